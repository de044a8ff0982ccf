#!/usr/bin/env bash
# Every GPU measurement issue 17 needs, in one go, in at most 8 minutes on one H200.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   GPU_CHECK_DRY=1 OUT=/tmp/gc bash bench/gpu_check.sh   # dry run on CPU: tiny shapes
#
# Steps, most important first; each is time-boxed (`timeout`), and the whole run stops
# starting steps when the budget (GPU_CHECK_BUDGET seconds, default 470) would be overrun,
# so one hang cannot eat the window. After every step $OUT/summary.json is rewritten: each
# step's status, exit code and seconds, the targets with pass/fail/not measured, and every
# result JSON written so far. Logs: $OUT/<step>.log.
#   env         versions, GPU, free disk                            -> env.json
#   bnb_wheel   pip install bitsandbytes from .whl/ if not importable (no network there)
#   build_7b    random Baichuan2-7B-shaped bf16 checkpoint on local disk (not timed in)
#   gptq_7b     bench/gptq_speed.py --shape baichuan2-7b: checkpoint on disk -> artifact,
#               per-phase seconds, peak GPU/host memory                -> gpu_gptq_7b.json
#   mem_7b_gptq quantkit mem on that artifact (target <= NF4's 5.04 GiB) -> gpu_mem_7b_gptq.json
#   mem_7b_bf16 quantkit mem on the bf16 checkpoint (anchor 13.98 GiB) -> gpu_mem_7b_bf16.json
#   pytest_gpu  pytest -m gpu (Triton kernel vs CPU path at 7B width, ...) -> pytest_gpu.xml
#   build_13b, gptq_13b  the same with --shape baichuan2-13b --max-gpu-memory 24GiB
#               (target peak <= 24 GiB)                                -> gpu_gptq_13b.json
#   bnb_7b_nf4, mem_7b_nf4, bnb_7b_int8, mem_7b_int8   quantkit bnb + mem (anchors 5.04 and
#               7.96 GiB); skipped, with a note in summary.json, when bitsandbytes is absent
#
# bitsandbytes wheel (the GPU machine has no network; .whl/ is gitignored and must be
# carried with the working tree):
#   pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: \
#       --platform manylinux_2_24_x86_64 --python-version 3.11 -d .whl
# (a py3-none wheel: any CPython 3 works; it needs torch, numpy and packaging, present
# wherever torch is).
#
# Environment: OUT (results, default ./gpu-check-out), GPU_CHECK_WORK (checkpoints and
# artifacts, ~55 GB at the real shapes, default /tmp/quantkit-gpu-check), GPU_CHECK_BUDGET,
# PYTHON (default python3), GPU_CHECK_DRY=1 (tiny shapes on CPU, a few seconds a step:
# checks this script end to end without a GPU).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/quantkit-gpu-check}
BUDGET=${GPU_CHECK_BUDGET:-470}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
RESERVE=10  # seconds kept for the last summary
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$WORK"
STEPS=$OUT/steps.jsonl
: > "$STEPS"
START=$(date +%s)

if [ "$DRY" = 1 ]; then
    SHAPE7=tiny; SHAPE13=tiny; DEVICE=cpu
    SMALL=(--nsamples 4 --seqlen 64)
else
    SHAPE7=baichuan2-7b; SHAPE13=baichuan2-13b; DEVICE=cuda
    SMALL=()
fi
QK=("$PY" -m quantkit)

elapsed() { echo $(( $(date +%s) - START )); }

note() {  # note STEP STATUS RC SECONDS [MESSAGE]
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "${5:-}" >> "$STEPS"
}

summary() {
    "$PY" - "$OUT" "$DRY" <<'EOF'
import json, os, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]
results = {}
for path in sorted(out.glob("*.json")):
    if path.name != "summary.json":
        try:
            results[path.stem] = json.loads(path.read_text())
        except ValueError as exc:
            results[path.stem] = {"unreadable": str(exc)}

def get(name, *keys):
    value = results.get(name)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value

