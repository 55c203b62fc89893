"""Stage job: train the text <-> image transformer on Ray Train and write the model bundle.

    ray job submit --working-dir . -- python jobs/train_lm.py --pipeline pipelines/shapes-32.yaml

Re-submitting with the same --run-name resumes from the run's latest checkpoint. Takes the same flags as `visgen train lm`.
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("train", "lm"))
