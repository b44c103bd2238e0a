"""Models from torchvision, timm and Hugging Face transformers, built from configs at test sizes.

Nothing is downloaded: every model is built from its constructor or config with random weights.
A library that is not installed skips its tests (``pytest.importorskip``); ``.ci/run`` installs
them through the ``test-models`` extra.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from dimat.align import has_batchnorm, reset_bn_stats


def import_torchvision():
    """torchvision, importable beside a CPU-only torch (see ``dimat.models.hf.importable_torchvision``)."""
    from dimat.models.hf import importable_torchvision
    importable_torchvision()
    return pytest.importorskip("torchvision")


def images(size: int) -> Callable[[int, int], torch.Tensor]:
    return lambda n, seed: torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tokens(vocab: int, length: int = 8) -> Callable[[int, int], torch.Tensor]:
    return lambda n, seed: torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def lively(model: nn.Module, seed: int = 0) -> nn.Module:
    """Per-channel BatchNorm statistics and parameters, as a trained model has.

    A fresh BatchNorm treats every channel alike, and with random weights some ReLU units are dead
    on every sample: a unit with no activation has nothing to be matched by.
    """
    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.track_running_stats:
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.rand(c, generator=g) * 0.5 + 0.1
            m.running_mean.data = torch.randn(c, generator=g) * 0.1
            m.running_var.data = torch.rand(c, generator=g) + 0.5
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            if m.bias is not None:
                m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
    return model


def _hf(model_cls: str, config_cls: str, **kw) -> nn.Module:
    try:  # transformers and timm import torchvision where it is installed
        import_torchvision()
    except pytest.skip.Exception:
        pass
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_cls)(**kw)
    return getattr(transformers, model_cls)(config)


def _tv_mobilenet() -> nn.Module:
    tv = import_torchvision()
    model = tv.models.mobilenet_v3_small(num_classes=5, width_mult=0.25)
    for m in model.modules():  # squeeze-excitation hidden units alive on every sample
        if type(m).__name__ == "SqueezeExcitation":
            m.fc1.bias.data += 1.0
    return model


def _timm(path: str, **kw) -> nn.Module:
    import_torchvision()  # timm needs it
    pytest.importorskip("timm")
    mod_name, cls = path.rsplit(".", 1)
    import importlib
    return getattr(importlib.import_module(f"timm.models.{mod_name}"), cls)(**kw)


def _timm_resnet() -> nn.Module:
    import_torchvision()
    pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 24, 32), stem_width=8, num_classes=5)


_LLAMA = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
              vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)

# name -> (build, inputs(n, seed)); each aligns exactly (tests/test_third_party_models.py)
ALIGNS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], torch.Tensor]]] = {
    "torchvision.resnet": (lambda: import_torchvision().models.resnet.ResNet(
        import_torchvision().models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5), images(32)),
    "torchvision.mobilenet_v3_small": (_tv_mobilenet, images(32)),
    "timm.resnet": (_timm_resnet, images(32)),
    "timm.convnext": (lambda: _timm("convnext.ConvNeXt", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5),
                      images(32)),
    "timm.mlp_mixer": (lambda: _timm("mlp_mixer.MlpMixer", num_classes=5, img_size=16, patch_size=4, num_blocks=2,
                                     embed_dim=16), images(16)),
    "hf.vit": (lambda: _hf("ViTForImageClassification", "ViTConfig", hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=4, num_labels=5),
               images(16)),
    "hf.distilbert": (lambda: _hf("DistilBertForMaskedLM", "DistilBertConfig", dim=16, n_layers=2, n_heads=2,
                                  hidden_dim=32, vocab_size=50, max_position_embeddings=16), tokens(50)),
    "torchvision.vit": (lambda: import_torchvision().models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5), images(16)),
    "timm.vit": (lambda: _timm("vision_transformer.VisionTransformer", img_size=16, patch_size=4, embed_dim=16,
                               depth=2, num_heads=2, num_classes=5), images(16)),
    "hf.gpt2": (lambda: _hf("GPT2LMHeadModel", "GPT2Config", n_embd=16, n_layer=2, n_head=2, vocab_size=50,
                            n_positions=16, bos_token_id=0, eos_token_id=0), tokens(50)),
    "hf.bert": (lambda: _hf("BertForSequenceClassification", "BertConfig", hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32, vocab_size=50, max_position_embeddings=16,
                            num_labels=3), tokens(50)),
    # grouped-query attention (4 query heads on 2 key/value heads) and rotary embeddings
    "hf.llama": (lambda: _hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA), tokens(50)),
    "hf.llama.eager": (lambda: _hf("LlamaForCausalLM", "LlamaConfig", attn_implementation="eager", **_LLAMA),
                       tokens(50)),
    # a relative position bias table per head, shared by every layer
    "hf.t5_encoder": (lambda: _hf("T5EncoderModel", "T5Config", d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                  num_heads=2, vocab_size=50), tokens(50)),
    "torch.transformer_encoder": (lambda: nn.Sequential(
        nn.Linear(6, 16), nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                                                2, enable_nested_tensor=False), nn.Linear(16, 3)),
        lambda n, seed: torch.randn(n, 5, 6, generator=torch.Generator().manual_seed(seed))),
    "torch.rms_norm": (lambda: nn.Sequential(nn.Linear(6, 16), nn.RMSNorm(16), nn.GELU(), nn.Linear(16, 3)),
                       lambda n, seed: torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Callable[[int, int], torch.Tensor]]:
    """The model in eval mode, its BatchNorm statistics measured on its inputs, and the inputs."""
    make, inputs = ALIGNS[name]
    torch.manual_seed(seed)
    model = lively(make(), seed)
    if has_batchnorm(model):  # random weights shrink the signal layer by layer; measured statistics undo that
        reset_bn_stats(model, [inputs(64, 100 + s) for s in range(2)])
    return model.eval(), inputs
