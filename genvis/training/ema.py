"""Exponential moving average of a model's parameters (fp32), saved as safetensors."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps `self.model`, an fp32 copy whose trained parameters track the training model's; its frozen
    parameters and buffers (an EMA codebook, usage statistics) are copies of the training model's.

    decay_t = min(decay, (1 + step) / (10 + step)) with `warmup` (so early, poorly trained weights
    are forgotten quickly), else the constant `decay` (DiT: 0.9999 from the start).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self._params = dict(self.model.named_parameters())  # load_state_dict copies in place, so this stays valid
        self._buffers = dict(self.model.named_buffers())

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for name, p in model.named_parameters():
            if p.requires_grad:
                self._params[name].lerp_(p.detach().float(), 1.0 - d)
            else:  # not trained by the optimizer but may still change (an EMA codebook): follow it
                self._params[name].copy_(p.detach())
        for name, b in model.named_buffers():  # statistics (codebook usage) are copied, not averaged
            self._buffers[name].copy_(b.detach())

    def state_dict(self):
        return {k: v.contiguous() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
