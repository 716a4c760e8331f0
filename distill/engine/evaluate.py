"""Evaluation: top-1, top-5 and mean cross-entropy of a model on a loader (sharded under DDP)."""

from __future__ import annotations

import sys
from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from .. import distributed
from ..errors import DistillError
from ..runtime import autocast


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], loader, device: torch.device,
             dtype: Optional[torch.dtype] = None, desc: str = "eval", progress: bool = False) -> Dict[str, float]:
    """Return ``{'top1', 'top5', 'loss'}`` (percent, percent, mean CE) of ``forward`` on ``loader``."""
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = forward(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y.unsqueeze(1))
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(1).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        count += y.shape[0]
    if distributed.is_distributed():  # sharded evaluation: sum every rank's shard
        total = torch.stack([correct1, correct5, loss_sum.double(), torch.tensor(float(count), device=device)])
        distributed.all_reduce_sum([total])
        correct1, correct5, loss_sum, count = total[0], total[1], total[2], int(total[3].item())
    if count == 0:
        raise DistillError("evaluation set is empty")
    return {"top1": 100.0 * correct1.item() / count, "top5": 100.0 * correct5.item() / count,
            "loss": loss_sum.item() / count}
