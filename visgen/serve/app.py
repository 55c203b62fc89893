"""The Serve application: a FastAPI ingress in front of the model deployment.

    from visgen.serve import ServeConfig, build_app, run
    app = build_app(ServeConfig(), tracking_uri="sqlite:///work/shapes-32/mlflow.db")
    serve.run(app, route_prefix="/")            # or run(cfg, tracking_uri) / `visgen serve --pipeline ...`

Endpoints (under the route prefix)::

    GET  /              playground page
    GET  /healthz       {"status": "ok", "version": ...}
    GET  /v1/model      name, version, aliases, eval scores, sampling defaults, resolution
    POST /v1/generate   {prompt, n, seed, cfg_scale, temperature, top_k, top_p, object_temperature,
                         object_cfg_scale, object_min_p, candidates}
                        -> base64 PNGs (or image/png)
    POST /v1/caption    image (multipart field "image", or JSON {"image": base64}) + language (auto | en | zh)
                        + candidates -> caption
    POST /v1/edit       image + prompt + keep_rows (+ sampling) -> base64 PNG (or image/png)
    GET  /docs, /openapi.json

Every response carries ``X-Request-Id`` (the caller's, or a new one) and, once a model answered,
``X-Model-Version``. Bad input is a 4xx JSON error ``{"error": {"status", "field", "message",
"limit"}, "request_id"}``; nothing here builds or runs anything at import.

Two parts make the ingress: :class:`Ingress`, which does the work of each endpoint and is
configured through ``__init__`` (the model's handle, the ``serve`` section), and
:func:`http_api`, the FastAPI app whose routes document the configured limits and pass each
request to the replica's ``Ingress``. :func:`build_app` joins them with ``serve.ingress``.
"""

import asyncio
import base64
import hmac
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.context import _get_serve_request_context
from ray.serve.handle import DeploymentHandle

from visgen.base import SpecError, validate_section
from visgen.data.images import ImagePrep
from visgen.serve.config import ServeConfig
from visgen.serve.inputs import (RequestError, body_kind, decode_base64, decode_image, parse_json, parse_multipart,
                                 read_body, request_id, request_models, validate, wants_png)
from visgen.serve.model import Loader, Probe, VisgenModel
from visgen.serve.playground import playground_html
from visgen.tracking import resolve_tracking_uri

log = logging.getLogger("ray.serve")

VERSION_HEADER, REQUEST_ID_HEADER = "X-Model-Version", "X-Request-Id"


