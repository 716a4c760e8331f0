"""Share a distilled student on the Hugging Face Hub, in timm's layout.

A run directory becomes a folder that ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``
(or ``'local-dir:DIR'``) loads as is:

- ``config.json``: architecture, num_classes, model_args, and a ``pretrained_cfg`` carrying the
  data config the student was trained on (input_size, mean, std, crop_pct) and label names
  (written by timm's ``save_for_hf``);
- ``model.safetensors``: the student's weights only (projectors and the policy / agent are
  training state and stay in the run directory);
- ``README.md``: a model card generated from the run (recipe, teacher pool with sources and
  content hashes, weighting policy, top-1 / top-5, how to load it, citation);
- ``weights.png``: the teacher-weight plot, when the run has one (``distill-plot``).

:func:`export_run` writes that folder; :func:`push_run` writes it to a temporary folder and
uploads it with huggingface_hub (``HfApi.create_repo`` + ``upload_folder``). The token is
whatever huggingface_hub finds (``HF_TOKEN``, ``hf auth login``): this module never reads it
into a message, a log or a file, and a failed upload changes nothing in the run directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .classmap import classes_line
from .errors import DistillError
from .fileio import read_json

HUB_FILES = ("config.json", "model.safetensors", "README.md")
PLOT_FILE = "weights.png"

CITATION = """@inproceedings{yang2025mtkdrl,
  title     = {Multi-Teacher Knowledge Distillation with Reinforcement Learning for Visual Recognition},
  author    = {Yang, Chuanguang and Yu, Xinqiang and Yang, Han and An, Zhulin and Yu, Chengqing and Huang, Libo and Xu, Yongjun},
  booktitle = {AAAI},
  year      = {2025}
}"""

_HUB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # dataset ids on the Hub, for the card's metadata
_TENSOR_DATASETS = ("digits", "cifar10", "cifar100")  # evaluated at native size without a crop


def repo_id_problem(repo_id: str) -> Optional[str]:
    """Return why ``repo_id`` is not a valid ``ORG/NAME`` Hub model id, or None if it is."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or "@" in repo_id:
        return f"{repo_id!r} is not ORG/NAME (a branch goes in --revision / hub.revision)"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return f"{repo_id!r} is not a valid repository id ({str(exc).splitlines()[0]})"
    return None


def check_repo_id(repo_id: str, where: str = "--repo-id") -> str:
    """Return ``repo_id`` if it is a valid ``ORG/NAME`` Hub model id; raise DistillError naming ``where``."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise DistillError(f"{where}: {problem}")
    return repo_id


# ----------------------------------------------------------------------------- reading a run


def _read_json(path: Path) -> Dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DistillError(f"{path}: not a JSON object")
    return data


class _Run:
    """What a finished run directory says about its student (JSON and YAML only; no tensors)."""

    def __init__(self, run_dir: Path, checkpoint: str):
        from .checkpoint import EMA_PREFIX, STUDENT_PREFIX

        self.dir = run_dir
        self.checkpoint = checkpoint
        stem = "last" if checkpoint == "ema" else checkpoint  # ema: the EMA student of the last checkpoint
        self.prefix = EMA_PREFIX if checkpoint == "ema" else STUDENT_PREFIX
        self.weights = run_dir / f"{stem}.safetensors"
        if not self.weights.is_file() or not (run_dir / f"{stem}.json").is_file():
            raise DistillError(f"{run_dir}: no {stem} checkpoint ({stem}.safetensors + "
                               f"{stem}.json); is it a distill run directory?")
        self.state = _read_json(run_dir / f"{stem}.json")
        if checkpoint == "ema" and self.state.get("ema_updates") is None:
            raise DistillError(f"{run_dir}: --checkpoint ema: the run kept no EMA of the student (run.ema was off)")
        last = run_dir / "last.json"
        self.last = _read_json(last) if last.is_file() else self.state
        recipe = run_dir / "recipe.yaml"
        self.recipe: Dict[str, Any] = yaml.safe_load(recipe.read_text()) or {} if recipe.is_file() else {}
        results = run_dir / "results.json"
        self.results: Dict[str, Any] = _read_json(results) if results.is_file() else {}

    @property
    def identity(self) -> Dict[str, Any]:
        return self.last.get("identity") or {}

    @property
    def policy(self) -> str:
        """Return the run's weighting policy name (from its checkpoint, else its recipe)."""
        return ((self.identity.get("distill") or {}).get("policy")
                or (self.recipe.get("distill") or {}).get("policy", "?"))

    def row(self, epoch: int) -> Dict[str, Any]:
        """Return the summary row of 0-based ``epoch`` (empty if unknown)."""
        return next((r for r in self.last.get("history", []) if r.get("epoch") == epoch + 1), {})

    def metrics(self) -> Dict[str, Any]:
        history = self.last.get("history", [])
        final = history[-1] if history else {}
        best_epoch = self.last.get("best_epoch", -1)
        best = self.row(best_epoch)
        pushed = self.row(self.state.get("epoch", -1))
        column = "val_ema_" if self.checkpoint == "ema" else "val_"
        return {"epochs": len(history), "final_top1": final.get("val_top1"), "final_top5": final.get("val_top5"),
                "best_top1": best.get("val_top1"), "best_top5": best.get("val_top5"), "best_epoch": best_epoch + 1,
                "pushed_epoch": self.state.get("epoch", -1) + 1, "pushed_top1": pushed.get(f"{column}top1"),
                "pushed_top5": pushed.get(f"{column}top5")}


