"""Nothing a user gave is ever overwritten (issue 10): every command that writes refuses, before any
work, an output that names one of its inputs (however spelled: ``./x``, a symlink, a hard link) and
an existing output without ``--force``; with ``--force`` the output is replaced. Refusals are one
line on stderr, exit status 2, every file byte-for-byte as before and no new file. Result files get
the user's umask. Wrong kinds of input files (Parquet for YAML, a directory, an empty file, CSV for
Parquet) are one line too. ``workloads.io.check_outputs`` is the shared rule."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sim import moesd
from sim.trace_cli import main as trace_main
from workloads.io import atomic_write, check_outputs
from workloads.synthetic import RoutingConfig, generate_routing
from workloads.trace import RoutedRequest, TraceMeta, read_trace, requests_to_frame, write_trace
from workloads.trace_stats import model_for_trace
from workloads.validation import ConfigError

EXPECTS = "expects the params YAML written by moesim-trace fit"
SHAPES = ["--num-experts", "8", "--top-k", "2", "--num-layers", "2"]
PARAMS_YAML = ("model: {name: toy, catalog: false, num_experts: 8, top_k: 2, num_layers: 2, moe_layers: [0, 1]}\n"
               "workload: {kind: synthetic, routing: uniform, num_requests: 2, prompt_len: 2, output_len: 3}\n")


# ------------------------------------------------------------------------------------ helpers

def snapshot(root: Path) -> dict:
    """Every entry under ``root``: files by sha256, symlinks by target, directories by name."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = ("link", os.readlink(p))
            elif p.is_dir():
                out[key] = ("dir",)
            else:
                out[key] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def refused(capsys, main, argv, root: Path, needle: str, prog: str = "moesim-trace") -> str:
    """Run ``main(argv)``: exit 2, one line ``PROG: error: ...`` holding ``needle``, nothing under
    ``root`` changed or added."""
    before = snapshot(root)
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert status == 2, out.err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), out.err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out.err
    assert snapshot(root) == before
    return lines[0]


def ok(capsys, main, argv) -> str:
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert status == 0, out.err
    return out.out


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def trace(tmp_path) -> Path:
    """A tiny router trace: 3 requests x 6 positions x 2 MoE layers of 8 experts, top-2."""
    model = model_for_trace("toy", 8, 2, 2, range(2))
    routing = generate_routing(model, RoutingConfig("uniform"), [6] * 3, np.random.default_rng(0))
    reqs = [RoutedRequest(i, 3, 4, x) for i, x in enumerate(routing)]
    path = tmp_path / "t.parquet"
    write_trace(path, requests_to_frame(reqs, model), TraceMeta.for_model(model, "test"))
    return path


@pytest.fixture
def log(tmp_path) -> Path:
    """A tiny generic router log (JSON Lines) of 2 requests x 3 tokens x 2 layers."""
    recs = [{"request_id": r, "token_index": t, "layer": l, "experts": [(r + t + l) % 8, (r + t + l + 1) % 8]}
            for r in range(2) for t in range(3) for l in range(2)]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    return path


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PARAMS_YAML)
    return path


