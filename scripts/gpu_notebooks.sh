#!/usr/bin/env bash
# Notebooks 01, 02 and 03 in quick mode on a CUDA machine, in bfloat16, beside the same runs on
# its CPU in float32, with the time of each printed side by side.
#
#   bash scripts/gpu_notebooks.sh [DECODERS] [ENCODER]
#
# DECODERS / ENCODER default to the suite's models (SmolLM2-135M and Gemma-3-270M, MiniLM). On a
# machine without them (their packages are 0.1-0.25 GB, too large for some transfer limits) it
# first saves a tiny random Qwen2 decoder (two of four layers in a sliding window) and a tiny
# BERT to build/gpu_models/ and runs the notebooks on those: the pipeline on CUDA, not the
# published numbers. Needs python3 with torch (CUDA), transformers, papermill, jupytext and
# ipykernel; figures and caches go to figures/quick/<model>/ and data/results/quick/<model>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script checks the notebooks on a GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
EOF

if [[ $# -ge 1 ]]; then
  DECODERS=$1 ENCODER=${2:-minilm-l6}
elif "$PY" -c "from topk_lib import load_model; load_model('smollm2-135m'); load_model('gemma3-270m')" 2>/dev/null; then
  DECODERS='["smollm2-135m", "gemma3-270m"]' ENCODER=minilm-l6
else
  echo "SmolLM2/Gemma-3 packages not installed here: using tiny random models (the pipeline, not the findings)"
  "$PY" scripts/tiny_models.py build/gpu_models
  DECODERS="[\"$PWD/build/gpu_models/tiny-qwen2\"]" ENCODER="$PWD/build/gpu_models/tiny-bert"
fi

run() {  # $1: device, $2: dtype; prints the runner's table
  "$PY" -m topk_lib.infra.runner --quick -p "DECODERS=$DECODERS" -p "ENCODER='$ENCODER'" \
    -p "DEVICE='$1'" -p "DTYPE='$2'" 01 02 03 2>&1 | tee "build/gpu_notebooks_$1.log" | grep -E "^(0[0-9]_|total|notebook)"
}
echo "== CUDA, bfloat16"; run cuda bfloat16
echo "== CPU, float32 (this machine's CPU)"; run cpu float32
