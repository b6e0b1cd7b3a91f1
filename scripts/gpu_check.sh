#!/usr/bin/env bash
# First run of moesim's CUDA path, on a machine with one NVIDIA GPU and no network.
#
#   scripts/gpu_check.sh WHEEL_DIR        # on the GPU machine (README: "Checking the CUDA path")
#   scripts/gpu_check.sh --dry-run        # the same steps on this machine's CPU (GPU_CHECK_DRY_RUN=1):
#                                         # no install, tiny sizes; to test the script itself
#   scripts/gpu_check.sh --report DIR     # print the figures block of an earlier run's output DIR
#
# The GPU machine has Python with a CUDA build of torch, pandas, pyarrow, networkx, scipy,
# matplotlib, pytest and hypothesis; WHEEL_DIR holds wheels (or sdists) of simpy, hydra-core,
# omegaconf, tqdm, pyyaml, setuptools, wheel and their pure-Python dependencies, made beforehand on
# a machine with a registry:
#
#   python3.12 -m pip wheel -w .gpu-wheels simpy hydra-core omegaconf tqdm pyyaml setuptools wheel
#
# Steps (each under `timeout`, each logged to OUTDIR/NAME.log; a failed step does not stop the
# others unless they need its output; the exit status is 1 if any failed):
#   1. env      GPU name, torch and CUDA versions, driver (nvidia-smi) -> env.json
#   2. install  moesim from WHEEL_DIR only (pip --no-index --find-links, --no-build-isolation,
#               --no-deps for moesim itself): torch is never reinstalled; checked afterwards
#   3. tests    the tests that run on CUDA (tests/test_gpu_check.py's device tests on cpu and
#               cuda, the fake-CUDA logic of tests/test_offload.py, tests/test_real_model.py)
#   4. profile  moesim-profile --device cuda --quick -o OUTDIR/profile
#   5. validate moesim-validate --device cuda: lru, lookahead x batch 1, 4 x mini_mixtral,
#               mini_qwen (bf16 byte sizes, no link cap: pinned host memory and the copy stream
#               at the real link's speed) -o OUTDIR/validate
#   6. figures  TPOT errors, copy bandwidth achieved, op tables against this GPU's roofline
#               (conf/hw/gpu/*.yaml matched by device name) -> OUTDIR/figures.txt
#
# OUTDIR is $OUT if set, else gpu_check_out/; it must be missing or empty.
# Bad input prints one line `gpu_check: error: ...` on stderr and exits with status 2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
WHEELS="${GPU_CHECK_WHEELS:-}"
REPORT=""

die() { echo "gpu_check: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --report) [ $# -ge 2 ] || die "--report needs an output directory of an earlier run"; REPORT="$2"; shift ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1; usage: scripts/gpu_check.sh WHEEL_DIR | --dry-run | --report DIR" ;;
    *) [ -z "$WHEELS" ] || [ "$WHEELS" = "$1" ] || die "one WHEEL_DIR only (got $WHEELS and $1)"; WHEELS="$1" ;;
  esac
  shift
done
case "$DRY" in 0|1) ;; *) die "GPU_CHECK_DRY_RUN=$DRY is invalid; use 1 or 0" ;; esac