# ----------------------------------------------------------------------------- the model card


def _pct(value: Optional[float]) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"


def _describe_source(source: Dict[str, Any]) -> str:
    """Return where a teacher's weights came from, in Markdown (no local directory names), with its class map."""
    where = _weights_origin(source)
    if source.get("classes") is not None:
        where += f"; outputs mapped to the data's classes (`{classes_line(source['classes'])}`)"
    return where


def _weights_origin(source: Dict[str, Any]) -> str:
    spec = source.get("spec", "?")
    if source.get("trained_in"):
        return f"`{spec}`, trained in this run (`{source['trained_in']}`)"
    if source.get("commit"):
        repo = source["hf_hub_id"]
        return (f"[`{repo}`](https://huggingface.co/{repo}/tree/{source['commit']}) at commit "
                f"`{source['commit']}` (asked for `{source.get('revision', 'main')}`)")
    if source.get("hf_hub_id"):
        return f"`{spec}` (timm; Hub `{source['hf_hub_id']}`)"
    if source.get("url"):
        return f"`{spec}` from <{source['url']}>"
    if source.get("file"):
        return f"`{Path(spec).name if '/' in spec else spec}` + file `{Path(source['file']).name}`"
    return f"`{spec}`"


def _public_recipe(recipe: Dict[str, Any]) -> Dict[str, Any]:
    """Return the recipe without machine-local paths (output_dir; folders and files by name only)."""
    recipe = json.loads(json.dumps(recipe))
    recipe.pop("output_dir", None)
    data = recipe.get("data") or {}
    if data.get("root"):
        data["root"] = Path(data["root"]).name
    for model in [recipe.get("student") or {}] + list(recipe.get("teachers") or []):
        if isinstance(model, dict) and model.get("weights"):
            model["weights"] = Path(model["weights"]).name
    return recipe


