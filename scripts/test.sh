#!/usr/bin/env bash
# Install if needed, then run the default test suite offline (slow checks excluded; add -m slow for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
