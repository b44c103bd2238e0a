"""Small test-sized versions of every registered model and inputs they take."""
import torch
from torch import nn

from dimat.models import build_model

SMALL = {
    "mlp": (dict(input_dim=40, hidden=(32, 24)), (1, 40)),
    "cnn1d": (dict(channels=(8, 12, 16)), (1, 40)),
    "vgg11": (dict(width=0.125), (3, 16, 16)),
    "vgg16": (dict(width=0.125), (3, 16, 16)),
    "resnet20": (dict(width=0.5), (3, 16, 16)),
    "transformer": (dict(num_classes=20, input_shape=(12,), dim=32, heads=4), (12,)),
    "vit": (dict(input_shape=(1, 8, 8), patch=2, dim=32, heads=4), (1, 8, 8)),
    # a class imported by name (model.class=...): here dimat's own MLP, which declares its spec
    "custom": ({"class": "dimat.models.mlp:MLP", "input_dim": 40, "hidden": (32, 24), "num_classes": 10}, (1, 40)),
}
TOKENS = {"transformer": 20}  # models whose inputs are token ids: the vocabulary size


def small_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs, _ = SMALL[name]
    model = build_model(name, **kwargs)
    distinguish_bn(model, seed)
    return model.eval()


def distinguish_bn(model: nn.Module, seed: int = 0) -> None:
    """A fresh BatchNorm is identical on every channel; give each channel its own parameters/stats."""
    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.rand(c, generator=g) * 0.5 + 0.1
            m.running_mean.data = torch.randn(c, generator=g) * 0.1
            m.running_var.data = torch.rand(c, generator=g) + 0.5


def inputs(name: str, n: int, seed: int = 0) -> torch.Tensor:
    _, shape = SMALL[name]
    g = torch.Generator().manual_seed(seed)
    if name in TOKENS:
        return torch.randint(0, TOKENS[name], (n, *shape), generator=g).float()
    return torch.randn(n, *shape, generator=g)