@pytest.fixture
def measurements(tmp_path) -> Path:
    path = tmp_path / "m.csv"
    rows = ["batch_size,gamma,target_1_s,target_gamma_s,draft_s,reject_s"]
    for b in (1, 2, 4, 8, 16, 32):
        rows.append(f"{b},4,{0.010 + 0.0001 * b},{0.012 + 0.0008 * b},{0.001 + 0.00001 * b},0.0001")
    path.write_text("\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------- the cases

def test_import_json_onto_the_source_is_refused(tmp_path, capsys, log):
    refused(capsys, trace_main, ["import", log, tmp_path / "out.parquet", *SHAPES, "--json", log],
            tmp_path, "--json")
    link = tmp_path / "link.jsonl"
    link.symlink_to(log.name)
    refused(capsys, trace_main, ["import", log, tmp_path / "out.parquet", *SHAPES, "--json", link],
            tmp_path, "is the input SRC")
    # DEST onto the source, spelled another way
    refused(capsys, trace_main, ["import", log, tmp_path / "." / "log.jsonl", *SHAPES], tmp_path, "the input SRC")


def test_import_json_onto_dest_is_refused_however_spelled(tmp_path, capsys, log, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, trace_main, ["import", "log.jsonl", "out.parquet", *SHAPES, "--json", "./out.parquet"],
            tmp_path, "are the same file")
    refused(capsys, trace_main, ["import", "log.jsonl", "out.parquet", *SHAPES, "--json",
                                 str(tmp_path / "sub" / ".." / "out.parquet")], tmp_path, "are the same file")
    # once DEST exists, also as a hard link and a symlink (--force does not help)
    ok(capsys, trace_main, ["import", "log.jsonl", "out.parquet", *SHAPES])
    os.link("out.parquet", "hard.parquet")
    os.symlink("out.parquet", "soft.parquet")
    for other in ("hard.parquet", "soft.parquet"):
        refused(capsys, trace_main, ["import", "log.jsonl", "out.parquet", *SHAPES, "--json", other, "--force"],
                tmp_path, "are the same file")


def test_import_into_a_source_directory(tmp_path, capsys, log):
    # a directory source: its files are inputs; DEST may be a new file beside them
    refused(capsys, trace_main, ["import", tmp_path, tmp_path / "r.parquet", *SHAPES, "--json", log, "--force"],
            tmp_path, "is the input SRC")
    ok(capsys, trace_main, ["import", tmp_path, tmp_path / "r.parquet", *SHAPES])


def test_stats_json_onto_the_trace_is_refused(tmp_path, capsys, trace, monkeypatch):
    refused(capsys, trace_main, ["stats", trace, "--json", trace], tmp_path, "is the input TRACE")
    monkeypatch.chdir(tmp_path)
    refused(capsys, trace_main, ["stats", trace.name, "--json", "./" + trace.name, "--force"], tmp_path,
            "is the input TRACE")
    (tmp_path / "link.json").symlink_to(trace.name)
    refused(capsys, trace_main, ["stats", trace, "--json", "link.json", "--force"], tmp_path, "is the input TRACE")
    os.link(trace, "hard.json")
    refused(capsys, trace_main, ["stats", trace, "--json", "hard.json", "--force"], tmp_path, "is the input TRACE")


def test_fit_onto_the_trace_is_refused(tmp_path, capsys, trace):
    refused(capsys, trace_main, ["fit", trace, "-o", trace], tmp_path, "is the input TRACE")
    refused(capsys, trace_main, ["fit", trace, "-o", tmp_path / "x" / ".." / trace.name, "--force"], tmp_path,
            "is the input TRACE")


def test_generate_onto_the_params_is_refused(tmp_path, capsys, params):
    refused(capsys, trace_main, ["generate", params, "-o", params], tmp_path, "is the input PARAMS.yaml")
    link = tmp_path / "out.parquet"
    link.symlink_to(params.name)
    refused(capsys, trace_main, ["generate", params, "-o", link, "--force"], tmp_path, "is the input PARAMS.yaml")


def test_moesd_outputs_onto_their_inputs_are_refused(tmp_path, capsys, measurements):
    fit_args = ["fit", measurements, "--num-experts", "8", "--top-k", "2", "--ridge-point", "100"]
    refused(capsys, moesd.main, [*fit_args, "-o", measurements, "--force"], tmp_path, "is the input MEASUREMENTS",
            prog="moesim-moesd")
    ok(capsys, moesd.main, [*fit_args, "-o", tmp_path / "params.json"])
    refused(capsys, moesd.main, ["predict", tmp_path / "params.json", "--gamma", "4", "--alpha", "0.8", "-o",
                                 tmp_path / "." / "params.json", "--force"], tmp_path, "is the input PARAMS.json",
            prog="moesim-moesd")


def test_capture_output_onto_the_prompts_is_refused(tmp_path, capsys):
    # checked before torch / transformers are imported or the model is looked at
    from real_backend.capture_cli import main as capture_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n")
    refused(capsys, capture_main, ["--model", tmp_path / "no_model", "--prompts", prompts, "-o", prompts, "--force"],
            tmp_path, "is the input --prompts", prog="moesim-capture")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    refused(capsys, capture_main, ["--model", model, "--prompts", prompts, "-o", model / "config.json", "--force"],
            tmp_path, "is a file in the input directory --model", prog="moesim-capture")
    (tmp_path / "old.parquet").write_bytes(b"someone's trace")
    refused(capsys, capture_main, ["--model", model, "--prompts", prompts, "-o", tmp_path / "old.parquet"],
            tmp_path, "exists; pass --force to replace it", prog="moesim-capture")


# ------------------------------------------------------------------- existing outputs, --force

def test_existing_outputs_need_force_then_are_replaced(tmp_path, capsys, trace, params, measurements, umask022):
    mine = tmp_path / "mine.json"
    mine.write_text("my notes\n")
    refused(capsys, trace_main, ["stats", trace, "--json", mine], tmp_path, f"--json {mine} exists; pass --force")
    ok(capsys, trace_main, ["stats", trace, "--json", mine, "--force"])
    assert "hit_rate" in json.loads(mine.read_text())

    gen = tmp_path / "gen.parquet"
    gen.write_bytes(b"not yours")
    refused(capsys, trace_main, ["generate", params, "-o", gen], tmp_path, "exists; pass --force to replace it")
    ok(capsys, trace_main, ["generate", params, "-o", gen, "--force"])
    assert read_trace(gen)[1].model == "toy"

    fitted = tmp_path / "fitted.yaml"
    fitted.write_text("keep me\n")
    refused(capsys, trace_main, ["fit", trace, "-o", fitted, "--replicates", "2"], tmp_path, "pass --force")
    ok(capsys, trace_main, ["fit", trace, "-o", fitted, "--replicates", "2", "--force"])
    assert "workload:" in fitted.read_text()

    pred = tmp_path / "pred.csv"
    ok(capsys, moesd.main, ["fit", measurements, "--num-experts", "8", "--top-k", "2", "--ridge-point", "100",
                            "-o", tmp_path / "params.json"])
    pred.write_text("mine\n")
    argv = ["predict", tmp_path / "params.json", "--gamma", "4", "--alpha", "0.8", "-o", pred]
    refused(capsys, moesd.main, argv, tmp_path, "exists; pass --force", prog="moesim-moesd")
    ok(capsys, moesd.main, argv + ["--force"])
    assert pred.read_text().startswith("batch_size,")


def test_import_existing_dest_and_report(tmp_path, capsys, log):
    dest, rep = tmp_path / "out.parquet", tmp_path / "rep.json"
    rep.write_text("old report\n")
    refused(capsys, trace_main, ["import", log, dest, *SHAPES, "--json", rep], tmp_path, "--json")
    ok(capsys, trace_main, ["import", log, dest, *SHAPES, "--json", rep, "--force"])
    assert json.loads(rep.read_text())["rows"] == 12
    refused(capsys, trace_main, ["import", log, dest, *SHAPES], tmp_path, f"DEST {dest} exists; pass --force")


def test_force_is_in_every_help(capsys):
    from real_backend.capture_cli import build_parser as capture_parser

    for argv in (["import", "--help"], ["stats", "--help"], ["fit", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            trace_main(argv)
        assert "--force" in capsys.readouterr().out
    for argv in (["fit", "--help"], ["predict", "--help"]):
        assert moesd.main(argv) == 0
        assert "--force" in capsys.readouterr().out
    assert "--force" in capture_parser().format_help()


def test_moesd_help_is_whole_sentences(capsys):
    assert moesd.main(["--help"]) == 0
    text = capsys.readouterr().out
    description = " ".join(text.split("\n\n")[1].split())
    assert description.startswith("MoESD's analytical speedup model") and description.endswith(".")


# ------------------------------------------------------------------------------- permissions

def test_result_files_get_the_umask(tmp_path, capsys, trace, params, umask022):
    out = tmp_path / "deep" / "er" / "s.json"
    ok(capsys, trace_main, ["stats", trace, "--json", out])
    assert out.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "deep").stat().st_mode & 0o777 == 0o755
    ok(capsys, trace_main, ["generate", params, "-o", tmp_path / "g.parquet"])
    assert (tmp_path / "g.parquet").stat().st_mode & 0o777 == 0o644
    assert trace.stat().st_mode & 0o777 == 0o644   # write_trace -> atomic_write


def test_atomic_write_modes(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.txt", lambda p: p.write_text("a"))
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
        # replacing keeps the existing file's mode, as open() would
        os.chmod(tmp_path / "a.txt", 0o604)
        atomic_write(tmp_path / "a.txt", lambda p: p.write_text("b"))
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o604
        assert (tmp_path / "a.txt").read_text() == "b"
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ----------------------------------------------------------------- wrong kinds of input files

def test_generate_given_a_parquet_or_other_non_params_file(tmp_path, capsys, trace, log):
    out = tmp_path / "g.parquet"
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    (tmp_path / "nomodel.yaml").write_text("workload: {routing: uniform}\n")
    (tmp_path / "shape.yaml").write_text("model: {name: x}\nworkload: {routing: uniform}\n")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00binary")
    for src in (trace, log, tmp_path, tmp_path / "empty.yaml", tmp_path / "list.yaml", tmp_path / "bad.yaml",
                tmp_path / "t.csv", tmp_path / "nomodel.yaml", tmp_path / "shape.yaml", tmp_path / "bin.yaml"):
        refused(capsys, trace_main, ["generate", src, "-o", out], tmp_path, EXPECTS)
    assert "Parquet" in refused(capsys, trace_main, ["generate", trace, "-o", out], tmp_path, EXPECTS)


@pytest.mark.parametrize("cmd", ["stats", "fit"])
def test_stats_and_fit_given_wrong_kinds_of_trace(tmp_path, capsys, log, cmd):
    import pandas as pd

    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "csv.parquet").write_text("request_id,layer\n0,1\n")
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "plain.parquet")
    extra = ["-o", tmp_path / "p.yaml"] if cmd == "fit" else ["--json", tmp_path / "s.json"]
    for src, needle in ((tmp_path, "is not a file"), (tmp_path / "empty.parquet", "not a readable Parquet"),
                        (tmp_path / "csv.parquet", "not a readable Parquet"), (log, "not a readable Parquet"),
                        (tmp_path / "plain.parquet", "lacks metadata"), (tmp_path / "none.parquet", "does not exist")):
        refused(capsys, trace_main, [cmd, src, *extra], tmp_path, needle)


def test_moesd_given_wrong_kinds_of_file(tmp_path, capsys, trace, measurements):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "csv.parquet").write_text(measurements.read_text())
    fit_opts = ["--num-experts", "8", "--top-k", "2", "--ridge-point", "100", "-o", tmp_path / "x.json"]
    for src, needle in ((tmp_path, "is not a file"), (tmp_path / "empty.csv", "not a readable csv"),
                        (tmp_path / "csv.parquet", "not a readable parquet"), (trace, "lack column")):
        refused(capsys, moesd.main, ["fit", src, *fit_opts], tmp_path, needle, prog="moesim-moesd")
    for src, needle in ((trace, "not readable JSON"), (tmp_path, "is not a file"),
                        (tmp_path / "empty.csv", "not readable JSON"), (measurements, "not readable JSON")):
        refused(capsys, moesd.main, ["predict", src, "--gamma", "4", "--alpha", "0.8"], tmp_path, needle,
                prog="moesim-moesd")


