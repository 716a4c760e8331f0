"""Property-based: mutated recipes, override strings and CLI arguments either validate or raise
DistillError naming the bad key, never another exception (Hypothesis, fixed seed, bounded).

Cases Hypothesis found and that were fixed are kept below as explicit regression tests.
"""

import copy
from pathlib import Path
from typing import Any, List

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill import cli
from distill.errors import DistillError, RecipeError
from distill.recipe_load import recipe_from_dict

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _paths(node: Any, prefix: tuple = ()) -> List[tuple]:
    """Return every key path (tuples of dict keys / list indices) of a nested recipe."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append(prefix + (key,))
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append(prefix + (i,))
            out += _paths(value, prefix + (i,))
    return out


PATHS = _paths(QUICKSTART)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=4),
                   st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
                   st.sampled_from([0, -1, 1, 10**9, 0.0, -0.5, 1.5, float("inf"), "", "auto", "imagefolder",
                                    "cifar_resnet8", "hf-hub:x", "nope/file.pth", [], {}]))
KEYS = st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["modle", "lr", "epoch", "teacher", "polcy"]))


def _parent(raw: dict, path: tuple):
    node = raw
    for key in path[:-1]:
        node = node[key]
    return node


def _needle(path: tuple) -> str:
    """Return the name the error must mention for a mutation at ``path``: its last mapping key."""
    keys = [k for k in path if isinstance(k, str)]
    return keys[-1]


def _check(raw: dict, needle: str, overrides=None) -> None:
    try:
        recipe_from_dict(raw, overrides)
    except DistillError as exc:
        assert needle in str(exc), (needle, str(exc))


@FUZZ
@given(st.sampled_from(PATHS), st.sampled_from(["remove", "rename", "retype"]), KEYS, VALUES)
def test_mutated_quickstart_validates_or_names_the_key(path, how, new_key, value):
    raw = copy.deepcopy(QUICKSTART)
    parent = _parent(raw, path)
    key = path[-1]
    if how == "remove":
        if isinstance(parent, list):
            parent.pop(key)
        else:
            del parent[key]
    elif how == "rename" and isinstance(parent, dict):
        parent[new_key] = parent.pop(key)
        if new_key != key:
            path = path[:-1] + (new_key,)
    else:
        parent[key] = value
    _check(raw, _needle(path) if path and any(isinstance(k, str) for k in path) else "")


@FUZZ
@given(st.sampled_from(PATHS), st.one_of(st.text(max_size=15), VALUES.map(str)))
def test_override_strings_validate_or_name_the_key(path, text):
    dotted = ".".join(str(k) for k in path)
    _check(QUICKSTART, _needle(path), [f"{dotted}={text}"])


@FUZZ
@given(st.text(max_size=30))
def test_random_override_strings_never_raise_anything_else(text):
    try:
        recipe_from_dict(QUICKSTART, [text])
    except DistillError:
        pass


EVAL_OPTIONS = ["--dataset", "--data-dir", "--weights", "--batch-size", "--num-workers", "--subset", "--device"]
PUSH_OPTIONS = ["--repo-id", "--revision", "--checkpoint", "--local-dir"]
ARG_VALUES = st.one_of(st.text(max_size=10), st.integers(-3, 5).map(str),
                       st.sampled_from(["cifar10", "digits", "cifar", "cpu", "cuda:0", "org/name", "best", "last",
                                        "bad repo", "", "-1", "--x"]))


def _argv(options, flags):
    pair = st.tuples(st.sampled_from(options), ARG_VALUES).map(list)
    return st.tuples(st.lists(st.one_of(pair, st.sampled_from(flags).map(lambda f: [f])), max_size=4),
                     st.one_of(st.just([]), ARG_VALUES.map(lambda v: [v])))


def _check_args(parse, argv):
    try:
        parse(argv)
    except DistillError as exc:
        message = str(exc)
        named = [a for a in argv if a.startswith("--")] + ["spec", "run_dir", "--dataset", "--repo-id"]
        assert any(name.lstrip("-").split("=")[0] in message for name in named if name), (argv, message)


@FUZZ
@given(_argv(EVAL_OPTIONS, ["--no-pretrained", "--offline", "--no-download"]))
def test_eval_arguments_parse_or_name_the_argument(parts):
    opts, positional = parts
    _check_args(cli.parse_eval_args, [a for pair in opts for a in pair] + positional)


@FUZZ
@given(_argv(PUSH_OPTIONS, ["--private"]))
def test_push_arguments_parse_or_name_the_argument(parts):
    opts, positional = parts
    _check_args(cli.parse_push_args, [a for pair in opts for a in pair] + positional)


# ----------------------------------------------------------------------------- found and fixed


def test_usage_errors_are_one_line_distill_errors():
    with pytest.raises(DistillError, match=r"distill-eval: argument --batch-size: invalid int value: 'q'"):
        cli.parse_eval_args(["x", "--dataset", "cifar10", "--batch-size", "q"])
    with pytest.raises(DistillError, match="--batch-size: must be >= 1, got 0"):
        cli.parse_eval_args(["x", "--dataset", "cifar10", "--batch-size", "0"])
    with pytest.raises(DistillError, match="--checkpoint"):
        cli.parse_push_args(["run", "--local-dir", "out", "--checkpoint", "worst"])
    with pytest.raises(RecipeError, match="student.new_keys"):
        recipe_from_dict({**QUICKSTART, "student": {"model": "cifar_resnet8", "new_keys": ["fc.*"]}})
