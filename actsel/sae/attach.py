"""Attach Sparse Autoencoders to a model's hook points and collect their latents.

``attach_saes`` adds one forward hook per SAE. Each hook encodes the activation
at its hook point and stores the latents on an ``SaeCapture``. By default the
activation passes through untouched, so the model's output is bit-identical to
a run without SAEs. With ``splice=True`` the hook returns the SAE output
instead:

* ``error_term=True``: ``reconstruction + (activation - reconstruction).detach()``.
  The value equals the activation up to float rounding, so downstream outputs
  match the unspliced run within tolerance. Gradients reach the activation only
  through the SAE's encoder and decoder, which is SAE-Lens's
  ``use_error_term`` behaviour.
* ``error_term=False``: the bare reconstruction, so the model runs on what the
  SAE explains and its outputs change.

An SAE is an SAE-Lens ``SAE`` or any ``torch.nn.Module`` with ``encode`` and
``decode`` and an input width in ``d_in`` or ``cfg.d_in``. ``load_sae`` reads
one from disk or, online, from the SAE-Lens registry of pretrained releases.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)

SAE_HOOK_SUFFIX = ".sae"
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class _ProbeDone(Exception):
    """Raised inside a probe hook to stop the forward pass early."""


def sae_d_in(sae: torch.nn.Module) -> int:
    """Input width of ``sae`` from ``sae.cfg.d_in`` or ``sae.d_in``."""
    cfg = getattr(sae, "cfg", None)
    for owner in (cfg, sae):
        value = getattr(owner, "d_in", None) if owner is not None else None
        if isinstance(value, int):
            return value
    raise TypeError(
        f"{type(sae).__name__} has no integer d_in or cfg.d_in; an SAE needs its input width to be checked "
        "against the hook point."
    )


def sae_hook_name(sae: torch.nn.Module) -> str | None:
    """Hook point recorded in an SAE-Lens SAE's metadata, or None when it records none."""
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    if metadata is None:
        return None
    hook_name = metadata.get("hook_name") if hasattr(metadata, "get") else getattr(metadata, "hook_name", None)
    return hook_name if isinstance(hook_name, str) else None


def check_sae(sae: Any) -> torch.nn.Module:
    """Return ``sae`` after checking that it has ``encode``, ``decode`` and an input width."""
    missing = [name for name in ("encode", "decode") if not callable(getattr(sae, name, None))]
    if missing:
        raise TypeError(f"{type(sae).__name__} is not an SAE: it has no {' or '.join(missing)} method.")
    sae_d_in(sae)
    return sae


