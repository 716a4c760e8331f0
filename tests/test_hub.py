"""Hugging Face Hub, offline: ``hf-hub:`` teachers from a local Hub cache (revisions, safe
loading), the teacher manifest and resume checks, and ``distill-push`` through
huggingface_hub's real ``HfApi`` code with only the HTTP transport replaced."""

import base64
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

import httpx2  # noqa: E402
import huggingface_hub  # noqa: E402
import timm  # noqa: E402
import yaml  # noqa: E402
from huggingface_hub import constants as hf_constants  # noqa: E402
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from timm.models import save_for_hf  # noqa: E402

from distill import cli  # noqa: E402
from distill.errors import DistillError, RecipeError  # noqa: E402
from distill.manifest import content_hash, diff  # noqa: E402
from distill.pipeline import RecipeRunner  # noqa: E402
from distill.recipe_load import recipe_from_dict  # noqa: E402
from distill.resolve import load_student_checkpoint, resolve_model  # noqa: E402

TOKEN = "hf_distillTEST0token0never0written0ABCDEFG"
REPO = "org/teacher"
SHA_A = hashlib.sha1(b"commit a").hexdigest()
SHA_B = hashlib.sha1(b"commit b").hexdigest()
HUB_FILES = {"config.json", "model.safetensors", "README.md"}


# ----------------------------------------------------------------------------- a local Hub cache


def tiny_teacher(seed: int):
    torch.manual_seed(seed)
    return timm.create_model("cifar_resnet8", num_classes=10, in_chans=1).eval()


def hub_files(model, tmp: Path, name: str) -> dict:
    """Return {file name: bytes} of ``model`` in timm's Hub layout (digits data config)."""
    folder = tmp / name
    save_for_hf(model, str(folder), safe_serialization=True,
                data_config={"input_size": (1, 8, 8), "mean": (0.3,), "std": (0.37,), "crop_pct": 1.0})
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict, refs=()) -> Path:
    """Lay files out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


def use_hub_cache(mp, root: Path, offline: bool) -> Path:
    """Point huggingface_hub at ``root`` (HF_HOME, HF_HUB_CACHE), offline or not, with a token in the env."""
    cache = root / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    mp.setenv("HF_HOME", str(root))
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    mp.setenv("HF_TOKEN", TOKEN)
    # huggingface_hub reads these environment variables once, at import
    mp.setattr(hf_constants, "HF_HOME", str(root))
    mp.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    return cache


def raw_recipe(run_dir: Path, teachers, **extra) -> dict:
    raw = {"name": "tiny-hub", "seed": 0, "output_dir": str(run_dir),
           "data": {"dataset": "digits", "batch_size": 32, "num_workers": 0, "train_subset": 128, "val_subset": 64},
           "student": "cifar_resnet8", "teachers": teachers,
           "optim": {"lr": 0.05}, "schedule": {"name": "cosine", "epochs": 1},
           "run": {"device": "cpu", "progress": False, "plot": True}}
    raw.update(extra)
    return raw


TEACHERS = ["hf-hub:org/teacher",
            {"model": "cifar_resnet8", "pretrained": False, "train": {"epochs": 1, "lr": 0.1}}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch digits run with an hf-hub: teacher (from an offline cache) and a teacher trained here."""
    root = tmp_path_factory.mktemp("hub_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILL_HOME", str(root / "distill_home"))
        cache = use_hub_cache(mp, root / "hf_home", offline=True)
        add_snapshot(cache, REPO, SHA_A, hub_files(tiny_teacher(1), root, "a"), refs=("main",))
        add_snapshot(cache, REPO, SHA_B, hub_files(tiny_teacher(2), root, "b"), refs=("v2",))
        raw = raw_recipe(root / "run", TEACHERS)
        RecipeRunner(recipe_from_dict(raw)).run()
    return {"root": root, "run": root / "run", "hf_home": root / "hf_home", "raw": raw}


