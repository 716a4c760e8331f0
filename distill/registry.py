"""One resolver for a model spec: timm name (with ``.tag``), zoo entry,
``hf-hub:org/repo[@revision]``, ``local-dir:PATH``, a distill checkpoint / run directory, or
an architecture plus a local weights file. Returns the model and its data config (input
size, mean, std), and where the weights came from (``ResolvedModel.source``, with a content
hash of the weights as loaded: :func:`distill.manifest.content_hash`).

Weights files are never unpickled beyond ``torch.load(weights_only=True)``; safetensors
first. Downloads (timm URLs) land in ``$DISTILL_HOME/weights``, where a pre-filled copy is
found offline. ``hf-hub:`` specs go through huggingface_hub's own cache (``HF_HUB_CACHE`` /
``HF_HOME``), honour ``HF_HUB_OFFLINE`` and take the token from the environment; the
revision (branch, tag or commit; default ``main``) is resolved to a commit once and config
and weights are both read at that commit.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import timm
from timm.data import resolve_model_data_config
from torch import nn

import zoo  # noqa: F401  (registers the zoo's architectures into timm)

from .checkpoint import STUDENT_PREFIX, load_tensors, read_metadata, split_prefix
from .errors import DistillError, RecipeError, close_matches
from .fetch import require_local_weights, weight_download
from .fileio import check_readable, require_finite
from .manifest import content_hash
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
    if weights is not None:
        try:
            check_readable(weights, "weights file")
        except DistillError as exc:
            raise RecipeError(where.rsplit(".", 1)[0] + ".weights", str(exc)) from None
    if spec.startswith("hf-hub:"):
        parse_hub_spec(spec, where)
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


def parse_hub_spec(spec: str, where: str = "model") -> Tuple[str, Optional[str]]:
    """Return ``(repo_id, revision)`` of ``hf-hub:org/name[@revision]`` (revision None: main)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, at, revision = spec[len("hf-hub:"):].partition("@")
    if repo_id.count("/") != 1 or (at and (not revision or "@" in revision)):
        raise RecipeError(where, f"{spec!r} is not hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise RecipeError(where, f"{spec!r}: bad repository id ({str(exc).splitlines()[0]})") from None
    return repo_id, revision or None


@contextlib.contextmanager
def _hub_errors(spec: str, where: str) -> Iterator[None]:
    """Turn huggingface_hub's download errors into one-line DistillErrors naming ``spec``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    def first_line(exc: BaseException) -> str:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]

    try:
        yield
    except GatedRepoError:
        raise DistillError(f"{where}: {spec}: gated repository; accept its terms on the Hub and set "
                           "HF_TOKEN in the environment") from None
    except RepositoryNotFoundError:
        raise DistillError(f"{where}: {spec}: repository not found on the Hub (a private one needs a token: "
                           "set HF_TOKEN in the environment)") from None
    except RevisionNotFoundError:
        raise DistillError(f"{where}: {spec}: revision not found in the repository") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else f"the Hub could not be reached ({first_line(exc)})")
        raise DistillError(f"{where}: {spec}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                           f"and {why}; fetch it once online (or fill the cache), then work offline with "
                           "HF_HUB_OFFLINE=1") from None
    except EntryNotFoundError as exc:
        raise DistillError(f"{where}: {spec}: a file is missing from the repository ({first_line(exc)}); "
                           "is it a timm model (config.json + model.safetensors)?") from None
    except HfHubHTTPError as exc:
        raise DistillError(f"{where}: {spec}: Hub request failed ({first_line(exc)})") from None


def _weights_error(label: str, spec: str, exc: Exception) -> DistillError:
    """Return the DistillError for a weights file that timm failed to load into ``spec``."""
    text = " ".join(str(exc).strip().splitlines()[:2])
    if "weights_only" in text or "Unpickl" in text:
        return DistillError(f"{label}: cannot load weights: refused to unpickle objects beyond plain "
                            "tensors (weights_only=True); convert the file to safetensors")
    if isinstance(exc, RuntimeError) and ("size mismatch" in text or "state_dict" in text):
        return DistillError(f"{label}: weights do not fit {spec} ({text[:300]})")
    return DistillError(f"{label}: cannot load weights ({type(exc).__name__}: {text[:200]})")


def _source_config(config_file: Path, build_args: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """Return the timm architecture and rebuild arguments recorded in a Hub-layout config.json."""
    cfg = json.loads(config_file.read_text())
    arch = cfg.get("architecture") or cfg.get("pretrained_cfg", {}).get("architecture")
    args = {**cfg.get("model_args", {}), **build_args}
    args.pop("num_classes", None)
    return arch, args


def _resolve_hub(spec: str, pretrained: bool, build_args: Dict[str, Any], where: str) -> ResolvedModel:
    """Build ``hf-hub:org/name[@revision]`` with timm, config and weights pinned to one commit."""
    from huggingface_hub import hf_hub_download

    from . import __version__

    repo_id, revision = parse_hub_spec(spec, where)
    with _hub_errors(spec, where):
        config_file = Path(hf_hub_download(repo_id, "config.json", revision=revision,
                                           library_name="distill", library_version=__version__))
    snapshot = config_file.parent
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    pinned = f"hf-hub:{repo_id}@{commit}" if commit else spec
    try:
        with _hub_errors(spec, where):
            model = timm.create_model(pinned, pretrained=pretrained, **build_args)
    except DistillError:
        raise
    except Exception as exc:  # unpickling refused, truncated file, strict-load mismatch, ...
        raise _weights_error(f"{where}: {spec}", spec, exc) from None
    arch, args = _source_config(config_file, build_args)
    source: Dict[str, Any] = {"spec": spec, "hf_hub_id": repo_id, "revision": revision or "main", "commit": commit}
    data = None
    if pretrained:
        data = model_data_spec(model)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
            "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"]
        source["weights_file"] = next((n for n in names if (snapshot / n).is_file()), names[0])
        require_finite(model.state_dict(), f"{where}: {spec} ({snapshot / source['weights_file']})")
        source["sha256"] = content_hash(model)
    return ResolvedModel(model, arch, data, source, args)


def resolve_model(spec: str, *, pretrained: bool = False, weights: Optional[str] = None,
                  num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                  model_args: Optional[Dict[str, Any]] = None, where: str = "model",
                  new_keys: Sequence[str] = ()) -> ResolvedModel:
    """Return the :class:`ResolvedModel` for ``spec``.

    ``num_classes`` / ``in_chans`` set the head and stem of a model built without weights;
    a model loaded with weights keeps the class count of its weights (the caller checks it
    against the dataset). ``weights`` loads a local file into the architecture ``spec``, every
    tensor of it (``new_keys``: fnmatch patterns of tensors left at their initialisation; when
    they cover the classifier, it is built for ``num_classes``).
    """
    args = dict(model_args or {})
    path = Path(spec)
    if not spec.startswith(_SOURCES) and (path.is_file() or _is_run_dir(path)):
        return load_student_checkpoint(path / "best.safetensors" if path.is_dir() else path)
    check_spec(spec, where, weights)
    if weights is not None:
        return _load_weights_file(spec, Path(weights), in_chans, args, where, new_keys, num_classes)

    build_args = dict(args)
    if not pretrained or spec.startswith(_SOURCES):
        if num_classes is not None and not pretrained:
            build_args["num_classes"] = num_classes
        if in_chans is not None and not pretrained:
            build_args["in_chans"] = in_chans
    if spec.startswith("hf-hub:"):
        return _resolve_hub(spec, pretrained, build_args, where)
    if pretrained:
        require_local_weights(spec, where)
    try:
        with weight_download(spec, where), _hub_errors(spec, where):
            model = timm.create_model(spec, pretrained=pretrained, cache_dir=str(weights_dir()), **build_args)
    except RuntimeError as exc:
        if "No pretrained weights" in str(exc) or "Invalid pretrained config" in str(exc):
            raise DistillError(f"{where}: {spec} has no pretrained weights; set pretrained: false "
                               "(with train: for a teacher) or give weights: FILE") from None
        raise
    source: Dict[str, Any] = {"spec": spec}
    data = None
    if pretrained:
        data = model_data_spec(model)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        source.update({k: cfg[k] for k in ("hf_hub_id", "url", "file") if cfg.get(k)})
        require_finite(model.state_dict(), f"{where}: {spec} (pretrained weights)")
        source["sha256"] = content_hash(model)
    recorded_args = {k: v for k, v in build_args.items() if k != "num_classes"}
    arch = spec
    if spec.startswith("local-dir:"):  # record the architecture itself, so checkpoints rebuild without the folder
        arch, recorded_args = _source_config(Path(spec[len("local-dir:"):]) / "config.json", build_args)
    return ResolvedModel(model, arch, data, source, recorded_args)


def model_data_spec(model: nn.Module) -> DataSpec:
    """Return the data config (input size, mean, std) timm resolves for ``model``."""
    cfg = resolve_model_data_config(model)
    return DataSpec(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))


def _load_weights_file(spec: str, path: Path, in_chans: Optional[int], args: Dict[str, Any], where: str,
                       new_keys: Sequence[str] = (), num_classes: Optional[int] = None) -> ResolvedModel:
    """Build ``spec`` and load every tensor of it from a local weights file (:mod:`distill.weightfile`)."""
    from timm.models import get_pretrained_cfg

    from .weightfile import load_weights_file

    if path.suffix not in WEIGHT_SUFFIXES:
        raise DistillError(f"{path}: unsupported weights file type; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    stored_arch = read_metadata(path).get("distill.arch") if path.suffix == ".safetensors" else None
    if stored_arch:
        if stored_arch.split(".")[0] != spec.split(".")[0]:
            raise DistillError(f"{path}: a distill checkpoint of {stored_arch}, not of {spec}; give model: "
                               f"{stored_arch} (or the checkpoint path alone as the model spec)")
        return load_student_checkpoint(path)
    build_args = dict(args)
    if in_chans is not None:
        build_args["in_chans"] = in_chans
    loaded = load_weights_file(spec, path, build_args, new_keys, num_classes)
    data = None
    if loaded.data_tag is not None:
        cfg = get_pretrained_cfg(loaded.data_tag)
        data = DataSpec(tuple(cfg.input_size), tuple(cfg.mean), tuple(cfg.std))
    source = {"spec": spec, "file": str(path), "sha256": content_hash(loaded.model)}
    if loaded.data_tag is not None:
        source["data_config"] = loaded.data_tag
    if new_keys:
        source["new_keys"] = list(new_keys)
    recorded = {k: v for k, v in args.items() if k != "num_classes"}
    return ResolvedModel(loaded.model, spec, data, source, recorded)


def load_student_checkpoint(path: Path, prefix: str = STUDENT_PREFIX) -> ResolvedModel:
    """Return the student stored in a distill checkpoint ``.safetensors`` file (``prefix``
    ``ema.``: its EMA copy)."""
    meta = read_metadata(path)
    if "distill.arch" not in meta:
        raise DistillError(f"{path}: not a distill checkpoint (no distill.arch metadata); "
                           "give the architecture as model: ARCH with weights: FILE")
    arch = meta["distill.arch"]
    args = json.loads(meta.get("distill.model_args", "{}"))
    model = timm.create_model(arch, pretrained=False, num_classes=int(meta["distill.num_classes"]), **args)
    state = split_prefix(load_tensors(path), prefix)
    if not state:
        raise DistillError(f"{path}: holds no {prefix}* tensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DistillError(f"{path}: checkpoint does not fit {arch} (missing {list(missing)[:3]}, "
                           f"unexpected {list(unexpected)[:3]})")
    data = DataSpec.from_json(meta["distill.data_config"])
    return ResolvedModel(model, arch, data, {"spec": str(path), "file": str(path), "sha256": content_hash(model)}, args)


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

