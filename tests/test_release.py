"""What a release holds: the wheel built from a clean copy of the checkout has every module and entry points
that import; the declared dependencies are what the code imports; an optional dependency that is missing is
named with the extra that installs it. (``.ci/release`` installs that wheel into a fresh environment and uses it.)"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
import zipfile
from configparser import ConfigParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

sys.path.insert(0, str(ROOT / ".ci"))
from clean_copy import clean_copy  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from a clean copy of this checkout (no build/ or egg-info left from other builds)."""
    tmp = tmp_path_factory.mktemp("release")
    clean_copy(ROOT, tmp / "fxprune")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(tmp / "fxprune")], check=True, capture_output=True)
    (built,) = (tmp / "dist").glob("fxprune-*.whl")
    return zipfile.ZipFile(built)


def _source_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "fxprune").rglob("*.py")}


def test_the_wheel_holds_every_module(wheel):
    in_wheel = {n for n in wheel.namelist() if n.endswith(".py")}
    assert _source_modules() - in_wheel == set()
    assert {n for n in in_wheel if not n.startswith("fxprune/")} == set()  # nothing beside the package


def _entry_points(wheel: zipfile.ZipFile) -> ConfigParser:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = ConfigParser()
    parser.read_string(wheel.read(name).decode())
    return parser


def test_the_wheels_entry_points_name_importable_objects(wheel):
    points = _entry_points(wheel)
    assert set(points["fxprune.passes"]) == set(PYPROJECT["project"]["entry-points"]["fxprune.passes"])
    assert dict(points["console_scripts"]) == PYPROJECT["project"]["scripts"]
    for section in ("fxprune.passes", "console_scripts"):
        for value in points[section].values():
            module, _, attr = value.partition(":")
            assert getattr(importlib.import_module(module), attr) is not None, value


# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def _requirement_names(specs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].lower() for s in specs}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level third-party module, imported at module level) for each import in ``path``; module level
    counts what runs on import (not inside a function, and not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    lazy: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or \
                (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            lazy.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and top != "fxprune":
                out.append((top, id(node) not in lazy))
    return out


def test_declared_dependencies_are_what_the_code_imports():
    """Every package fxprune imports is a dependency, or an extra's that is imported only where it is needed
    (inside a function, so the rest works without it); every dependency is imported somewhere."""
    required = _requirement_names(PYPROJECT["project"]["dependencies"])
    extras = {name: _requirement_names(specs) for name, specs in PYPROJECT["project"]["optional-dependencies"].items()
              if name in ("hf", "onnx")}
    optional = set().union(*extras.values())
    imported: set[str] = set()
    eager_optional = []
    for path in (ROOT / "fxprune").rglob("*.py"):
        for top, eager in _imports(path):
            dist = DISTRIBUTION.get(top, top).lower()
            imported.add(dist)
            assert dist in required | optional, f"{path.relative_to(ROOT)} imports {top}, which is not declared"
            if dist in optional - required and eager:
                eager_optional.append(f"{path.relative_to(ROOT)}: {top}")
    assert eager_optional == []
    assert required - imported == set(), "declared but never imported"


def test_a_folder_run_without_transformers_names_the_extra(tmp_path, monkeypatch, cli):
    """transformers is the `hf` extra: without it, `fxprune run DIR` stops with exit code 2 naming the extra."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4)}, str(tmp_path / "llama" / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = cli("run", tmp_path / "llama", "--pass", "l1", "--ratio", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert 'pip install "fxprune[hf]"' in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "content", "message"), [("config.json", b"{not json", "is not valid JSON"),
                                                          ("model.safetensors", b"", "not a readable safetensors")])
def test_a_damaged_folder_is_bad_input(tmp_path, cli, name, content, message):
    """A truncated download (a config that is not JSON, an empty shard) exits 2 with its message."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(2)}, str(tmp_path / "llama" / "model.safetensors"))
    (tmp_path / "llama" / name).write_bytes(content)
    result = cli("run", tmp_path / "llama", "--pass", "l1", "--ratio", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 2 and message in result.output, result.output
