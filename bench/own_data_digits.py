"""The bring-your-own-data path, tried as a new user would, on a public human-made data set that
is not in this repository and needs no download: scikit-learn's copy of the UCI handwritten
digits (1 797 scans, 8 x 8, 16 grey levels).

1. write them as an ImageFolder tree (one folder per digit, upscaled to 32 px);
2. ``visgen data pack`` with an English and a Chinese caption template;
3. ``jobs/pipeline.py`` with ``pipelines/own-data-example.yaml`` pointed at the shards
   (32 px, the small image tokenizer preset, fewer steps: sized for 2 CPU cores);
4. ``visgen serve`` on the registered champion, and every held-out image captioned over HTTP in
   English and in Chinese: does the caption name the right digit?

Prints the held-out metrics (retrieval against chance, losses, BLEU / chrF) and the caption
accuracy as one JSON line at the end.

    python bench/own_data_digits.py --workdir /tmp/digits        # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]


def write_image_folder(out: Path, size: int) -> int:
    """sklearn's digits as ``out/<digit>/<index>.png`` (grey, upscaled to ``size``) plus labels.json."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this check reads scikit-learn's bundled digits: pip install scikit-learn")
    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = out / "images" / str(label)
        d.mkdir(parents=True, exist_ok=True)
        arr = (np.asarray(img) * (255 / 16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").resize((size, size), Image.Resampling.BICUBIC).save(d / f"{i:05d}.png")
    labels = {str(k): {"en": EN[k], "zh": ZH[k]} for k in range(10)}
    (out / "labels.json").write_text(json.dumps(labels, ensure_ascii=False))
    return len(digits.images)


def run(cmd: list[str], **kw) -> str:
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out.stdout


def held_out(shards: Path) -> list[tuple[bytes, int]]:
    """(png bytes, digit) of every sample in the last shard (the one the spec holds out)."""
    last = sorted(shards.glob("*.tar"))[-1]
    samples: dict[str, dict] = {}
    with tarfile.open(last) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    out = []
    for s in samples.values():
        meta = json.loads(s["json"])
        if meta.get("language") == "en":  # each image is in the shard once per template: take it once
            out.append((s["png"], int(meta["class"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/visgen-digits")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--tokenizer-steps", type=int, default=600)
    ap.add_argument("--lm-steps", type=int, default=800)
    ap.add_argument("--port", type=int, default=8021)
    args = ap.parse_args()
    wd = Path(args.workdir)
    t0 = time.perf_counter()
    n = write_image_folder(wd, args.size)
    shards = wd / "shards"
    visgen = str(BIN / "visgen")
    print(run([visgen, "data", "pack", str(wd / "images"), "--out", str(shards), "--labels", str(wd / "labels.json"),
               "--template", "a handwritten digit {label}", "--template-zh", "手写数字{label}",
               "--shard-size", "400", "--min-size", "16"]))
    spec = ["--pipeline", "pipelines/own-data-example.yaml", "--workdir", str(wd / "work"),
            "--set", f"data.ingest.source={shards}", "--set", f"data.ingest.resolution={args.size}",
            "--set", "data.ingest.min_size=16", "--set", "image_tokenizer.model.preset=small",
            "--set", f"image_tokenizer.train.steps={args.tokenizer_steps}",
            "--set", "image_tokenizer.train.lr=3e-3", "--set", f"lm.train.steps={args.lm_steps}",
            "--set", "lm.train.lr=8e-3", "--set", "text_tokenizer.vocab_size=512",
            "--set", f"serve.port={args.port}"]
    log = run([sys.executable, "jobs/pipeline.py", *spec], timeout=3600)
    (wd / "pipeline.log").write_text(log)
    ev = json.loads((wd / "work" / "eval" / "lm.json").read_text())
    t_pipe = time.perf_counter() - t0

    # Serve the champion and caption the held-out scans over HTTP, in both languages.
    server = subprocess.Popen([visgen, "serve", *spec], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.get(url + "/v1/model", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        right = {"en": 0, "zh": 0}
        examples = []
        cases = held_out(shards)
        for png, digit in cases:
            for lang, names in (("en", EN), ("zh", ZH)):
                r = requests.post(url + "/v1/caption", files={"image": ("d.png", png, "image/png")},
                                  data={"language": lang}, timeout=120)
                r.raise_for_status()
                caption = r.json()["caption"]
                said = [k for k, name in enumerate(names) if name in caption.split() or (lang == "zh" and name in caption)]
                right[lang] += said == [digit]
                if len(examples) < 6:
                    examples.append({"digit": digit, "language": lang, "caption": caption})
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    keys = ("retrieval_i2t_at1", "retrieval_t2i_at1", "retrieval_chance", "heldout_t2i_loss", "heldout_i2t_loss",
            "heldout_caption_bleu_en", "heldout_caption_bleu_zh", "heldout_caption_chrf_en", "heldout_caption_chrf_zh",
            "frechet_vq_encoder")
    result = {"images": n, "held_out_images": len(cases), **{k: ev.get(k) for k in keys},
              "http_caption_names_the_digit_en": round(right["en"] / len(cases), 3),
              "http_caption_names_the_digit_zh": round(right["zh"] / len(cases), 3),
              "pipeline_s": round(t_pipe), "examples": examples}
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
