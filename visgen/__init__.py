"""visgen: train and serve a text <-> image "LLM visual generation" model on Ray.

Importing the package is cheap and has no side effects; heavy modules (ray, torch, mlflow)
are imported by the submodules that need them.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``visgen.Pipeline`` without importing torch at ``import visgen``.
    if name == "Pipeline":
        from visgen.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'visgen' has no attribute {name!r}")
