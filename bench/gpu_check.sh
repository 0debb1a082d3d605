#!/usr/bin/env bash
# One command that checks the project on a GPU machine in under 5 minutes:
#   1. prepares char-level tinyshakespeare and trains the 6x6x384 target and the 2x128 draft
#      on CUDA (bf16 autocast is automatic there, torch.compile on) for a few hundred steps,
#   2. samples from the target,
#   3. times decoding on the GPU (bench/sample_speed.py --device cuda; its comparison with
#      transformers' generate() runs on the CPU side only, and is skipped here),
#   4. times speculative decoding and prompt lookup on the GPU (bench/speculative_speed.py).
#
#   bench/gpu_check.sh [--cpu] [--steps N]      (PYTHON=... to pick the interpreter; default .venv/bin/python)
#
# --cpu runs the same steps on the CPU with a small model, few steps and no compile: a check
# that the script itself works, on any machine. Work files go to a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=cuda
STEPS=300
SMALL=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) DEVICE=cpu; STEPS=8; SMALL=(n_layer=2 n_head=2 n_embd=32 block_size=64 compile=false eval_iters=2) ;;
        --steps) STEPS=$2; shift ;;
        *) echo "usage: bench/gpu_check.sh [--cpu] [--steps N]" >&2; exit 2 ;;
    esac
    shift
done
TEXT=${SHAKESPEARE:-../shared/data/tinyshakespeare.txt}
[ -f "$TEXT" ] || TEXT=data/tinyshakespeare.txt
[ -f "$TEXT" ] || { echo "error: no tinyshakespeare.txt (set SHAKESPEARE=path, or: make data/tinyshakespeare.txt)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - started )) s)"; }

if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_bf16_supported())"
fi
step "prepare"
"$PYTHON" data/prepare.py "$TEXT" --tokenizer char --out "$WORK/data" --no-progress
for run in large draft; do
    step "train $run: $STEPS steps on $DEVICE"
    "$PYTHON" train.py --config "configs/shakespeare_char_$run.toml" --no-progress device="$DEVICE" \
        data_dir="$WORK/data" out_dir="$WORK/$run" max_iters="$STEPS" max_seconds=100 warmup_iters=10 "${SMALL[@]}"
done
step "sample"
"$PYTHON" sample.py "$WORK/large/best.pt" --device "$DEVICE" --prompt "ROMEO:" --max-new-tokens 200 --seed 1
step "decode speed"
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" bench/sample_speed.py --device cuda --repeats 3 --hf-python none --out "$WORK/sample_speed.json"
else
    "$PYTHON" bench/sample_speed.py --tiny --repeats 1 --hf-python none --out "$WORK/sample_speed.json"
fi
step "speculative decoding"
"$PYTHON" bench/speculative_speed.py --target "$WORK/large/best.pt" --draft "$WORK/draft/best.pt" --device "$DEVICE" \
    --tokens 200 --repeats 3 --out "$WORK/speculative_speed.json"
step "done"
