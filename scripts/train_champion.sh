#!/usr/bin/env bash
# The default champion, end to end, the way nanochat's speedrun.sh reads: corpus -> tokenizer -> index ->
# chat data -> pretrain -> SFT -> registry -> eval -> champion. Every training step is resumable: stop it
# at any time (Ctrl-C or kill) and run the script again; finished stages are skipped or resumed.
#   PRETRAIN_STEPS=550 SFT_STEPS=900 bash scripts/train_champion.sh
#   SFT2_STEPS=569 ...   a second, continued SFT run from the first one's weights (lr 5e-4, warmup 30): v3's
#                        recipe (same seed, so it replays the first run's first chats; a new --set seed=N sees
#                        others); the registry then takes that run instead of the first
# On a 2-core CPU a small-preset step (batch 16 x 512) takes seconds, so 550 + 900 steps take hours
# (OMP_NUM_THREADS=1 leaves a core free at little cost): run it in pieces if you need to
# (timeout 90m bash scripts/train_champion.sh). The defaults are the `default`
# profile of `builder release` (builder/release.py), which runs the same stages.
set -euo pipefail
cd "$(dirname "$0")/.."
PRETRAIN_STEPS="${PRETRAIN_STEPS:-550}"
SFT_STEPS="${SFT_STEPS:-900}"
SFT2_STEPS="${SFT2_STEPS:-0}"
BASE=runs/base-small
SFT=runs/sft-small

[ -f datasets/built/default/manifest.json ] || builder data build
[ -f runs/tokenizer/tokenizer.model ] || builder tokenizer train
[ -f datasets/built/index ] || builder index build
[ -f datasets/built/sft/train.jsonl ] || builder sft-data

resume() { [ -f "$1/train_state.pt" ] && echo --resume || true; }
builder pretrain --preset small --out "$BASE" $(resume "$BASE") --no-samples \
  --set max_steps="$PRETRAIN_STEPS" --set checkpoint_every=50 --set eval_every=250
builder sft --preset small --base "$BASE/model.pth" --out "$SFT" $(resume "$SFT") \
  --set max_steps="$SFT_STEPS" --set lr=1e-3 --set checkpoint_every=50 --set eval_every=250

FINAL="$SFT"
NOTES="small: pretrain $PRETRAIN_STEPS steps, full SFT $SFT_STEPS steps (scripts/train_champion.sh)"
if [ "$SFT2_STEPS" -gt 0 ]; then
  FINAL=runs/sft-small-2
  builder sft --preset small --base "$SFT/model.pth" --out "$FINAL" $(resume "$FINAL") \
    --set max_steps="$SFT2_STEPS" --set lr=5e-4 --set warmup_steps=30 --set checkpoint_every=50 --set eval_every=250
  NOTES="$NOTES, then $SFT2_STEPS more SFT steps at lr 5e-4"
fi
builder models add "$FINAL/model.pth" --tokenizer runs/tokenizer --notes "$NOTES"
builder eval --model latest
builder models champion --auto