def layer_of_hook(hook_name: str) -> int:
    """Block index in a hook name such as ``blocks.15.hook_resid_post``; -1 for hooks outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else -1


def check_hook_name(model: HookedTransformer, hook_name: str) -> None:
    """Raise a ``ValueError`` listing close matches when ``model`` has no hook point ``hook_name``."""
    if hook_name in model.hook_dict:
        return
    close = difflib.get_close_matches(hook_name, list(model.hook_dict), n=5, cutoff=0.6)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"The model has no hook point {hook_name!r}.{hint} Hook names follow TransformerLens, "
        f"e.g. 'blocks.0.hook_resid_post'; layers run 0..{model.cfg.n_layers - 1}."
    )


def hook_width(model: HookedTransformer, hook_name: str) -> int:
    """Width of the activation at ``hook_name``: the last dimension, times the head dimension for per-head hooks.

    Runs the model on one BOS token and stops at the hook, so it costs at most a one-token forward pass.
    """
    check_hook_name(model, hook_name)
    shapes: list[torch.Size] = []

    def record(activation: torch.Tensor, hook) -> None:
        shapes.append(activation.shape)
        raise _ProbeDone

    token_id = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    tokens = torch.tensor([[token_id if token_id is not None else 0]], device=model.cfg.device)
    with model.hooks(fwd_hooks=[(hook_name, record)]):
        try:
            with torch.no_grad():
                model(tokens, return_type=None)
        except _ProbeDone:
            pass
    if not shapes:
        raise ValueError(f"Hook point {hook_name!r} was not reached by a forward pass of the model.")
    shape = shapes[0]
    # Per-head hooks (hook_z, hook_q, ...) are (batch, pos, head, d_head); SAE-Lens flattens head and d_head.
    return int(shape[-1] * shape[-2]) if len(shape) == 4 else int(shape[-1])


def resolve_saes(
    sae_or_saes: torch.nn.Module | Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
) -> dict[str, torch.nn.Module]:
    """Map hook name -> SAE from one SAE, a sequence of SAEs or a ``{hook_name: sae}`` mapping.

    A bare SAE or a sequence element must record its hook point in ``cfg.metadata.hook_name``
    (SAE-Lens SAEs do); otherwise pass a mapping.
    """
    if isinstance(sae_or_saes, Mapping):
        resolved = {str(name): check_sae(sae) for name, sae in sae_or_saes.items()}
    else:
        saes = [sae_or_saes] if isinstance(sae_or_saes, torch.nn.Module) else list(sae_or_saes)
        resolved = {}
        for sae in saes:
            check_sae(sae)
            hook_name = sae_hook_name(sae)
            if hook_name is None:
                raise ValueError(
                    f"{type(sae).__name__} records no hook point (cfg.metadata.hook_name); pass a mapping "
                    "{'blocks.L.hook_resid_post': sae} instead."
                )
            if hook_name in resolved:
                raise ValueError(f"Two SAEs read the same hook point {hook_name!r}; pass one SAE per hook point.")
            resolved[hook_name] = sae
    if not resolved:
        raise ValueError("No SAE given; pass an SAE, a sequence of SAEs or a {hook_name: sae} mapping.")
    return resolved


def check_saes_fit(model: HookedTransformer, saes: Mapping[str, torch.nn.Module]) -> None:
    """Raise a ``ValueError`` unless every hook point exists and its width equals the SAE's ``d_in``."""
    for hook_name, sae in saes.items():
        width = hook_width(model, hook_name)
        d_in = sae_d_in(sae)
        if width != d_in:
            raise ValueError(
                f"The SAE for {hook_name!r} has d_in={d_in} but the activation there has width {width}; "
                "use an SAE trained on this model and hook point."
            )
        recorded = sae_hook_name(sae)
        if recorded is not None and recorded != hook_name:
            logger.warning("SAE trained on %r is attached at %r.", recorded, hook_name)


@dataclass
class SaeCapture:
    """Latents collected by ``attach_saes`` during the latest forward pass.

    Attributes:
        latents: hook name -> latent activations of shape (batch, pos, d_sae), overwritten by each forward pass.
            They keep their autograd graph, so call ``.detach()`` before storing many of them.
        reconstructions: hook name -> SAE reconstructions of shape (batch, pos, d_model); filled only when
            ``attach_saes`` was called with ``keep_reconstructions=True``.
    """

    latents: dict[str, Float[torch.Tensor, "batch pos d_sae"]] = field(default_factory=dict)
    reconstructions: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.latents.clear()
        self.reconstructions.clear()