# ------------------------------------------------------------------------------------- figures
figures() {  # figures OUTDIR: the compact block, from what the steps wrote (any subset of them)
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$1" <<'PYEOF'
import json, math, sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
W = 78


def ms(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 1e3:.3f}"


def pct(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.1f}%"


def read_csv(path):
    try:
        return pd.read_csv(path) if path.is_file() else None
    except Exception as exc:  # a half-written file of a step that was killed
        print(f"  ({path.name} unreadable: {exc})")
        return None


print("=" * W)
print("gpu_check figures" + (f"  ({out})"))
env = {}
if (out / "env.json").is_file():
    env = json.loads((out / "env.json").read_text())
    print(f"device: {env.get('device_name')} ({env.get('device')}), {env.get('memory_gb') or '-'} GB"
          f" | torch {env.get('torch')} | CUDA {env.get('cuda')} | driver {env.get('driver') or '-'}"
          f" | python {env.get('python')}")
    if env.get("dry_run"):
        print("DRY RUN on the CPU: these are not GPU figures")

# ---- TPOT errors
print("-" * W)
print("TPOT: simulator (measured cost tables) vs real executor, per validation cell")
acc = read_csv(out / "validate" / "accuracy.csv")
if acc is None or acc.empty:
    print("  (no validate/accuracy.csv: the validate step did not finish)")
else:
    keys = [c for c in acc.columns if c in ("model", "policy/prefetch", "workload.batch_size")]
    for _, r in acc.iterrows():
        cell = Path(str(r.get("dir", "")))
        comp = read_csv(cell / "comparison.csv") if str(r.get("dir", "")) else None
        extra = ""
        if comp is not None:
            c = comp.set_index("metric")["error_pct"]
            extra = (f" stall {pct(c.get('copy_stall_s'))} bytes {pct(c.get('h2d_bytes'))}"
                     f" |iter| p50 {c.get('iter_abs_err_p50', float('nan')):.1f}%")
        name = " ".join(f"{r[k]}" for k in keys)
        print(f"  {name:<26} sim {ms(r['sim_tpot_s']):>8} ms  real {ms(r['real_tpot_s']):>8} ms  "
              f"err {pct(r['tpot_err_pct']):>7}{extra}")
    print(f"  median |TPOT error| {acc['abs_tpot_err_pct'].median():.1f}% over {len(acc)} cells"
          + (f"; policy ranking agrees in {int(acc.groupby('group')['ranking_agrees'].first().sum())}/"
             f"{acc['group'].nunique()} groups" if "ranking_agrees" in acc else ""))

# ---- copy bandwidth
print("-" * W)
print("Copy bandwidth achieved (host -> device)")
prof = read_csv(out / "profile" / "profile.csv")
header = json.loads((out / "profile" / "profile.json").read_text()) if (out / "profile" / "profile.json").is_file() else {}
if prof is not None:
    copies = prof[prof["op"] == "copy"].sort_values("bytes")
    for phase, g in copies.groupby("phase", sort=False):
        pts = ", ".join(f"{b / 2**20:.3g} MiB {b / t / 1e9:.1f}" for b, t in zip(g["bytes"], g["median_s"]))
        print(f"  profile, {phase:<9} GB/s at: {pts}")
    if header.get("host_link"):
        print(f"  (profile's copy path: {header['host_link']})")
reps = sorted((out / "validate").glob("cells/*/real_repeats.csv"))
if reps:
    rr = pd.concat([pd.read_csv(p) for p in reps], ignore_index=True)
    busy = rr.get("copy_engine_busy_s", pd.Series(dtype=float)).sum()
    if busy > 0:
        sched = ",".join(sorted(set(map(str, rr.get("copy_worker_sched", pd.Series(["?"]))))))
        print(f"  executor, validation runs: {rr['h2d_bytes'].sum() / 2**30:.2f} GiB in {busy:.3f} s of copy "
              f"engine time = {rr['h2d_bytes'].sum() / busy / 1e9:.1f} GB/s (copy worker: {sched})")
if prof is None and not reps:
    print("  (no profile or validation output)")

# ---- op tables against the roofline
print("-" * W)
gpu_name = env.get("hw_gpu") or ""
roof, note = None, ""
if prof is not None and gpu_name:
    try:
        from hw.cost import BatchShape, Roofline
        from sim.config import compose_scenario

        root = Path(env.get("root", "."))
        hw_over = [f"hw={gpu_name}"] if (root / "conf" / "hw" / f"{gpu_name}.yaml").is_file() else [f"hw/gpu={gpu_name}"]
        hw = compose_scenario(hw_over + ["++hw.cost_model=roofline"]).hw
        roof = Roofline(hw.gpu, hw.cpu)
        note = (f"roofline of conf/hw/gpu/{gpu_name}.yaml: {hw.gpu.peak_flops / 1e12:g} TFLOP/s x "
                f"{hw.gpu.flops_efficiency:g}, {hw.gpu.mem_bw_bps / 1e12:g} TB/s x {hw.gpu.mem_efficiency:g}, "
                f"launch {hw.gpu.kernel_launch_s * 1e6:g} us; host link {hw.host_link.name} "
                f"{hw.host_link.bandwidth_bps / 1e9:g} GB/s")
    except Exception as exc:
        note = f"no roofline ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
elif prof is not None:
    note = "measured only: no conf/hw/gpu preset matches this device's name (set GPU_CHECK_HW_GPU=NAME)"
print("Op tables (profile medians) against the roofline" + (f"\n  {note}" if note else ""))
if prof is None:
    print("  (no profile/profile.csv: the profile step did not finish)")
else:
    import dataclasses

    for model in [m for m in dict.fromkeys(prof["model"].dropna()) if m]:
        rows = prof[prof["model"] == model]
        spec = None
        if roof is not None:
            try:
                from sim.config import compose_scenario

                spec = compose_scenario([f"model={model}"]).model
                sig = header.get("models", {}).get(model, {})
                spec = dataclasses.replace(spec, **{k: sig[k] for k in ("weight_bytes_per_param", "kv_bytes_per_elem",
                                                                       "act_bytes_per_elem", "expert_bytes_per_param")
                                                    if k in sig})
            except Exception:
                spec = None
        dtype = rows["dtype"].iloc[0] if "dtype" in rows and len(rows) else "?"
        print(f"  {model} ({dtype})" + ("" if spec is not None else ": measured only"))
        print(f"    {'op':<34} {'measured ms':>11} {'roofline ms':>11} {'meas/roof':>9}")

        def line(label, measured, predicted):
            ratio = f"{measured / predicted:.2f}" if predicted else "-"
            print(f"    {label:<34} {measured * 1e3:>11.4g} {'-' if predicted is None else f'{predicted * 1e3:.4g}':>11}"
                  f" {ratio:>9}")

        ex = rows[(rows["op"] == "expert") & (rows["phase"].isna() | (rows["phase"] == ""))].sort_values("tokens")
        for r in ex.itertuples():
            pred = roof.expert_s(spec, int(r.tokens)) if spec is not None else None
            line(f"expert FFN, {int(r.tokens)} tokens", r.median_s, pred)
        at = rows[(rows["op"] == "attention") & (rows["phase"] == "decode")].sort_values(["batch", "context"])
        for r in at.itertuples():
            b, c = int(r.batch), int(r.context)
            pred = roof.attention_block_s(spec, BatchShape(b, b, b * c, b * c)) if spec is not None else None
            line(f"attention decode, {b} seq x {c} ctx", r.median_s, pred)
        pf = rows[(rows["op"] == "attention") & (rows["phase"] == "prefill")].sort_values(["batch", "context"])
        for r in pf.itertuples():
            b, n = int(r.batch), int(r.context)
            pred = (roof.attention_block_s(spec, BatchShape(b * n, b, b * n * (n + 1) // 2, b * n))
                    if spec is not None else None)
            line(f"attention prefill, {b} seq x {n} tok", r.median_s, pred)
print("=" * W)
PYEOF
}

if [ -n "$REPORT" ]; then
  [ -d "$REPORT" ] || die "--report $REPORT is not a directory"
  figures "$REPORT"
  exit 0
fi

# ------------------------------------------------------------------------------------- checks
OUTDIR="${OUT:-gpu_check_out}"
if [ -e "$OUTDIR" ] && [ -n "$(ls -A "$OUTDIR" 2>/dev/null)" ]; then
  die "output directory $OUTDIR is not empty; remove it or set OUT=another directory"
fi
command -v "$PY" >/dev/null 2>&1 || die "$PY not found; set PYTHON=/path/to/python3"
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
else
  [ -n "$WHEELS" ] || die "give the wheel folder: scripts/gpu_check.sh WHEEL_DIR (made with: pip wheel -w WHEEL_DIR simpy hydra-core omegaconf tqdm pyyaml setuptools wheel), or --dry-run"
  [ -d "$WHEELS" ] || die "wheel folder $WHEELS is not a directory"
  compgen -G "$WHEELS/*.whl" >/dev/null || compgen -G "$WHEELS/*.tar.gz" >/dev/null || die "wheel folder $WHEELS holds no .whl or .tar.gz"
  WHEELS="$(cd "$WHEELS" && pwd)"
  cuda_ok="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo missing)"
  [ "$cuda_ok" != missing ] || die "$PY cannot import torch; this script needs a CUDA build of torch already installed"
  [ "$cuda_ok" = 1 ] || die "torch.cuda.is_available() is False: no usable NVIDIA GPU here (use --dry-run to test on CPU)"
  DEVICE=cuda
fi
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$ROOT"

# Step time limits (seconds); the whole run is meant to take under 10 minutes.
T_INSTALL="${GPU_CHECK_T_INSTALL:-90}"
T_TESTS="${GPU_CHECK_T_TESTS:-150}"
T_PROFILE="${GPU_CHECK_T_PROFILE:-240}"
T_VALIDATE="${GPU_CHECK_T_VALIDATE:-180}"

FAILED=()
T0=$SECONDS
step() {  # step NAME LIMIT_S CMD...: run CMD under timeout, tee into OUTDIR/NAME.log, record a failure
  local name="$1" limit="$2"; shift 2
  local t=$SECONDS rc=0
  echo "== gpu_check: $name (limit ${limit}s): $*"
  if declare -F "$1" >/dev/null; then   # a function of this script: run it in a child bash
    set -- bash -c 'set -euo pipefail; "$@"' "$1" "$@"
  fi
  set +e
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 0 ]; then
    echo "== gpu_check: $name ok ($((SECONDS - t)) s)"
  else
    [ "$rc" -eq 124 ] && echo "== gpu_check: $name TIMED OUT after ${limit}s" || echo "== gpu_check: $name FAILED (status $rc)"
    FAILED+=("$name")
  fi
  return "$rc"
}

export PY ROOT OUTDIR DEVICE DRY WHEELS

# 1. environment -------------------------------------------------------------------------------
env_json() {
  GPU_CHECK_DEVICE="$DEVICE" GPU_CHECK_ROOT="$ROOT" GPU_CHECK_DRY="$DRY" "$PY" - "$OUTDIR/env.json" <<'PYEOF'
import json, os, platform, re, shutil, subprocess, sys
from pathlib import Path

import torch

device = os.environ["GPU_CHECK_DEVICE"]
root = Path(os.environ["GPU_CHECK_ROOT"])
env = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
       "dry_run": os.environ["GPU_CHECK_DRY"] == "1", "root": str(root), "driver": None}
if device == "cuda":
    p = torch.cuda.get_device_properties(0)
    env.update(device_name=torch.cuda.get_device_name(0), memory_gb=round(p.total_memory / 1e9, 1),
               capability=f"{p.major}.{p.minor}", device_count=torch.cuda.device_count())
    if shutil.which("nvidia-smi"):
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            pass
else:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env.update(device_name=name, memory_gb=None)


def match_gpu(name: str) -> str | None:
    """The conf/hw/gpu preset for a torch.cuda.get_device_name() string (None: no match)."""
    n = name.upper().replace("-", " ")
    rules = [("GH200", "gh200"), ("H200", "h200"), ("H800", "h800"), ("H100 PCIE", "h100_pcie"),
             ("H100", "h100_sxm"), ("A800", "a800"), ("A100", "a100_sxm"), ("6000 ADA", "rtx6000_ada"),
             ("A6000", "a6000"), ("L40", "l40"), ("T4", "t4")]
    for needle, preset in rules:
        if re.search(rf"\b{needle}", n):
            return preset
    return None


forced = os.environ.get("GPU_CHECK_HW_GPU")
gpu = forced or (match_gpu(env["device_name"]) if device == "cuda" else "this_cpu")
if gpu and not (root / "conf" / "hw" / "gpu" / f"{gpu}.yaml").is_file():
    gpu = None
env["hw_gpu"] = gpu
Path(sys.argv[1]).write_text(json.dumps(env, indent=2) + "\n")
print(f"device: {env['device_name']} ({device}) | torch {env['torch']} | CUDA {env['cuda']} | "
      f"driver {env['driver'] or '-'} | python {env['python']} | roofline preset: {gpu or 'none'}")
PYEOF
}
export -f env_json
step env 60 env_json || true
TORCH_BEFORE="$("$PY" -c 'import torch; print(torch.__version__)')"
export TORCH_BEFORE

