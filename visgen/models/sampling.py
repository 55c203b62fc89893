"""Token sampling for VisGPT: counter-based per-row noise, temperature, top-k / top-p, guidance.

Every function here is a pure tensor function with static shapes, so the decode step that calls
them (:meth:`visgen.models.gpt.VisGPT.decode_image_step`) compiles into one graph. What changes
the graph's structure is a Python value (greedy or not, ``top_k``, whether top-p filters); what
only changes numbers (temperature, ``top_p``, the guidance scale, the step counter) may be a
0-d tensor on the device, so a new value needs neither a recompile nor a host → device copy.

Sampling noise is a counter-based hash of (seed, step, token id) per row, so a seed gives the
same output whatever else shares the batch (CFG doubling, serving batches), and the noise a token
gets does not depend on which other tokens survived the filters.

Pure PyTorch; imports nothing of the package.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
Number = float | torch.Tensor  # a Python number or a 0-d tensor on the logits' device


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """A ValueError naming the values unless temperature >= 0, 0 < top_p <= 1 and top_k >= 0."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors (multipliers < 2**31, so nothing overflows int64)."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, step: int | torch.Tensor, ids: int | torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64, for token ids ``ids`` ((B, k) tensor, or an int n for ids
    0..n-1 in every row): a pure function of (seeds[b], step, id), so filtering the candidates
    never changes the noise a token gets. ``step`` is an int or a 0-d int64 tensor (same values)."""
    if isinstance(ids, int):
        ids = torch.arange(ids, device=seeds.device, dtype=torch.long)[None, :]
    if not isinstance(step, torch.Tensor):
        step = torch.tensor(step, device=seeds.device)
    seeds = seeds.long()[:, None]
    hi = _mix32((seeds >> 32) + 0x632BE5AB)
    key = _mix32((seeds & _M32) * 0x5BD1E995 + hi + _mix32(step.long() * 0x27D4EB2F + 1))
    x = _mix32(key ^ _mix32(ids.long() + 0x1B873593))
    return (x.double() + 0.5) / 4294967296.0


def guide(logits: torch.Tensor, cfg_scale: Number) -> torch.Tensor:
    """Classifier-free guidance: ``logits`` (2B, V), conditional rows first, then the null prompt's
    → (B, V) ``uncond + cfg_scale * (cond - uncond)``."""
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def pick(logits: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor, temperature: Number, top_p: Number, *,
         greedy: bool, top_k: int, nucleus: bool) -> torch.Tensor:
    """One id per row of ``logits`` (B, V), with the switches already decided (no checks, no host
    sync: what the compiled decode step runs). ``greedy``: argmax. Otherwise the Gumbel-max trick
    over ``logits / temperature`` with :func:`uniform_noise`, among the ``top_k`` best ids when
    ``0 < top_k < V`` (noise drawn only for those), then, with ``nucleus``, among the smallest
    prefix of the sorted candidates whose probability mass reaches ``top_p``."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    ids = None  # candidate token ids per row when filtered, (B, k)
    if 0 < top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, descending
    if nucleus:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already exceeds top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    noise = uniform_noise(seeds, step, ids if ids is not None else logits.shape[-1])  # (B, k or V) float64
    choice = (logits - torch.log(-torch.log(noise)).float()).argmax(-1)
    return ids.gather(1, choice[:, None])[:, 0] if ids is not None else choice


def sample(logits: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """One id per row of ``logits`` (B, V): greedy at temperature 0, else top-k / top-p filtered
    sampling by the Gumbel-max trick with per-row counter-based noise (drawn only for the
    candidates that survive top-k). Checks its arguments; :func:`pick` is the unchecked core."""
    check_sampling(temperature, top_k, top_p)
    if seeds.shape != logits.shape[:1]:
        raise ValueError(f"one seed per row: {tuple(seeds.shape)} seeds for {logits.shape[0]} rows")
    return pick(logits, seeds, step, temperature, top_p, greedy=temperature == 0, top_k=top_k, nucleus=top_p < 1.0)
