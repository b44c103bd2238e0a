"""derive_spec: the traced structure equals every declared one, and works on models from outside dimat."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dimat.align import (TraceError, align, apply_permutation, derive_spec, find_permutations, get_spec, invert,
                         random_permutations, reset_bn_stats, weight_matching)
from dimat.merge import merge

from helpers_models import SMALL, distinguish_bn, inputs, small_model


def canonical(spec):
    """Groups as sets of axes (names may differ), with size, hook points and head structure."""
    groups = {frozenset(g.axes): (g.size, frozenset(g.hook_points), g.heads,
                                  tuple(n for _, n in g.parts)) for g in spec.groups}
    by_head: dict = {}
    for g in spec.groups:
        if g.heads > 1:
            by_head.setdefault(g.head_group, set()).add(frozenset(g.axes))
    return groups, {frozenset(v) for v in by_head.values()}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_derived_spec_equals_declared(name):
    model = small_model(name)
    derived = derive_spec(model, inputs(name, 4))
    assert canonical(derived) == canonical(get_spec(model))


# ---------------------------------------------------------------- models from outside dimat
class ProjBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.proj = None
        if stride != 1 or c_in != c_out:  # a projection shortcut: 1x1 conv + BN
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return F.relu(out + (x if self.proj is None else self.proj(x)))


class ProjResNet(nn.Module):
    """ResNet variant: functional ReLUs, 1x1 projection shortcuts, torch.flatten + adaptive pooling."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(ProjBlock(width, width, 1), ProjBlock(width, 2 * width, 2),
                                    ProjBlock(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UNet1d(nn.Module):
    """U-shaped 1-D net: the decoder reads the upsampled path concatenated with the skip connection."""

    def __init__(self, c=8, classes=4):
        super().__init__()
        self.enc1 = nn.Conv1d(2, c, 3, padding=1)
        self.act1 = nn.SiLU()
        self.enc2 = nn.Conv1d(c, 2 * c, 3, padding=1)
        self.act2 = nn.SiLU()
        self.up = nn.ConvTranspose1d(2 * c, c, 2, stride=2)
        self.act_up = nn.Tanh()
        self.dec = nn.Conv1d(2 * c, c, 3, padding=1)
        self.act3 = nn.SiLU()
        self.head = nn.Conv1d(c, classes, 1)

    def forward(self, x):
        e1 = self.act1(self.enc1(x))
        e2 = self.act2(self.enc2(F.max_pool1d(e1, 2)))
        u = self.act_up(self.up(e2))
        d = self.act3(self.dec(torch.cat([u, e1], dim=1)))
        return self.head(d).mean(-1)


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class GatedBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = RMSNorm(d)
        self.gate = nn.Linear(d, h, bias=False)
        self.up = nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class GatedMLP(nn.Module):
    """SwiGLU-style gated MLP with a hand-written RMSNorm and a residual stream."""

    def __init__(self, d_in=12, d=16, h=24, classes=5):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(GatedBlock(d, h), GatedBlock(d, h))
        self.norm = RMSNorm(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        return self.out(self.norm(self.blocks(self.inp(x))))


def _outside(name, seed=0):
    torch.manual_seed(seed)
    if name == "resnet_proj":
        model = ProjResNet()
        distinguish_bn(model, seed)
        return model.eval(), lambda n, s: torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(s))
    if name == "unet1d":
        return UNet1d().eval(), lambda n, s: torch.randn(n, 2, 16, generator=torch.Generator().manual_seed(s))
    if name == "gated_mlp":
        return GatedMLP().eval(), lambda n, s: torch.randn(n, 12, generator=torch.Generator().manual_seed(s))
    if name in ("transformer", "vit"):
        return small_model(name, seed), lambda n, s: inputs(name, n, s)
    raise KeyError(name)


def test_outside_models_have_the_expected_structure():
    spec = derive_spec(*(lambda m, f: (m, f(2, 0)))(*_outside("resnet_proj")))
    stage2 = next(g for g in spec.groups if ("blocks.1.proj.0.weight", 0) in g.axes)
    assert {("blocks.1.b2.weight", 0), ("blocks.2.c2.weight", 0), ("blocks.2.c1.weight", 1), ("fc.weight", 1)} <= set(stage2.axes)
    assert len(spec.groups) == 5  # stem stream, stage-2 stream, three block interiors
    spec = derive_spec(*(lambda m, f: (m, f(2, 0)))(*_outside("unet1d")))
    (cat,) = [g for g in spec.groups if g.derived]
    assert cat.axes == (("dec.weight", 1),) and [n for _, n in cat.parts] == [8, 8]
    assert {p for p, _ in cat.parts} == {spec.axes_to_groups()["up.weight"][1], spec.axes_to_groups()["enc1.weight"][0]}
    spec = derive_spec(*(lambda m, f: (m, f(2, 0)))(*_outside("gated_mlp")))
    hidden = next(g for g in spec.groups if ("blocks.0.gate.weight", 0) in g.axes)
    assert set(hidden.axes) == {("blocks.0.gate.weight", 0), ("blocks.0.up.weight", 0), ("blocks.0.down.weight", 1)}
    stream = next(g for g in spec.groups if ("inp.weight", 0) in g.axes)
    assert ("blocks.1.norm.scale", 0) in stream.axes and ("norm.scale", 0) in stream.axes


@pytest.mark.parametrize("name", ["transformer", "vit", "resnet_proj", "unet1d", "gated_mlp"])
def test_planted_permutation_recovered_by_derived_spec(name):
    model, make = _outside(name, seed=3)
    data = [make(64, s) for s in range(3)]
    if name == "resnet_proj":
        reset_bn_stats(model, data).eval()  # statistics from data keep every channel alive
    spec = derive_spec(model, data[0])
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    scrambled = apply_permutation(model, perms, spec).eval()
    x = torch.cat(data)
    with torch.no_grad():
        assert (scrambled(x) - model(x)).abs().max() <= 1e-5
    (found,) = find_permutations(model, [scrambled], data, spec=spec)
    for g in spec.groups:
        assert torch.equal(found[g.name], invert(perms[g.name])), g.name
    # the public entry point traces the model itself (no permutation_spec on outside models)
    (aligned,) = align(model, [scrambled], data)
    with torch.no_grad():
        assert (aligned.eval()(x) - model(x)).abs().max() <= 1e-5
    for key, value in model.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), key


