"""Tiny random HookedTransformers with a byte-level tokenizer, for tests and dry runs.

They need no download and build in well under a second, so unit tests can check
mechanisms (masks, hooks, statistics) on a model whose every weight is known to
be deterministic given the seed.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformerConfig

from actsel.models.convert import default_cache_dir, new_hooked_transformer

# Each entry maps a spec to the HookedTransformerConfig fields that differ
# between the tiny families; all share the byte-level vocabulary below.
TINY_CONFIGS: dict[str, dict] = {
    "tiny-llama": {
        "n_layers": 2,
        "d_model": 32,
        "d_head": 8,
        "n_heads": 4,
        "n_key_value_heads": 2,
        "d_mlp": 64,
        "act_fn": "silu",
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": 8,
        "gated_mlp": True,
        "final_rms": True,
    },
    "tiny-gpt2": {
        "n_layers": 2,
        "d_model": 32,
        "d_head": 8,
        "n_heads": 4,
        "d_mlp": 128,
        "act_fn": "gelu_new",
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    },
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def byte_level_tokenizer():
    """Build a byte-level BPE tokenizer: one token per UTF-8 byte, plus space + alphanumeric pairs.

    The pair merges give a word its own first token after a space (" positive"
    starts with "Ġp", " negative" with "Ġn"), as real tokenizers do, so label
    words of a task keep distinct first tokens. The end-of-text token doubles
    as BOS and EOS. The pad token is separate, so tests can tell padding from
    content.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    space = "\u0120"  # the byte-level alphabet's symbol for a space
    merges = [(space, char) for char in string.ascii_letters + string.digits]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    # TransformerLens reloads every tokenizer from its ``name_or_path`` (to add
    # BOS), so the tokenizer must live in a folder; a cached one is reused.
    folder = default_cache_dir() / "tiny-byte-tokenizer-v2"
    if not (folder / "tokenizer.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-byte-tokenizer-v2.tmp-", dir=folder.parent))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process wrote the folder first; its content is identical.
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_model(spec: str = "tiny-llama", *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Return a randomly initialised tiny HookedTransformer named by ``spec``."""
    if spec not in TINY_CONFIGS:
        raise ValueError(f"Unknown tiny model {spec!r}; valid: {sorted(TINY_CONFIGS)}.")
    tokenizer = byte_level_tokenizer()
    cfg = HookedTransformerConfig(
        **TINY_CONFIGS[spec],
        n_ctx=512,
        d_vocab=len(tokenizer),
        seed=seed,
        device=device,
        dtype=dtype,
        model_name=spec,
        default_prepend_bos=False,
    )
    model = new_hooked_transformer(cfg, tokenizer)
    model.move_model_modules_to_device()
    return model
