"""Serve pieces without Ray: the config section, request parsing, image checks and the batch line."""

from __future__ import annotations

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from visgen.config import SpecError, validate_section
from visgen.serve.config import ServeConfig, ServeLimits
from visgen.serve.model import Coalescer
from visgen.serve.inputs import (RequestError, body_kind, decode_base64, decode_image, parse_multipart, read_body,
                                 request_models, validate, wants_png)


def test_config_defaults_and_cross_field_rules():
    cfg = ServeConfig()
    assert cfg.model_uri == "models:/visgen@champion" and cfg.max_ongoing_requests > cfg.max_batch_size
    for bad, words in [({"max_batch_size": 64, "max_ongoing_requests": 64}, "greater than max_batch_size"),
                       ({"autoscaling": True, "min_replicas": 5, "max_replicas": 2}, "min_replicas"),
                       ({"route_prefix": "no-slash"}, "route_prefix"), ({"port": 0}, "port"),
                       ({"limits": {"max_image_bytes": 2 << 20, "max_body_bytes": 1 << 20}}, "max_image_bytes"),
                       ({"limits": {"image_formats": ["TIFF"]}}, "image_formats"), ({"batch_size": 4}, "unknown key")]:
        with pytest.raises(SpecError, match=words):
            validate_section(ServeConfig, bad, "serve")


def test_every_field_has_a_description():
    for cls in (ServeConfig, ServeLimits):
        assert all(f.description for f in cls.model_fields.values()), cls


