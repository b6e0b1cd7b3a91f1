"""``scripts/gpu_check.sh`` and the device tests it runs on the GPU.

* The script parses, refuses bad input with one line and status 2 before touching anything, and its
  ``--report`` mode turns a run's outputs into the figures block (TPOT errors, copy bandwidth, op
  tables against the roofline of the matched ``conf/hw/gpu`` preset).
* ``test_device_*``: the real CUDA path, parametrized over ``cpu`` (runs everywhere, so the test
  itself is known to work) and ``cuda`` (skipped without a GPU; ``gpu_check.sh`` runs it with
  ``-k "cuda or device"``): pinned host store and the copy engine's stream landing exact bytes, and
  the executor offloading for real with the simulator's counters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU here"))]
BF16 = ["model.weight_bytes_per_param=2", "model.kv_bytes_per_elem=2", "model.act_bytes_per_elem=2"]


def _run(*args, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update(env_extra or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


def _one_line_error(res, needle):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: "), res.stderr
    assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ script
def test_script_parses():
    assert shutil.which("bash")
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "set -euo pipefail" in SCRIPT.read_text()


def test_refuses_without_a_wheel_folder_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    _one_line_error(_run(env_extra={"OUT": str(out)}), "give the wheel folder")
    _one_line_error(_run(str(tmp_path / "nope"), env_extra={"OUT": str(out)}), "is not a directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(_run(str(tmp_path / "empty"), env_extra={"OUT": str(out)}), "holds no .whl")
    _one_line_error(_run("--bogus", env_extra={"OUT": str(out)}), "unknown option --bogus")
    _one_line_error(_run(env_extra={"OUT": str(out), "GPU_CHECK_DRY_RUN": "yes"}), "GPU_CHECK_DRY_RUN=yes")
    assert not out.exists()
    out.mkdir()
    (out / "old.txt").write_text("x")
    _one_line_error(_run("--dry-run", env_extra={"OUT": str(out)}), "is not empty")
    assert [p.name for p in out.iterdir()] == ["old.txt"]


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_refuses_without_a_gpu(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "simpy-4.1.2-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    _one_line_error(_run(str(wheels), env_extra={"OUT": str(out)}), "torch.cuda.is_available() is False")
    assert not out.exists()


def _fake_run(out: Path, hw_gpu: str = "h100_sxm") -> None:
    """What a run's steps write, by hand: env.json, a profile, a validation sweep."""
    (out / "profile").mkdir(parents=True)
    (out / "env.json").write_text(json.dumps({"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                                              "memory_gb": 85.0, "torch": "2.5.1+cu124", "cuda": "12.4",
                                              "driver": "550.54", "python": "3.12.3", "dry_run": False,
                                              "root": str(ROOT), "hw_gpu": hw_gpu}))
    base = {"device": "cuda", "repeats": 5, "threads": 16, "dtype": "bfloat16", "p10_s": 0.0, "p90_s": 0.0}
    rows = [{**base, "model": "mini_mixtral", "op": "expert", "phase": None, "tokens": t, "median_s": s}
            for t, s in ((1, 40e-6), (64, 60e-6))]
    rows += [{**base, "model": "mini_mixtral", "op": "attention", "phase": "decode", "tokens": 8, "batch": 8,
              "context": 1024, "median_s": 90e-6},
             {**base, "model": "mini_mixtral", "op": "attention", "phase": "prefill", "tokens": 128, "batch": 1,
              "context": 128, "median_s": 120e-6},
             {**base, "model": "mini_mixtral", "op": "layer_overhead", "phase": None, "tokens": 1, "median_s": 1e-4}]
    rows += [{**base, "model": None, "op": "copy", "phase": ph, "bytes": b, "median_s": b / bw}
             for ph, bw in (("idle", 25e9), ("contended", 20e9)) for b in (2 ** 20, 16 * 2 ** 20)]
    pd.DataFrame(rows).to_csv(out / "profile" / "profile.csv", index=False)
    sig = {"weight_bytes_per_param": 2.0, "kv_bytes_per_elem": 2.0, "act_bytes_per_elem": 2.0,
           "expert_bytes_per_param": 2.0}
    (out / "profile" / "profile.json").write_text(json.dumps({"models": {"mini_mixtral": sig},
                                                              "host_link": "pinned host -> device, copy stream"}))
    cells, acc = out / "validate" / "cells", []
    for i, (policy, batch, sim, real) in enumerate([("lru", 1, 0.0020, 0.0025), ("lookahead", 1, 0.0015, 0.0016),
                                                    ("lru", 4, 0.0030, 0.0030), ("lookahead", 4, 0.0024, 0.0020)]):
        d = cells / f"{i:03d}-{policy}-{batch}"
        d.mkdir(parents=True)
        err = (sim - real) / real * 100
        pd.DataFrame([{"metric": "tpot_s", "sim": sim, "real_median": real, "error_pct": err},
                      {"metric": "copy_stall_s", "sim": 1, "real_median": 1, "error_pct": -5.0},
                      {"metric": "h2d_bytes", "sim": 1, "real_median": 1, "error_pct": 0.0},
                      {"metric": "iter_abs_err_p50", "error_pct": 7.5}]).to_csv(d / "comparison.csv", index=False)
        pd.DataFrame([{"h2d_bytes": 2e9, "copy_engine_busy_s": 0.1, "copy_worker_sched": "cuda"}] * 3).to_csv(
            d / "real_repeats.csv", index=False)
        acc.append({"model": "mini_mixtral", "policy/prefetch": policy, "workload.batch_size": batch,
                    "sim_tpot_s": sim, "real_tpot_s": real, "tpot_err_pct": err, "abs_tpot_err_pct": abs(err),
                    "dir": str(d), "group": f"mini_mixtral {batch}", "ranking_agrees": batch == 1})
    pd.DataFrame(acc).to_csv(out / "validate" / "accuracy.csv", index=False)


