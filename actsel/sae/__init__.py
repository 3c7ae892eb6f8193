"""Sparse Autoencoders (SAE-Lens) as a lens on the same activations: attach, featurise, train."""

from actsel.sae.attach import SaeCapture, attach_saes, check_saes_fit, hook_width, load_sae, resolve_saes, sae_d_in
from actsel.sae.features import SAE_SPANS, SAE_STATISTICS, extract_sae_features, latent_statistics, top_latents
from actsel.sae.train import evaluate_sae, hook_activations, train_sae

__all__ = [
    "SAE_SPANS", "SAE_STATISTICS", "SaeCapture", "attach_saes", "check_saes_fit", "evaluate_sae",
    "extract_sae_features", "hook_activations", "hook_width", "latent_statistics", "load_sae", "resolve_saes",
    "sae_d_in", "top_latents", "train_sae",
]
