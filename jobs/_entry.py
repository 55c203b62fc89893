"""Shared by the job scripts: make the repo importable when submitted with `--working-dir .`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(*command: str) -> int:
    """``visgen <command...> <argv>``: a job accepts exactly the flags of its CLI command."""
    from visgen.cli import main

    return main([*command, *sys.argv[1:]])
