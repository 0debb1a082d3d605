#!/usr/bin/env bash
# One command that checks the project on a GPU machine in under 5 minutes:
#   1. prepares char-level tinyshakespeare and trains the 6x6x384 target and the 2x128 draft
#      on CUDA (bf16 autocast is automatic there, torch.compile on) for a few hundred steps,
#   2. samples from the target,
#   3. times decoding on the GPU against transformers' generate() on the same weights and the
#      same GPU, both with float32 weights under the same autocast (bench/sample_speed.py
#      --device cuda, its transformers side run by $PYTHON itself, or $HF_PYTHON when set),
#   4. times speculative decoding and prompt lookup on the GPU (bench/speculative_speed.py).
#
#   bench/gpu_check.sh [--cpu] [--steps N]      (PYTHON=... to pick the interpreter; default .venv/bin/python)
#
# PYTHON needs torch, numpy, regex, tiktoken, tqdm and safetensors (checked first); the
# comparison with transformers runs when HF_PYTHON (default: PYTHON on CUDA, .venv-hf/bin/python
# with --cpu, made by make venv-hf) imports transformers, and is skipped with a note otherwise.
# --cpu runs the same steps on the CPU with a small model, few steps and no compile, and the
# comparison with the tiny model of sample_speed.py --tiny: a check that the script itself
# works, on any machine. Work files go to a temporary folder.
#
# Meant to take under 5 minutes on one GPU; not yet run on one (bench/README.md).
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

# The modules train.py, sample.py, data/prepare.py and the benches import when they start.
"$PYTHON" -c "import numpy, regex, safetensors, tiktoken, torch, tqdm" ||
    { echo "error: $PYTHON lacks a module the project needs (above); use a Python with its dependencies" >&2; exit 2; }
if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'bf16:', torch.cuda.is_bf16_supported())"
    HF_SIDE=${HF_PYTHON:-$PYTHON}
else
    HF_SIDE=${HF_PYTHON:-.venv-hf/bin/python}
fi
if ! "$HF_SIDE" -c "import torch, transformers; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()" 2>/dev/null; then
    echo "note: $HF_SIDE cannot import torch and transformers, or sees no $DEVICE device: the decode step skips the comparison with transformers"
    HF_SIDE=none
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
    "$PYTHON" bench/sample_speed.py --device cuda --repeats 3 --hf-python "$HF_SIDE" --out "$WORK/sample_speed.json"
else
    "$PYTHON" bench/sample_speed.py --tiny --repeats 1 --hf-vocabs 65 --hf-python "$HF_SIDE" \
        --out "$WORK/sample_speed.json"
fi
step "speculative decoding"
"$PYTHON" bench/speculative_speed.py --target "$WORK/large/best.pt" --draft "$WORK/draft/best.pt" --device "$DEVICE" \
    --tokens 200 --repeats 3 --out "$WORK/speculative_speed.json"
step "done"
