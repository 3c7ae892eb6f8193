#!/usr/bin/env bash
# Install if needed, then run the whole pipeline on the bundled model and the shipped demo task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/actsel run --task demo --output runs/demo "$@"
