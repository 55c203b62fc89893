"""Stage job: train the VQ image tokenizer on Ray Train.

    ray job submit --working-dir . -- python jobs/train_tokenizer.py --pipeline pipelines/shapes-32.yaml --steps 2000

Re-submitting with the same --run-name resumes from the run's latest checkpoint. Takes the same
flags as `visgen train tokenizer` (see `--help`).
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("train", "tokenizer"))
