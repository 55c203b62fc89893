"""Stage job: one ingest pass (kept / quarantined counts).

    ray job submit --working-dir . -- python jobs/ingest.py --pipeline pipelines/shapes-32.yaml

Takes the same flags as `visgen data ingest` (see `--help`).
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("data", "ingest"))
