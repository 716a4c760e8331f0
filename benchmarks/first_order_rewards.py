"""Can a first-order reward see a corrupted teacher's dark knowledge?

MTKD-RL's rewards ask whether a step on teacher m's distillation term for sample i lowers the
student's cross-entropy, to first order: ``reward: align`` on sample i itself (the cosine of
the two per-sample gradients on the logits), ``reward: heldout`` on other samples (the inner
product with a held-out CE gradient in the space of the student's linear classifier, learning
to reweight, Ren et al. 2018). This script measures, for a trained student and a pool with one
corrupted teacher, what each reward gives the corrupted teacher on its corrupted (sample,
teacher) pairs against the other teachers, with the held-out gradient at its best: from a
whole held-out set rather than one batch, and in the space of *all* the student's parameters
(the full look-ahead of learning to reweight) rather than the classifier's.

Rewards (per training sample i and teacher m; ``g_mi`` the gradient of the KD term, ``e_i``
that of the CE, both on the student's logits; held-out images from the test split):

- ``align``: ``cos(e_i, g_mi)`` (the policy's ``reward: align`` at the logit level);
- ``heldout, batch``: the policy's ``reward: heldout`` (:mod:`distill.policies.mtkd_rl.heldout`),
  the held-out gradient from 64 held-out images (a fresh draw per training batch);
- ``heldout, all held-out``: the same with the gradient from every held-out image;
- ``heldout, all parameters``: ``<grad_theta KD_m[i], grad_theta CE_H>`` over every parameter
  of the student (BatchNorm in eval mode, so each sample's gradient is its own), ``CE_H``
  over every held-out image (``--all-params`` training samples: per-sample gradients cost).

Reported on the corrupted pairs and, as a control, on the corrupted teacher's clean pairs:
``z``, the mean of (the corrupted teacher's reward minus the mean of the others') over the
per-sample standard deviation of the M rewards (negative: the reward ranks it below the
others), and how often it gets the lowest of the M rewards (chance: 1/M). A reward that can
steer weight off the corrupted pairs needs ``z < 0`` there.

    python benchmarks/first_order_rewards.py RUN_DIR [RUN_DIR ...] --corrupt 3:dark \\
        --set data.root=/tmp/cifar10 --train 2048 --heldout 2000 --all-params 512

``RUN_DIR``: a finished run (``recipe.yaml``, ``last.safetensors``), e.g. of the converged study;
its recipe gives the teachers, the data and T (the teacher cache and stored views are not used).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zoo  # noqa: E402,F401  (registers the zoo models)
import accuracy  # noqa: E402
from corruptions import corrupt_teacher, corrupted_pairs  # noqa: E402
from distill.errors import DistillError  # noqa: E402
from distill.losses import kd_loss  # noqa: E402
from distill.policies.mtkd_rl.heldout import HeldoutGradient, ce_logit_gradient  # noqa: E402

MEASURED_KINDS = ("dark",)  # corruptions of the logits on some pairs: the rewards measured here are the logit level's
REWARDS = ("align", "heldout, batch", "heldout, all held-out", "heldout, all parameters")
HELDOUT_BATCH = 64


def pair_statistics(rewards: Tensor, mask: Tensor, index: int) -> Dict[str, float]:
    """Return, for teacher ``index``'s rewards in ``rewards (B, M)`` on the samples where
    ``mask (B,)`` is True: ``z`` (mean of its reward minus the others' mean, over the per-sample
    std of the M rewards) and ``lowest`` (the share of those samples where its reward is the least)."""
    rewards, mask = rewards[mask], mask[mask]
    others = torch.cat([rewards[:, :index], rewards[:, index + 1:]], dim=1)
    z = (rewards[:, index] - others.mean(1)) / rewards.std(1).clamp_min(1e-12)
    lowest = (rewards.argmin(1) == index).float()
    return {"z": float(z.mean()), "lowest": float(lowest.mean()), "pairs": int(mask.numel())}


def kd_logit_gradients(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Return each teacher's per-sample KD gradient on the student logits, ``(M, B, C)``
    (``logits (B, C)``, ``teacher_logits (M, B, C)``; the toolkit's :func:`kd_loss`)."""
    z = logits.detach().float().requires_grad_(True)
    rows = [torch.autograd.grad(kd_loss(z, t.float(), temperature).sum(), z)[0] for t in teacher_logits]
    return torch.stack(rows)


