#!/usr/bin/env bash
# The GPU check: every performance figure the docs quote, and the GPU tests, in about 8 minutes on
# one GPU machine. Each part runs under its own time budget (a slow part cannot eat the rest) and
# writes into one results folder as it goes (a part cut short keeps what it measured).
#
#   bench/gpu_check.sh [RESULTS_DIR]          # on the GPU machine (default: bench/results/gpu-check-<date>)
#   bench/gpu_check.sh --smoke /tmp/check     # CPU-sized settings: checks the script, not figures (or SMOKE=1);
#                                             # CI runs it (tests/test_bench.py), 4 min on 2 busy cores
#
# Parts and budgets (seconds; BUDGET_SCALE=2 doubles them all):
#   ddp-gpt     200  GPT-2-small shape, bf16, batch 8: hand-written, launcher, Accelerate, Fabric,
#                    3 rounds in each process; then compiled (hand-written, launcher), 3 rounds
#   ddp-resnet   70  ResNet-18, batch 256, the same four, 3 rounds in each process
#   fsdp         80  FSDP2 at every GPU of the machine: the same four, 3 rounds in each process
#   hf-gpt2      60  transformers GPT-2 (124M), bf16, batch 8 x 1024: hand-written, launcher, Trainer
#   gpu-tests    70  tests/test_gpu.py, each test's result logged as it ends
#   profile      90  only with PROFILE=1: traces of the same 5 GPT steps, hand-written and launcher,
#                    and bench/trace_diff.py's comparison (kernel counts per step, peak memory)
# Estimated GPU time from the H200 figures of 2026-12-04 (10 to 20 s of start-up per process,
# ~28 ms per GPT step, 15 timed chunks of 10 steps a process): ddp-gpt 6 processes x ~25 s +
# compile ~60 s, ddp-resnet 4 x ~17 s, fsdp 4 x ~18 s, hf-gpt2 3 x ~18 s, tests ~60 s: about 7 min.
#
# What the machine needs: torch, and transformers, accelerate and lightning for their rows (a row
# whose package is missing is skipped, saying so). The launcher itself needs pydantic and PyYAML:
# where pip cannot reach an index, bring wheels and point WHEELS at them, e.g. on a machine with
# pip access:  pip download --no-deps --only-binary=:all: -d .whl pydantic pydantic-core
# typing-extensions typing-inspection annotated-types  (matching the GPU machine's Python), then
# WHEELS=.whl bench/gpu_check.sh. They are installed into /tmp/gpu-check-site, not the system.
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = --smoke ]; then
    SMOKE=1
    shift
fi
case "${1:-}" in -*) echo "usage: bench/gpu_check.sh [--smoke] [RESULTS_DIR]" >&2; exit 2 ;; esac
out=${1:-bench/results/gpu-check-$(date +%Y-%m-%d-%H%M)}
py=${PYTHON:-python3}  # the interpreter with torch (PYTHON=.venv/bin/python, say)
mkdir -p "$out"
scale=${BUDGET_SCALE:-1}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site "$WHEELS"/*.whl \
        || { echo "could not install the wheels in $WHEELS" >&2; exit 2; }
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${SMOKE:-0}" = 1 ]; then  # checks that every part runs and reports, in CI: the smallest models
    device=cpu                    # and fewest steps, 2 rounds (the JSON as the GPU run writes it)
    bench=(--device cpu --smoke --rounds-in-process 2)
    fsdp=(--device cpu --smoke --steps 5 --warmup 5 --rounds-in-process 2)
else
    device=cuda
    bench=(--device cuda --warmup 5 --chunk 10 --chunks 5 --rounds-in-process 3)
    fsdp=(--device cuda --steps 20 --warmup 10 --rounds-in-process 3)
fi

{
    date -u +"started %Y-%m-%dT%H:%M:%SZ"
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} > "$out/machine.txt" 2>&1

# part NAME BUDGET_S COMMAND...: the command's output in NAME.log, its exit and seconds in summary.txt
part() {
    local name=$1 budget=$(( $2 * scale )) start=$SECONDS code
    shift 2
    echo "== $name (budget ${budget} s): $*"
    timeout --kill-after=10 "$budget" "$@" > "$out/$name.log" 2>&1
    code=$?
    local how="exit $code"
    [ $code -eq 124 ] || [ $code -eq 137 ] && how="cut short at its budget (exit $code)"
    echo "$name: $how after $(( SECONDS - start )) s" | tee -a "$out/summary.txt"
}

part ddp-gpt 200 bash -c "$py bench/bench.py ${bench[*]} --workloads gpt --impls raw,launcher,accelerate,fabric \
    --ckpt off --json $out/ddp-gpt.json && $py bench/bench.py ${bench[*]} --workloads gpt --impls none \
    --ckpt off --compile --json $out/compiled-gpt.json"
part ddp-resnet 70 "$py" bench/bench.py "${bench[@]}" --workloads resnet18 \
    --impls raw,launcher,accelerate,fabric --ckpt off --json "$out/ddp-resnet.json"
part fsdp 80 "$py" bench/fsdp.py "${fsdp[@]}" --json "$out/fsdp.json"
part hf-gpt2 60 "$py" bench/bench.py "${bench[@]}" --workloads hfgpt2 --impls raw,launcher,trainer \
    --ckpt off --json "$out/hf-gpt2.json"
part gpu-tests 70 "$py" -m pytest -v -p no:cacheprovider -n 0 tests/test_gpu.py
if [ "${PROFILE:-0}" = 1 ]; then  # the 1 ms per step (issue #24): traces of the same 5 steps, and their difference
    part profile 90 bash -c "$py bench/bench.py ${bench[*]} --workloads gpt --impls raw,launcher --ckpt off \
        --profile $out/prof --json $out/profile.json && $py bench/trace_diff.py \
        $out/prof/gpt-nockpt-raw.trace.json $out/prof/gpt-nockpt-launcher.trace.json"
fi

echo "device: $device; results in $out" | tee -a "$out/summary.txt"
