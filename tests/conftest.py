import warnings

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: thread start-up dominates, and a second thread only adds contention on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    """The fxprune command line, run in-process: ``cli("run", path, "--out", out)`` -> click's Result (any argument
    may be a Path)."""
    from typer.testing import CliRunner

    from fxprune.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Calibration and held-out text for the language-model folder tests: two different parts of a standard-library
    source file."""
    import os

    source = open(os.__file__, encoding="utf-8").read()
    root = tmp_path_factory.mktemp("text")
    (root / "calib.txt").write_text(source[:12000])
    (root / "eval.txt").write_text(source[12000:18000])
    return root / "calib.txt", root / "eval.txt"
