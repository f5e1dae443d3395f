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