# 2. install -----------------------------------------------------------------------------------
install() {
  local pip=("$PY" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check)
  # Only moesim's pure-Python dependencies that may be missing; torch is not among them (it is the
  # [real] extra, which is not installed), so nothing here can replace it.
  "${pip[@]}" simpy 'hydra-core>=1.3.2,<1.4' 'omegaconf>=2.3' 'tqdm>=4.66' 'pyyaml>=6'
  if ! "$PY" -c 'import setuptools, sys; v = tuple(int(x) for x in setuptools.__version__.split(".")[:2]); sys.exit(v < (68, 0))' 2>/dev/null; then
    "${pip[@]}" 'setuptools>=68' wheel
  fi
  "${pip[@]}" --no-build-isolation --no-deps -e "$ROOT"
  cd "$OUTDIR"   # import the installed package, not the checkout in the working directory
  "$PY" - "$TORCH_BEFORE" <<'PYEOF'
import sys

import torch

import hydra, omegaconf, simpy  # noqa: F401
import real_backend.validate, sim.engine  # noqa: F401

assert torch.__version__ == sys.argv[1], f"torch changed: {sys.argv[1]} -> {torch.__version__}"
assert torch.cuda.is_available(), "torch.cuda.is_available() is False after the install"
print(f"moesim installed; torch {torch.__version__} unchanged, CUDA available")
PYEOF
}
export -f install
if [ "$DRY" = 1 ]; then
  echo "== gpu_check: install skipped (dry run)"