def target(measured, limit, what):
    status = "not measured" if measured is None else ("pass" if measured <= limit else "fail")
    if dry and measured is not None:
        status = "dry run: tiny shape on CPU, not a measurement"
    return {"what": what, "measured": measured, "limit": limit, "status": status}

def junit(test):
    """pass / fail / skipped / not measured for one test of pytest_gpu.xml (all params)."""
    import xml.etree.ElementTree as ET
    try:
        cases = [c for c in ET.parse(out / "pytest_gpu.xml").iter("testcase")
                 if c.get("name", "").split("[")[0] == test]
    except (OSError, ET.ParseError):
        return "not measured"
    if not cases:
        return "not measured"
    kinds = {child.tag for c in cases for child in c}
    if kinds & {"failure", "error"}:
        return "fail"
    return "skipped (no CUDA)" if "skipped" in kinds else "pass"

errors = get("gpu_gptq_7b", "layer_errors")
targets = {
    "7b_total_seconds": target(get("gpu_gptq_7b", "total_seconds"), 45,
                               "7B end to end, disk to artifact, s"),
    "7b_peak_gpu_gib": target(get("gpu_gptq_7b", "peak_gpu_gib"), 10, "7B peak GPU GiB"),
    "13b_peak_gpu_gib": target(get("gpu_gptq_13b", "peak_gpu_gib"), 24,
                               "13B peak GPU GiB with --max-gpu-memory 24GiB"),
    "7b_gptq_after_load_gib": target(get("gpu_mem_7b_gptq", "results", "allocated_after_load_gib"),
                                     5.04, "our 4-bit 7B after load, GiB (NF4 anchor 5.04)"),
    "layer_errors_match_cpu": {
        "what": "per-layer output errors unchanged from the CPU path",
        "status": junit("test_cuda_solve_matches_the_cpu_path_at_7b_width"),
        "test": "tests/test_solve_triton.py::test_cuda_solve_matches_the_cpu_path_at_7b_width"},
}
summary = {"dry_run": dry, "seconds": sum(s["seconds"] for s in steps), "steps": steps,
           "targets": targets, "mean_layer_error_7b": (sum(errors) / len(errors)) if errors else None,
           "results": results}
tmp = out / "summary.json.tmp"
tmp.write_text(json.dumps(summary, indent=2) + "\n")
os.replace(tmp, out / "summary.json")
EOF
}

# step NAME CAP_SECONDS COMMAND...: run with the smaller of CAP and what the budget leaves.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - RESERVE - $(elapsed) ))
    if [ "$left" -lt 5 ]; then
        note "$name" skipped null 0 "budget of ${BUDGET}s spent"
        summary
        return 1
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (up to ${cap}s, $(elapsed)s elapsed)" >&2
    local t0 rc status
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=pass ;;
        124|137) status=timeout ;;
        *) status=fail ;;
    esac
    note "$name" "$status" "$rc" $(( $(date +%s) - t0 )) "cap ${cap}s"
    summary
    [ "$status" = pass ] || tail -n 5 "$OUT/$name.log" >&2
    [ "$status" = pass ]
}

skip() {  # skip NAME REASON
    note "$1" skipped null 0 "$2"
    summary
}

has_bnb() { "$PY" -c "import bitsandbytes" > /dev/null 2>&1; }

# --------------------------------------------------------------------------- steps

step env 40 "$PY" - "$OUT/env.json" "$WORK" <<'EOF'
import importlib, json, platform, shutil, subprocess, sys
out, work = sys.argv[1], sys.argv[2]
env = {"python": sys.version.split()[0], "host": platform.node()}
for name in ("torch", "triton", "transformers", "accelerate", "safetensors", "bitsandbytes"):
    try:
        env[name] = importlib.import_module(name).__version__
    except Exception as exc:  # noqa: BLE001
        env[name] = f"absent ({type(exc).__name__})"