def model_card(run: _Run, arch: str, num_classes: int, load_spec: str, has_plot: bool) -> str:
    """Return the README.md of the pushed student: metadata header, results, teachers, usage, citation."""
    import zoo

    recipe, identity, m = run.recipe, run.identity, run.metrics()
    data = recipe.get("data") or {}
    dataset = data.get("dataset", "?")
    distill = recipe.get("distill") or {}
    policy = run.policy
    teachers = identity.get("teachers") or []
    accuracy = {t.get("name"): t for t in run.results.get("teachers", [])}
    name = load_spec.split(":", 1)[1].split("/")[-1] if load_spec.startswith("hf-hub:") else recipe.get("name", arch)
    num_val = run.results.get("num_val")

    front = {"library_name": "timm", "pipeline_tag": "image-classification",
             "tags": ["image-classification", "timm", "knowledge-distillation", "distill", f"policy-{policy}"]}
    if dataset in _HUB_DATASETS:
        front["datasets"] = [_HUB_DATASETS[dataset]]
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
           f"# {name}", "",
           f"A `{arch}` image classifier ({num_classes} classes, {dataset}) distilled from {len(teachers)} "
           f"teacher{'s' if len(teachers) != 1 else ''} with the `{policy}` teacher-weighting policy by "
           "distill (multi-teacher knowledge distillation for timm). "
           "Only the student is here: the projectors and the policy's agent are training state.", "",
           "## Results", "",
           f"Test split of {dataset}" + (f" ({num_val} images)" if num_val else "") +
           f", after {m['epochs']} of {(recipe.get('schedule') or {}).get('epochs', '?')} epochs.", "",
           "| | epoch | top-1 | top-5 |", "| --- | ---: | ---: | ---: |",
           f"| final | {m['epochs']} | {_pct(m['final_top1'])} | {_pct(m['final_top5'])} |",
           f"| best | {m['best_epoch']} | {_pct(m['best_top1'])} | {_pct(m['best_top5'])} |",
           f"| **these weights** (`{run.checkpoint}` checkpoint) | {m['pushed_epoch']} | {_pct(m['pushed_top1'])} | "
           f"{_pct(m['pushed_top5'])} |", ""]

    out += ["## Teacher pool", "",
            "Each teacher's weights are identified by a SHA-256 over its state_dict as loaded "
            "(sorted keys; key, dtype, shape and bytes of each tensor).", "",
            "| teacher | source | test top-1 | weights sha256 |", "| --- | --- | ---: | --- |"]
    for t in teachers:
        acc = accuracy.get(t.get("name"), {})
        out.append(f"| `{t.get('name', '?')}` | {_describe_source(t)} | {_pct(acc.get('top1'))} | "
                   f"`{t.get('sha256', 'n/a')}` |")
    out.append("")

    args = distill.get("policy_args") or {}
    out += ["## Training", "",
            f"- dataset: `{dataset}`" + (f" ({data['train_subset']} training images)" if data.get("train_subset") else ""),
            f"- student: `{identity.get('student') or (recipe.get('student') or {}).get('model', arch)}` -> `{arch}`",
            f"- weighting policy: `{policy}`" + (f" with `{json.dumps(args, sort_keys=True)}`" if args else ""),
            f"- loss: CE + {distill.get('alpha', '?')}·Σ w_l·{distill.get('logit_loss', 'kd').upper()} + "
            f"{distill.get('beta', '?')}·Σ w_f·FEAT (T={distill.get('temperature', '?')}, features "
            f"`{distill.get('features', '?')}`)",
            f"- epochs: {(recipe.get('schedule') or {}).get('epochs', '?')}, optimiser "
            f"`{(recipe.get('optim') or {}).get('name', '?')}`, lr {(recipe.get('optim') or {}).get('lr', '?')}, "
            f"schedule `{(recipe.get('schedule') or {}).get('name', '?')}`", ""]
    if has_plot:
        out += ["Teacher weights chosen by the policy, per epoch:", "", f"![teacher weights per epoch]({PLOT_FILE})", ""]
    if recipe:
        out += ["<details><summary>The recipe</summary>", "", "```yaml",
                yaml.safe_dump(_public_recipe(recipe), sort_keys=False).strip(), "```", "", "</details>", ""]

    zoo_note = arch.split(".")[0] in set(zoo.list_models())
    out += ["## How to use", "", "```python", "import timm"]
    if zoo_note:
        out.append("import zoo  # distill's model zoo: registers the CIFAR-style architectures into timm")
    out += [f"model = timm.create_model('{load_spec}', pretrained=True).eval()",
            "config = timm.data.resolve_model_data_config(model)  # input size, mean, std of the training data",
            "transform = timm.data.create_transform(**config, is_training=False)",
            "```", ""]
    if zoo_note:
        out += [f"`{arch.split('.')[0]}` is an architecture of distill's zoo, not of timm itself: "
                "`import zoo` (installed with distill) before `timm.create_model`.", ""]
    out += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- export and push


def _data_config(run: _Run, data_spec) -> Dict[str, Any]:
    config = {"input_size": tuple(data_spec.input_size), "mean": tuple(data_spec.mean), "std": tuple(data_spec.std),
              "interpolation": "bilinear", "crop_mode": "center"}
    dataset = (run.recipe.get("data") or {}).get("dataset")
    config["crop_pct"] = 1.0 if dataset in _TENSOR_DATASETS else 0.875  # imagefolder: timm's eval resize + crop
    return config


