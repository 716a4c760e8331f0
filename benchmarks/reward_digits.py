"""MTKD-RL rewards on a dark-knowledge-corrupted pool, sklearn digits (seconds per run on CPU).

Pool (pre_logits features, one-hidden-layer MLP teachers with timm's classifier API):
teacher 0 and teacher 1 are MLPs trained on the training split (different seeds); teacher 2
is teacher 0 with, on every sample whose argmax is in the first half of the classes, its
non-argmax logits shifted cyclically among themselves: its top-1, its CE wherever it is
right and its features are teacher 0's, only the similarity structure of its soft labels is
wrong on half the classes. The right answer, written before the run: a policy that values
dark knowledge puts less than the uniform share 1/3 of the logit weight on teacher 2 on the
corrupted samples; a CE-based policy (camkd) cannot see it (~1/3).

For each policy and seed a student MLP is distilled (SGD, batch 64); reported: the student's
test top-1 at the end, and the mean logit weight on teacher 2 over the last epoch on the
corrupted samples, as a multiple of the uniform share.

    OMP_NUM_THREADS=1 python benchmarks/reward_digits.py --seeds 0 1 2 --epochs 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.distiller import Distiller  # noqa: E402
from distill.step import TrainSettings, TrainStep  # noqa: E402
from distill.policies import build_policy  # noqa: E402
from distill.resolve import DataSpec  # noqa: E402
from distill.taps import FeatureTap  # noqa: E402
from distill.teachers import InputAdapter, Teacher, TeacherPool  # noqa: E402

CLASSES, TAP = 10, FeatureTap("pre_logits")
DATA = DataSpec((1, 8, 8), (0.0,), (1.0,))
POLICIES = {"aver": ("aver", {}), "camkd": ("camkd", {}), "mtkd_rl align": ("mtkd_rl", {}),
            "mtkd_rl heldout": ("mtkd_rl", {"reward": "heldout"})}


class DarkKnowledgePermuted(nn.Module):
    """Logits ``(B, C)`` -> :func:`permute_dark_knowledge` of them."""

    def forward(self, logits):
        return permute_dark_knowledge(logits)


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU, then a linear classifier (timm's classifier API); ``corrupt``:
    the classifier's logits go through :class:`DarkKnowledgePermuted`."""

    def __init__(self, hidden: int, corrupt: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, CLASSES)
        self.classifier = nn.Sequential(self.fc, DarkKnowledgePermuted()) if corrupt else self.fc

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, f, pre_logits: bool = False):
        return f if pre_logits else self.classifier(f)

    def get_classifier(self):
        return self.classifier

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def corrupted(logits):
    """Return ``(B,)`` bool: the samples whose argmax is in the first half of the classes."""
    return logits.argmax(1) < CLASSES // 2


def permute_dark_knowledge(logits):
    """Non-argmax logits shifted cyclically among themselves on the :func:`corrupted` samples."""
    top = logits.argmax(1, keepdim=True)
    order = torch.arange(logits.shape[1], device=logits.device).expand_as(logits)
    others = order[order != top].view(len(logits), -1)
    shifted = logits.clone().scatter_(1, others, logits.gather(1, others.roll(1, 1)))
    return torch.where(corrupted(logits).unsqueeze(1), shifted, logits)


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = (torch.tensor(x, dtype=torch.float32)[order] / 16).view(-1, 1, 8, 8)
    y = torch.tensor(y)[order]
    return x[:1200], y[:1200], x[1200:], y[1200:]


def train_teacher(x, y, seed):
    torch.manual_seed(seed)
    net = MLP(128)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(600):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return net.eval()


def run(policy_key, teachers, data, seed, epochs, lr):
    x, y, x_test, y_test = data
    name, args = POLICIES[policy_key]
    torch.manual_seed(seed)
    pool = TeacherPool([Teacher(str(i), t, InputAdapter(DATA, DATA.mean, DATA.std), TAP, DATA.input_size)
                        for i, t in enumerate(teachers)])
    policy = build_policy(name, len(teachers), dict(args))
    distiller = Distiller(MLP(32), pool, policy, TAP, DATA.input_size)
    step = TrainStep(distiller, torch.optim.SGD(distiller.trainable.parameters(), lr=lr, momentum=0.9), TrainSettings())
    with torch.no_grad():
        bad = corrupted(teachers[0](x))
    share = []
    for epoch in range(epochs):
        policy.begin_epoch(epoch)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 * seed + epoch))
        share = []
        for s in range(0, len(y) - 63, 64):
            idx = order[s:s + 64]
            out = step(x[idx], y[idx])
            w = out.weights.logit[bad[idx]]
            share.append(w[:, 2] * len(teachers))
        policy.end_epoch(epoch)
    distiller.student.eval()
    with torch.no_grad():
        top1 = (distiller.student(x_test).argmax(1) == y_test).float().mean().item() * 100
    return top1, torch.cat(share).mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = digits()
    clean = [train_teacher(data[0], data[1], s) for s in (10, 11)]
    bad = MLP(128, corrupt=True)
    bad.load_state_dict(clean[0].state_dict(), strict=False)
    teachers = [clean[0], clean[1], bad.eval()]
    with torch.no_grad():
        accs = [(t(data[2]).argmax(1) == data[3]).float().mean().item() * 100 for t in teachers]
    print(f"teachers' test top-1: {', '.join(f'{a:.2f}' for a in accs)}; student MLP(32), {args.epochs} epochs, "
          f"seeds {args.seeds}")
    print("| policy | student top-1 (mean ± sd) | teacher 2 logit weight on corrupted samples, × uniform |")
    print("|---|---|---|")
    for key in args.policies:
        results = [run(key, teachers, data, s, args.epochs, args.lr) for s in args.seeds]
        top1, share = zip(*results)
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"| {key} | {statistics.mean(top1):.2f} ± {sd:.2f} ({', '.join(f'{t:.2f}' for t in top1)}) | "
              f"{statistics.mean(share):.3f} ({', '.join(f'{v:.3f}' for v in share)}) |", flush=True)


if __name__ == "__main__":
    main()
