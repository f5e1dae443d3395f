"""One results file per benchmark: the measurements, and what they were measured with.

Every benchmark writes ``benchmarks/results/NAME.json`` through :func:`save`::

    {"meta": {"benchmark", "command", "commit", "dirty", "code", "measures", "torch", "python", "device",
              "threads", "date", "seconds"},
     "results": <the benchmark's own payload>}

``code`` is a fingerprint of the source the numbers depend on (``measures``: fxprune itself, the examples and
the benchmark's own script), taken from each file's syntax tree with docstrings dropped: a docstring or a
comment does not make a result stale, a changed line of code does. ``python benchmarks/report.py`` takes the
fingerprint again and marks a result whose code has changed since it was measured.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MEASURES = ("fxprune", "examples", "benchmarks/_common.py", "benchmarks/_results.py")


def _sources(measures: list[str]) -> list[Path]:
    files: set[Path] = set()
    for m in measures:
        p = ROOT / m
        files.update(p.rglob("*.py") if p.is_dir() else [p] if p.exists() else [])
    return sorted(files)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def fingerprint(measures: list[str]) -> str:
    """A hash of the code in ``measures`` (paths from the repository root), blind to docstrings and comments."""
    h = hashlib.sha256()
    for f in _sources(measures):
        tree = _without_docstrings(ast.parse(f.read_text(), str(f)))
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:16]


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return out.stdout.strip()


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


# files a benchmark runs besides fxprune, the examples and the shared helpers (its model files)
ALSO = {"methods_robustness": ("benchmarks/robustness_models.py",)}


def measures_of(script: str) -> list[str]:
    """What a benchmark's numbers depend on: fxprune, the examples, the shared helpers, its own script and the
    files it runs (``ALSO``)."""
    return [*MEASURES, f"benchmarks/{Path(script).name}", *ALSO.get(Path(script).stem, ())]


def meta(script: str, seconds: float | None = None) -> dict[str, Any]:
    """What a result was measured with: commit, code fingerprint, torch, device, threads, date, command."""
    import torch

    measures = measures_of(script)
    return {"benchmark": Path(script).stem, "command": " ".join(["python", f"benchmarks/{Path(script).name}",
                                                                 *sys.argv[1:]]),
            "commit": _git("rev-parse", "HEAD")[:12],
            "dirty": bool(_git("status", "--porcelain", "--", *measures)),
            "code": fingerprint(measures), "measures": measures, "torch": torch.__version__,
            "python": platform.python_version(), "device": _device(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "seconds": None if seconds is None else round(seconds, 1)}


def save(path: str | Path, results: Any, script: str, started: float | None = None) -> Path:
    """Write ``{"meta": meta(script), "results": results}`` to ``path`` (whole, or not at all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds = None if started is None else time.perf_counter() - started
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta(script, seconds), "results": results}, indent=1) + "\n")
    tmp.replace(path)
    return path


def load(path: str | Path) -> Any:
    """The ``results`` of a file :func:`save` wrote (or the whole payload of an older file, which has no meta)."""
    data = json.loads(Path(path).read_text())
    return data["results"] if isinstance(data, dict) and "meta" in data else data