def export_run(run_dir: Union[str, Path], out_dir: Union[str, Path], checkpoint: str = "best",
               repo_id: Optional[str] = None) -> List[Path]:
    """Write the Hub files of run ``run_dir``'s ``checkpoint`` student into ``out_dir``; return their paths.

    ``out_dir`` must be empty or hold only files a previous export wrote. ``repo_id`` (if
    given) is the name the model card's loading snippet uses; otherwise ``local-dir:OUT_DIR``.
    """
    from timm.models import save_for_hf

    from .resolve import load_student_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if checkpoint not in ("best", "last", "ema"):
        raise DistillError(f"--checkpoint: {checkpoint!r} is not best, last or ema")
    run = _Run(run_dir, checkpoint)
    if out_dir.resolve() == run_dir.resolve():
        raise DistillError(f"{out_dir}: is the run directory itself; choose another folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DistillError(f"{out_dir}: exists and is not a folder")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in HUB_FILES + (PLOT_FILE,))
        if foreign:
            raise DistillError(f"{out_dir}: not empty ({', '.join(foreign[:3])}); choose an empty or new folder")
    resolved = load_student_checkpoint(run.weights, run.prefix)  # one student: no projector, no policy tensor
    model = resolved.model.eval()
    labels = run.results.get("class_names") or None
    if labels is not None and len(labels) != model.num_classes:
        labels = None  # from another dataset than these weights: leave them out rather than mislabel
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES + (PLOT_FILE,):
        (out_dir / name).unlink(missing_ok=True)
    save_for_hf(model, str(out_dir), model_config={"label_names": list(labels)} if labels else None,
                model_args=resolved.model_args or None, data_config=_data_config(run, resolved.data),
                safe_serialization=True)
    plot = run_dir / PLOT_FILE
    if plot.is_file():
        shutil.copyfile(plot, out_dir / PLOT_FILE)
    load_spec = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{out_dir}"
    card = model_card(run, resolved.arch, model.num_classes, load_spec, plot.is_file())
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def _one_line(exc: BaseException) -> str:
    """Return ``exc`` as one short line, with any token huggingface_hub would send masked."""
    from huggingface_hub import get_token

    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = (text if len(text) <= 300 else text[:297] + "...") or type(exc).__name__
    token = get_token()
    if token:
        text = text.replace(token, "***")
    return f"{type(exc).__name__}: {text}"


def push_run(run_dir: Union[str, Path], repo_id: str, *, private: bool = False, revision: Optional[str] = None,
             checkpoint: str = "best") -> str:
    """Upload run ``run_dir``'s student to the Hub repository ``repo_id``; return the commit URL.

    Creates the repository if needed (``private`` applies only then) and the branch
    ``revision`` if given and missing. The commit leaves the branch holding exactly the
    exported files: files of an earlier upload that this one lacks are deleted in the same commit. Files are prepared in a temporary folder, so the run
    directory is never written to; any failure is a one-line DistillError saying which step
    failed.
    """
    from huggingface_hub import HfApi

    from . import __version__

    check_repo_id(repo_id)
    api = HfApi(library_name="distill", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="distill-push-") as tmp:
        folder = Path(tmp) / "model"
        export_run(run_dir, folder, checkpoint, repo_id)
        meta = _Run(Path(run_dir), checkpoint)
        teachers = len(meta.identity.get("teachers") or [])
        message = f"distill: student distilled from {teachers} teachers ({meta.policy})"
        step = "creating the repository"
        try:
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if revision:
                step = f"creating branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "uploading the files"
            # delete_patterns: the commit also removes every file of an earlier upload that this one does
            # not carry (a stale weights.png, other weights), so readers never load a mix of two uploads
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=message, delete_patterns="*")
        except Exception as exc:  # HTTP errors, offline mode, no token, network: one line, nothing written
            raise DistillError(f"push to {repo_id} failed while {step} ({_one_line(exc)}); "
                               "the run directory is unchanged") from None
    return info.commit_url