class Ingress:
    """HTTP in front of the model deployment: auth, limits, decoding, timeouts, response formats.

    Configured through ``__init__``: the model deployment's handle and the ``serve`` section as a
    dict. Each route of :func:`http_api` hands its request to one method here; :func:`build_app`
    joins the two into the ingress deployment.
    """

    def __init__(self, model: DeploymentHandle, cfg_dict: dict):
        self.model, self.cfg = model, ServeConfig.model_validate(cfg_dict)
        self.limits = self.cfg.limits
        self.schemas = request_models(self.limits)
        self._grid_rows: int | None = None  # learnt from the model's info, for the keep_rows limit
        self._resolution: int | None = None
        self._prep: ImagePrep | None = None  # the bundle's image preprocessing (None: ingest's defaults)

    # -- routes ----------------------------------------------------------------------------------
    async def page(self) -> HTMLResponse:
        return HTMLResponse(playground_html(self.cfg.route_prefix, self.limits.max_prompt_chars, self.limits.max_n,
                                            self.limits.max_candidates))

    async def healthz(self, request: Request) -> Response:
        info = await self._info()
        return JSONResponse({"status": "ok", "version": info["version"]}, headers={VERSION_HEADER: str(info["version"])})

    async def model_info(self, request: Request) -> Response:
        self._authorize(request)
        info = await self._info()
        body = {k: info.get(k) for k in ("name", "version", "aliases", "eval", "model_uri", "resolution", "grid",
                                          "image_prep", "sampling", "loaded_at", "reload_error", "replica")}
        body["limits"] = self.limits.model_dump(mode="json")
        return JSONResponse(body, headers={VERSION_HEADER: str(info["version"])})

    async def generate(self, request: Request) -> Response:
        self._authorize(request)
        if body_kind(request.headers.get("content-type")) != "json":
            raise RequestError(415, "Content-Type", "send the generate request as application/json",
                               ["application/json"])
        body = await read_body(request.headers.get("content-length"), request.stream(), self.limits.max_body_bytes)
        req = validate(self.schemas["generate"], parse_json(body))
        if wants_png(request.headers.get("accept")) and req.n != 1:
            raise RequestError(406, "n", f"n: {req.n} images cannot be one image/png response; ask for n=1 or "
                               "Accept: application/json", 1)
        result = self._result(await self._call(self.model.generate.remote(req.model_dump())))
        return self._images(request, result, req.seed)

    async def caption(self, request: Request) -> Response:
        self._authorize(request)
        req, data = await self._form(request, self.schemas["caption"])
        if self._resolution is None:
            await self._info()
        image = decode_image(data, self.limits, "image", resolution=self._resolution, prep=self._prep)
        result = self._result(await self._call(self.model.caption.remote({"image": image, "language": req.language,
                                                                            "candidates": req.candidates})))
        return JSONResponse({"caption": result["caption"], "version": result["version"],
                             "request_id": request.state.rid}, headers={VERSION_HEADER: str(result["version"])})

    async def edit(self, request: Request) -> Response:
        self._authorize(request)
        req, data = await self._form(request, self.schemas["edit"])
        if self._grid_rows is None:
            await self._info()
        if req.keep_rows > self._grid_rows:
            raise RequestError(422, "keep_rows", f"keep_rows: {req.keep_rows} is not allowed: the image has "
                               f"{self._grid_rows} token rows", self._grid_rows)
        image = decode_image(data, self.limits, "image", resolution=self._resolution, prep=self._prep)
        job = {**req.model_dump(), "image": image}
        result = self._result(await self._call(self.model.edit.remote(job)))
        return self._images(request, result, req.seed)

    # -- plumbing --------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        token = os.environ.get(self.cfg.token_env, "")
        if not token:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise RequestError(401, "Authorization", "missing or wrong bearer token (send Authorization: Bearer <token>)")

    async def _call(self, response, timeout_s: float | None = None) -> dict:
        timeout_s = timeout_s or self.cfg.request_timeout_s

        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestError(504, "request", f"the model did not answer within {timeout_s:g} s", timeout_s) from None

    async def _info(self) -> dict:
        info = await self._call(self.model.info.remote(), timeout_s=min(10.0, self.cfg.request_timeout_s))
        self._grid_rows, self._resolution = info["grid"][0], info["resolution"]
        self._prep = ImagePrep.model_validate(info["image_prep"]) if info.get("image_prep") else None
        return info

    async def _form(self, request: Request, model) -> tuple[Any, bytes | None]:
        """(validated fields, image bytes or None) from a JSON or multipart body."""
        kind = body_kind(request.headers.get("content-type"))
        body = await read_body(request.headers.get("content-length"), request.stream(), self.limits.max_body_bytes)
        if kind == "json":
            data = parse_json(body)
            if isinstance(data, dict) and isinstance(data.get("image"), str):
                return validate(model, data), decode_base64(data["image"], "image", self.limits.max_image_bytes)
            return validate(model, data), None
        form = parse_multipart(body, request.headers["content-type"])
        image = form.pop("image", None)
        if isinstance(image, str):  # a text field named image: treat as base64
            image = decode_base64(image, "image", self.limits.max_image_bytes)
        if image is None:
            raise RequestError(422, "image", "image: required field is missing (a multipart file part named 'image')")
        fields = {k: v for k, v in form.items()}
        return validate(model, {**fields, "image": "multipart"}), image

    def _result(self, result: dict) -> dict:
        if "error" in result:
            status = result.get("status", 500)
            raise RequestError(status, "request" if status >= 500 else "model", result["error"])
        return result

    def _images(self, request: Request, result: dict, seed: int) -> Response:
        headers = {VERSION_HEADER: str(result["version"])}
        if wants_png(request.headers.get("accept")):
            return Response(result["images"][0], media_type="image/png", headers=headers)
        return JSONResponse({"version": result["version"], "request_id": request.state.rid,
                             "images": [{"seed": seed + j, "png_base64": base64.b64encode(png).decode("ascii")}
                                        for j, png in enumerate(result["images"])]}, headers=headers)


