"""Pruning leaves the process as it found it: the caller's random stream, and the warnings of the user's own
code and of other threads (Python's random state and warning filters are process-wide)."""
from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


class ConvNet(nn.Module):
    """conv-bn-relu twice, a pool and a linear head: every pass but flop (linear layers only) prunes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


# the shortest run of each built-in pass; every pass must appear here (checked below)
FAST = {"l1": {}, "slimming": {"epochs": 1}, "thinet": {"batches": 1, "per_batch": 8},
        "lasso": {"batches": 1, "per_batch": 8}, "scratch": {"epochs": 1}, "anp": {"epochs": 1, "steps": 1},
        "tas": {"epochs": 1}, "sanp": {"epochs": 1}, "flop": {"epochs": 1}, "act": {"calib_batches": 1}}
# passes that run on Hugging Face folders only (their side effects: tests/test_lm_streaming.py and
# tests/test_lm_experts.py, which check the source folder is untouched and nothing is left behind on a refusal)
FOLDER_ONLY = {"depth", "experts"}


def _case(name: str) -> tuple[nn.Module, tuple[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    if name == "flop":
        x, y = torch.randn(64, 12, generator=g), torch.randint(0, 4, (64,), generator=g)
        return MLP().eval(), (x[:4],), [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)]
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    return ConvNet().eval(), (x[:4],), [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)]


def test_every_built_in_pass_is_covered():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert set(FAST) | FOLDER_ONLY == set(pyproject["project"]["entry-points"]["fxprune.passes"])


@pytest.mark.parametrize("name", sorted(FAST))
def test_the_callers_random_stream_reads_the_same_after_a_prune(name):
    """Sampling, a loader's shuffle and a pass's own seed (anp, sanp, tas seed themselves) all draw from torch's
    generator: after fxprune.prune the caller's next draws are those it would have had without the call."""
    torch.manual_seed(0)
    model, inputs, loader = _case(name)
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxprune.prune(model, inputs, name, 0.5, options=FAST[name], train_loader=loader)
    torch.testing.assert_close(torch.rand(8), expected, rtol=0, atol=0)


def test_a_seeded_prune_is_still_reproducible():
    """The stream inside fxprune.prune continues from the caller's state: seeding before the call repeats it."""
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        model, inputs, loader = _case("slimming")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fxprune.prune(model, inputs, "slimming", 0.5, options=FAST["slimming"], train_loader=loader)
        results.append(res.module.state_dict())
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=0, atol=0)


class Chatty(nn.Module):
    """A model whose forward warns, as user code does (a deprecation of its own, a shape it dislikes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("chatty: the user's own warning", UserWarning, stacklevel=1)
        return self.head(torch.relu(self.fc(x)))


def test_a_warning_of_the_users_forward_reaches_them_through_a_trace():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxprune.trace(Chatty().eval(), (torch.randn(4, 6),))
    assert any("chatty: the user's own warning" in str(w.message) for w in caught)


def test_torchs_own_tracing_noise_stays_quiet():
    """What torch says about fxprune's tracing machinery (make_fx's attribute lookups) is not shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxprune.trace(ConvNet().eval(), (torch.randn(4, 3, 8, 8),), frontend="make_fx")
    noise = [str(w.message) for w in caught if "Failed to fetch module" in str(w.message)
             or "no underlying reference" in str(w.message)]
    assert noise == []


def test_other_warnings_are_not_silenced_while_a_trace_runs():
    """While a trace runs (seen from inside the model's forward, on every front end), a warning of another
    module, raised by any thread, would still be shown: Python's filters are process-wide, and the trace adds
    only its table of torch's own messages to them."""
    seen: list[bool] = []

    class Looks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(_shown("another thread's own warning", module="other_thread"))
            return self.fc(x)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for frontend in ("record", "make_fx", "export"):
            fxprune.trace(Looks().eval(), (torch.randn(1 if frontend == "record" else 4, 6),), frontend=frontend)
    assert seen and all(seen), seen


def _shown(message: str, module: str) -> bool:
    """Whether a UserWarning with ``message`` from ``module`` would be shown under the filters in force now
    (the first matching entry decides, as in ``warnings.warn``)."""
    for action, msg, category, mod, lineno in warnings.filters:
        if (msg is None or msg.match(message)) and issubclass(UserWarning, category) and \
                (mod is None or mod.match(module)) and lineno == 0:
            return action != "ignore"
    return warnings.defaultaction != "ignore"
