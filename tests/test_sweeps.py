"""Sweeps lose nothing: every point checked first, failures recorded, parallel launchers agree with
single runs, Ctrl-C leaves no half-written results, moesim-report lists every point.

Faults are injected without test hooks in moesim: a ``sitecustomize.py`` on the subprocess's
PYTHONPATH wraps ``sim.engine.simulate`` to raise, or to kill its process (``os._exit(9)``), for
``workload.batch_size == 3``; joblib's loky workers and submitit's jobs inherit the environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sim.report import main as report

SMALL = ["model=olmoe_1b_7b", "workload.num_requests=2", "workload.prompt_len=16", "workload.output_len=4",
         "sim.progress=false"]
FAULT = """
import os
import sim.engine as _engine

_simulate = _engine.simulate


def simulate(scenario, *args, **kwargs):
    if scenario.workload.batch_size == 3:
        {action}
    return _simulate(scenario, *args, **kwargs)


_engine.simulate = simulate
"""
RAISE = 'raise RuntimeError("injected failure for batch_size=3")'
DIE = "os._exit(9)"


def moesim(cwd: Path, *args: str, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if fault is not None:
        site = cwd / "fault"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(FAULT.format(action=fault))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    code = "import sys; from sim.cli import main; sys.argv[0] = 'moesim'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in out.stderr.splitlines() if ln.startswith("moesim: error: ")]


@pytest.mark.parametrize("args,expected", [
    # the case: point 0 would have run, point 1 fails, point 2 never runs
    (["workload.batch_size=1,0,4", *SMALL],
     ["moesim: error: point 1 (workload.batch_size=0): workload.batch_size=0 is invalid; must be > 0"]),
    # a bad first point
    (["workload.batch_size=0,2", *SMALL],
     ["moesim: error: point 0 (workload.batch_size=0): workload.batch_size=0 is invalid; must be > 0"]),
    # points from an experiment preset's hydra.sweeper.params are checked too, one line each
    (["+experiment=offload_batch_sweep", "workload.num_requests=0", "sim.progress=false"],
     [f"moesim: error: point {i} (workload.batch_size={b}): workload.num_requests=0 is invalid; must be > 0"
      for i, b in enumerate([1, 4, 16, 64])]),
])
def test_a_bad_point_refuses_the_whole_sweep_before_anything_runs(tmp_path, args, expected):
    out = moesim(tmp_path, "-m", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == expected
    assert "TPOT" not in out.stdout   # no point ran
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no multirun/ folder, nothing


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """summary.json of single runs (no -m) of batch sizes 1 and 2."""
    tmp = tmp_path_factory.mktemp("single")
    out = {}
    for bs in (1, 2):
        res = moesim(tmp, *SMALL, f"workload.batch_size={bs}", f"hydra.run.dir={tmp / str(bs)}")
        assert res.returncode == 0, res.stderr
        out[bs] = summary(tmp / str(bs))
    return out


def _same_results(a: dict, b: dict) -> None:
    wall = {"sim_wall_s"}   # the only key that is not a function of the scenario
    assert {k: v for k, v in a.items() if k not in wall} == {k: v for k, v in b.items() if k not in wall}


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"]],
                         ids=["joblib", "submitit_local"])
def test_parallel_launchers_give_the_results_of_single_runs(tmp_path, single_runs, launcher):
    sweep = tmp_path / "sweep"
    out = moesim(tmp_path, "-m", "workload.batch_size=1,2", *SMALL, *launcher, f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr
    for num, bs in enumerate((1, 2)):
        got = summary(sweep / str(num))
        assert got["status"] == "ok" and got["batch_size"] == bs
        assert got["tpot_s"] == single_runs[bs]["tpot_s"]   # exactly: the simulator is deterministic
        _same_results(got, single_runs[bs])
        assert not (sweep / str(num) / "INCOMPLETE").exists()
    points = json.loads((sweep / "sweep_points.json").read_text())["points"]
    assert [(p["num"], p["dir"]) for p in points] == [(0, "0"), (1, "1")]
    assert "workload.batch_size=2" in points[1]["overrides"]


def _check_sweep_with_one_failed_point(tmp_path: Path, sweep: Path, out, error_type: str, capsys) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = error_lines(out)
    assert len(lines) == 1 and lines[0].startswith(
        f"moesim: error: point 1 (workload.batch_size=3) failed: {error_type}: "), out.stderr
    assert "Traceback" not in out.stderr
    for num in (0, 2):   # the other points are complete
        assert summary(sweep / str(num))["status"] == "ok"
        assert (sweep / str(num) / "steps.parquet").exists()
        assert not (sweep / str(num) / "INCOMPLETE").exists()
    failed = summary(sweep / "1")
    assert failed["status"] == "failed" and failed["error_type"] == error_type
    assert (sweep / "1" / "error.txt").read_text().strip()
    assert not (sweep / "1" / "steps.parquet").exists() and not (sweep / "1" / "INCOMPLETE").exists()
    assert not list(sweep.rglob(".*.tmp"))   # no half-written file anywhere

    capsys.readouterr()
    assert report([str(sweep), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert f"point 1 (workload.batch_size=3) in 1: failed: {error_type}: " in printed
    import pandas as pd

    table = pd.read_csv(sweep / "report.csv")
    assert table["workload.batch_size"].tolist() == [1, 2, 3]
    assert table.status.tolist() == ["ok", "ok", "failed"]
    assert table.tpot_s.notna().tolist() == [True, True, False]


def test_a_point_that_raises_leaves_the_others_complete(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    out = moesim(tmp_path, "-m", "workload.batch_size=1,3,2", *SMALL, f"hydra.sweep.dir={sweep}", fault=RAISE)
    _check_sweep_with_one_failed_point(tmp_path, sweep, out, "RuntimeError", capsys)
    assert "injected failure for batch_size=3" in summary(sweep / "1")["error"]
    assert "RuntimeError: injected failure" in (sweep / "1" / "error.txt").read_text()
    assert summary(sweep / "1")["batch_size"] == 3   # the scenario's choices are kept


def test_a_killed_joblib_worker_loses_no_other_point(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    out = moesim(tmp_path, "-m", "workload.batch_size=1,3,2", *SMALL, "hydra/launcher=joblib",
                 "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", fault=DIE)
    _check_sweep_with_one_failed_point(tmp_path, sweep, out, "WorkerDied", capsys)
    assert "moesim: warning: the launcher stopped (TerminatedWorkerError" in out.stderr


def test_ctrl_c_exits_130_and_leaves_the_run_marked_incomplete(tmp_path):
    run_dir = tmp_path / "run"
    # Mixtral offloading 64 requests x 2000 tokens: minutes of simulation, interrupted within seconds.
    code = "import sys; from sim.cli import main; sys.argv[0] = 'moesim'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "workload.num_requests=64", "workload.output_len=2000",
                             "sim.progress=false", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "INCOMPLETE").exists():   # written once the simulation starts
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run did not start within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.splitlines() == ["moesim: interrupted"]
    assert (run_dir / "INCOMPLETE").exists()
    leftovers = {p.name for p in run_dir.iterdir()}
    assert not leftovers & {"summary.json", "steps.parquet", "requests.parquet", "timeline.json"}
    assert not [n for n in leftovers if n.endswith(".tmp")]


def _fake_sweep(sweep: Path) -> None:
    """Five points, written by hand: ok, truncated summary, corrupt overrides, incomplete, never ran."""
    good = {"status": "ok", "tpot_s": 0.01, "ttft_s": 0.1, "throughput_tok_s": 100.0, "expert_hit_rate": 0.5,
            "h2d_bytes": 1e9, "copy_stall_s": 0.0, "model": "olmoe_1b_7b", "batch_size": 1}
    for num in range(4):
        (sweep / str(num) / ".hydra").mkdir(parents=True)
        (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(f"- workload.batch_size={num + 1}\n")
    (sweep / "0" / "summary.json").write_text(json.dumps(good))
    (sweep / "1" / "summary.json").write_text(json.dumps(good)[:25])
    (sweep / "2" / "summary.json").write_text(json.dumps(good))
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("- workload.batch_size=3\n- [unclosed: {\n")
    (sweep / "3" / "INCOMPLETE").write_text("")
    (sweep / "3" / "summary.json").write_text(json.dumps(good))   # stale: the marker wins
    points = [{"num": n, "dir": str(n), "overrides": [f"workload.batch_size={n + 1}"]} for n in range(5)]
    (sweep / "sweep_points.json").write_text(json.dumps({"points": points}))


def test_report_lists_bad_incomplete_and_missing_points_without_a_traceback(tmp_path, capsys):
    import pandas as pd

    sweep = tmp_path / "sweep"
    _fake_sweep(sweep)
    assert report([str(sweep), "--no-plots"]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    lines = printed.out.splitlines()
    assert any(ln.startswith("point 1 (workload.batch_size=2) in 1: bad: summary.json is unreadable") for ln in lines)
    assert any(ln.startswith("point 2 (workload.batch_size=3) in 2: bad: .hydra/overrides.yaml is unreadable")
               for ln in lines)
    assert "point 3 (workload.batch_size=4) in 3: incomplete: " in printed.out
    assert "point 4 (workload.batch_size=5) in 4: missing: never ran" in printed.out
    table = pd.read_csv(sweep / "report.csv")
    assert table["workload.batch_size"].tolist() == [1, 2, 3, 4, 5]
    assert table.status.tolist() == ["ok", "bad", "bad", "incomplete", "missing"]
    assert table.tpot_s.notna().tolist() == [True, False, False, False, False]
    assert pd.read_parquet(sweep / "report.parquet").status.tolist() == table.status.tolist()

    # The report is not replaced without --force: one line, exit 2, the old file untouched.
    before = (sweep / "report.csv").read_text()
    (sweep / "0" / "summary.json").write_text(json.dumps({"status": "ok", "tpot_s": 0.5}))
    assert report([str(sweep), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moesim-report: error: ") and "--force" in err[0]
    assert (sweep / "report.csv").read_text() == before
    assert report([str(sweep), "--no-plots", "--force"]) == 0
    assert pd.read_csv(sweep / "report.csv").tpot_s.iloc[0] == 0.5


def test_report_cli_on_a_corrupt_points_file_and_plots_only_ok_points(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_sweep(sweep)
    (sweep / "sweep_points.json").write_text('{"points": [{"num": ')
    (sweep / "report_tpot_s.png").write_bytes(b"old")
    out = subprocess.run([sys.executable, "-c", "from sim.report import entry; entry()", str(sweep)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "report_tpot_s.png exists; pass --force" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-c", "from sim.report import entry; entry()", str(sweep), "--force"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    (warning,) = out.stderr.strip().splitlines()
    assert warning.startswith("moesim-report: warning: sweep_points.json is unreadable (JSONDecodeError: ")
    assert "points 0 (workload.batch_size=1)" not in out.stdout and "point 1" not in out.stdout
    assert "run (workload.batch_size=2) in 1: bad: summary.json is unreadable" in out.stdout
    assert (sweep / "report_tpot_s.png").read_bytes() != b"old"