async def _replica_ingress() -> Ingress:
    """The :class:`Ingress` of the replica serving this request (a FastAPI dependency)."""
    return serve.get_replica_context().servable_object


def http_api(cfg: ServeConfig, find_ingress: Callable[[], Any] | None = None) -> FastAPI:
    """The ingress's FastAPI app for ``cfg``: routes (their documented bodies show ``cfg.limits``),
    the error format and request ids. Each route hands its request to the :class:`Ingress` that
    ``find_ingress`` returns: by default the Serve replica's own; tests pass theirs."""
    schemas = request_models(cfg.limits)
    api = FastAPI(title="visgen", version="1", description="Text -> image generation, captioning and editing "
                  "with the registered visgen model. Errors: {error: {status, field, message, limit}, request_id}.")

    def json_body(model) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    def image_body(model) -> dict:
        form = {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP file"},
            **{k: v for k, v in model.model_json_schema()["properties"].items() if k != "image"}}}
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": model.model_json_schema()}, "multipart/form-data": {"schema": form}}}}

    png_response = {"200": {"content": {"image/png": {}, "application/json": {}},
                            "description": "base64 PNGs as JSON, or one image/png when Accept asks for it"}}
    this = Depends(find_ingress or _replica_ingress)

    @api.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        rid = getattr(request.state, "rid", "-")
        log.info("rid=%s %s %s refused %d: %s", rid, request.method, request.url.path, err.status, err.message)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(rid), status_code=err.status, headers=headers)

    @api.middleware("http")
    async def with_request_id(request: Request, call_next):
        # Serve's proxy already gives each request an id (the caller's X-Request-Id when sent), puts it
        # on every replica log line and returns it as a header; outside a proxy, make one here.
        serve_rid = _serve_request_id()
        rid = serve_rid or request_id(request.headers.get(REQUEST_ID_HEADER), uuid.uuid4().hex)
        request.state.rid = rid
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as err:  # noqa: BLE001 - an unexpected failure is a 500 with the id, never a dropped connection
            log.exception("rid=%s %s %s failed", rid, request.method, request.url.path)
            response = JSONResponse({"error": {"status": 500, "field": None, "message": f"internal error ({type(err).__name__})",
                                               "limit": None}, "request_id": rid}, status_code=500)
        if serve_rid is None:
            response.headers[REQUEST_ID_HEADER] = rid
        log.info("rid=%s %s %s %d %.1f ms", rid, request.method, request.url.path, response.status_code,
                 1000 * (time.perf_counter() - t0))
        return response

    @api.get("/", include_in_schema=False)
    async def page(ingress: Ingress = this) -> HTMLResponse:
        return await ingress.page()

    @api.get("/healthz", summary="Liveness: the model deployment answers")
    async def healthz(request: Request, ingress: Ingress = this):
        return await ingress.healthz(request)

    @api.get("/v1/model", summary="The served model: name, version, aliases, eval scores, sampling defaults")
    async def model_info(request: Request, ingress: Ingress = this):
        return await ingress.model_info(request)

    @api.post("/v1/generate", summary="Text -> images", openapi_extra=json_body(schemas["generate"]),
              responses=png_response)
    async def generate(request: Request, ingress: Ingress = this):
        return await ingress.generate(request)

    @api.post("/v1/caption", summary="Image -> text", openapi_extra=image_body(schemas["caption"]))
    async def caption(request: Request, ingress: Ingress = this):
        return await ingress.caption(request)

    @api.post("/v1/edit", summary="Image + prompt -> image (rows below keep_rows redrawn)",
              openapi_extra=image_body(schemas["edit"]), responses=png_response)
    async def edit(request: Request, ingress: Ingress = this):
        return await ingress.edit(request)

    return api


def _serve_request_id() -> str | None:
    """Serve's own id of the current request (what its replica logs show), when there is one."""
    try:
        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - a private API: absent in some versions
        return None


