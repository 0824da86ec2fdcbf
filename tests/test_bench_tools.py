"""fastmil.bench: comparing two benchmark runs (regressions beyond the measured noise) and the run report."""
import json

import pytest

from fastmil.bench import compare_runs, format_changes, write_report
from fastmil.cli import main


def _entry(name, median, spread=0.02, rounds=5, **extra):
    params = {}
    if "[" in name:
        kind, n = name[name.index("[") + 1 : -1].split("-")[-2:]
        params = {"device": "cpu", "kind": kind, "n": int(n)}
    return {"name": name, "params": params, "extra_info": extra,
            "stats": {"median": median, "q1": median * (1 - spread / 2), "q3": median * (1 + spread / 2),
                      "rounds": rounds, "min": median, "max": median, "mean": median}}


def _run(path, entries):
    path.write_text(json.dumps({"benchmarks": entries, "datetime": "2026-11-30T00:00:00",
                                "machine_info": {"cpu": {"brand_raw": "test cpu", "count": 2}}}))
    return path


def _cases(scale_fast=1.0, scale_noisy=1.0, mem=100 * 2**20):
    return [_entry("test_step_time[cpu-fastmil-1000]", 0.010 * scale_fast, gflop=1.0),
            _entry("test_step_time[cpu-fastmil-10000]", 0.100),
            _entry("test_step_time[cpu-chain-1000]", 0.020),
            _entry("test_step_time[cpu-chain-10000]", 0.200),
            _entry("test_noisy_time[cpu-fastmil-1000]", 0.050 * scale_noisy, spread=0.30),
            _entry("test_step_memory[cpu-fastmil-1000]", 1.0, rounds=1, extra_peak_bytes=mem),
            _entry("test_gemm_rate", 0.005, gflop=1.0)]


def test_compare_flags_an_injected_slowdown_only(tmp_path):
    a = _run(tmp_path / "a.json", _cases())
    same, _, _ = compare_runs(a, _run(tmp_path / "same.json", _cases()))
    assert all(c.status == "same" for c in same)
    # +30% on a case with 2% spread: flagged; +30% on a case whose own rounds spread 30%: within its noise
    changes, only_a, only_b = compare_runs(a, _run(tmp_path / "b.json", _cases(scale_fast=1.3, scale_noisy=1.3)))
    status = {c.name: c.status for c in changes}
    assert status["test_step_time[cpu-fastmil-1000]"] == "regression"
    assert status["test_noisy_time[cpu-fastmil-1000]"] == "same"
    assert sum(s == "regression" for s in status.values()) == 1 and not only_a and not only_b
    faster, _, _ = compare_runs(a, _run(tmp_path / "c.json", _cases(scale_fast=0.5, mem=150 * 2**20)))
    status = {c.name: c.status for c in faster}
    assert status["test_step_time[cpu-fastmil-1000]"] == "improvement"
    assert status["test_step_memory[cpu-fastmil-1000]"] == "regression"  # +50% memory
    text = format_changes(*compare_runs(a, tmp_path / "b.json"))
    assert text.splitlines()[1].startswith("test_step_time[cpu-fastmil-1000]") and "REGRESSION" in text


def test_cli_exit_codes_and_bad_files(tmp_path, capsys):
    a = _run(tmp_path / "a.json", _cases())
    b = _run(tmp_path / "b.json", _cases(scale_fast=2.0))
    assert main(["bench", "compare", str(a), str(a)]) == 0
    assert main(["bench", "compare", str(a), str(b)]) == 1
    assert "1 regression(s)" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{")
    assert main(["bench", "compare", str(a), str(tmp_path / "bad.json")]) == 2
    assert "not a readable pytest-benchmark JSON" in capsys.readouterr().err


def test_report_tables_ratios_gemm_share_and_plots(tmp_path):
    path = write_report(_run(tmp_path / "run.json", _cases()), tmp_path / "out",
                        [("test_step_time[cpu-fastmil-1000]", "test_step_time[cpu-chain-1000]", 0.8, "step ratio")])
    text = path.read_text()
    assert "Measured GEMM rate in this run: 200 GFLOP/s" in text
    assert "| step ratio | 0.50 | <= 0.80 | met |" in text
    assert "| fastmil / chain | 0.50x | 0.50x |" in text
    assert "10.0 ms, 100 MiB, 50% of GEMM rate" in text  # 1 GFLOP in 10 ms = 100 GFLOP/s of 200
    pngs = list((tmp_path / "out" / "plots").glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 5000 for p in pngs)
    assert all(f"](plots/{p.name})" in text for p in pngs)
    (tmp_path / "nolist.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'benchmarks' list"):
        write_report(tmp_path / "nolist.json", tmp_path / "o2")