import torch
env["cuda"] = torch.cuda.is_available()
if env["cuda"]:
    env["gpu"] = torch.cuda.get_device_name()
    env["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    from quantkit.gptq import solve_triton
    env["triton_kernel_usable"] = solve_triton.available()
env["work_free_gib"] = round(shutil.disk_usage(work).free / 2**30, 1)
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
json.dump(env, open(out, "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

if has_bnb; then
    skip bnb_wheel "bitsandbytes already importable"
elif ls .whl/bitsandbytes-*.whl > /dev/null 2>&1; then
    step bnb_wheel 60 "$PY" -m pip install --no-index --no-deps .whl/bitsandbytes-*.whl
else
    skip bnb_wheel "no .whl/bitsandbytes-*.whl carried: int8/NF4 steps will be skipped"
fi

CK7=$WORK/ck7-$SHAPE7
CK13=$WORK/ck13-$SHAPE13
ART7=$WORK/gptq-$SHAPE7

if step build_7b 100 "$PY" bench/gptq_speed.py --shape "$SHAPE7" --device "$DEVICE" \
        --checkpoint "$CK7" --build-only --out "$OUT/build_7b.json"; then
    rm -rf "$ART7"
    step gptq_7b 160 "$PY" bench/gptq_speed.py --shape "$SHAPE7" --device "$DEVICE" \
        "${SMALL[@]}" --checkpoint "$CK7" --artifact "$ART7" --out "$OUT/gpu_gptq_7b.json"
    if [ -d "$ART7" ]; then
        step mem_7b_gptq 60 "${QK[@]}" mem "$ART7" --device "$DEVICE" \
            --out "$OUT/gpu_mem_7b_gptq.json"
    else
        skip mem_7b_gptq "no 7B artifact"
    fi
    rm -rf "$ART7"  # disk: the 13B checkpoint and its artifact come next
    step mem_7b_bf16 60 "${QK[@]}" mem "$CK7" --device "$DEVICE" \
        --out "$OUT/gpu_mem_7b_bf16.json"
else
    for s in gptq_7b mem_7b_gptq mem_7b_bf16; do skip "$s" "no 7B checkpoint"; done
fi

step pytest_gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml" tests

# --max-gpu-memory: issue 15 extends what it keeps on the host; on its own branch this
# flag already keeps the calibration activations there when they do not fit.
if step build_13b 100 "$PY" bench/gptq_speed.py --shape "$SHAPE13" --device "$DEVICE" \
        --checkpoint "$CK13" --build-only --out "$OUT/build_13b.json"; then
    step gptq_13b 200 "$PY" bench/gptq_speed.py --shape "$SHAPE13" --device "$DEVICE" \
        "${SMALL[@]}" --checkpoint "$CK13" --max-gpu-memory 24GiB \
        --out "$OUT/gpu_gptq_13b.json"
else
    skip gptq_13b "no 13B checkpoint"
fi
rm -rf "$CK13"

if has_bnb; then
    for mode in nf4 int8; do
        rm -rf "$WORK/bnb-$mode"
        if step "bnb_7b_$mode" 90 "${QK[@]}" bnb "$CK7" --out "$WORK/bnb-$mode" "--$mode" \
                --device "$DEVICE"; then
            step "mem_7b_$mode" 60 "${QK[@]}" mem "$WORK/bnb-$mode" --device "$DEVICE" \
                --out "$OUT/gpu_mem_7b_$mode.json"
        else
            skip "mem_7b_$mode" "quantkit bnb --$mode did not finish"
        fi
        rm -rf "$WORK/bnb-$mode"
    done
else
    for s in bnb_7b_nf4 mem_7b_nf4 bnb_7b_int8 mem_7b_int8; do
        skip "$s" "bitsandbytes is not installed (carry .whl/bitsandbytes-*.whl; see header)"
    done
fi

summary
echo "== done in $(elapsed)s; $OUT/summary.json" >&2
"$PY" - "$OUT/summary.json" <<'EOF'
import json, sys
for name, t in json.load(open(sys.argv[1]))["targets"].items():
    print(f"{name:24} {t['status']:16} measured {t.get('measured')} limit {t.get('limit')}")
EOF