def snapshot_dir(path: Path) -> dict:
    """Return {relative path: (size, mtime_ns)} of every file under ``path``."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def files_containing(root: Path, needle: str) -> list:
    data = needle.encode()
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and data in p.read_bytes()]


# ----------------------------------------------------------------------------- a fake Hub behind HfApi


class FakeHub:
    """The Hub's HTTP API as far as create_repo / create_branch / upload_folder use it."""

    def __init__(self, fail: str = ""):
        self.fail = fail  # a path fragment answered with 403
        self.requests, self.repos, self.branches, self.commits, self.unexpected = [], {}, [], [], []
        self.trees = {}  # (repo, revision) -> {path: bytes}: the files each branch holds after the commits

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path, request.headers.get("authorization")))
        if self.fail and self.fail in path:
            return httpx2.Response(403, headers={"X-Error-Message": "You don't have the rights to do that"},
                                   json={"error": "You don't have the rights to do that"})
        if path == "/api/agent-harnesses":  # huggingface_hub's own optional lookup
            return httpx2.Response(404, json={})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            self.repos[f"{body['organization']}/{body['name']}"] = body
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch|tree)/(.+)", path)
        if match and match.group(2) == "tree":
            tree = self.trees.get((match.group(1), match.group(3)), {})
            return httpx2.Response(200, json=[{"type": "file", "path": name, "size": len(data), "oid": "0" * 40}
                                              for name, data in sorted(tree.items())])
        if match and match.group(2) == "preupload":
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                         "shouldIgnore": False} for f in files]})
        if match and match.group(2) == "branch":
            self.branches.append((match.group(1), match.group(3)))
            return httpx2.Response(200, json={})
        if match and match.group(2) == "commit":
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            deleted = [item["value"]["path"] for item in lines if item["key"] == "deletedFile"]
            tree = self.trees.setdefault((match.group(1), match.group(3)), {})
            for name in deleted:
                tree.pop(name, None)
            tree.update(files)
            self.commits.append({"repo": match.group(1), "revision": match.group(3), "files": files, "deleted": deleted,
                                 "keys": [item["key"] for item in lines],
                                 "summary": lines[0]["value"]["summary"]})
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{match.group(1)}/commit/{SHA_A}",
                                              "commitOid": SHA_A, "pullRequestUrl": None})
        self.unexpected.append((request.method, path))
        return httpx2.Response(404, json={"error": "not found"})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Route every huggingface_hub request to a FakeHub (online mode, token in the environment)."""
    use_hub_cache(monkeypatch, tmp_path / "hf_home", offline=False)
    hub = FakeHub()
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        transport=httpx2.MockTransport(hub), event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True))
    yield hub
    huggingface_hub.set_client_factory(default_client_factory)


def rebuild(files: dict, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


# ----------------------------------------------------------------------------- pull


def test_hub_teacher_resolves_offline_from_the_cache_with_revisions(tmp_path, monkeypatch):
    cache = use_hub_cache(monkeypatch, tmp_path / "hf_home", offline=True)
    a, b = tiny_teacher(1), tiny_teacher(2)
    add_snapshot(cache, REPO, SHA_A, hub_files(a, tmp_path, "a"), refs=("main",))
    add_snapshot(cache, REPO, SHA_B, hub_files(b, tmp_path, "b"), refs=("v2",))
    x = torch.randn(3, 1, 8, 8)

    main = resolve_model("hf-hub:org/teacher", pretrained=True)
    assert main.source == {"spec": "hf-hub:org/teacher", "hf_hub_id": REPO, "revision": "main", "commit": SHA_A,
                           "weights_file": "model.safetensors", "sha256": content_hash(a)}
    assert main.arch == "cifar_resnet8" and main.model_args["in_chans"] == 1  # rebuildable without the Hub
    assert main.data.mean == pytest.approx((0.3,)) and main.data.input_size == (1, 8, 8)
    with torch.no_grad():
        assert torch.equal(main.model.eval()(x), a(x))

        tagged = resolve_model("hf-hub:org/teacher@v2", pretrained=True)
        assert (tagged.source["commit"], tagged.source["revision"]) == (SHA_B, "v2")
        assert tagged.source["sha256"] == content_hash(b) != main.source["sha256"]
        assert torch.equal(tagged.model.eval()(x), b(x))

        pinned = resolve_model(f"hf-hub:org/teacher@{SHA_A}", pretrained=True)
        assert pinned.source["commit"] == SHA_A and torch.equal(pinned.model.eval()(x), a(x))

    for spec in ("hf-hub:org/missing", "hf-hub:org/teacher@v3"):
        with pytest.raises(DistillError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE is set"):
            resolve_model(spec, pretrained=True)
    with pytest.raises(RecipeError, match="hf-hub:ORG/NAME"):
        resolve_model("hf-hub:teacher", pretrained=True)


def test_hub_bin_weights_load_only_as_plain_tensors(tmp_path, monkeypatch):
    cache = use_hub_cache(monkeypatch, tmp_path / "hf_home", offline=True)
    model = tiny_teacher(3)
    config = hub_files(model, tmp_path, "c")["config.json"]
    bin_file = tmp_path / "plain.bin"
    torch.save(model.state_dict(), bin_file)
    add_snapshot(cache, "org/plain", SHA_A, {"config.json": config, "pytorch_model.bin": bin_file.read_bytes()},
                 refs=("main",))
    resolved = resolve_model("hf-hub:org/plain", pretrained=True)
    assert resolved.source["weights_file"] == "pytorch_model.bin"
    assert resolved.source["sha256"] == content_hash(model)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    add_snapshot(cache, "org/evil", SHA_B, {"config.json": config,
                                            "pytorch_model.bin": pickle.dumps({"conv1.weight": Evil()})},
                 refs=("main",))
    with pytest.raises(DistillError, match="refused to unpickle"):
        resolve_model("hf-hub:org/evil", pretrained=True)


# ----------------------------------------------------------------------------- the teacher manifest


def test_diff_lists_each_difference_with_the_teacher_name():
    old = {"policy": "aver", "teachers": [{"name": "0:a", "commit": "x", "sha256": "1"}, {"name": "1:b"}]}
    new = {"policy": "aver", "teachers": [{"name": "0:a", "commit": "y", "sha256": "2"}]}
    assert diff(old, new, "identity") == [
        "identity.teachers: 2 items in the checkpoint, 1 now",
        "identity.teachers[0] (0:a).commit: 'x' in the checkpoint, 'y' now",
        "identity.teachers[0] (0:a).sha256: '1' in the checkpoint, '2' now",
        'identity.teachers[1] (1:b): {"name": "1:b"} in the checkpoint, absent now']
    assert diff(old, json.loads(json.dumps(old))) == []


def test_run_records_the_teacher_manifest(trained):
    run = trained["run"]
    results = json.loads((run / "results.json").read_text())
    hub_source, trained_source = (t["source"] for t in results["teachers"])
    assert hub_source["hf_hub_id"] == REPO and hub_source["commit"] == SHA_A and hub_source["revision"] == "main"
    assert hub_source["sha256"] == content_hash(tiny_teacher(1))
    assert trained_source["trained_in"] == "teachers/1-cifar_resnet8"
    assert trained_source["sha256"] == content_hash(load_student_checkpoint(
        run / "teachers" / "1-cifar_resnet8" / "last.safetensors").model)
    identity = json.loads((run / "last.json").read_text())["identity"]
    assert identity["teachers"] == [hub_source, trained_source]
    assert results["class_names"] == [str(i) for i in range(10)]


def test_resume_after_the_hub_revision_moved_lists_the_difference(trained, tmp_path, monkeypatch, capsys):
    root = tmp_path / "copy"
    shutil.copytree(trained["root"], root, symlinks=True)
    cache = use_hub_cache(monkeypatch, root / "hf_home", offline=True)
    (cache / "models--org--teacher" / "refs" / "main").write_text(SHA_B)  # main now points elsewhere
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw_recipe(root / "run", TEACHERS)))
    capsys.readouterr()
    assert cli.train_main([str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "cannot resume" in err
    assert (f"identity.teachers[0] (0:hf-hub:org/teacher).commit: '{SHA_A}' in the checkpoint, "
            f"'{SHA_B}' in this run") in err
    assert "identity.teachers[0] (0:hf-hub:org/teacher).sha256" in err
    assert "teachers[1]" not in err  # the unchanged teacher is not reported


# ----------------------------------------------------------------------------- push


def test_push_commits_exactly_the_hub_files_and_they_load_back(trained, fake_hub, tmp_path, capsys):
    run = trained["run"]
    before = snapshot_dir(run)
    assert cli.push_main([str(run), "--repo-id", "org/tiny-student", "--private", "--revision", "dev"]) == 0
    out, err = capsys.readouterr()
    assert "org/tiny-student" in out

    assert fake_hub.repos == {"org/tiny-student": {"name": "tiny-student", "organization": "org",
                                                   "visibility": "private"}}
    assert fake_hub.branches == [("org/tiny-student", "dev")]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo"] == "org/tiny-student" and commit["revision"] == "dev"
    assert set(commit["files"]) == HUB_FILES | {"weights.png"}
    assert commit["keys"].count("file") == 4 and "lfsFile" not in commit["keys"]
    assert not fake_hub.unexpected
    assert all(auth == f"Bearer {TOKEN}" for method, path, auth in fake_hub.requests if path != "/api/agent-harnesses")
    assert snapshot_dir(run) == before  # pushing writes nothing into the run

    folder = rebuild(commit["files"], tmp_path / "downloaded")
    hub_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    student = load_student_checkpoint(run / "best.safetensors").model.eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hub_model(x), student(x))
    config = json.loads(commit["files"]["config.json"])
    assert config["architecture"] == "cifar_resnet8" and config["num_classes"] == 10
    assert config["label_names"] == [str(i) for i in range(10)]
    data = load_student_checkpoint(run / "best.safetensors").data
    assert config["pretrained_cfg"]["input_size"] == [1, 8, 8]
    assert config["pretrained_cfg"]["mean"] == pytest.approx(list(data.mean))
    assert config["pretrained_cfg"]["std"] == pytest.approx(list(data.std))
    assert set(load_file(str(folder / "model.safetensors"))) == set(student.state_dict())  # no projector / agent

    card = commit["files"]["README.md"].decode()
    for needle in ("timm.create_model('hf-hub:org/tiny-student', pretrained=True)", "import zoo", SHA_A,
                   content_hash(tiny_teacher(1)), "trained in this run", "`aver`", "yang2025mtkdrl",
                   "![teacher weights per epoch](weights.png)", "| final | 1 |", "dataset: `digits`"):
        assert needle in card, needle
    assert str(trained["root"]) not in card  # no machine-local paths on a public card

    assert TOKEN not in out + err
    assert not files_containing(trained["root"], TOKEN) and not files_containing(tmp_path, TOKEN)
    assert all(TOKEN.encode() not in data for data in commit["files"].values())


def test_push_over_an_earlier_upload_deletes_its_stale_files(trained, fake_hub, tmp_path, capsys):
    run = trained["run"]
    assert cli.push_main([str(run), "--repo-id", "org/again"]) == 0
    fake_hub.trees[("org/again", "main")]["pytorch_model.bin"] = b"an older upload's weights"
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "weights.png").unlink()  # this run drew no plot
    assert cli.push_main([str(bare), "--repo-id", "org/again"]) == 0
    first, second = fake_hub.commits
    assert "weights.png" in first["files"] and not first["deleted"]
    assert sorted(second["deleted"]) == ["pytorch_model.bin", "weights.png"]
    assert set(fake_hub.trees[("org/again", "main")]) == HUB_FILES  # exactly this upload, no mix
    assert not fake_hub.unexpected


def test_failed_upload_is_one_line_and_leaves_the_run_untouched(trained, fake_hub, monkeypatch, capsys):
    run = trained["run"]
    before = snapshot_dir(run)
    fake_hub.fail = "/commit/"
    assert cli.push_main([str(run), "--repo-id", "org/tiny-student"]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: push to org/tiny-student failed while uploading the files (")
    assert "403 Forbidden" in err and "rights" in err and "Traceback" not in err and TOKEN not in out + err

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert cli.push_main([str(run), "--repo-id", "org/tiny-student"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "failed while creating the repository" in err
    assert "OfflineModeIsEnabled" in err and TOKEN not in err
    assert snapshot_dir(run) == before
    assert not files_containing(trained["root"], TOKEN)


def test_push_local_dir_writes_exactly_the_hub_files(trained, tmp_path, monkeypatch, capsys):
    use_hub_cache(monkeypatch, tmp_path / "hf_home", offline=True)  # no network needed
    run = trained["run"]
    assert cli.push_main([str(run), "--local-dir", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == HUB_FILES | {"weights.png"}
    assert "local-dir:" in (tmp_path / "out" / "README.md").read_text()
    assert cli.push_main([str(run), "--local-dir", str(tmp_path / "out"), "--checkpoint", "last"]) == 0  # re-export

    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "weights.png").unlink()
    assert cli.push_main([str(bare), "--local-dir", str(tmp_path / "out2"), "--repo-id", "org/x"]) == 0
    assert {p.name for p in (tmp_path / "out2").iterdir()} == HUB_FILES
    card = (tmp_path / "out2" / "README.md").read_text()
    assert "hf-hub:org/x" in card and "weights.png" not in card

    capsys.readouterr()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    assert cli.push_main([str(run), "--local-dir", str(tmp_path / "busy")]) == 2
    assert cli.push_main([str(run)]) == 2
    assert cli.push_main([str(run), "--repo-id", "not-a-repo-id"]) == 2
    assert cli.push_main([str(tmp_path / "nowhere"), "--local-dir", str(tmp_path / "out3")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 4 and all(e.startswith("error: ") for e in errs)
    assert "not empty" in errs[0] and "--repo-id" in errs[1] and "ORG/NAME" in errs[2] and "checkpoint" in errs[3]


def test_recipe_hub_section_and_push_at_the_end_of_training(trained, fake_hub, tmp_path, capsys):
    teacher = str(trained["run"] / "best.safetensors")  # a distilled student as the teacher: nothing to train
    for hub, field in (({"push": True}, "hub.repo_id"), ({"repo_id": "nope"}, "hub.repo_id"),
                       ({"repo": "org/x"}, "hub.repo")):
        with pytest.raises(RecipeError, match=re.escape(field)):
            recipe_from_dict(raw_recipe(tmp_path / "r", [teacher], hub=hub))
    raw = raw_recipe(tmp_path / "run", [teacher], hub={"push": True, "repo_id": "org/at-the-end"})
    raw["run"]["plot"] = False
    RecipeRunner(recipe_from_dict(raw)).run()
    assert "pushed to the Hub: https://huggingface.co/org/at-the-end/commit/" in capsys.readouterr().out
    (commit,) = fake_hub.commits
    assert commit["repo"] == "org/at-the-end" and commit["revision"] == "main"
    assert set(commit["files"]) == HUB_FILES
    assert fake_hub.repos["org/at-the-end"].get("visibility") is None  # not private: the account's default