def test_report_prints_the_figures_against_the_roofline(tmp_path):
    from hw.cost import BatchShape, Roofline
    from sim.config import compose_scenario
    import dataclasses

    _fake_run(tmp_path)
    res = _run("--report", str(tmp_path))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "NVIDIA H100 80GB HBM3" in text and "torch 2.5.1+cu124" in text and "CUDA 12.4" in text
    assert "DRY RUN" not in text
    # TPOT errors per cell, their median and the ranking
    assert "mini_mixtral lru 1" in text and "err  -20.0%" in text
    assert "median |TPOT error| 13.1% over 4 cells; policy ranking agrees in 1/2 groups" in text
    # copy bandwidth: the profile's curve and the executor's
    assert "idle      GB/s at: 1 MiB 25.0, 16 MiB 25.0" in text
    assert "= 20.0 GB/s (copy worker: cuda)" in text
    # op tables against the roofline of conf/hw/gpu/h100_sxm.yaml
    assert "roofline of conf/hw/gpu/h100_sxm.yaml: 989 TFLOP/s" in text
    hw = compose_scenario(["hw=h100_sxm"]).hw
    roof = Roofline(hw.gpu, hw.cpu)
    spec = dataclasses.replace(compose_scenario(["model=mini_mixtral"]).model, weight_bytes_per_param=2.0,
                               kv_bytes_per_elem=2.0, act_bytes_per_elem=2.0, expert_bytes_per_param=2.0)
    line = next(l for l in text.splitlines() if "expert FFN, 64 tokens" in l)
    measured, predicted, ratio = (float(v) for v in line.split()[-3:])
    assert measured == pytest.approx(0.06) and predicted == pytest.approx(roof.expert_s(spec, 64) * 1e3, rel=1e-3)
    assert ratio == pytest.approx(measured / predicted, rel=0.02)
    line = next(l for l in text.splitlines() if "attention decode, 8 seq x 1024 ctx" in l)
    assert float(line.split()[-2]) == pytest.approx(
        roof.attention_block_s(spec, BatchShape(8, 8, 8 * 1024, 8 * 1024)) * 1e3, rel=1e-3)
    assert "layer_overhead" not in text


