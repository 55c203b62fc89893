"""Stage job: generate the shapes shards.

    ray job submit --working-dir . -- python jobs/synth.py --pipeline pipelines/shapes-32.yaml

Takes the same flags as `visgen data synth` (see `--help`).
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("data", "synth"))
