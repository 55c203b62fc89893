"""Load test of the Serve app: throughput and latency at concurrency 1 / 4 / 16, batched vs unbatched.

    python bench/serve_load.py --duration 20            # tiny random-init bundle, CPU, loopback HTTP
    python bench/serve_load.py --bundle work/shapes-32/models/bundle

Deploys the app twice on one local Ray (max_batch_size 16, then 1), drives ``POST /v1/generate``
with C closed-loop clients for a fixed duration each, and prints one JSON line per run plus the
batched / unbatched throughput ratio at each concurrency. Errors (non-200 answers) are counted.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, concurrency: int, duration_s: float, n: int) -> dict:
    """C clients, each sending its next request as soon as the last one returned."""
    import requests

    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def client(k: int) -> None:
        s, i = requests.Session(), 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                ok = s.post(url, json={"prompt": f"a red circle {k} {i}", "n": n, "seed": i}, timeout=120).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                (lat.append(time.perf_counter() - t0) if ok else errors.__setitem__(0, errors[0] + 1))
            i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000) if lat else (lambda p: float("nan"))
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors[0], "images_per_s": len(lat) * n / wall,
            "req_per_s": len(lat) / wall, "p50_ms": q(0.50), "p99_ms": q(0.99),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle directory to serve (default: a tiny random-init bundle)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per (mode, concurrency) run")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch-size", type=int, default=16, help="max_batch_size of the batched run")
    ap.add_argument("--n", type=int, default=1, help="images per request")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from visgen.serve import ServeConfig, build_app

    bundle = args.bundle
    if bundle is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from bundles import make_bundle

        bundle = str(make_bundle(Path(tempfile.mkdtemp(prefix="serve-load-")), seed=0))
    ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    for mode, bs in (("batched", args.batch_size), ("unbatched", 1)):
        cfg = ServeConfig(model_uri=str(Path(bundle).resolve()), port=port, max_batch_size=bs,
                          max_ongoing_requests=max(64, 2 * bs), batch_wait_timeout_s=0.01 if bs > 1 else 0.0,
                          model_num_cpus=max(1, args.cpus - 1), ingress_num_cpus=0, poll_interval_s=0,
                          token_env="VISGEN_BENCH_NO_TOKEN")
        serve.run(build_app(cfg), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/generate"
        drive(url, 2, 2.0, args.n)  # warm-up
        for c in args.concurrency:
            r = {"mode": mode, "max_batch_size": bs, **drive(url, c, args.duration, args.n)}
            results[(mode, c)] = r
            print(json.dumps(r), flush=True)
        serve.delete("bench")
    for c in args.concurrency:
        b, u = results[("batched", c)], results[("unbatched", c)]
        print(json.dumps({"concurrency": c, "throughput_ratio_batched_vs_unbatched":
                          b["images_per_s"] / max(u["images_per_s"], 1e-9),
                          "errors": b["errors"] + u["errors"]}), flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
