#!/usr/bin/env bash
# One check that minigrpo works on this machine's GPU: every CUDA path a first real run takes, in
# under 8 minutes on one GPU, with no network, no vLLM needed and no downloaded weights (every model
# is built from a config with random weights).
#
#   benchmarks/gpu_check.sh [--cpu] [--out DIR]
#
#   --cpu     every stage on CPU with tiny shapes: checks the script and the stages, not the GPU
#   --out     result folder (default benchmarks/results/gpu_check-<date>, or gpu_check_cpu-<date>)
#   PYTHON    the interpreter (default: .venv/bin/python if present, else python3)
#
# Stages, each under its own time limit (`timeout`), each writing STAGE.txt (its output) and, where
# it has numbers, STAGE.json in the result folder:
#   env      machine, GPU, driver, library versions, commit
#   tests    pytest -m cuda: the GPU tests (kernels vs float64, NCCL + bf16 FSDP2 vs the fp32 CPU
#            run, load_sharded and the bf16 push on NCCL, torch engine prefill without the math
#            SDPA kernel); --cpu: the CPU checks of the same paths (tests/test_gpu_paths.py)
#   kernels  fused log-probs at the Qwen2.5-7B head (N 16384, H 3584, V 152064, bf16) against the
#            naive path and the 8NHV floor at the measured matmul rate, per phase, and their error
#            against float64 (benchmarks/kernel_floor.py; where absent, benchmarks/logprobs.py)
#   update   FSDP2 update step, bf16 mixed precision, Qwen2.5-1.5B shape, 4 x 4096 tokens:
#            tokens/s, MFU, peak memory, against HF full logits + CE
#   grpo     digits GRPO on the tiny model: the reward rises; then KL, 2 updates per batch,
#            activation checkpointing, saved and resumed
#   rollout  torch engine against HF generate on the Qwen2.5-1.5B shape (bf16)
#   vllm     only where vllm imports: FSDP2 step -> sleep (level 2) -> bf16 push -> wake of a
#            colocated vLLM engine, sampler against trainer log-probs, twice
# Then a summary table (also summary.md); the exit status is 1 if any stage failed.
set -u
cd "$(dirname "$0")/.."

CPU=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --out) OUT="$2"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DATE=$(date -u +%F)
if [ -z "$OUT" ]; then
    if [ $CPU = 1 ]; then OUT="benchmarks/results/gpu_check_cpu-$DATE"; else OUT="benchmarks/results/gpu_check-$DATE"
    fi
fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # models and runs: never in the result folder
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ $CPU = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: run with --cpu to check the stages on CPU" >&2
    exit 2
fi

ROWS=()
FAILED=0
# stage NAME LIMIT_S CPU_LIMIT_S COMMAND...: run COMMAND under `timeout`, output to $OUT/NAME.txt
stage() {
    local name=$1 limit=$2
    [ $CPU = 1 ] && limit=$3
    shift 3
    local log="$OUT/$name.txt" start status rc
    start=$(date +%s)
    printf '== %s (limit %ss)\n$ %s\n' "$name" "$limit" "$*" | tee "$log"
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    case $rc in
        0) status=pass ;;
        124|137) status="TIMEOUT (${limit}s)"; FAILED=1 ;;
        *) status="FAIL (exit $rc)"; FAILED=1 ;;
    esac
    tail -n +3 "$log" | tail -n 12
    ROWS+=("| $name | $status | $(( $(date +%s) - start )) | $limit | $name.txt |")
    echo "== $name: $status"
}

stage env 20 60 "$PYTHON" benchmarks/gpu_check/env.py "$OUT/env.json"

PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rs)
if [ $CPU = 1 ]; then
    stage tests 120 600 "${PYTEST[@]}" tests/test_gpu_paths.py \
        tests/test_parallel.py::test_load_sharded_equals_plain_load_on_two_ranks
else
    stage tests 120 120 "${PYTEST[@]}" -m cuda tests/
fi

if [ -f benchmarks/kernel_floor.py ]; then  # fwd / d_logits / d_weight / d_hidden vs the floor, error vs float64
    if [ $CPU = 1 ]; then PRESET=cpu; else PRESET=7b; fi
    stage kernels 60 300 "$PYTHON" benchmarks/kernel_floor.py --preset $PRESET --out "$OUT/kernels.json"
elif [ $CPU = 1 ]; then
    stage kernels 60 300 "$PYTHON" benchmarks/logprobs.py --shape 1024,256,8192 --dtype fp32 --impls fused,naive \
        --entropy off --reps 2
else
    stage kernels 60 60 "$PYTHON" benchmarks/logprobs.py --shape 16384,3584,152064 --dtype bf16 --impls fused,naive \
        --entropy off --reps 3
fi

if [ $CPU = 1 ]; then
    stage update 80 300 "$PYTHON" benchmarks/update_throughput.py --preset tiny --seq-len 64 --batch 2 --steps 2 \
        --out "$OUT/update.json"
else
    stage update 80 80 "$PYTHON" benchmarks/update_throughput.py --preset qwen2.5-1.5b --seq-len 4096 --batch 4 \
        --steps 3 --out "$OUT/update.json"
fi

stage grpo 90 900 "$PYTHON" benchmarks/gpu_check/grpo.py "$WORK/grpo" "$OUT/grpo.json"

if [ $CPU = 1 ]; then
    stage rollout 60 300 "$PYTHON" benchmarks/rollout_throughput.py --preset tiny --engines hf,torch --dtypes float32 \
        --prompts 4 --n 2 --max-new 16 --repeats 1 --out "$OUT/rollout.json"
else
    stage rollout 60 60 "$PYTHON" benchmarks/rollout_throughput.py --preset qwen2.5-1.5b --engines hf,torch \
        --dtypes bfloat16 --prompts 16 --n 8 --prompt-len 128 --max-new 128 --repeats 2 --out "$OUT/rollout.json"
fi

if "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
    stage vllm 50 600 env VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PYTHON" benchmarks/gpu_check/vllm_sync.py "$WORK/vllm" \
        "$OUT/vllm.json"
else
    ROWS+=("| vllm | skipped (vllm not installed) | 0 | - | - |")
fi

{
    echo "# gpu_check $([ $CPU = 1 ] && echo '--cpu ')$DATE"
    echo
    echo "command: benchmarks/gpu_check.sh $([ $CPU = 1 ] && echo '--cpu ')--out $OUT"
    echo
    echo "| stage | status | seconds | limit s | output |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} > "$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $FAILED
