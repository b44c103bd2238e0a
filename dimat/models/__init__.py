"""Models, each declaring its permutation structure beside its definition."""
from . import cnn1d, hf, mlp, resnet, transformer, vgg  # noqa: F401  (registration; hf imports transformers lazily)
from .registry import available_models, build_model, register_model

__all__ = ["available_models", "build_model", "register_model"]
