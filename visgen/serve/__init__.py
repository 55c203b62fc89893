"""Ray Serve endpoints for the registered model: :func:`build_app` builds the application from a
:class:`ServeConfig`; nothing is started or loaded at import."""

from visgen.serve.config import ServeConfig, ServeLimits

__all__ = ["ServeConfig", "ServeLimits", "build_app", "run", "app_builder"]


def __getattr__(name: str):
    # Ray Serve and FastAPI are imported only by code that builds an app.
    if name in ("build_app", "run", "app_builder"):
        from visgen.serve import app  # Ray Serve, FastAPI: only building an app needs them

        return getattr(app, name)
    raise AttributeError(f"module 'visgen.serve' has no attribute {name!r}")