def classifier_gradient(logits: Tensor, target: Tensor, embedding: Tensor, bias: bool) -> HeldoutGradient:
    """Return a :class:`HeldoutGradient` holding the CE gradient of these held-out samples."""
    held = HeldoutGradient()
    held.update(logits, target, embedding, bias)
    return held


def parameter_gradient(model: nn.Module, x: Tensor, target: Tensor, chunk: int = 250) -> Dict[str, Tensor]:
    """Return the gradient of the mean CE of ``model`` over ``x (N, ...)`` w.r.t. each parameter."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        loss = F.cross_entropy(model(x[part]), target[part], reduction="sum") / len(x)
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            total[name] += g
    return total


def parameter_rewards(model: nn.Module, x: Tensor, teacher_logits: Tensor, temperature: float,
                      heldout: Dict[str, Tensor], chunk: int = 32) -> Tensor:
    """Return ``<grad_theta KD_m[i], heldout>`` for each sample of ``x (B, ...)`` and teacher of
    ``teacher_logits (M, B, C)``, shape ``(B, M)`` (per-sample gradients by ``torch.func``;
    ``model`` in eval mode, so no sample's gradient mixes another's)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    flat = torch.cat([heldout[k].flatten() for k in params])

    def term(p: Dict[str, Tensor], xi: Tensor, ti: Tensor) -> Tensor:
        z = functional_call(model, (p, buffers), (xi[None],))
        return kd_loss(z, ti[None], temperature)[0]

    out = torch.zeros(len(x), len(teacher_logits))
    for m, tm in enumerate(teacher_logits):
        for start in range(0, len(x), chunk):
            part = slice(start, start + chunk)
            grads = vmap(grad(term), in_dims=(None, 0, 0))(params, x[part], tm[part])
            out[part, m] = torch.cat([grads[k].flatten(1) for k in params], dim=1) @ flat
    return out


