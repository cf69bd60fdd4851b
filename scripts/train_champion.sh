#!/usr/bin/env bash
# The committed champion's training, replayed from its recipe (models/recipes/champion.json): corpus,
# tokenizer, index, chat data, then each training piece, then registry, eval and champion. Finished pieces
# are skipped and an interrupted one resumes, so run it in chunks:
#   bash scripts/train_champion.sh --max-minutes 90     # exit status 3: time is up, run it again
#   bash scripts/train_champion.sh --recipe models/recipes/mine.json
# It is `builder release --retrain --only-training`; leave out --only-training for the whole release.
set -euo pipefail
cd "$(dirname "$0")/.."
exec builder release --retrain --only-training "$@"