def _png(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_checks_bytes_format_and_pixels_before_decoding():
    limits = ServeLimits(max_image_bytes=50_000, max_image_pixels=100 * 100, max_body_bytes=100_000)
    arr = decode_image(_png(40, 30), limits, resolution=16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and tuple(arr[0, 0]) == (200, 10, 10)
    assert decode_image(_png(20, 20, "JPEG"), limits).shape == (20, 20, 3)
    cases = [(_png(101, 100), 413, "pixels"), (_png(10, 10, "GIF"), 415, "accepted format"),
             (b"\0" * 50_001, 413, "bytes"), (b"", 400, "empty"), (_png(64, 64)[:100], 400, "could not be decoded")]
    for data, status, words in cases:
        with pytest.raises(RequestError, match=words) as err:
            decode_image(data, limits)
        assert err.value.status == status and err.value.field == "image"


def test_bodies_are_refused_as_soon_as_they_pass_the_limit():
    async def chunks(n):
        for _ in range(n):
            yield b"x" * 100

    assert asyncio.run(read_body(None, chunks(3), 300)) == b"x" * 300
    with pytest.raises(RequestError, match="exceeds the limit of 250") as err:
        asyncio.run(read_body(None, chunks(3), 250))  # no Content-Length: counted while streaming
    assert err.value.status == 413
    with pytest.raises(RequestError, match="has 10000 bytes"):
        asyncio.run(read_body("10000", chunks(0), 250))
    with pytest.raises(RequestError, match="not a number"):
        asyncio.run(read_body("ten", chunks(0), 250))


def test_multipart_base64_accept_and_content_type_parsing():
    body = (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n\xe4\xb8\x80\xe4\xb8\xaa\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n"
            b"\x89PNG\r\n\x00\x01\r\n--B--\r\n")
    form = parse_multipart(body, "multipart/form-data; boundary=B")
    assert form == {"prompt": "一个", "image": b"\x89PNG\r\n\x00\x01"}
    with pytest.raises(RequestError, match="boundary"):
        parse_multipart(body, "multipart/form-data")
    assert decode_base64("data:image/png;base64,aGk=", "image", 10) == b"hi"
    with pytest.raises(RequestError, match="limit is 10"):
        decode_base64("aGk=" * 20, "image", 10)
    assert wants_png("image/png") and wants_png("image/png, application/json")
    assert not wants_png("application/json, image/png") and not wants_png(None) and not wants_png("*/*")
    assert body_kind(None) == "json" and body_kind("multipart/form-data; boundary=x") == "multipart"
    with pytest.raises(RequestError) as err:
        body_kind("text/xml")
    assert err.value.status == 415


def test_request_models_carry_the_limits():
    models = request_models(ServeLimits(max_n=3, max_prompt_chars=10), grid_rows=4)
    assert validate(models["generate"], {"prompt": "hi", "n": "2"}).n == 2  # form strings are coerced
    with pytest.raises(RequestError) as err:
        validate(models["generate"], {"prompt": "hi", "n": 4})
    assert (err.value.status, err.value.field, err.value.limit) == (422, "n", 3)
    assert validate(models["generate"], {"prompt": "hi"}).candidates is None  # the model's default
    with pytest.raises(RequestError) as err:
        validate(models["generate"], {"prompt": "hi", "candidates": 17})
    assert (err.value.status, err.value.field, err.value.limit) == (422, "candidates", 16)
    assert validate(models["generate"], {"prompt": "hi", "object_temperature": 0}).object_temperature == 0.0
    with pytest.raises(RequestError) as err:
        validate(models["generate"], {"prompt": "hi", "object_temperature": -1})
    assert (err.value.status, err.value.field, err.value.limit) == (422, "object_temperature", 0.0)
    with pytest.raises(RequestError) as err:
        validate(models["generate"], {"prompt": "hi", "object_cfg_scale": 0.5})
    assert (err.value.status, err.value.field, err.value.limit) == (422, "object_cfg_scale", 1.0)
    assert validate(models["generate"], {"prompt": "hi", "object_min_p": 0.1}).object_min_p == 0.1
    with pytest.raises(RequestError) as err:
        validate(models["generate"], {"prompt": "hi", "object_min_p": 2})
    assert (err.value.status, err.value.field, err.value.limit) == (422, "object_min_p", 1.0)
    assert validate(models["caption"], {"image": "x"}).candidates is None
    assert validate(models["caption"], {"image": "x", "candidates": "8"}).candidates == 8  # a multipart field
    with pytest.raises(RequestError) as err:
        validate(models["caption"], {"image": "x", "candidates": 0})
    assert (err.value.status, err.value.field, err.value.limit) == (422, "candidates", 1)
    with pytest.raises(RequestError) as err:
        validate(models["edit"], {"prompt": "hi", "image": "x", "keep_rows": 5})
    assert (err.value.field, err.value.limit) == ("keep_rows", 4)


def test_caption_language_field_is_validated_with_the_allowed_values():
    from visgen.inference import CAPTION_LANGUAGES

    models = request_models(ServeLimits())
    assert validate(models["caption"], {"image": "x"}).language == "auto"
    assert validate(models["caption"], {"image": "x", "language": "zh"}).language == "zh"
    for bad in ("fr", "ZH", "", 3):
        with pytest.raises(RequestError) as err:
            validate(models["caption"], {"image": "x", "language": bad})
        e = err.value
        assert (e.status, e.field, e.limit) == (422, "language", list(CAPTION_LANGUAGES)), e.message
        assert repr(bad) in e.message and "'auto', 'en' or 'zh'" in e.message, e.message
    schema = models["caption"].model_json_schema()["properties"]["language"]
    assert schema["enum"] == list(CAPTION_LANGUAGES) and schema["default"] == "auto"


def test_the_replica_captions_each_job_in_its_own_language(tmp_path):
    """One model call for a batch of mixed languages; each answer as Model.caption gives it."""
    import re

    import numpy as np

    import visgen
    from bundles import make_bundle
    from visgen.serve.model import Served, VisgenModel

    pipe = visgen.Model.load(make_bundle(tmp_path), device="cpu")
    images = list(np.random.default_rng(3).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    langs = ["zh", "en", "auto", "zh", "en", "auto"]
    out = VisgenModel._run_caption(Served(pipe=pipe, info={"version": "7"}),
                                   [{"image": im, "language": lang} for im, lang in zip(images, langs)])
    assert [o["version"] for o in out] == ["7"] * 6 and all(o["batch"] == 6 for o in out)
    for o, im, lang in zip(out, images, langs):
        assert o["caption"] == pipe.caption(im, language=lang, seed=0)[0]
    assert not any(re.search(r"[A-Za-z]", o["caption"]) for o, lang in zip(out, langs) if lang == "zh")
    assert all(o["caption"].isascii() for o, lang in zip(out, langs) if lang == "en")
    # best of n per job: jobs asking for different counts in one batch, each as Model.caption gives it
    ks = [None, 4, 1, 4, 2, None]
    out = VisgenModel._run_caption(Served(pipe=pipe, info={"version": "7"}),
                                   [{"image": im, "language": lang, "seed": 5, "candidates": k}
                                    for im, lang, k in zip(images, langs, ks)])
    assert [o["caption"] for o in out] == [pipe.caption(im, language=lang, seed=5, candidates=k)[0]
                                           for im, lang, k in zip(images, langs, ks)]


def test_the_replica_refuses_object_temperature_per_job_on_a_model_without_a_background(tmp_path):
    """A job the model refuses gets its own 422; the others of its batch are drawn as Model.generate draws them."""
    import json
    import shutil

    import numpy as np

    import visgen
    from bundles import make_bundle
    from visgen.serve.model import Served, VisgenModel

    plain = make_bundle(tmp_path / "a")
    with_bg = shutil.copytree(plain, tmp_path / "bg")
    m = json.loads((with_bg / "manifest.json").read_text())
    (with_bg / "manifest.json").write_text(json.dumps({**m, "background_code": {"code": 2, "share": 0.6}}))
    jobs = [{"prompt": "a red circle", "n": 1, "seed": 3}, {"prompt": "a blue star", "n": 2, "seed": 4, "object_temperature": 0.0},
            {"prompt": "two squares", "n": 1, "seed": 5, "object_temperature": 0.5, "object_cfg_scale": 1.5}]
    pipe = visgen.Model.load(plain, device="cpu")
    out = VisgenModel._run_generate(Served(pipe=pipe, info={"version": "7"}), jobs)
    assert [o.get("status") for o in out] == [None, 422, 422]
    assert "needs a background code" in out[1]["error"] and out[1]["version"] == "7"
    assert out[0]["batch"] == 1 and len(out[0]["images"]) == 1
    pipe = visgen.Model.load(with_bg, device="cpu")
    out = VisgenModel._run_generate(Served(pipe=pipe, info={"version": "7"}), jobs)
    assert all("images" in o and o["batch"] == 3 for o in out)
    from visgen.serve.inputs import encode_png

    for o, j in zip(out, jobs):
        want = pipe.generate(j["prompt"], n=j["n"], seed=j["seed"], object_temperature=j.get("object_temperature"),
                             object_cfg_scale=j.get("object_cfg_scale"))
        assert o["images"] == [encode_png(w) for w in want]
    assert out[1]["images"] != [encode_png(w) for w in pipe.generate("a blue star", n=2, seed=4)]


def _recording_model(calls: list[list[int]], delay_s: float = 0.05, fail_on: int | None = None):
    def call(jobs: list[dict]) -> list[dict]:
        calls.append([j["i"] for j in jobs])
        time.sleep(delay_s)
        if fail_on is not None and fail_on in calls[-1]:
            raise RuntimeError(f"job {fail_on} broke the call")
        return [{"out": j["i"] * 10} for j in jobs]
    return call


def test_coalescer_merges_what_waits_while_the_model_is_busy():
    """Serve cuts a batch per wait window; whatever queued during a model call goes in the next one."""
    calls: list[list[int]] = []
    line = Coalescer(_recording_model(calls), max_size=4)

    async def main():
        first = asyncio.create_task(line.run([{"i": 0}]))
        await asyncio.sleep(0.01)  # the model is now busy with job 0
        rest = [asyncio.create_task(line.run([{"i": i}])) for i in range(1, 7)]  # six one-job "batches"
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == [{"out": 0}] and [r[0]["out"] for r in rest] == [10, 20, 30, 40, 50, 60]
    assert calls == [[0], [1, 2, 3, 4], [5, 6]]  # oldest first, never more than max_size per call


def test_coalescer_failure_answers_every_job_of_that_call_and_the_line_goes_on():
    calls: list[list[int]] = []
    line = Coalescer(_recording_model(calls, fail_on=2), max_size=8)

    async def main():
        first = asyncio.create_task(line.run([{"i": 0}]))
        await asyncio.sleep(0.01)
        broken = [asyncio.create_task(line.run([{"i": i}])) for i in (1, 2)]
        await asyncio.gather(first, *broken, return_exceptions=True)
        return [t.exception() for t in broken], await line.run([{"i": 3}])

    errors, after = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "job 2" in str(e) for e in errors)
    assert after == [{"out": 30}] and calls == [[0], [1, 2], [3]]


def test_coalescer_finishes_a_call_whose_caller_was_cancelled():
    """A client that goes away must not strand the jobs that rode along in its model call."""
    calls: list[list[int]] = []
    line = Coalescer(_recording_model(calls, delay_s=0.1), max_size=8)

    async def main():
        busy = asyncio.create_task(line.run([{"i": 0}]))
        await asyncio.sleep(0.01)
        leaver = asyncio.create_task(line.run([{"i": 1}]))
        stayer = asyncio.create_task(line.run([{"i": 2}]))
        await busy  # the leaver now runs [1, 2] for both
        await asyncio.sleep(0.02)
        leaver.cancel()
        return await asyncio.wait_for(stayer, 5)

    assert asyncio.run(main()) == [{"out": 20}]
    assert calls == [[0], [1, 2]]  # answered by the call already running: no repeat, no empty call


def test_coalescer_answers_every_job_even_when_the_model_returns_too_few_results():
    line = Coalescer(lambda jobs: [{"out": 0}], max_size=8)

    async def main():
        return await asyncio.gather(line.run([{"i": 1}, {"i": 2}]), return_exceptions=True)

    (err,) = asyncio.run(asyncio.wait_for(main(), 5))
    assert isinstance(err, RuntimeError) and "1 results for 2 jobs" in str(err)


class PublicOnly:
    """A model seen through its public names only, recording every reach for a ``_`` name."""

    def __init__(self, pipe, reached: list[str]):
        object.__setattr__(self, "_target", pipe)
        object.__setattr__(self, "_reached", reached)

    def __getattr__(self, name):  # only names the proxy itself lacks get here
        if name.startswith("_"):
            object.__getattribute__(self, "_reached").append(name)
            raise AttributeError(f"Serve reached into the model's private {name!r}; ask Model for a public method")
        return getattr(object.__getattribute__(self, "_target"), name)


def test_public_only_records_a_private_reach():
    reached: list[str] = []
    proxy = PublicOnly(type("P", (), {"_sampling": 1, "sampling": 2})(), reached)
    assert proxy.sampling == 2
    with pytest.raises(AttributeError, match="_sampling"):
        proxy._sampling
    assert getattr(proxy, "_other", None) is None and reached == ["_sampling", "_other"]


def test_the_replica_uses_only_the_public_model(tmp_path):
    """Load, info, generate, caption and edit through a model that refuses its private names;
    generate answers each job as Model.generate_many answers it alone."""
    import visgen
    from bundles import make_bundle
    from visgen.inference import GenerationRequest
    from visgen.serve.model import VisgenModel

    pipe = visgen.Model.load(make_bundle(tmp_path), device="cpu")
    reached: list[str] = []
    model = VisgenModel(ServeConfig(poll_interval_s=0).model_dump(mode="json"), None,
                        loader=lambda uri, tracking_uri, device: (PublicOnly(pipe, reached), {"version": "7"}),
                        probe=lambda uri, tracking_uri: None)
    info = model.info()
    assert info["version"] == "7" and info["grid"] == list(pipe.grid) and info["sampling"] == pipe.sampling.model_dump()
    jobs = [{"prompt": "a red circle", "n": 2, "seed": 3}, {"prompt": "a blue square", "n": 1, "seed": 9, "temperature": 0.0}]
    out = VisgenModel._run_generate(model._served, jobs)
    want = pipe.generate_many([GenerationRequest("a red circle", n=2, seed=3),
                               GenerationRequest("a blue square", seed=9, temperature=0.0)])
    for result, images in zip(out, want):
        assert result["version"] == "7" and result["batch"] == 2
        got = [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in result["images"]]
        assert len(got) == len(images) and all(np.array_equal(a, b) for a, b in zip(got, images))
    image = np.zeros((16, 16, 3), np.uint8)
    (caption,) = VisgenModel._run_caption(model._served, [{"image": image, "language": "en"}])
    assert caption["caption"] == pipe.caption(image, language="en")[0]
    (edited,) = VisgenModel._run_edit(model._served, [{"image": image, "prompt": "a star", "keep_rows": 2, "seed": 1}])
    assert edited["version"] == "7" and len(edited["images"]) == 1
    assert reached == []


def _asgi_call(app, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request through an ASGI app without a server: (status, headers, body)."""
    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("test", 80), "client": ("test", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def test_the_ingress_is_a_module_class_configured_through_init():
    """Ingress and its routes work without Serve: the routes hand each request to the Ingress
    they are given, which holds the handle and the configured limits."""
    import json

    from visgen.serve.app import Ingress, http_api

    class Handle:  # the model deployment: each method answers .remote(...) with an awaitable
        def __init__(self):
            self.jobs: list[dict] = []

        def __getattr__(self, method):
            def remote(*args):
                self.jobs.extend(args)
                answer = {"generate": {"images": [b"png"], "version": "3"},
                          "info": {"version": "3", "grid": [4, 4], "resolution": 16}}[method]

                class Response:
                    def __await__(self):
                        async def value():
                            return answer
                        return value().__await__()

                    def cancel(self):
                        pass

                return Response()
            return type("Method", (), {"remote": staticmethod(remote)})()

    cfg = ServeConfig(limits=ServeLimits(max_n=3))
    handle = Handle()
    ingress = Ingress(handle, cfg.model_dump(mode="json"))
    assert ingress.cfg == cfg and ingress.limits.max_n == 3
    api = http_api(cfg, find_ingress=lambda: ingress)
    schema = api.openapi()["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["n"]["maximum"] == 3  # the docs show the configured limits
    status, headers, body = _asgi_call(api, "POST", "/v1/generate", json.dumps({"prompt": "a red circle", "n": 2}).encode(),
                                       {"content-type": "application/json"})
    assert status == 200 and headers["x-model-version"] == "3" and "x-request-id" in headers
    assert json.loads(body)["images"][0]["seed"] == 0 and handle.jobs[-1]["n"] == 2
    status, _, body = _asgi_call(api, "POST", "/v1/generate", json.dumps({"prompt": "x", "n": 4}).encode(),
                                 {"content-type": "application/json"})
    assert status == 422 and json.loads(body)["error"]["limit"] == 3
    status, _, body = _asgi_call(api, "GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "version": "3"}


def test_replica_warm_up_follows_the_config(tmp_path):
    """compile_decode / warmup: 'auto' on a CPU replica neither compiles nor warms; true compiles the
    decode steps and generates + captions at batch 1 and max_batch_size before taking traffic."""
    import visgen
    from bundles import make_bundle
    from visgen.serve.model import VisgenModel

    pipe = visgen.Model.load(make_bundle(tmp_path), device="cpu")
    compiled: list[bool] = []
    pipe.lm.compile_decode = lambda *a, **k: compiled.append(True)  # the real one takes minutes on a CPU

    def replica(**cfg):
        return VisgenModel(ServeConfig(poll_interval_s=0, max_batch_size=3, **cfg).model_dump(mode="json"), None,
                           loader=lambda uri, tracking_uri, device: (pipe, {"version": "7"}),
                           probe=lambda uri, tracking_uri: None)

    assert "warmup_s" not in replica().info() and compiled == []
    info = replica(compile_decode=True).info()  # warmup 'auto' follows the compilation
    assert compiled == [True]
    assert set(info["warmup_s"]) == {"generate@1", "caption@1", "generate@3", "caption@3"}
    assert all(t > 0 for t in info["warmup_s"].values())
    assert "warmup_s" in replica(warmup=True).info() and compiled == [True]
    with pytest.raises(ValueError, match="compile_decode"):
        ServeConfig(compile_decode="always")
