#!/usr/bin/env bash
# The champion on one CUDA GPU in minutes: the training stages of scripts/train_champion.sh with 4x larger
# batches, each stage fitted to a wall-clock budget (`--time-budget`: max_steps is lowered to what fits after
# the first timed steps, before the cosine schedule depends on it). Run the data stages first (they need no
# GPU): builder data build; builder tokenizer train; builder index build; builder sft-data.
#   PRETRAIN_SECONDS=200 SFT_SECONDS=200 bash scripts/train_champion_gpu.sh
#   ONLY=pretrain | ONLY=sft     one stage; a stage with a train_state.pt in its folder resumes
# Then, on any machine: builder models add runs/sft-small-gpu/model.pth --tokenizer runs/tokenizer;
# builder eval --model latest; builder models champion --auto.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILDER="${BUILDER:-builder}"
PRESET="${PRESET:-small}"
PRETRAIN_SECONDS="${PRETRAIN_SECONDS:-200}"
SFT_SECONDS="${SFT_SECONDS:-200}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-5000}"  # an upper bound: the time budget usually ends the run first
SFT_STEPS="${SFT_STEPS:-2400}"            # ~4 epochs of builder sft-data's ~38k chats at 64 per step
BATCH="${BATCH:-64}"
BASE="${BASE:-runs/base-$PRESET-gpu}"
SFT="${SFT:-runs/sft-$PRESET-gpu}"
ONLY="${ONLY:-all}"

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: use scripts/train_champion.sh')"
resume() { [ -f "$1/train_state.pt" ] && echo --resume || true; }
if [ "$ONLY" = all ] || [ "$ONLY" = pretrain ]; then
  $BUILDER pretrain --preset "$PRESET" --out "$BASE" $(resume "$BASE") --no-samples --time-budget "$PRETRAIN_SECONDS" \
    --set batch_size="$BATCH" --set max_steps="$PRETRAIN_STEPS" --set eval_every=500 --set checkpoint_every=500
fi
if [ "$ONLY" = all ] || [ "$ONLY" = sft ]; then
  $BUILDER sft --preset "$PRESET" --base "$BASE/model.pth" --out "$SFT" $(resume "$SFT") --time-budget "$SFT_SECONDS" \
    --set batch_size="$BATCH" --set max_steps="$SFT_STEPS" --set lr=1e-3 --set eval_every=400 --set checkpoint_every=400
fi
