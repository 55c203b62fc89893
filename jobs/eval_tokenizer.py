"""Stage job: PSNR / SSIM / codebook usage / perplexity of the trained image tokenizer on the held-out shards.

    ray job submit --working-dir . -- python jobs/eval_tokenizer.py --pipeline pipelines/shapes-32.yaml

Takes the same flags as `visgen eval tokenizer` (see `--help`).
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("eval", "tokenizer"))
