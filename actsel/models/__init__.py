"""Model loading: specs to HookedTransformers."""

from actsel.models.loading import DEFAULT_MODEL, ModelInfo, bundled_gguf_path, list_models, load_model
from actsel.models.layout import use_linear_layout
from actsel.models.tiny import tiny_model

__all__ = ["DEFAULT_MODEL", "ModelInfo", "bundled_gguf_path", "list_models", "load_model", "tiny_model",
           "use_linear_layout"]
