"""visgen: train and serve a text <-> image "LLM visual generation" model on Ray.

Importing the package is cheap and has no side effects; heavy modules (ray, torch, mlflow)
are imported by the submodules that need them.
"""

import warnings

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``visgen.Model`` without importing torch at ``import visgen``.
    if name in ("Model", "Pipeline"):
        from visgen.inference import Model  # torch: ``import visgen`` stays cheap

        if name == "Pipeline":
            warnings.warn("visgen.Pipeline is deprecated: use visgen.Model (visgen.inference)", DeprecationWarning, stacklevel=2)
        return Model
    raise AttributeError(f"module 'visgen' has no attribute {name!r}")
