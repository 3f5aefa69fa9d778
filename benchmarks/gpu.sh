#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA-marked tests, then the engine and transformer benchmarks
# on the GPU, each step's output in a results folder ($OUT if set, else benchmarks/results-gpu/).
# Under 9 minutes on an H200. Run from anywhere:
#
#     bash benchmarks/gpu.sh                       # the real run (refuses without CUDA: exit 2)
#     DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh    # a tiny run of the same steps, to check them
#
# Settings (environment): DEVICE (cuda, cuda:N or cpu; default cuda), QUICK=1 (small workloads),
# PYTHON (default python), OUT (results folder), and each step's time limit in seconds:
# TESTS_LIMIT (60), ENGINE_LIMIT (90), TRANSFORMERS_LIMIT (150), SCALE_LIMIT (90, each of two
# steps), FSDP_LIMIT (60: bench_fsdp.py, Qwen2-0.5B's shape sharded by FSDP2 over 1 rank, and
# 2 where there are 2 GPUs): 9 minutes in all; 900 each with QUICK=1, which is meant for a slow CPU. The scale step (bench_scale.py:
# a Llama-3.2-1B-shaped model, 8 x 1024 tokens, and an 8B-shaped one with LoRA rank 16, per
# Hessian backend against a training step) needs transformers, and peft for the 8B. A failed or timed-out step is recorded and the
# next one runs; the exit code is 1 if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python}
RESULTS=${OUT:-benchmarks/results-gpu}

if [[ $DEVICE == cuda* ]] &&
    ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu.sh: no CUDA device here (torch.cuda.is_available() is false); DEVICE=cpu QUICK=1 runs a smoke test on the CPU" >&2
    exit 2
fi
mkdir -p "$RESULTS" || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ $QUICK == 1 ]]; then
    engine=(--workload mlp --repeats 1 --products-only)
    transformers=(--workload minilm-block --batch 2 --length 16)
    scale=(--workload gpt2 --batch 1 --length 8 --products 3)
    fsdp=(--batch 2 --length 8 --products 2)
    : "${TESTS_LIMIT:=900}" "${ENGINE_LIMIT:=900}" "${TRANSFORMERS_LIMIT:=900}" "${SCALE_LIMIT:=900}"
    : "${FSDP_LIMIT:=900}"
else
    engine=(--repeats 3)
    transformers=(--workload all)
    scale=(--workload llama-1b --length 1024 --products 100)
    scale_lora=(--workload llama-8b-lora --length 1024 --products 100)
    fsdp=(--workload qwen2-0.5b --batch 8 --length 512 --products 10)
    : "${TESTS_LIMIT:=60}" "${ENGINE_LIMIT:=90}" "${TRANSFORMERS_LIMIT:=150}" "${SCALE_LIMIT:=90}"
    : "${FSDP_LIMIT:=60}"
fi

failed=0
step() {  # step NAME LIMIT COMMAND...: run COMMAND with a time limit, its output in NAME.log
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "gpu.sh: $name ..."
    timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    status=$?
    if ((status == 0)); then
        echo "gpu.sh: $name passed in $((SECONDS - start)) s"
    else
        ((status == 124)) && status="timed out after $limit s"
        echo "gpu.sh: $name FAILED ($status; see $RESULTS/$name.log)"
        failed=1
    fi
}

{
    date -u
    git rev-parse HEAD 2>/dev/null
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    command -v nvidia-smi >/dev/null && nvidia-smi
} >"$RESULTS/machine.txt" 2>&1

step tests "$TESTS_LIMIT" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider
step engine "$ENGINE_LIMIT" "$PYTHON" benchmarks/bench_engine.py --device "$DEVICE" \
    "${engine[@]}" --out "$RESULTS/engine.md"
step transformers "$TRANSFORMERS_LIMIT" "$PYTHON" benchmarks/bench_transformers.py \
    --device "$DEVICE" "${transformers[@]}" --out "$RESULTS/transformers.md"

step scale "$SCALE_LIMIT" "$PYTHON" benchmarks/bench_scale.py --device "$DEVICE" \
    "${scale[@]}" --out "$RESULTS/scale.md"
if [[ $QUICK != 1 ]]; then
    step scale-lora "$SCALE_LIMIT" "$PYTHON" benchmarks/bench_scale.py --device "$DEVICE" \
        "${scale_lora[@]}" --out "$RESULTS/scale-lora.md"
fi

# FSDP2 over 1 rank, and 2 where there are 2 GPUs (NCCL takes one GPU per rank); on the CPU, 1 and 2
ranks=1
if [[ $DEVICE == cpu ]] || (("$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" >= 2)); then
    ranks=1,2
fi
step fsdp "$FSDP_LIMIT" "$PYTHON" benchmarks/bench_fsdp.py --device "${DEVICE%%:*}" --ranks "$ranks" \
    "${fsdp[@]}" --out "$RESULTS/fsdp.md"

echo "gpu.sh: results in $RESULTS/ (machine.txt, tests.log, engine.md, transformers.md, scale*.md, fsdp.md)"
exit "$failed"
