"""Stage job: encode the ingested images with the frozen image tokenizer (a Ray Data actor pool) into the parquet token cache.

    ray job submit --working-dir . -- python jobs/token_cache.py --pipeline pipelines/shapes-32.yaml

Reuses an up-to-date cache; a cache made by another tokenizer is rebuilt (--force rebuilds anyway). Takes the same flags as `visgen data token-cache`.
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("data", "token-cache"))
