"""The plain-PyTorch lower bound of a multi-teacher step, shared by ``step_cost.py`` and ``gpu.py``.

Every teacher's ``model(x)`` under ``torch.inference_mode()`` and the student's forward,
cross-entropy, backward and optimiser step: what any distillation step must at least do.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.runtime import autocast


def bound_step(models: Sequence[nn.Module], student: nn.Module, opt: torch.optim.Optimizer,
               device: torch.device, dtype: Optional[torch.dtype] = None,
               channels_last: bool = False) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Return ``step(x, y) -> None``: the lower bound's step, under autocast ``dtype`` (None:
    fp32), with ``x`` made channels-last first when ``channels_last``."""
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            with torch.inference_mode():
                for m in models:
                    m(x)
            loss = F.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step