else
  step install "$T_INSTALL" install || { figures "$OUTDIR" | tee "$OUTDIR/figures.txt"; echo "gpu_check: install failed; see $OUTDIR/install.log" >&2; exit 1; }
fi

# 3. tests ---------------------------------------------------------------------------------------
step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_gpu_check.py tests/test_offload.py tests/test_real_model.py -k "cuda or device" || true

# 4. profile -------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  PROFILE_ARGS=(--device cpu --quick --models mini_mixtral)
else
  PROFILE_ARGS=(--device cuda --quick)
fi
PROFILED=0
step profile "$T_PROFILE" "$PY" -m real_backend.profile "${PROFILE_ARGS[@]}" -o "$OUTDIR/profile" && PROFILED=1 || true

# 5. validate ------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  # The CPU executor's link shaper holds moesim-validate's default 2 GB/s cap; one repeat, 8 tokens.
  VALIDATE_ARGS=(model=mini_mixtral workload.output_len=9 --device cpu --repeats 1
                 --sweep policy/prefetch=lru,lookahead workload.batch_size=1,4)
else
  # bf16 byte sizes (the CUDA model's dtype; the profile's shape signature has them) and no link
  # cap: on CUDA the copies run from pinned memory on the copy stream at the real link's speed,
  # and the simulator takes the copy curve the profile measured on it.
  VALIDATE_ARGS=(hw.host_link.bandwidth_bps=1e12 model.weight_bytes_per_param=2 model.kv_bytes_per_elem=2
                 model.act_bytes_per_elem=2 --device cuda --repeats 3
                 --sweep policy/prefetch=lru,lookahead workload.batch_size=1,4 model=mini_mixtral,mini_qwen)
fi
if [ "$PROFILED" = 1 ]; then
  step validate "$T_VALIDATE" "$PY" -m real_backend.validate "${VALIDATE_ARGS[@]}" \
    --profile-dir "$OUTDIR/profile" -o "$OUTDIR/validate" || true
else
  echo "== gpu_check: validate skipped (no profile)"
  FAILED+=(validate)
fi

# 6. figures -------------------------------------------------------------------------------------
figures "$OUTDIR" | tee "$OUTDIR/figures.txt"
echo "gpu_check: $((SECONDS - T0)) s in all; outputs in $OUTDIR"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${FAILED[*]} (logs in $OUTDIR)" >&2
  exit 1
fi
echo "gpu_check: all steps passed"
