"""Saved models by role (``visgen/models/io.py``): one save / load / fingerprint for the image
tokenizer and the transformer, the one check that a transformer fits its tokenizers, and
``visgen/models`` importing nothing but PyTorch and pydantic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from visgen.models.gpt import LM_FORMAT, VisGPT, gpt_config, load_gpt, save_gpt
from visgen.models.io import check_fits
from visgen.models.vq import VQModel, load_vq, save_vq, vq_config


@pytest.mark.parametrize("kind", ["vq", "gpt"])
def test_round_trip_and_every_way_a_saved_model_can_be_wrong(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "vq":
        model, save, load, name = VQModel(vq_config("tiny", resolution=16)), save_vq, load_vq, "image_tokenizer"
    else:
        model, save, load, name = VisGPT(gpt_config("tiny")), save_gpt, load_gpt, "lm"
    d = save(model, tmp_path / "m")
    meta = json.loads((d / f"{name}.json").read_text())
    assert meta["fingerprint"] == model.fingerprint() and meta["config"] == model.cfg.model_dump(mode="json")
    back = load(d)
    assert back.fingerprint() == model.fingerprint() and not back.training
    if kind == "gpt":
        assert meta["format"] == LM_FORMAT and meta["params"] == model.num_params()

    # another format (the same check for both kinds; the transformer's message says why it matters)
    (d / f"{name}.json").write_text(json.dumps({**meta, "format": "something/0"}))
    with pytest.raises(ValueError, match=r"has format 'something/0', not"):
        load(d)
    # weights of another model under the right description
    (d / f"{name}.json").write_text(json.dumps(meta))
    weights = load_file(str(d / f"{name}.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(d / f"{name}.safetensors"))
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        load(d)
    (d / f"{name}.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{name}.safetensors does not exist"):
        load(d)


def test_check_fits_names_what_does_not_fit():
    lm = gpt_config("tiny")
    grid = tuple(lm.grid)
    check_fits(lm, codebook_size=lm.codebook_size, grid=grid, text_vocab_size=lm.text_vocab)
    with pytest.raises(ValueError, match=rf"expects {lm.codebook_size} codes .* has {lm.codebook_size * 2} codes"):
        check_fits(lm, codebook_size=lm.codebook_size * 2, grid=grid, text_vocab_size=100)
    with pytest.raises(ValueError, match="not trained together"):
        check_fits(lm, codebook_size=lm.codebook_size, grid=(grid[0] * 2, grid[1] * 2), text_vocab_size=100)
    with pytest.raises(ValueError, match=rf"tok.json has {lm.text_vocab + 1} ids but the transformer's text_vocab is {lm.text_vocab}"):
        check_fits(lm, codebook_size=lm.codebook_size, grid=grid, text_vocab_size=lm.text_vocab + 1, text_tokenizer="tok.json")


def test_models_import_neither_the_tokenizers_library_nor_the_inference_stack():
    code = ("import sys; import visgen.models.gpt, visgen.models.vq, visgen.models.io, visgen.models.sampling; "
            "bad = sorted(m for m in ('tokenizers', 'ray', 'mlflow', 'pyarrow', 'visgen.text.tokenizer', 'visgen.inference') "
            "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
