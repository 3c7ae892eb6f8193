"""Shared fixtures: the bundled SmolLM2 (loaded once per session), tiny models, the data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network; anything that would load from a hub fails fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    candidates = [os.environ.get("ACTSEL_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = _data_dir()
    if folder is None:
        pytest.skip("No data folder: set ACTSEL_DATA_DIR or place shared/data beside the checkout.")
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct as a float32 HookedTransformer on the CPU."""
    from actsel.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama():
    from actsel.models import load_model

    return load_model("tiny-llama", device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from actsel.models import load_model

    return load_model("tiny-gpt2", device="cpu", seed=0)