def _sae_dtype(sae: torch.nn.Module) -> torch.dtype:
    dtype = getattr(sae, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    parameter = next(sae.parameters(), None)
    return parameter.dtype if parameter is not None else torch.float32


def _make_hook(hook_name: str, sae: torch.nn.Module, capture: SaeCapture, splice: bool, error_term: bool, keep: bool):
    dtype = _sae_dtype(sae)

    def sae_hook(activation: torch.Tensor, hook) -> torch.Tensor | None:
        latents = sae.encode(activation.to(dtype))
        capture.latents[hook_name] = latents
        if not splice and not keep:
            return None
        reconstruction = sae.decode(latents).to(activation.dtype)
        if keep:
            capture.reconstructions[hook_name] = reconstruction
        if not splice:
            return None
        if error_term:
            return reconstruction + (activation - reconstruction).detach()
        return reconstruction

    return sae_hook


@contextlib.contextmanager
def attach_saes(
    model: HookedTransformer,
    sae_or_saes: torch.nn.Module | Sequence[torch.nn.Module] | Mapping[str, torch.nn.Module],
    *,
    splice: bool = False,
    error_term: bool = True,
    keep_reconstructions: bool = False,
    check: bool = True,
) -> Iterator[SaeCapture]:
    """Run ``model`` with SAEs at their hook points and collect their latents.

    Args:
        model: the model.
        sae_or_saes: one SAE, a sequence of SAEs (each recording its hook point in ``cfg.metadata.hook_name``)
            or a ``{hook_name: sae}`` mapping.
        splice: replace the activation with the SAE output (see the module docstring). False leaves the
            model's output bit-identical.
        error_term: with ``splice``, add the detached reconstruction error so the output value is unchanged.
        keep_reconstructions: also store each reconstruction on the capture.
        check: check hook names and SAE widths first (one probe forward of a single token per SAE).

    Yields:
        An ``SaeCapture`` whose ``latents`` are filled by every forward pass inside the block. The hooks are
        removed on exit, also on error.

    Example:
        >>> with attach_saes(model, sae) as capture:
        ...     model(tokens, attention_mask=mask)
        >>> capture.latents["blocks.15.hook_resid_post"].shape  # (batch, pos, d_sae)
    """
    saes = resolve_saes(sae_or_saes)
    if check:
        check_saes_fit(model, saes)
    capture = SaeCapture()
    fwd_hooks = [
        (hook_name, _make_hook(hook_name, sae, capture, splice, error_term, keep_reconstructions))
        for hook_name, sae in saes.items()
    ]
    with model.hooks(fwd_hooks=fwd_hooks):
        yield capture


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in _OFFLINE_VARIABLES)


def load_sae(path_or_release: str | os.PathLike, sae_id: str | None = None, *, device: str = "cpu", dtype: str | None = None):
    """Load an SAE-Lens SAE from a folder or from the SAE-Lens registry of pretrained releases.

    Args:
        path_or_release: a folder written by ``SAE.save_model`` / ``save_inference_model`` (``cfg.json`` and
            ``sae_weights.safetensors``), or a release name such as ``"gpt2-small-res-jb"``.
        sae_id: the SAE within the release (for example ``"blocks.8.hook_resid_pre"``); required for a release
            and ignored for a folder.
        device: device to load onto.
        dtype: dtype to cast to; None keeps the one in the SAE's config.

    Returns:
        The SAE.

    Raises:
        FileNotFoundError: the path is not a folder and no ``sae_id`` was given.
        ValueError: the name is neither a folder, a registry release nor a Hugging Face repo id.
        RuntimeError: a release was requested while ``HF_HUB_OFFLINE`` is set, or the download failed.
    """
    from sae_lens import SAE

    path = Path(path_or_release).expanduser()
    if path.is_dir():
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    if sae_id is None:
        raise FileNotFoundError(
            f"{str(path_or_release)!r} is not a folder holding a saved SAE (cfg.json and sae_weights.safetensors); "
            "for a pretrained release pass sae_id as well."
        )
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    releases = get_pretrained_saes_directory()  # read from the YAML file shipped with SAE-Lens, no download
    release = str(path_or_release)
    if release not in releases and "/" not in release:
        close = difflib.get_close_matches(release, list(releases), n=5, cutoff=0.6)
        raise ValueError(
            f"{release!r} is neither a folder nor an SAE-Lens release (nor a Hugging Face repo id 'owner/name')."
            + (f" Close releases: {close}." if close else "")
        )
    if _hub_offline():
        raise RuntimeError(
            f"Cannot load the pretrained SAE {sae_id!r} from release {release!r}: HF_HUB_OFFLINE is "
            "set, so nothing can be downloaded. Unset it on a machine with network access, or train and save an "
            "SAE locally (actsel.sae.train_sae) and load its folder."
        )
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype or "float32")
    except (OSError, ValueError) as err:
        raise RuntimeError(f"Failed to load the pretrained SAE {sae_id!r} from release {release!r}: {err}") from err
