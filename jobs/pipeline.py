"""The main job: shards -> text tokenizer -> ingest -> image tokenizer (Ray Train) -> evaluation.

    ray job submit --working-dir . -- python jobs/pipeline.py --pipeline pipelines/shapes-32.yaml

`make demo` runs it on the embedded defaults (local Ray, sqlite MLflow, generated shards).
Takes the same flags as `visgen run` (see `--help`).
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("run"))
