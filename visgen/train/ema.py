"""An exponential moving average of a task's weights, kept by the training loop (``train.ema_decay``).

A short, noisy run ends on one point of a wandering trajectory; the average of its last few
hundred steps is usually a better model than that point (Polyak averaging; the EMA weights of
diffusion and GAN generators). The loop updates the average after every optimiser step on rank 0
(the weights are the same on every rank), saves it in each checkpoint (``ema.safetensors``), so a
resumed run continues the same average, and copies it into the modules after the last step:
the final evaluation, the exported model and everything downstream use the average. The last
step's own weights stay in the checkpoint's ``modules`` (a run continued with more steps trains
on from them, not from the average).

The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the first steps'
weights (far from where training ends) are forgotten quickly and the average is never dominated
by the initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class WeightAverage:
    """EMA of every floating-point tensor in the modules' ``state_dict`` (parameters and float
    buffers); other buffers (counters, integer state) are copied as they are."""

    def __init__(self, modules: Mapping[str, torch.nn.Module], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.reset(modules)

    def reset(self, modules: Mapping[str, torch.nn.Module]) -> None:
        """Start the average afresh from the modules' current weights."""
        self.updates = 0
        self.shadow = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in modules.items()}

    def current_decay(self) -> float:
        """The decay the next update applies."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, modules: Mapping[str, torch.nn.Module]) -> None:
        """Move the average towards the modules' weights: ``avg += (1 - decay) * (w - avg)``."""
        weight = 1.0 - self.current_decay()
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for name, m in modules.items():
            shadow = self.shadow[name]
            # Read the state_dict each time: a module may replace a buffer object (not only update it).
            for key, value in m.state_dict(keep_vars=True).items():
                avg = shadow[key]
                if avg.is_floating_point():
                    dst.append(avg)
                    src.append(value.detach())
                else:
                    avg.copy_(value)
        if dst:
            torch._foreach_lerp_(dst, src, weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, modules: Mapping[str, torch.nn.Module]) -> None:
        """Load the average into the modules (in place)."""
        for name, m in modules.items():
            m.load_state_dict(self.shadow[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "modules": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any], modules: Mapping[str, torch.nn.Module]) -> None:
        """Restore a saved average; its module and tensor names must match ``modules``'s."""
        saved = state["modules"]
        if set(saved) != set(modules):
            raise ValueError(f"the saved weight average holds modules {sorted(saved)}, this run has {sorted(modules)}")
        for name, m in modules.items():
            want = m.state_dict()
            if set(saved[name]) != set(want):
                missing, extra = sorted(set(want) - set(saved[name])), sorted(set(saved[name]) - set(want))
                raise ValueError(f"the saved weight average of {name!r} does not fit the module: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            self.shadow[name] = {k: saved[name][k].to(device=v.device, dtype=v.dtype).clone() for k, v in want.items()}
        self.updates = int(state["updates"])
