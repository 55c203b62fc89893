"""The transformer trainer's pieces that need no Ray: sequence assembly (with the caption's
language token), the quick eval's captions in the reference language, stale runs set aside."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from bundles import captions
from visgen.data.captions import detect_language
from visgen.models.gpt import EN, EOS, NULL, PAD, ZH, VisGPT, gpt_config
from visgen.text.tokenizer import TextTokenizerConfig, train_text_tokenizer
from visgen.train.lm import assemble, padded_ids, retire_stale_run

TEXT_VOCAB = 400


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(captions(), TextTokenizerConfig(vocab_size=TEXT_VOCAB, min_frequency=1))


@pytest.fixture(scope="module")
def layout():
    return VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=16, grid=(2, 2), max_text_tokens=12)).layout


def test_padded_ids_cut_and_pad_without_a_row_loop():
    ids, lengths = padded_ids([[11, 12, 13], [], np.array([20, 21, 22, 23, 24], dtype=np.int32), [30]], 4)
    assert lengths.tolist() == [3, 0, 5, 1]
    assert ids.tolist() == [[11, 12, 13, PAD], [PAD] * 4, [20, 21, 22, 23], [30, PAD, PAD, PAD]]
    empty, n = padded_ids([[], []], 3)
    assert empty.tolist() == [[PAD] * 3] * 2 and n.tolist() == [0, 0]


def test_assemble_gives_i2t_rows_their_caption_language(tok, layout):
    en = ["a red circle left of a blue square", "Two small green stars.", "there is 1 star"]
    zh = ["两个绿色的三角形", "红色圆形在蓝色正方形的左边。", "图中有3个星形"]
    texts = [en[0], zh[0], *en, *zh]  # two t2i rows, then six i2t rows
    ids = tok.encode_batch(texts, max_length=12)
    cjk = tok.script_tables(TEXT_VOCAB)["cjk"]
    image = np.arange(len(texts) * 4).reshape(len(texts), 4) % 16
    seq = assemble(ids, image, layout, 2, null=[False, True], cjk=cjk)
    assert seq.shape == (8, layout.length)
    region = seq[:, layout.i2t_text]
    # i2t: <lang> + the caption's ids + <eos> + <pad>s; the language is the caption's own.
    for row, text, tid in zip(region[2:].tolist(), texts[2:], ids[2:]):
        want = ZH if detect_language(text) == "zh" else EN
        assert row[0] == want, text
        body = tid[: layout.text_slots - 2]
        assert row[1:1 + len(body)] == body and row[1 + len(body)] == EOS, text
        assert row[2 + len(body):] == [PAD] * (layout.text_slots - 2 - len(body))
        assert tok.decode(row) == tok.decode(body)  # the language token decodes to nothing
    # t2i rows are laid out as before: no language token; the null row is the null prompt.
    t2i = seq[:2, layout.t2i_text].tolist()
    assert t2i[0] == layout.text_region(ids[0]) and t2i[1] == [NULL] + [PAD] * (layout.text_slots - 1)
    # Without a table every caption counts as English.
    assert (assemble(ids, image, layout, 2)[2:, layout.i2t_text.start] == EN).all()


def test_assemble_refuses_special_ids(layout):
    with pytest.raises(ValueError, match="non-special"):
        assemble([[11, ZH]], np.zeros((1, 4), dtype=np.int64), layout, 0)


def test_quick_eval_captions_in_the_reference_language(tok, tmp_path):
    from visgen.inference import SamplingConfig
    from visgen.train.config import TrainConfig
    from visgen.train.lm import LMRecipe, LMTask
    from visgen.train.loop import WorkerEnv

    tok.save(tmp_path / "tok.json")
    cfg = gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=16, grid=(2, 2), max_text_tokens=12)
    task = LMTask(cfg, LMRecipe(eval_images=0), SamplingConfig(), text_tokenizer=str(tmp_path / "tok.json"))
    env = WorkerEnv(TrainConfig(), torch.device("cpu"))
    torch.manual_seed(0)
    task.setup(env)
    assert task.cjk is not None and task.cjk.shape == (TEXT_VOCAB,)
    truth = captions(12)
    text = np.empty(len(truth), dtype=object)
    text[:] = tok.encode_batch(truth, max_length=12)
    batch = {"text_ids": text, "image_ids": np.random.default_rng(0).integers(0, 16, (len(truth), 4)),
             "caption": np.array(truth, dtype=object)}
    res = task.evaluate(env, batch, step=1)
    assert {"t2i_loss", "i2t_loss", "caption_slot_accuracy", "caption_slot_accuracy_en",
            "caption_slot_accuracy_zh"} <= set(res.metrics)
    assert all(np.isfinite(v) for v in res.metrics.values())
    for row in res.texts["captions"]:
        assert row["language"] == detect_language(row["truth"])
        if row["language"] == "zh":
            assert not re.search(r"[A-Za-z]", row["generated"]), row
        else:
            assert row["generated"].isascii(), row


def test_checkpoints_for_other_inputs_are_set_aside(tmp_path):
    run = tmp_path / "ray_results" / "lm"
    inputs = {"format": "visgen-lm/2", "image_tokenizer": "a", "text_tokenizer": "b"}
    assert retire_stale_run(run, inputs) is None  # a fresh run: nothing to set aside
    assert json.loads((run / "lm_inputs.json").read_text()) == inputs

    def checkpoint() -> None:
        from visgen.train.checkpoint import Progress, checkpoint_dir_name, save_checkpoint

        save_checkpoint(run / checkpoint_dir_name(10), progress=Progress(step=10), modules={"m": torch.nn.Linear(2, 2)},
                        optimizers={}, schedulers={})

    from visgen.train.checkpoint import latest_checkpoint

    checkpoint()
    assert retire_stale_run(run, inputs) is None and latest_checkpoint(run) is not None  # same inputs: resumed
    aside = retire_stale_run(run, {**inputs, "text_tokenizer": "c"})  # a retrained text tokenizer
    assert aside is not None and aside.name.startswith("lm.stale-") and latest_checkpoint(aside) is not None
    assert latest_checkpoint(run) is None
    assert json.loads((run / "lm_inputs.json").read_text())["text_tokenizer"] == "c"
    checkpoint()
    (run / "lm_inputs.json").unlink()  # checkpoints from before the record existed
    assert retire_stale_run(run, inputs) is not None and latest_checkpoint(run) is None
