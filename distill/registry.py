"""One resolver for a model spec: timm name (with ``.tag``), zoo entry, ``hf-hub:org/repo``,
``local-dir:PATH``, a distill checkpoint / run directory, or an architecture plus a local
weights file. Returns the model and its data config (input size, mean, std).

Weights files are never unpickled beyond ``torch.load(weights_only=True)``; safetensors
first. Downloads (timm URLs) land in ``$DISTILL_HOME/weights``, where a pre-filled copy is
found offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

import zoo  # noqa: F401  (registers the zoo's architectures into timm)

from .checkpoint import STUDENT_PREFIX, load_tensors, read_metadata, split_prefix
from .errors import DistillError, RecipeError, close_matches
from .paths import weights_dir

_SOURCES = ("hf-hub:", "local-dir:")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".th", ".bin")


@dataclass
class DataSpec:
    """How a model expects its input: ``input_size (C, H, W)``, per-channel ``mean`` / ``std``."""

    input_size: tuple
    mean: tuple
    std: tuple

    def to_json(self) -> str:
        """Return the spec as a JSON string (for checkpoint metadata)."""
        return json.dumps({"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std)})

    @classmethod
    def from_json(cls, text: str) -> "DataSpec":
        """Return the spec stored by :meth:`to_json`."""
        raw = json.loads(text)
        return cls(tuple(raw["input_size"]), tuple(raw["mean"]), tuple(raw["std"]))


@dataclass
class ResolvedModel:
    """A built model, the data spec its weights expect, and where the weights came from.

    ``data`` is None when the weights carry no normalisation of their own (random init),
    in which case the model is trained on, and fed, the dataset's normalisation.
    """

    model: nn.Module
    arch: str
    data: Optional[DataSpec]
    source: Dict[str, Any] = field(default_factory=dict)
    model_args: Dict[str, Any] = field(default_factory=dict)


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "best.safetensors").is_file()


def check_spec(spec: str, where: str, weights: Optional[str] = None) -> None:
    """Raise RecipeError (naming ``where``) if ``spec`` cannot name a model; no model is built."""
    if weights is not None and not Path(weights).is_file():
        raise RecipeError(where.rsplit(".", 1)[0] + ".weights", f"file not found: {weights}")
    if spec.startswith("hf-hub:"):
        return
    if spec.startswith("local-dir:"):
        if not Path(spec[len("local-dir:"):]).is_dir():
            raise RecipeError(where, f"folder not found: {spec}")
        return
    path = Path(spec)
    if path.suffix in WEIGHT_SUFFIXES or "/" in spec or path.exists():
        if not (path.is_file() or _is_run_dir(path)):
            raise RecipeError(where, f"no checkpoint file or run directory at {spec}")
        return
    if not timm.is_model(spec):
        arch = spec.split(".")[0]
        raise RecipeError(where, f"unknown model {spec!r}{close_matches(arch, _known_models())}")
    if "." in spec and not timm.list_pretrained(spec):
        tags = timm.list_pretrained(spec.split(".")[0] + ".*")
        raise RecipeError(where, f"{spec!r} has no pretrained tag {spec.split('.', 1)[1]!r}; "
                                 f"known: {', '.join(tags) or 'none'}")


def _known_models() -> list:
    return sorted(set(timm.list_models()) | set(zoo.list_models()))


def resolve_model(spec: str, *, pretrained: bool = False, weights: Optional[str] = None,
                  num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                  model_args: Optional[Dict[str, Any]] = None, where: str = "model") -> ResolvedModel:
    """Return the :class:`ResolvedModel` for ``spec``.

    ``num_classes`` / ``in_chans`` set the head and stem of a model built without weights;
    a model loaded with weights keeps the class count of its weights (the caller checks it
    against the dataset). ``weights`` loads a local file into the architecture ``spec``.
    """
    args = dict(model_args or {})
    path = Path(spec)
    if not spec.startswith(_SOURCES) and (path.is_file() or _is_run_dir(path)):
        return load_student_checkpoint(path / "best.safetensors" if path.is_dir() else path)
    check_spec(spec, where, weights)
    if weights is not None:
        return _load_weights_file(spec, Path(weights), in_chans, args, where)

    build_args = dict(args)
    if not pretrained or spec.startswith(_SOURCES):
        if num_classes is not None and not pretrained:
            build_args["num_classes"] = num_classes
        if in_chans is not None and not pretrained:
            build_args["in_chans"] = in_chans
    try:
        model = timm.create_model(spec, pretrained=pretrained, cache_dir=str(weights_dir()), **build_args)
    except RuntimeError as exc:
        if "No pretrained weights" in str(exc) or "Invalid pretrained config" in str(exc):
            raise DistillError(f"{where}: {spec} has no pretrained weights; set pretrained: false "
                               "(with train: for a teacher) or give weights: FILE") from None
        raise
    source: Dict[str, Any] = {"spec": spec}
    data = None
    if pretrained:
        data = _data_spec(model)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        source.update({k: cfg[k] for k in ("hf_hub_id", "url", "file") if cfg.get(k)})
    recorded_args = {k: v for k, v in build_args.items() if k != "num_classes"}
    return ResolvedModel(model, spec, data, source, recorded_args)


def _data_spec(model: nn.Module) -> DataSpec:
    cfg = resolve_model_data_config(model)
    return DataSpec(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))


def _load_weights_file(spec: str, path: Path, in_chans: Optional[int], args: Dict[str, Any],
                       where: str) -> ResolvedModel:
    """Build ``spec`` and load a local weights file into it through timm's file loader.

    timm applies the architecture's checkpoint filter (key mapping for foreign weights);
    ``.pth`` files go through ``torch.load(weights_only=True)``.
    """
    if path.suffix not in WEIGHT_SUFFIXES:
        raise DistillError(f"{path}: unsupported weights file type; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == ".safetensors" and read_metadata(path).get("distill.arch"):
        return load_student_checkpoint(path)
    build_args = dict(args)
    if in_chans is not None:
        build_args["in_chans"] = in_chans
    try:
        model = timm.create_model(spec, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **build_args)
    except Exception as exc:  # unpickling refused, truncated file, strict-load mismatch, ...
        text = " ".join(str(exc).strip().splitlines()[:2])
        if "weights_only" in text or "Unpickl" in text:
            raise DistillError(f"{path}: cannot load weights: refused to unpickle objects beyond plain "
                               "tensors (weights_only=True); convert the file to safetensors") from None
        if isinstance(exc, RuntimeError) and ("size mismatch" in text or "state_dict" in text):
            raise DistillError(f"{path}: weights do not fit {spec} ({text[:300]})") from None
        raise DistillError(f"{path}: cannot load weights ({type(exc).__name__}: {text[:200]})") from None
    return ResolvedModel(model, spec, _data_spec(model), {"spec": spec, "file": str(path)}, args)


def load_student_checkpoint(path: Path) -> ResolvedModel:
    """Return the student stored in a distill checkpoint ``.safetensors`` file."""
    meta = read_metadata(path)
    if "distill.arch" not in meta:
        raise DistillError(f"{path}: not a distill checkpoint (no distill.arch metadata); "
                           "give the architecture as model: ARCH with weights: FILE")
    arch = meta["distill.arch"]
    args = json.loads(meta.get("distill.model_args", "{}"))
    model = timm.create_model(arch, pretrained=False, num_classes=int(meta["distill.num_classes"]), **args)
    state = split_prefix(load_tensors(path), STUDENT_PREFIX)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DistillError(f"{path}: checkpoint does not fit {arch} (missing {list(missing)[:3]}, "
                           f"unexpected {list(unexpected)[:3]})")
    data = DataSpec.from_json(meta["distill.data_config"])
    return ResolvedModel(model, arch, data, {"spec": str(path), "file": str(path)}, args)


def student_metadata(resolved_arch: str, model: nn.Module, model_args: Dict[str, Any], data: DataSpec) -> Dict[str, str]:
    """Return the safetensors metadata that lets a checkpoint rebuild its student."""
    return {
        "distill.arch": resolved_arch,
        "distill.num_classes": str(model.num_classes),
        "distill.model_args": json.dumps(model_args, sort_keys=True),
        "distill.data_config": data.to_json(),
    }


def count_params(model: nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())

