"""``model=hf``: a Hugging Face transformers model as a dimat classifier (``pip install 'dimat[hf]'``).

``source`` names the model: a transformers config class (``GPT2Config``), a model type
(``gpt2``), or a local folder holding a ``config.json``. A folder that also holds weights
(``model.safetensors``, ``pytorch_model.bin``) is loaded with ``from_pretrained`` (local files
only, nothing is downloaded); anything else is built from its config with random weights, the
options under ``config`` overriding the config's own (``model.config.n_layer=2``).

The task follows the data: token windows (``input_shape`` of one axis, ``data=text``) make a
causal language model whose logits at the last position are the classes (the next token;
``vocab_size`` is the data's vocabulary), images make an image classifier. The model declares no
permutation spec: dimat traces it (``dimat.align.derive_spec``), which verifies what it derives.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .registry import register_model

TASKS = ("auto", "causal-lm", "sequence-classification", "image-classification")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_KEEP: list = []


def importable_torchvision() -> None:
    """Make ``import torchvision`` work beside a CPU-only torch, for the model code that imports it.

    transformers and timm import torchvision where it is installed. PyPI's torchvision for torch
    2.13.0 is a CUDA build whose compiled ops cannot load beside the CPU torch, and its import
    then fails registering a fake kernel for ``torchvision::nms`` ('operator torchvision::nms does
    not exist'). Model constructors need none of those ops, so only in that case the two op
    schemas that import registers against are defined first. Nothing changes where torchvision
    imports, or is absent.
    """
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)  # a Library unregisters its definitions when it is collected
    import torchvision  # noqa: F401,F811


def _transformers():
    importable_torchvision()
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("model 'hf' needs Hugging Face transformers: pip install 'dimat[hf]'") from exc
    transformers.logging.set_verbosity_error()  # config warnings about unused defaults, once per run each
    return transformers


def _config(tf, source: str, overrides: Mapping[str, Any]):
    path = Path(str(source)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model 'hf': folder {str(path)!r} has no config.json")
        return tf.AutoConfig.from_pretrained(str(path), local_files_only=True, **overrides), path
    cls = getattr(tf, str(source), None)
    if isinstance(cls, type) and issubclass(cls, tf.PretrainedConfig):
        return cls(**overrides), None
    try:
        return tf.AutoConfig.for_model(str(source), **overrides), None
    except ValueError:
        raise ValueError(f"model 'hf': source {source!r} is neither a local folder, a transformers config class "
                         "(e.g. GPT2Config) nor a model type (e.g. gpt2)") from None


class HFClassifier(nn.Module):
    """A transformers model whose logits (at the last position, for a language model) are the classes."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "image-classification":
            return self.model(pixel_values=x).logits
        logits = self.model(input_ids=x.long()).logits
        return logits[:, -1] if self.task == "causal-lm" else logits


@register_model("hf")
def hf(num_classes: int = 2, input_shape: Sequence[int] | None = None, source: str | None = None,
       task: str = "auto", config: Mapping[str, Any] | None = None) -> HFClassifier:
    """A transformers model from a config or a local folder.

    Args:
        num_classes: the data's classes: the vocabulary of a language model, the labels otherwise.
        input_shape: one sample's shape: ``(context,)`` token ids, or ``(C, H, W)`` images.
        source: a config class name, a model type, or a local folder (see the module docstring).
        task: ``auto`` (token windows: ``causal-lm``; images: ``image-classification``) or one of
            ``causal-lm``, ``sequence-classification``, ``image-classification``.
        config: options overriding the config's own (ignored for weights loaded from a folder,
            except those ``from_pretrained`` accepts).
    """
    if not source:
        raise ValueError("model 'hf' needs source=<config class, model type or local folder> "
                         "(model.source=GPT2Config on the command line)")
    if task not in TASKS:
        raise ValueError(f"model 'hf': task must be one of {', '.join(TASKS)} (got {task!r})")
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else ()
    if task == "auto":
        task = "image-classification" if len(shape) == 3 else "causal-lm"
    tf = _transformers()
    overrides = dict(config or {})
    cfg, folder = _config(tf, source, overrides)
    if task == "causal-lm":
        cfg.vocab_size = int(num_classes)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults outside a small vocabulary
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) >= cfg.vocab_size:
                setattr(cfg, key, None)
    else:
        cfg.num_labels = int(num_classes)
    if task == "image-classification" and len(shape) == 3:
        for key, value in (("num_channels", shape[0]), ("image_size", shape[1])):
            if hasattr(cfg, key) and key not in overrides:
                setattr(cfg, key, value)
    auto = {"causal-lm": tf.AutoModelForCausalLM, "sequence-classification": tf.AutoModelForSequenceClassification,
            "image-classification": tf.AutoModelForImageClassification}[task]
    if folder is not None and any((folder / w).is_file() for w in _WEIGHTS):
        model = auto.from_pretrained(str(folder), config=cfg, local_files_only=True)
    else:
        model = auto.from_config(cfg)
    return HFClassifier(model, task)