def test_report_without_a_matching_preset_prints_measured_only(tmp_path):
    _fake_run(tmp_path, hw_gpu="")
    (tmp_path / "validate" / "accuracy.csv").unlink()
    res = _run("--report", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "no validate/accuracy.csv" in res.stdout
    assert "measured only: no conf/hw/gpu preset matches" in res.stdout
    line = next(l for l in res.stdout.splitlines() if "expert FFN, 1 tokens" in l)
    assert line.split()[-3:] == ["0.04", "-", "-"]


def test_device_name_matching(tmp_path):
    """env.json's roofline preset for the names torch.cuda.get_device_name() gives."""
    script = SCRIPT.read_text()
    body = script.split("def match_gpu", 1)[1].split("\n\n\n", 1)[0]
    ns: dict = {}
    exec("import re\ndef match_gpu" + body, ns)
    match = ns["match_gpu"]
    cases = {"NVIDIA H100 80GB HBM3": "h100_sxm", "NVIDIA H100 PCIe": "h100_pcie", "NVIDIA H200": "h200",
             "NVIDIA GH200 480GB": "gh200", "NVIDIA A100-SXM4-80GB": "a100_sxm", "NVIDIA A800-SXM4-80GB": "a800",
             "NVIDIA RTX A6000": "a6000", "NVIDIA RTX 6000 Ada Generation": "rtx6000_ada", "NVIDIA L40S": "l40",
             "Tesla T4": "t4", "NVIDIA GeForce RTX 4090": None, "NVIDIA H800": "h800"}
    for name, preset in cases.items():
        assert match(name) == preset, name
        if preset:
            assert (ROOT / "conf" / "hw" / "gpu" / f"{preset}.yaml").is_file()


# ------------------------------------------------------------------------------------------ device
TINY = ["hw=this_cpu", "hw.cost_model=roofline", "model=mini_qwen", "model.hidden_size=64",
        "model.expert_intermediate_size=32", "model.shared_expert_intermediate_size=64",
        "model.num_attention_heads=2", "model.num_kv_heads=2", "model.head_dim=32", "model.vocab_size=128",
        "model.num_layers=3", "model.num_experts=8", "workload.num_requests=3", "workload.prompt_len=8",
        "workload.output_len=6", "workload.batch_size=2", "policy.prefetch.capacity_per_layer=3",
        "sim.progress=false"]
COUNT_COLUMNS = ["step", "phase", "batch_size", "tokens", "hits", "misses", "demand_bytes", "prefetch_bytes",
                 "demand_loads", "prefetches", "h2d_bytes", "active_experts_mean"]


@pytest.mark.parametrize("device", DEVICES)
def test_device_copy_engine_lands_exact_bytes_from_the_host_store(device):
    from real_backend.offload import CopyEngine, CopyJob, HostStore

    cuda = device == "cuda"
    store = HostStore.random([0], 2, 256, 512, dtype=torch.bfloat16 if cuda else torch.float32, pin_memory=cuda)
    assert store.pinned == cuda and store.flat((0, 1)).is_pinned() == cuda
    engine = CopyEngine(device)
    try:
        assert (engine.stream is not None) == cuda
        src = store.flat((0, 1))
        dst = torch.zeros_like(src, device=device)
        job = engine.submit(CopyJob(key=(0, 1), kind="demand", priority=0, nbytes=store.expert_bytes, src=src,
                                    dst=dst))
        assert job.done.wait(30) and job.error is None
        if cuda:
            job.cuda_event.synchronize()
        assert torch.equal(dst.cpu(), src) and job.end >= job.start
        # A 64 MiB copy, three times: what the link gives this engine.
        n = 64 << 20
        big = torch.randint(0, 256, (n,), dtype=torch.uint8).pin_memory() if cuda else \
            torch.randint(0, 256, (n,), dtype=torch.uint8)
        big_dst = torch.empty_like(big, device=device)
        times = []
        for _ in range(3):
            j = engine.submit(CopyJob(key=(0, 0), kind="demand", priority=0, nbytes=n, src=big, dst=big_dst))
            assert j.done.wait(60) and j.error is None
            times.append(j.end - j.start)
        bw = n / min(times)
        print(f"{device}: 64 MiB host->device copy at {bw / 1e9:.1f} GB/s")
        assert torch.equal(big_dst[-4096:].cpu(), big[-4096:])
        assert bw > (2e9 if cuda else 2e8)   # pinned PCIe Gen3 x16 gives ~12 GB/s
    finally:
        engine.close()


@pytest.mark.parametrize("device", DEVICES)
def test_device_executor_offloads_for_real_with_the_simulators_counters(device):
    from real_backend.executor import RealExecutor, build_model_and_store
    from sim.config import compose_scenario
    from sim.engine import simulate
    from workloads.requests import build_requests

    cuda = device == "cuda"
    sc = compose_scenario(TINY + (BF16 if cuda else []))
    reqs = build_requests(sc.workload, sc.model, sc.seed)
    model, store = build_model_and_store(sc, device)
    assert model.device.type == device and model.dtype == (torch.bfloat16 if cuda else torch.float32)
    assert store.pinned == cuda and store.expert_bytes == sc.model.expert_bytes
    sim = simulate(sc, reqs)
    # LRU with the copy worker thread (asynchronous copies on the copy stream on CUDA): demand loads
    # only, so the counters cannot depend on timing.
    real = RealExecutor(sc, reqs, model=model, store=store).run()
    assert real.summary["device"] == device
    pd.testing.assert_frame_equal(real.steps[COUNT_COLUMNS].reset_index(drop=True),
                                  sim.steps[COUNT_COLUMNS].reset_index(drop=True), check_dtype=False)
    assert real.steps["misses"].sum() > 0 and real.summary["h2d_bytes"] == sim.summary["h2d_bytes"] > 0
    assert (real.steps["duration_s"] > 0).all() and (real.steps["copy_stall_s"] >= 0).all()
    assert real.summary["copy_engine_busy_s"] > 0 and real.summary["tpot_s"] > 0
    # A prefetching policy: with synchronous copies the counters are the simulator's exactly; with
    # the worker thread the prefetches overlap compute and the run completes with the same tokens.
    sc2 = compose_scenario(TINY + (BF16 if cuda else []) + ["policy/prefetch=lookahead"])
    sim2 = simulate(sc2, reqs)
    sync = RealExecutor(sc2, reqs, model=model, store=store, synchronous_copies=True).run()
    pd.testing.assert_frame_equal(sync.steps[COUNT_COLUMNS].reset_index(drop=True),
                                  sim2.steps[COUNT_COLUMNS].reset_index(drop=True), check_dtype=False)
    assert sync.steps["prefetches"].sum() > 0
    free = RealExecutor(sc2, reqs, model=model, store=store).run()
    assert free.summary["decode_tokens"] == sim2.summary["decode_tokens"]
    assert free.steps["prefetches"].sum() > 0