# How often a stopping replica (app deleted or redeployed, scaled down, replaced) checks whether
# its requests are done, first after this long: Serve's default, 2 s, makes even an idle replica
# take 2 s to stop (and `serve.delete` wait 3 s). In-flight requests still get up to
# graceful_shutdown_timeout_s (Serve's default, 20 s) to finish.
SHUTDOWN_CHECK_S = 0.5


def build_app(cfg: ServeConfig, tracking_uri: str | None = None, *, loader: Loader | None = None,
              probe: Probe | None = None, runtime_env: dict | None = None) -> serve.Application:
    """The Serve application for ``cfg``: ``Ingress`` (FastAPI) → ``VisgenModel``.

    ``tracking_uri`` is the MLflow store holding the registered model (needed for ``models:/``
    URIs). ``loader`` / ``probe`` replace how a model is loaded and how an alias is resolved
    (tests); ``runtime_env`` is given to both deployments' actors (e.g. env vars).
    """
    actor_env = {"runtime_env": runtime_env} if runtime_env else {}
    scaling: dict[str, Any]
    if cfg.autoscaling:
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": cfg.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": cfg.num_replicas}
    model = serve.deployment(VisgenModel, name="VisgenModel").options(
        max_ongoing_requests=cfg.max_ongoing_requests, health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s, graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S,
        ray_actor_options={"num_cpus": cfg.model_num_cpus, "num_gpus": cfg.model_num_gpus, **actor_env}, **scaling)
    # The routes are built per app (their docs show the configured limits); the class is the module's.
    ingress = serve.deployment(serve.ingress(http_api(cfg))(Ingress), name="Ingress").options(
        num_replicas=cfg.ingress_replicas,
        # The ingress holds requests while the model works on them: allow every model slot plus a margin.
        max_ongoing_requests=max(cfg.max_ongoing_requests * (cfg.max_replicas if cfg.autoscaling else cfg.num_replicas), 100),
        graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S, ray_actor_options={"num_cpus": cfg.ingress_num_cpus, **actor_env})
    cfg_dict = cfg.model_dump(mode="json")
    return ingress.bind(model.bind(cfg_dict, tracking_uri, loader, probe), cfg_dict)


def _spec_path(path: str) -> str:
    """A relative spec path as given, else relative to the repository holding this package (``serve
    deploy`` builds the app in a process whose working directory is not the repository)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    repo = Path(__file__).resolve().parents[2]
    return str(repo / p) if (repo / p).exists() else str(p)


def app_builder(args: dict) -> serve.Application:
    """Entry for ``serve deploy`` / ``serve run`` (``import_path: visgen.serve.app:app_builder``).

    ``args``: ``pipeline`` (a spec path; its ``serve:`` section and tracking store are used) and
    ``serve`` (field overrides, e.g. ``{"max_batch_size": 8}``).
    """
    args = dict(args or {})
    unknown = set(args) - {"pipeline", "serve", "tracking_uri"}
    if unknown:
        raise SpecError(f"serve app args {sorted(unknown)} are unknown; allowed: pipeline, serve, tracking_uri")
    base: dict = {}
    tracking_uri = args.get("tracking_uri")
    if args.get("pipeline"):
        from visgen.config import load_spec  # the spec imports torch; only an app built from a pipeline file reads one

        spec = load_spec(_spec_path(args["pipeline"]))
        section = getattr(spec, "serve", None)
        base = section.model_dump() if section is not None else {}
        tracking_uri = tracking_uri or resolve_tracking_uri(spec.tracking, spec.workdir)
    cfg = validate_section(ServeConfig, {**base, **(args.get("serve") or {})}, "serve")
    return build_app(cfg, tracking_uri)


def run(cfg: ServeConfig, tracking_uri: str | None, blocking: bool = True) -> DeploymentHandle:
    """Start Serve on ``cfg.host:cfg.port`` and deploy the app (what ``visgen serve`` calls)."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(build_app(cfg, tracking_uri), name=cfg.app_name, route_prefix=cfg.route_prefix,
                       blocking=blocking)
    return handle