def test_output_paths_that_cannot_be_written(tmp_path, capsys, trace):
    (tmp_path / "afile").write_text("x")
    refused(capsys, trace_main, ["stats", trace, "--json", tmp_path / "afile" / "s.json"], tmp_path,
            "is not a directory")
    refused(capsys, trace_main, ["stats", trace, "--json", tmp_path, "--force"], tmp_path, "is a directory")


# ------------------------------------------------------------------------------- the helper

def test_check_outputs_rule(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a")
    check_outputs([("-o", b)], [("IN", a)])
    with pytest.raises(ConfigError, match="are the same file"):
        check_outputs([("-o", b), ("--json", tmp_path / "." / "b.txt")], [("IN", a)])
    with pytest.raises(ConfigError, match=r"^-o .*a\.txt is the input IN "):
        check_outputs([("-o", a)], [("IN", a)], force=True)
    with pytest.raises(ConfigError, match="exists; pass --force to replace it"):
        check_outputs([("-o", a)], [])
    check_outputs([("-o", a)], [], force=True)
    check_outputs([("-o", None), ("--json", "")], [("IN", a)])   # options not given

    # directory outputs
    out = tmp_path / "out"
    check_outputs((), [("IN", a)], dirs=[("-o", out, ("sim", "*.csv"))])      # missing: fine
    out.mkdir()
    check_outputs((), [("IN", a)], dirs=[("-o", out, ("sim", "*.csv"))])      # empty: fine
    (out / "notes").mkdir()
    (out / "notes" / "n.txt").write_text("n")
    with pytest.raises(ConfigError, match="exists and is not empty; pass --force"):
        check_outputs((), [], dirs=[("-o", out, ("sim", "*.csv"))])
    # an input in the directory at a name the command does not write: fine with --force
    check_outputs((), [("IN", out / "notes" / "n.txt")], True, dirs=[("-o", out, ("sim", "*.csv"))])
    # ... at a name it writes, or the directory itself an input: never
    (out / "sim").mkdir()
    with pytest.raises(ConfigError, match="holds the input --profile-dir"):
        check_outputs((), [("--profile-dir", out / "sim")], True, dirs=[("-o", out, ("sim", "*.csv"))])
    with pytest.raises(ConfigError, match="holds the input IN"):
        check_outputs((), [("IN", out / "x.csv")], True, dirs=[("-o", out, ("sim", "*.csv"))])
    with pytest.raises(ConfigError, match="is the input"):
        check_outputs((), [("IN", out)], True, dirs=[("-o", tmp_path / "." / "out")])
    with pytest.raises(ConfigError, match="is a file; give a directory"):
        check_outputs((), [], True, dirs=[("-o", a)])


# ------------------------------------------------------------------ directory outputs (torch)

def test_profile_refuses_files_it_did_not_write(tmp_path, capsys):
    pytest.importorskip("torch")
    from real_backend.profile import main as profile_main

    out = tmp_path / "prof"
    out.mkdir()
    (out / "profile.csv").write_text("my spreadsheet\n")
    refused(capsys, profile_main, ["--device", "cpu", "--quick", "-o", out], tmp_path,
            "profile.csv exists; pass --force", prog="moesim-profile")
    (out / "profile.csv").unlink()
    (out / "profile.json").write_text(json.dumps({"format": 1, "models": {}, "device": "cpu",
                                                  "torch_threads": 3}))
    (out / "profile.parquet").write_bytes(b"")
    refused(capsys, profile_main, ["--device", "cpu", "--quick", "--threads", "1", "-o", out], tmp_path,
            "would replace; pass --force", prog="moesim-profile")
    refused(capsys, profile_main, ["--device", "cpu", "-o", out / "profile.json"], tmp_path, "is a file",
            prog="moesim-profile")


def test_validate_refuses_a_non_empty_or_input_directory(tmp_path, capsys):
    pytest.importorskip("torch")
    from real_backend.validate import main as validate_main

    out = tmp_path / "val"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    refused(capsys, validate_main, ["-o", out], tmp_path, "exists and is not empty; pass --force",
            prog="moesim-validate")
    refused(capsys, validate_main, ["-o", out, "--profile-dir", out, "--force"], tmp_path,
            "is the input --profile-dir", prog="moesim-validate")
    refused(capsys, validate_main, ["-o", out, f"workload.path={out}/sim/t.parquet", "--force"], tmp_path,
            "holds the input workload.path", prog="moesim-validate")