def test_weight_matching_through_concatenation_and_heads():
    for name in ("unet1d", "transformer"):
        model, make = _outside(name, seed=1)
        spec = derive_spec(model, make(2, 0))
        perms = random_permutations(spec, torch.Generator().manual_seed(2))
        scrambled = apply_permutation(model, perms, spec)
        found = weight_matching(model.state_dict(), scrambled.state_dict(), spec)
        for g in spec.groups:
            assert torch.equal(found[g.name], invert(perms[g.name])), (name, g.name)


def test_merge_and_get_spec_accept_a_model_without_declared_spec():
    a, make = _outside("gated_mlp", seed=0)
    b, _ = _outside("gated_mlp", seed=1)
    data = [make(32, s) for s in range(2)]
    with pytest.raises(ValueError, match="no example input"):
        get_spec(a)
    spec = get_spec(a, data[0])
    assert get_spec(a) is spec  # traced once, kept on the instance
    merged = merge([a, b], [1, 1], iter(data))  # a one-shot iterator is not spent by the trace
    assert isinstance(merged, GatedMLP) and merged is not a


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return torch.einsum("nd,de->ne", x, self.w)


class Flattening(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_what_the_tracer_cannot_see_through_is_named_in_one_error():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Einsum(), nn.Linear(6, 2))
    with pytest.raises(TraceError, match=r"op 'einsum' in module '2' \(Einsum\)"):
        derive_spec(model, torch.randn(2, 4))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x)[0]
    with pytest.raises(TraceError, match="multi_head_attention_forward.*module 'attn'"):
        derive_spec(WithMHA(), torch.randn(2, 3, 8))
    with pytest.raises(TraceError, match="flatten.*not supported"):
        derive_spec(Flattening(), torch.randn(2, 1, 6))
