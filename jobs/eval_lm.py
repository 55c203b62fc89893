"""Stage job: GenEval-shapes (text -> image) and caption accuracy (image -> text) of the model bundle.

    ray job submit --working-dir . -- python jobs/eval_lm.py --pipeline pipelines/shapes-32.yaml

Writes <workdir>/eval/lm.json and the bundle's eval.json and logs to MLflow. Takes the same flags as `visgen eval lm`.
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("eval", "lm"))
