"""Finding passes: Python entry points in the group ``fxprune.passes`` (built-ins register the same way),
or ``package.module:Class`` for a pass that is not installed."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from importlib.metadata import entry_points
from typing import Any

from .base import Pass, PassError

__all__ = ["available_passes", "load_pass", "make_pass", "PassError", "GROUP"]

GROUP = "fxprune.passes"


def _entry_points() -> dict[str, Any]:
    """Registered entry points by name (not loaded); two providers of one name is an error naming both.
    Reading every installed distribution's metadata is not free, so the result is kept for as long as
    ``sys.path`` stays the same (a plugin put on the path is found; one pip-installed into a directory
    already on it is found by the next process)."""
    return dict(_scan(tuple(sys.path)))


@functools.lru_cache(maxsize=4)
def _scan(path: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    found: dict[str, Any] = {}
    for ep in entry_points(group=GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PassError(f"two passes are named {ep.name!r}: {found[ep.name].value} and {ep.value}; "
                            "uninstall one of the packages that provide them")
        found[ep.name] = ep
    return tuple(sorted(found.items()))


def _load(name: str, ep: Any) -> type[Pass]:
    try:
        return ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
        raise PassError(f"pass {name!r} ({ep.value}) is registered but does not load: {exc}") from exc


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name, loaded (a plugin that fails to import is an error naming it)."""
    return {name: _load(name, ep) for name, ep in _entry_points().items()}


def load_pass(name: str) -> type[Pass]:
    """A pass by registered name (only that plugin is imported), or ``package.module:Class``."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PassError(f"cannot load pass {name!r}: {exc}") from exc
    eps = _entry_points()
    if name not in eps:
        raise PassError(f"unknown pass {name!r}; available: {', '.join(eps) or 'none (is fxprune installed?)'}")
    return _load(name, eps[name])


def make_pass(name: str | Pass, options: dict[str, Any] | None = None) -> Pass:
    """Instantiate a pass by name with options; unknown options are an error listing the valid ones."""
    if isinstance(name, Pass):
        return dataclasses.replace(name, **(options or {})) if options else name
    cls = load_pass(name)
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    options = dict(options or {})
    bad = sorted(set(options) - set(fields))
    if bad:
        raise PassError(f"pass {name!r} has no option {', '.join(map(repr, bad))}; "
                        f"its options: {', '.join(fields) or 'none'}")
    if "preset" in options and "preset" in fields:  # the preset's options first, the ones given win
        return cls.with_preset(options.pop("preset"), **options)
    return cls(**options)
