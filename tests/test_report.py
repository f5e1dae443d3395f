"""The benchmark pages: generated from the results files, marked stale when the code they measure changed, and
what is committed is what the results give (benchmarks/report.py; CI runs its --check too)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _results  # noqa: E402
import report  # noqa: E402


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A repository of one measured module, one benchmark and its results file, with ROOT pointing there."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "core.py").write_text('"""Docs."""\n\ndef f(x):\n    """Twice."""\n    return 2 * x\n')
    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    (bench / "toy.py").write_text('"""A toy benchmark: twice one.\n\nIt measures f(1)."""\n')
    for module in (_results, report):
        monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(report, "RESULTS", bench / "results")
    monkeypatch.setattr(report, "DOCS", tmp_path / "docs" / "benchmarks")
    monkeypatch.setitem(report.RENDERERS, "toy", lambda res: [f"f(1) = {res['value']}"])
    measures = ["pkg", "benchmarks/toy.py"]
    meta = {"benchmark": "toy", "command": "python benchmarks/toy.py", "commit": "abc", "dirty": False,
            "code": _results.fingerprint(measures), "measures": measures, "torch": "2", "python": "3.11",
            "device": "CPU", "threads": 1, "date": "2026-12-06", "seconds": 1.0}
    (bench / "results" / "toy.json").write_text(json.dumps({"meta": meta, "results": {"value": 2}}))
    return tmp_path


def test_fingerprint_is_blind_to_docstrings_and_comments_not_to_code(tree):
    before = _results.fingerprint(["pkg"])
    core = tree / "pkg" / "core.py"
    core.write_text('"""Other docs."""\n\ndef f(x):  # a comment\n    """Two times x."""\n    return 2 * x\n')
    assert _results.fingerprint(["pkg"]) == before
    core.write_text('"""Docs."""\n\ndef f(x):\n    """Twice."""\n    return 3 * x\n')
    assert _results.fingerprint(["pkg"]) != before


def test_a_page_shows_what_it_was_measured_with_and_is_not_stale_on_its_own_code(tree):
    [r] = report.results()
    assert r.stale is None
    text = report.page(r)
    assert "f(1) = 2" in text and "`abc`" in text and "2026-12-06" in text and "Stale" not in text
    assert text.startswith("# toy: A toy benchmark: twice one")


def test_a_code_change_marks_the_result_stale_on_its_page_and_in_the_index(tree):
    (tree / "pkg" / "core.py").write_text("def f(x):\n    return 3 * x\n")
    [r] = report.results()
    assert r.stale and "changed since commit abc" in r.stale
    assert '!!! warning "Stale"' in report.page(r)
    assert "**stale**" in report.index([r])


def test_check_fails_until_the_pages_are_written_then_passes(tree, capsys):
    assert report.check(report.rendered()) == 1
    assert report.main([]) == 0
    assert report.check(report.rendered()) == 0
    (tree / "docs" / "benchmarks" / "toy.md").write_text("# typed by hand\n")
    assert report.check(report.rendered()) == 1
    assert "typed by hand" in capsys.readouterr().out


def test_a_results_file_without_meta_or_renderer_is_refused(tree):
    (tree / "benchmarks" / "results" / "old.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="records no meta"):
        report.results()
    (tree / "benchmarks" / "results" / "old.json").unlink()
    report.RENDERERS.pop("toy")
    with pytest.raises(SystemExit, match="no renderer"):
        report.rendered()


def test_the_committed_pages_are_what_the_results_give():
    """docs/benchmarks/ is generated: run `python benchmarks/report.py` after measuring, and commit the pages."""
    assert report.check(report.rendered()) == 0


def test_the_zoo_summary_counts_a_detector_compared_by_its_dense_heads_as_exact():
    import zoo

    def run(status: str) -> dict:
        return {"model": status, "fxprune": {"status": status}, "tp": {"status": "ok"}}

    runs = [run("ok"), run("ok (dense heads; detections tie-break differently)"), run("inexact"),
            run("trace failed: TraceError: x")]
    t = zoo.totals(runs)
    assert (t["fxprune_ok"], t["fxprune_inexact"], t["fxprune_failed"]) == (2, 1, 1)


def test_the_zoo_table_shows_the_error_the_status_rests_on():
    import zoo

    fx = {"status": "ok (dense heads; detections tie-break differently)", "max_rel_err": 0.8,
          "max_rel_err_dense": 2e-16}
    row = zoo.table_rows([{"suite": "detection", "model": "m", "fxprune": fx, "tp": {}}])[0]
    assert "2.0e-16 (dense heads)" in row and "8.0e-01" not in row
