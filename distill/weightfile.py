"""Complete loads of a local weights file into an architecture (``model: ARCH`` + ``weights: FILE``).

After a load every tensor of the model came from the file, except those the user lists as
intentionally new (``new_keys: [fc.*]``, fnmatch patterns, e.g. a re-initialised head for
fine-tuning). A missing, unexpected or shape-mismatched key is one DistillError line naming
the keys and the file. The class count comes from the file's classifier unless the user sets
``model_args.num_classes`` (then the file must fit it, or the head must be listed as new).

The file's normalisation (its data config) comes from the spec's pretrained tag
(``cifar_resnet56.akamaster_cifar10``), else from the tag whose published file has this
file's name (``resnet56-4bfd9763.th``); otherwise the file carries none and the model sees
the dataset's normalisation (or the recipe's ``mean`` / ``std``).
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
from torch import nn

from .checkpoint import load_tensors
from .errors import DistillError
from .fileio import load_torch_file, require_finite

_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")


@dataclass
class LoadedFile:
    """A model with every tensor from ``path`` (or listed in ``new_keys``), and its data config tag."""

    model: nn.Module
    data_tag: Optional[str]  # the pretrained tag whose data config (mean, std, size) the file follows; None: none


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Return the tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``.

    A checkpoint wrapper (``{'state_dict': {...}, 'epoch': ...}``) is unwrapped and the
    ``module.`` / ``_orig_mod.`` prefixes of DDP / torch.compile are removed.
    """
    from timm.models import clean_state_dict

    if path.suffix == ".safetensors":
        return load_tensors(path)
    obj: Any = load_torch_file(path)
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DistillError(f"{path}: holds no tensors (expected a state dict, or one under 'state_dict' / 'model')")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    require_finite(state, path)
    return clean_state_dict(state)


def architecture_filter(model: nn.Module) -> Optional[Callable]:
    """Return the architecture's checkpoint key mapping (timm's ``checkpoint_filter_fn`` convention), or None."""
    return getattr(inspect.getmodule(type(model)), "checkpoint_filter_fn", None)


def mapped_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Return ``state`` in ``model``'s key names (the architecture's filter applied, if it has one)."""
    fn = architecture_filter(model)
    return dict(fn(state, model)) if fn is not None else state


def _classifier_keys(model: nn.Module) -> List[str]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    names = cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def file_num_classes(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[int]:
    """Return the class count of the classifier in ``state`` (mapped), or None when it has none."""
    for key in _classifier_keys(model)[::2]:
        if key in state and state[key].ndim >= 1:
            return int(state[key].shape[0])
    return None


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _show(keys: List[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_complete(model: nn.Module, state: Dict[str, torch.Tensor], path: Path, spec: str,
                  new_keys: Sequence[str] = ()) -> None:
    """Load ``state`` into ``model``; raise DistillError unless every model tensor not in ``new_keys`` is in it
    with the model's shape, and the file has no tensor the model lacks."""
    expected = model.state_dict()
    for pattern in new_keys:
        if not any(_matches(k, [pattern]) for k in expected):
            raise DistillError(f"new_keys: {pattern!r} matches no tensor of {spec} (its keys look like "
                               f"{_show(list(expected), 3)})")
    state = {k: v for k, v in state.items() if not _matches(k, new_keys)}
    missing = [k for k in expected if k not in state and not _matches(k, new_keys)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in state
                  if k in expected and state[k].shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch (file vs model): {_show(mismatched)}")
    if missing:
        problems.append(f"missing from the file: {_show(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_show(unexpected)}")
    if problems:
        raise DistillError(f"{path}: weights do not fit {spec}: {'; '.join(problems)} (list tensors to "
                           "initialise afresh with new_keys, e.g. new_keys: [fc.*])")
    model.load_state_dict(state, strict=False)


def data_tag(spec: str, path: Path) -> Optional[str]:
    """Return the pretrained tag whose data config a file follows: ``spec``'s own tag, else the tag that
    publishes a file of this name; None when neither."""
    from timm.models import get_pretrained_cfg

    if "." in spec:
        return spec
    for name in timm.list_pretrained(spec + ".*"):
        cfg = get_pretrained_cfg(name)
        if cfg is not None and any(u and Path(u).name == path.name for u in (cfg.url, cfg.file)):
            return name
    return None


def load_weights_file(spec: str, path: Path, build_args: Dict[str, Any], new_keys: Sequence[str] = (),
                      num_classes: Optional[int] = None) -> LoadedFile:
    """Return ``spec`` built with ``build_args`` and loaded completely from ``path``.

    The class count is ``build_args['num_classes']`` if given, else ``num_classes`` (the
    dataset's) when the classifier is listed in ``new_keys``, else the file's.
    """
    raw = read_state_dict(path)
    try:
        model = timm.create_model(spec, pretrained=False, **build_args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DistillError(f"{spec}: cannot build the model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") \
            from None
    state = mapped_state(model, raw)
    if "num_classes" not in build_args:
        head_new = any(_matches(k, new_keys) for k in _classifier_keys(model))
        wanted = num_classes if head_new and num_classes is not None else file_num_classes(model, state)
        if wanted is not None and wanted != model.num_classes:
            model = timm.create_model(spec, pretrained=False, **build_args, num_classes=wanted)
            state = mapped_state(model, raw)  # the file read once: only the mapping depends on the model
    load_complete(model, state, path, spec, new_keys)
    return LoadedFile(model, data_tag(spec, path))


def label(spec: str, weights: Optional[str]) -> str:
    """Return how tables name a model: ``spec``, or ``FILE (spec)`` when its weights come from a file."""
    return f"{Path(weights).name} ({spec})" if weights else spec
