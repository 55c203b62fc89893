"""Stage job: train the text tokenizer over the shard captions.

    ray job submit --working-dir . -- python jobs/text_tokenizer.py --pipeline pipelines/shapes-32.yaml

Takes the same flags as `visgen data tokenizer` (see `--help`).
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("data", "tokenizer"))
