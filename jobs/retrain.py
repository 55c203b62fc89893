"""Scheduled retraining: continue the champion on shards it has not seen, behind an evaluation gate.

    ray job submit --submission-id visgen-retrain-$(date +%Y%m%d%H) --working-dir . -- \
        python jobs/retrain.py --pipeline pipelines/shapes-64-gpu.yaml

Nothing new → exits 0 and says so. A second retrain while one runs exits 0 without running (a
lock under the workdir); the deterministic submission id also stops a schedule from submitting
the same slot twice. Takes the same flags as `visgen retrain`.
"""

import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.run("retrain"))
