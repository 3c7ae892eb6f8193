"""Convert Hugging Face causal language models to HookedTransformers, with a disk cache.

Two routes lead here. A local HF model folder is converted on every load (its
weights are already fast to read). A GGUF file is dequantized by transformers,
which takes close to a minute for SmolLM2-135M on two CPU cores, so the
converted HookedTransformer weights and config are cached as safetensors and
JSON in a folder keyed by the file's SHA-256. A later load of the same file
reads that folder and skips transformers entirely.

Weights are loaded without TransformerLens' processing (no layer-norm folding,
no centring of the weights that write to the residual stream). The processed
weights give the same logits but different residual-stream values, and the
residual-stream values themselves are what actsel measures, so they must match
the hidden states of the original model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading

logger = logging.getLogger(__name__)

# Bump when the layout of a cache folder changes, so old folders are rebuilt.
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """Return the folder for converted weights: ``$ACTSEL_CACHE_DIR`` or the user cache."""
    env = os.environ.get("ACTSEL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("actsel")) / "models"


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def new_hooked_transformer(cfg, tokenizer) -> HookedTransformer:
    # HookedTransformer is deprecated in TransformerLens 3.x in favour of
    # TransformerBridge, but it stays the documented class until 4.0, and
    # SAE-Lens requires < 4.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        return HookedTransformer(cfg, tokenizer, move_to_device=False)


def hf_to_hooked(hf_model, tokenizer, *, config_source: str, device: str, dtype: torch.dtype) -> HookedTransformer:
    """Convert a loaded HF causal LM to a HookedTransformer with unprocessed weights.

    ``config_source`` is a folder holding the model's ``config.json``; TransformerLens
    reads the architecture from it.
    """
    cfg = tl_loading.get_pretrained_model_config(
        config_source,
        hf_cfg=hf_model.config.to_dict(),
        device=device,
        dtype=dtype,
        fold_ln=False,
    )
    state_dict = tl_loading.get_pretrained_state_dict(config_source, cfg, hf_model, dtype=dtype)
    model = new_hooked_transformer(cfg, tokenizer)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.move_model_modules_to_device()
    return model


def _save_hf_config(hf_model, folder: Path, architecture: str) -> None:
    """Write a plain ``config.json`` for a model that was read from a GGUF file.

    The GGUF route leaves a quantization entry and no ``architectures`` field in
    the config; TransformerLens needs the architecture and the weights are
    already dequantized.
    """
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [architecture]
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str))


def _gguf_architecture(hf_model) -> str:
    model_type = hf_model.config.model_type
    architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
    if model_type not in architectures:
        raise ValueError(
            f"GGUF model type {model_type!r} is not supported; supported types: {sorted(architectures)}."
        )
    return architectures[model_type]


def _write_cache(model: HookedTransformer, tokenizer, folder: Path, source: str) -> None:
    """Write the converted model to ``folder`` atomically (temporary folder, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        cfg = model.cfg.to_dict()
        cfg["dtype"] = str(cfg["dtype"]).removeprefix("torch.")
        cfg["device"] = None
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format_version": CACHE_FORMAT_VERSION, "source": source, "config": cfg}
        (tmp / "actsel.json").write_text(json.dumps(meta, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_cache(folder: Path, *, device: str, dtype: torch.dtype) -> HookedTransformer | None:
    meta_path = folder / "actsel.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        logger.info("Ignoring converted-model cache %s with an old format", folder)
        return None
    from transformers import AutoTokenizer

    cfg_dict = dict(meta["config"])
    cfg_dict["dtype"] = dtype
    cfg_dict["device"] = device
    cfg_dict["init_weights"] = False
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = new_hooked_transformer(cfg, tokenizer)
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, strict=True)
    model.move_model_modules_to_device()
    return model


def load_gguf(path: Path, *, device: str, dtype: torch.dtype, cache_dir: Path | None = None) -> HookedTransformer:
    """Load a GGUF file as a HookedTransformer, converting it on the first call only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}. Pass the path of an existing .gguf file.")
    cache_root = cache_dir or default_cache_dir()
    folder = cache_root / f"gguf-{file_sha256(path)[:20]}"
    model = _read_cache(folder, device=device, dtype=dtype)
    if model is not None:
        logger.info("Loaded converted weights of %s from %s", path.name, folder)
        return model

    logger.info("Converting %s to a HookedTransformer (first load only; cached in %s)", path.name, folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="actsel-gguf-config-") as config_dir:
        _save_hf_config(hf_model, Path(config_dir), _gguf_architecture(hf_model))
        model = hf_to_hooked(hf_model, tokenizer, config_source=config_dir, device="cpu", dtype=torch.float32)
    del hf_model
    model.cfg.model_name = path.stem
    _write_cache(model, tokenizer, folder, source=str(path))
    model = _read_cache(folder, device=device, dtype=dtype)
    if model is None:
        raise RuntimeError(f"Converted-model cache {folder} could not be read back after writing it.")
    return model