def student_parts(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Return the student's logits ``(B, C)`` and its classifier's input ``(B, d)``."""
    embedding = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.get_classifier()(embedding), embedding


def measure(run_dir: Path, corrupt: Tuple[int, str], overrides: Sequence[str], train: int, heldout: int,
            all_params: int, seed: int = 0) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Return ``{reward: {"corrupted": stats, "clean": stats}}`` (:func:`pair_statistics`) for the
    student of ``run_dir`` and its recipe's pool with teacher ``corrupt[0]`` corrupted as ``corrupt[1]``."""
    from distill.pipeline import RecipeRunner
    from distill.recipe_load import load_recipe, teacher_configs
    from distill.resolve import load_student_checkpoint

    recipe = load_recipe(run_dir / "recipe.yaml", [
        *overrides, "run.teacher_cache=null", "data.fixed_views=null", "run.teacher_cache_view_seed=null",
        f"data.train_subset={train}", f"data.val_subset={heldout}", "data.num_workers=0"])
    runner = RecipeRunner(recipe)
    teachers = [runner.prepare_teacher(i, cfg) for i, cfg in enumerate(teacher_configs(recipe))]
    index, kind = corrupt
    if index >= len(teachers):
        raise DistillError(f"--corrupt: teacher {index} does not exist ({run_dir} has {len(teachers)} teachers)")
    teachers[index] = corrupt_teacher(teachers[index], kind, index, runner.bundle.input_size)
    model = load_student_checkpoint(run_dir / "last.safetensors").model.eval()
    bias = model.get_classifier().bias is not None
    temperature = recipe.distill.temperature

    def collect(loader) -> Tuple[Tensor, ...]:
        xs, ys = zip(*loader)
        x, y = torch.cat(xs), torch.cat(ys)
        with torch.inference_mode():
            logits, embedding = student_parts(model, x)
            teacher_logits = torch.stack([t.logits(x) for t in teachers])
        return x, y, logits.clone(), embedding.clone(), teacher_logits.clone()

    torch.manual_seed(seed)
    xh, yh, zh, hh, _ = collect(runner.val_loader)
    x, y, z, h, tl = collect(runner.train_loader)
    mask = corrupted_pairs(tl, {index: kind}, y)[index]
    g = kd_logit_gradients(z, tl, temperature)
    e = ce_logit_gradient(z, y)
    draw = torch.Generator().manual_seed(seed)
    batch = torch.zeros(len(y), len(teachers))
    for start in range(0, len(y), HELDOUT_BATCH):  # one fresh held-out batch per training batch
        part = slice(start, start + HELDOUT_BATCH)
        pick = torch.randperm(len(yh), generator=draw)[:HELDOUT_BATCH]
        batch[part] = classifier_gradient(zh[pick], yh[pick], hh[pick], bias).rewards(g[:, part], h[part])
    rewards = {
        "align": torch.stack([F.cosine_similarity(e, gm, dim=1) for gm in g], dim=1),
        "heldout, batch": batch,
        "heldout, all held-out": classifier_gradient(zh, yh, hh, bias).rewards(g, h),
    }
    if all_params:
        n = min(all_params, len(y))
        rewards["heldout, all parameters"] = parameter_rewards(model, x[:n], tl[:, :n], temperature,
                                                              parameter_gradient(model, xh, yh))
    out = {}
    for name, u in rewards.items():
        m = mask[:len(u)]
        out[name] = {"corrupted": pair_statistics(u, m, index), "clean": pair_statistics(u, ~m, index)}
    out["_student"] = {"train_top1": float((z.argmax(1) == y).float().mean() * 100),
                       "heldout_top1": float((zh.argmax(1) == yh).float().mean() * 100),
                       "teachers": len(teachers)}
    return out


def table(results: Dict[str, Dict]) -> str:
    """Return the markdown table of :func:`measure`'s results over runs (mean ± std over runs)."""
    teachers = {r["_student"]["teachers"] for r in results.values()}
    chance = " / ".join(f"{1 / m:.2f}" for m in sorted(teachers))
    lines = [f"| reward | corrupted pairs: z | lowest (chance {chance}) | clean pairs: z | lowest |",
             "|---|---:|---:|---:|---:|"]
    for reward in REWARDS:
        rows = [r[reward] for r in results.values() if reward in r]
        if not rows:
            continue
        cells = [accuracy.mean_std([row[part][key] for row in rows], signed=key == "z")
                 for part in ("corrupted", "clean") for key in ("z", "lowest")]
        lines.append(f"| {reward} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished runs (recipe.yaml, last.safetensors)")
    parser.add_argument("--corrupt", required=True, help="INDEX:KIND, e.g. 3:dark (kinds: %s)" % ", ".join(MEASURED_KINDS))
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides, e.g. data.root=/tmp/cifar10")
    parser.add_argument("--train", type=int, default=2048, help="training images (augmented views) measured")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out (test) images")
    parser.add_argument("--all-params", type=int, default=512, help="training images for the all-parameter reward (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(list(argv))
    index, _, kind = args.corrupt.partition(":")
    if not index.isdigit() or kind not in MEASURED_KINDS:
        parser.error(f"--corrupt: {args.corrupt!r} is not INDEX:KIND with KIND one of {', '.join(MEASURED_KINDS)}")
    torch.set_num_threads(args.threads)
    results = {}
    for run in args.runs:
        results[str(run)] = measure(run, (int(index), kind), args.set, args.train, args.heldout, args.all_params)
        student = results[str(run)]["_student"]
        print(f"{run}: student {student['train_top1']:.1f} % train views, {student['heldout_top1']:.1f} % held-out",
              file=sys.stderr)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
