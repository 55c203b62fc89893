"""Reconstruction metrics of the image tokenizer: PSNR, SSIM, codebook usage and perplexity.

Images are compared in [0, 1] (``data_range=1``), whichever form they arrive in: uint8
``(B, H, W, 3)`` arrays or tensors (pixel values / 255), or float ``(B, 3, H, W)`` tensors in the
model's [-1, 1] range (clamped, so an unclamped decoder output is judged as it would be shown).
PSNR and SSIM are computed per image with torchmetrics and averaged over images; an exact
reconstruction's PSNR is infinite and is capped at ``psnr_cap`` so that means stay finite.

Codebook usage and perplexity are taken over the code histogram of the *whole* evaluation set,
not per batch (per-batch values depend on the batch size): usage = distinct codes used / codebook
size, perplexity = exp(entropy of the histogram), between 1 and the codebook size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from visgen.models.vq import VQModel, to_model_input


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [-1, 1] -> float32 (B, 3, H, W) in [0, 1] on CPU."""
    if isinstance(images, np.ndarray) or (torch.is_tensor(images) and images.dtype == torch.uint8):
        return (to_model_input(images) + 1.0) / 2.0
    if torch.is_tensor(images) and images.is_floating_point() and images.ndim == 4 and images.shape[1] == 3:
        return ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0).contiguous()
    raise ValueError(f"expected uint8 (B, H, W, 3) or float (B, 3, H, W) images in [-1, 1], got "
                     f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))} {getattr(images, 'dtype', '')}")


class ReconMetrics:
    """Accumulates reconstruction quality and code statistics over an evaluation set.

    >>> m = ReconMetrics(num_codes=1024)
    >>> m.update(real_uint8, recon_float, ids)        # once per batch
    >>> m.compute()  # {'psnr': ..., 'ssim': ..., 'usage': ..., 'perplexity': ..., 'n_images': ..., 'codes_used': ...}
    """

    def __init__(self, num_codes: int | None = None, psnr_cap: float = 100.0):
        if num_codes is not None and num_codes < 1:
            raise ValueError(f"num_codes must be positive, got {num_codes}")
        self.num_codes = num_codes
        self.psnr_cap = psnr_cap
        self.reset()

    def reset(self) -> None:
        self.n_images = 0
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.hist = torch.zeros(self.num_codes or 0, dtype=torch.long)  # code histogram over the set

    def update(self, real: np.ndarray | torch.Tensor, recon: np.ndarray | torch.Tensor,
               ids: np.ndarray | torch.Tensor | None = None) -> None:
        """Add one batch: originals, reconstructions (same size) and optionally their token ids (B, h, w)."""
        a, b = to_unit_range(real), to_unit_range(recon)
        if a.shape != b.shape:
            raise ValueError(f"real {tuple(a.shape)} and recon {tuple(b.shape)} differ in shape (compared as (B, 3, H, W))")
        psnr = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3))  # (B,)
        self.psnr_sum += float(psnr.clamp(max=self.psnr_cap).sum())
        side = min(a.shape[-2:])
        kernel = 11 if side >= 11 else max(3, side - (1 - side % 2))  # largest odd window that fits
        ssim = structural_similarity_index_measure(b, a, data_range=1.0, kernel_size=kernel, reduction="none")  # (B,)
        self.ssim_sum += float(ssim.sum())
        self.n_images += a.shape[0]
        if ids is not None:
            self._count(ids)

    def _count(self, ids: np.ndarray | torch.Tensor) -> None:
        if self.num_codes is None:
            raise ValueError("ReconMetrics got token ids but no num_codes; pass ReconMetrics(num_codes=model.num_codes)")
        t = torch.as_tensor(ids).reshape(-1).cpu()
        if t.is_floating_point():
            raise ValueError(f"token ids must be integers, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_codes):
            raise ValueError(f"token ids must lie in [0, {self.num_codes}); got values in [{int(t.min())}, {int(t.max())}]")
        self.hist += torch.bincount(t.long(), minlength=self.num_codes)

    def merge(self, other: "ReconMetrics") -> "ReconMetrics":
        """Fold in another accumulator over different images (e.g. from another worker)."""
        if other.num_codes != self.num_codes:
            raise ValueError(f"cannot merge metrics over {other.num_codes} codes into metrics over {self.num_codes}")
        self.n_images += other.n_images
        self.psnr_sum += other.psnr_sum
        self.ssim_sum += other.ssim_sum
        self.hist += other.hist
        return self

    def compute(self) -> dict[str, float]:
        """Mean PSNR (dB) and SSIM over images; usage and perplexity over the set's code histogram (NaN without ids)."""
        if self.n_images == 0:
            raise ValueError("ReconMetrics.compute() before any update(): no images were evaluated")
        usage = perplexity = math.nan
        total = int(self.hist.sum())
        if total:
            p = self.hist[self.hist > 0].double() / total
            usage = float((self.hist > 0).sum()) / self.num_codes
            perplexity = float(torch.exp(-(p * p.log()).sum()))
        return {"psnr": self.psnr_sum / self.n_images, "ssim": self.ssim_sum / self.n_images,
                "usage": usage, "perplexity": perplexity, "n_images": self.n_images,
                "codes_used": int((self.hist > 0).sum())}


def _images_of(batch: Any) -> np.ndarray | torch.Tensor:
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"batch dict has no 'image' column (columns: {sorted(batch)})")
        return batch["image"]
    return batch


@torch.no_grad()
def evaluate_reconstruction(model: VQModel, batches: Iterable[Any], max_batches: int | None = None) -> dict[str, float]:
    """Reconstruct every batch with ``model`` (eval mode, no stats updates) and return ReconMetrics.compute().

    A batch is uint8 images (B, H, W, 3), float images (B, 3, H, W) in [-1, 1], or a dict with an
    ``image`` column of either (a Ray Data / WebDataset batch).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    metrics = ReconMetrics(num_codes=model.num_codes)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            images = _images_of(batch)
            is_uint8 = isinstance(images, np.ndarray) or images.dtype == torch.uint8
            x = to_model_input(images) if is_uint8 else images.float()
            out = model(x.to(device))
            metrics.update(x, out["recon"], out["ids"])
    finally:
        model.train(was_training)
    return metrics.compute()
