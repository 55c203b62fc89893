"""The Serve app over real HTTP on loopback: every endpoint, the bad-input table, auth, hot reload.

One app for the module (tiny random-init bundles registered in a sqlite MLflow store, the
champion served); the bearer token is switched on through the replicas' environment.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

import visgen
from visgen.data.images import ImagePrep
from visgen.registry import Registry
from visgen.serve import ServeConfig, ServeLimits, build_app
from visgen.tracking import TrackingConfig

from bundles import make_bundle
from net import free_port

TOKEN = "test-token-123"
EVAL = {"geneval_overall": 0.5, "caption_exact": 0.125}
PREP_A = ImagePrep(resolution=16, resize_mode="pad", pad_color=(10, 20, 30))


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory, fresh_mlflow_db):
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    fresh_mlflow_db(root)
    # version 1 records letterboxing (not ingest's default crop): uploads must be made square its way
    bundles = (make_bundle(root / "a", seed=0, eval_results=EVAL, image_prep=PREP_A),
               make_bundle(root / "b", seed=1))
    reg = Registry.from_config(TrackingConfig(experiment="serve-test", tracking_uri=f"sqlite:///{root}/mlflow.db"),
                               root / "work")
    v1, v2 = (reg.register(b).version for b in bundles)
    reg.promote(v1)
    port = free_port()
    cfg = ServeConfig(port=port, model_num_cpus=0, ingress_num_cpus=0, poll_interval_s=0.5, max_batch_size=8,
                      batch_wait_timeout_s=0.05, max_ongoing_requests=32, request_timeout_s=60,
                      token_env="VISGEN_TEST_SERVE_TOKEN",
                      limits=ServeLimits(max_body_bytes=300_000, max_image_bytes=200_000, max_image_pixels=512 * 512,
                                         max_prompt_chars=100, max_n=4, max_cfg_scale=10.0))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, reg.tracking_uri, runtime_env={"env_vars": {"VISGEN_TEST_SERVE_TOKEN": TOKEN}}),
              name="visgen-test", route_prefix="/")
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield {"url": f"http://127.0.0.1:{port}", "http": session, "reg": reg, "versions": (v1, v2), "bundles": bundles,
           "cfg": cfg}
    serve.delete("visgen-test")
    serve.shutdown()


def _png(size: int = 16, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A few hundred bytes whose header claims width x height pixels (decoding would need gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


@pytest.fixture(scope="module")
def pipes(env):
    return [visgen.Model.load(b, device="cpu") for b in env["bundles"]]


def test_health_model_info_docs_and_page(env):
    url, http = env["url"], env["http"]
    r = http.get(url + "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "version": "1"} and r.headers["X-Model-Version"] == "1"
    info = http.get(url + "/v1/model").json()
    assert info["name"] == "visgen" and info["version"] == "1" and "champion" in info["aliases"]
    assert info["eval"] == {"geneval_overall": "0.5", "caption_exact": "0.125"}
    assert info["resolution"] == 16 and info["grid"] == [8, 8] and info["limits"]["max_n"] == 4
    assert info["image_prep"] == PREP_A.model_dump(mode="json")  # how the ingress makes uploads square
    spec = requests.get(url + "/openapi.json").json()
    assert {"/v1/generate", "/v1/caption", "/v1/edit", "/v1/model", "/healthz"} <= set(spec["paths"])
    gen_schema = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert gen_schema["properties"]["n"]["maximum"] == 4  # the docs show the configured limits
    assert requests.get(url + "/docs").status_code == 200
    page = requests.get(url + "/")  # no token needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for call in ('call("v1/generate"', 'call("v1/caption"', 'call("v1/model"', 'const BASE = "/"',
                 '<select id="cap-language">', 'form.append("language"', 'form.append("candidates"',
                 'body.candidates = ', 'id="gen-candidates" min="1" max="16"'):
        assert call in page.text
    cap_schema = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert cap_schema["properties"]["language"]["enum"] == ["auto", "en", "zh"]


def test_generate_matches_the_pipeline_and_answers_png(env, pipes):
    url, http = env["url"], env["http"]
    r = http.post(url + "/v1/generate", json={"prompt": "a red circle left of a blue square", "n": 2, "seed": 5,
                                              "cfg_scale": 2.0, "top_k": 50})
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "1"
    body = r.json()
    assert body["version"] == "1" and [im["seed"] for im in body["images"]] == [5, 6]
    want = pipes[0].generate("a red circle left of a blue square", n=2, seed=5, cfg_scale=2.0, top_k=50)
    for got, ref in zip(body["images"], want):
        np.testing.assert_array_equal(_decode(got["png_base64"]), ref)
    # best of 3 per image, as Model.generate(candidates=3) draws it
    r = http.post(url + "/v1/generate", json={"prompt": "a white star", "n": 2, "seed": 9, "candidates": 3})
    want = pipes[0].generate("a white star", n=2, seed=9, candidates=3)
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    for got, ref in zip(r.json()["images"], want):
        np.testing.assert_array_equal(_decode(got["png_base64"]), ref)
    r = http.post(url + "/v1/generate", json={"prompt": "两个绿色的三角形", "seed": 1}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), pipes[0].generate("两个绿色的三角形", seed=1)[0])


def test_concurrent_requests_are_batched_without_changing_results(env, pipes):
    url, http = env["url"], env["http"]
    prompts = [f"{c} square" for c in ("red", "blue", "green", "yellow", "purple", "orange", "pink", "black")]
    out: dict[int, requests.Response] = {}

    def go(i: int) -> None:
        out[i] = requests.post(url + "/v1/generate", json={"prompt": prompts[i], "seed": i, "n": 1 + i % 2,
                                                           "temperature": 0.5 + 0.5 * (i % 2)},
                               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in out.items():
        assert r.status_code == 200, r.text
        want = pipes[0].generate(prompts[i], n=1 + i % 2, seed=i, temperature=0.5 + 0.5 * (i % 2))
        for got, ref in zip(r.json()["images"], want):
            np.testing.assert_array_equal(_decode(got["png_base64"]), ref)


def test_caption_by_upload_and_base64_and_edit(env, pipes):
    url, http = env["url"], env["http"]
    png = _png(48, seed=2)  # resized to the model's 16 px like the pipeline does
    want = pipes[0].caption(Image.open(io.BytesIO(png)))[0]
    r = http.post(url + "/v1/caption", files={"image": ("x.png", png, "image/png")})
    assert r.status_code == 200 and r.json()["caption"] == want and r.headers["X-Model-Version"] == "1"
    r = http.post(url + "/v1/caption", json={"image": _b64(png)})
    assert r.status_code == 200 and r.json()["caption"] == want
    for lang in ("zh", "en"):  # a requested language, as JSON and as a multipart form field
        want = pipes[0].caption(Image.open(io.BytesIO(png)), language=lang)[0]
        r = http.post(url + "/v1/caption", json={"image": _b64(png), "language": lang})
        assert r.status_code == 200 and r.json()["caption"] == want, r.text
        r = http.post(url + "/v1/caption", files={"image": ("x.png", png, "image/png")}, data={"language": lang})
        assert r.status_code == 200 and r.json()["caption"] == want, r.text
    # best of 3 captions, as Model.caption(candidates=3) writes it, as JSON and as a form field
    want = pipes[0].caption(Image.open(io.BytesIO(png)), language="en", candidates=3)[0]
    r = http.post(url + "/v1/caption", json={"image": _b64(png), "language": "en", "candidates": 3})
    assert r.status_code == 200 and r.json()["caption"] == want, r.text
    r = http.post(url + "/v1/caption", files={"image": ("x.png", png, "image/png")},
                  data={"language": "en", "candidates": "3"})
    assert r.status_code == 200 and r.json()["caption"] == want, r.text
    r = http.post(url + "/v1/caption", json={"image": _b64(png), "candidates": 99})
    assert r.status_code == 422 and r.json()["error"]["field"] == "candidates", r.text
    img = _png(16, seed=4)
    r = http.post(url + "/v1/edit", json={"image": _b64(img), "prompt": "a purple hexagon", "keep_rows": 3, "seed": 2})
    assert r.status_code == 200
    ref = pipes[0].edit(np.asarray(Image.open(io.BytesIO(img))), "a purple hexagon", keep_rows=3, seed=2)
    np.testing.assert_array_equal(_decode(r.json()["images"][0]["png_base64"]), ref)
    r = http.post(url + "/v1/edit", files={"image": ("x.png", img, "image/png")},
                  data={"prompt": "a purple hexagon", "keep_rows": "3", "seed": "2"}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), ref)


BAD = [
    # (endpoint, request kwargs, status, field, words in the message, limit)
    ("generate", dict(json={"prompt": "x", "n": 0}), 422, "n", "greater than or equal to 1", 1),
    ("generate", dict(json={"prompt": "x", "n": 5}), 422, "n", "less than or equal to 4", 4),
    ("generate", dict(json={"prompt": "x" * 101}), 422, "prompt", "at most 100 characters", 100),
    ("generate", dict(json={"prompt": ""}), 422, "prompt", "at least 1 character", 1),
    ("generate", dict(json={"n": 1}), 422, "prompt", "required field is missing", None),
    ("generate", dict(json={"prompt": "x", "cfg_scale": 11}), 422, "cfg_scale", "less than or equal to 10", 10.0),
    ("generate", dict(json={"prompt": "x", "temperature": -1}), 422, "temperature", "greater than or equal to 0", 0.0),
    ("generate", dict(json={"prompt": "x", "top_p": 0}), 422, "top_p", "greater than 0", 0.0),
    ("generate", dict(json={"prompt": "x", "top_k": -2}), 422, "top_k", "greater than or equal to 0", 0),
    ("generate", dict(json={"prompt": "x", "seed": -1}), 422, "seed", "greater than or equal to 0", 0),
    ("generate", dict(json={"prompt": "x", "object_temperature": -1}), 422, "object_temperature", "greater than or equal to 0", 0.0),
    # a setting the served model refuses: its data has no background code (its token cache is not a sparse scene's)
    ("generate", dict(json={"prompt": "x", "object_temperature": 0.5}), 422, "model", "object_temperature=0.5 needs a background code", None),
    ("edit", dict(json={"image": _b64(_png()), "prompt": "x", "keep_rows": 1, "object_temperature": 0}), 422, "model",
     "needs a background code", None),
    ("generate", dict(json={"prompt": "x", "size": 512}), 422, "size", "unknown field; allowed: prompt, n", "prompt, n, candidates, seed, cfg_scale, temperature, top_k, top_p, object_temperature, object_cfg_scale, object_min_p"),
    ("generate", dict(json={"prompt": 3}), 422, "prompt", "valid string", None),
    ("generate", dict(json=["a red circle"]), 422, "body", "JSON object", None),
    ("generate", dict(data=b"{not json", headers={"Content-Type": "application/json"}), 400, "body", "not valid JSON", None),
    ("generate", dict(data=b"", headers={"Content-Type": "application/json"}), 400, "body", "empty", None),
    ("generate", dict(data=b"prompt=x", headers={"Content-Type": "text/plain"}), 415, "Content-Type", "not accepted",
     ["application/json", "multipart/form-data"]),
    ("generate", dict(files={"prompt": ("p.txt", b"x")}), 415, "Content-Type", "as application/json", ["application/json"]),
    ("generate", dict(json={"prompt": "x", "n": 2}, headers={"Accept": "image/png"}), 406, "n", "one image/png", 1),
    ("generate", dict(json={"prompt": "x" * 400_000}), 413, "body", "limit is 300000", 300_000),
    ("caption", dict(json={"image": "not base64!"}), 400, "image", "not valid base64", None),
    ("caption", dict(json={"image": _b64(b"hello, not an image")}), 415, "image", "not an image in an accepted format", ["PNG", "JPEG", "WEBP"]),
    ("caption", dict(json={"image": _b64(_bomb_png())}), 413, "image", "more than 262144 pixels", 262_144),
    ("caption", dict(json={"image": _b64(_bomb_png(1000, 1000))}), 413, "image", "1000x1000 = 1000000 pixels", 262_144),
    ("caption", dict(files={"image": ("b.png", _bomb_png(), "image/png")}), 413, "image", "pixels", 262_144),
    ("caption", dict(json={"image": _b64(b"\0" * 210_000)}), 413, "image", "the limit is 200000", 200_000),
    ("caption", dict(json={"image": _b64(_png(64)[:200])}), 400, "image", "could not be decoded", None),
    ("caption", dict(json={}), 422, "image", "required field is missing", None),
    ("caption", dict(files={"file": ("x.png", b"abc", "image/png")}), 422, "image", "part named 'image'", None),
    ("caption", dict(json={"image": _b64(_png()), "language": "fr"}), 422, "language",
     "'fr' is not allowed: Input should be 'auto', 'en' or 'zh'", ["auto", "en", "zh"]),
    ("caption", dict(files={"image": ("x.png", _png(), "image/png")}, data={"language": "english"}), 422, "language",
     "'english' is not allowed", ["auto", "en", "zh"]),
    ("edit", dict(json={"image": _b64(_png()), "prompt": "x", "keep_rows": 9}), 422, "keep_rows", "8 token rows", 8),
    ("edit", dict(json={"image": _b64(_png()), "prompt": "x", "keep_rows": -1}), 422, "keep_rows", "greater than or equal to 0", 0),
    ("edit", dict(json={"image": _b64(_png()), "keep_rows": 1}), 422, "prompt", "required field is missing", None),
]


@pytest.mark.parametrize("endpoint, kwargs, status, field, words, limit", BAD,
                         ids=[f"{b[0]}-{b[3]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_get_a_4xx_naming_the_field_and_limit(env, endpoint, kwargs, status, field, words, limit):
    r = env["http"].post(f"{env['url']}/v1/{endpoint}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and words in err["message"], err
    assert err["status"] == status and err["limit"] == limit and r.json()["request_id"]


def test_the_replica_survives_the_bad_inputs(env):
    assert env["http"].post(env["url"] + "/v1/generate", json={"prompt": "a red circle"}).status_code == 200


def test_bearer_token_and_request_id(env):
    url = env["url"]
    r = requests.post(url + "/v1/generate", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = requests.get(url + "/v1/model", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert requests.get(url + "/healthz").status_code == 200  # probes need no token
    r = env["http"].get(url + "/v1/model", headers={"X-Request-Id": "client-chosen-42"})
    assert r.headers["X-Request-Id"] == "client-chosen-42"
    r = env["http"].post(url + "/v1/generate", json={"prompt": "x", "n": 0}, headers={"X-Request-Id": "bad-req-7"})
    assert r.json()["request_id"] == "bad-req-7" and r.headers["X-Request-Id"] == "bad-req-7"


@pytest.mark.slow
def test_playground_in_headless_chromium(env, pipes, tmp_path):
    """The page as a person uses it: token, a Chinese prompt → images, an upload → its caption, the version."""
    from browser import chromium
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = chromium()
    if isinstance(found, str):
        pytest.skip(f"headless Chromium unavailable: {found}")
    browser, driver_path = found
    opts = Options()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        wait = WebDriverWait(driver, 90)
        driver.get(env["url"] + "/")
        text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
        wait.until(lambda d: "unavailable" in text("model"))  # this server wants a token
        assert "bearer token" in text("model")
        driver.find_element(By.TAG_NAME, "summary").click()
        driver.find_element(By.ID, "token").send_keys(TOKEN + "\t")  # leaving the field reloads the model info
        wait.until(lambda d: "version 1" in text("model"))
        assert text("model").startswith("visgen version 1") and "geneval_overall 0.5" in text("model")

        prompt = "两个绿色的三角形"
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        n = driver.find_element(By.ID, "n")
        n.clear()
        n.send_keys("2")
        driver.find_element(By.ID, "gen-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#images img.generated")) == 2)
        shown = [im.get_attribute("src") for im in driver.find_elements(By.CSS_SELECTOR, "#images img.generated")]
        for src, ref in zip(shown, pipes[0].generate(prompt, n=2, seed=0)):
            assert src.startswith("data:image/png;base64,")
            np.testing.assert_array_equal(_decode(src.split(",", 1)[1]), ref)
        assert "2 image(s) from version 1" in text("gen-status")

        upload = tmp_path / "upload.png"
        upload.write_bytes(_png(16, seed=4))
        driver.find_element(By.ID, "file").send_keys(str(upload))
        driver.find_element(By.ID, "cap-button").click()
        wait.until(lambda d: text("cap-status").startswith("version"))
        want = env["http"].post(env["url"] + "/v1/caption", files={"image": ("u.png", upload.read_bytes(), "image/png")})
        # The caption's exact characters (an untrained model's caption may hold \r or other control
        # characters, which the rendered .text normalises): compare the element's textContent.
        raw = lambda: driver.execute_script('return document.getElementById("caption").textContent')  # noqa: E731
        assert raw() == want.json()["caption"] and text("cap-status") == "version 1"
        # The language selector: the same upload asked for in Chinese.
        from selenium.webdriver.support.ui import Select

        want_zh = env["http"].post(env["url"] + "/v1/caption", data={"language": "zh"},
                                   files={"image": ("u.png", upload.read_bytes(), "image/png")}).json()["caption"]
        Select(driver.find_element(By.ID, "cap-language")).select_by_value("zh")
        driver.execute_script('document.getElementById("caption").textContent = "…";')
        driver.find_element(By.ID, "cap-button").click()
        wait.until(lambda d: text("caption") != "…" and text("cap-status").startswith("version"))
        assert raw() == want_zh
        # The best-of-n field: the same upload in Chinese, best of 3 captions.
        want_best = pipes[0].caption(Image.open(upload), language="zh", candidates=3)[0]
        driver.find_element(By.ID, "cap-candidates").send_keys("3")
        driver.execute_script('document.getElementById("caption").textContent = "…";')
        driver.find_element(By.ID, "cap-button").click()
        wait.until(lambda d: text("caption") != "…" and text("cap-status").startswith("version"))
        assert raw() == want_best
        driver.save_screenshot(str(tmp_path / "playground.png"))
    finally:
        driver.quit()


@pytest.mark.slow
def test_hot_reload_under_traffic_has_no_failed_request(env):
    """Promote v2, roll back to v1, then pin v2 by reconfigure, while clients hammer the app:
    every request answers 200, and each move takes over."""
    from ray import serve

    url, reg, (v1, v2) = env["url"], env["reg"], env["versions"]
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {TOKEN}"
        i = 0
        while not stop.is_set():
            r = s.post(url + "/v1/generate", json={"prompt": f"a shape {k}", "seed": i}, timeout=60)
            seen.append((r.status_code, r.headers.get("X-Model-Version", "")))
            i += 1

    def served_now(version: str) -> bool:
        deadline = time.time() + 30
        while time.time() < deadline and not all(v == version for _, v in seen[-4:]):
            time.sleep(0.2)
        return all(v == version for _, v in seen[-4:])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        reg.promote(v2)
        assert served_now(v2), seen[-8:]
        reg.rollback()  # the alias moves back: replicas follow it the same way
        assert served_now(v1), seen[-8:]
        # reconfigure (what `serve deploy` with a new user_config does) pins a version at once.
        handle = serve.get_deployment_handle("VisgenModel", app_name="visgen-test")
        handle.reconfigure.remote({"model_uri": f"models:/visgen/{v2}", "poll_interval_s": 0}).result(timeout_s=60)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [s for s, _ in seen]
    versions = [v for _, v in seen]
    assert len(seen) > 20 and statuses.count(200) == len(statuses), [s for s in statuses if s != 200]
    moves = iter(versions)
    assert all(v in moves for v in (v1, v2, v1, v2)) and versions[0] == v1 and versions[-1] == v2, versions
    assert env["http"].get(url + "/v1/model").json()["model_uri"] == f"models:/visgen/{v2}"


@pytest.mark.slow
def test_health_check_replaces_a_replica_whose_model_keeps_failing(env):
    """A replica whose model raises on every call reports unhealthy; Serve swaps in a fresh one.

    A second app (its own replica, fast health checks) is driven into that state through its
    deployment handle with jobs the model cannot run (the ingress never sends those); the
    errors are real exceptions inside the replica's model code.
    """
    from ray import serve

    cfg = env["cfg"].model_copy(update={"app_name": "visgen-health", "model_uri": f"models:/visgen/{env['versions'][0]}",
                                        "poll_interval_s": 0, "health_check_period_s": 0.5,
                                        "unhealthy_after_failures": 2})
    serve.run(build_app(cfg, env["reg"].tracking_uri, runtime_env={"env_vars": {"VISGEN_TEST_SERVE_TOKEN": TOKEN}}),
              name="visgen-health", route_prefix="/health-test")
    try:
        url, http = env["url"] + "/health-test", env["http"]
        before = http.get(url + "/v1/model").json()["replica"]
        assert before not in ("", "local")
        handle = serve.get_deployment_handle("VisgenModel", app_name="visgen-health")
        broken = {"prompt": "a red circle", "n": 1, "seed": "not-a-number", "cfg_scale": None, "temperature": None,
                  "top_k": None, "top_p": None}
        for _ in range(2):
            out = handle.generate.remote(broken).result(timeout_s=60)
            assert out["status"] == 500 and "TypeError" in out["error"], out
        deadline, after = time.time() + 90, before
        while time.time() < deadline and after == before:
            time.sleep(0.5)
            try:
                r = http.get(url + "/v1/model", timeout=10)
                after = r.json().get("replica", before) if r.status_code == 200 else before
            except requests.RequestException:
                pass
        assert after != before, "Serve did not replace the failing replica within 90 s"
        r = http.post(url + "/v1/generate", json={"prompt": "a red circle", "seed": 3}, timeout=60)
        assert r.status_code == 200 and r.headers["X-Model-Version"] == env["versions"][0]
        # The main app's replica was not touched.
        assert http.get(env["url"] + "/healthz").status_code == 200
    finally:
        serve.delete("visgen-health")
