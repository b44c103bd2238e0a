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
    mha = nn.MultiheadAttention(8, 2, batch_first=True, add_zero_attn=True)

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x)[0]
    with pytest.raises(TraceError, match="multi_head_attention_forward.*module 'attn'.*add_zero_attn"):
        derive_spec(WithMHA(), torch.randn(2, 3, 8))
    with pytest.raises(TraceError, match="flatten.*not supported"):
        derive_spec(Flattening(), torch.randn(2, 1, 6))


# ---------------------------------------------------------------- cases that were silently wrong
class LayerNorm2d(nn.LayerNorm):
    """timm's: an nn.LayerNorm whose own forward normalises the channels, dim 1."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = LayerNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.act = nn.GELU()
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.norm(self.conv(x)))).mean((2, 3)))


class TokenMixer(nn.Module):
    """MLP-Mixer: the token-mixing hidden units sit beside the channels, which are permuted themselves."""

    def __init__(self, tokens=6, c=8, hidden=12):
        super().__init__()
        self.inp = nn.Linear(5, c)
        self.fc1 = nn.Linear(tokens, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, tokens)
        self.head = nn.Linear(c, 3)

    def forward(self, x):  # x: (N, tokens, 5)
        h = self.inp(x)
        h = h + self.fc2(self.act(self.fc1(h.transpose(1, 2)))).transpose(1, 2)
        return self.head(h.mean(1))


class InPlaceBlock(nn.Module):
    """torchvision's BasicBlock habits: ReLU(inplace=True) after a hooked BatchNorm, `out += identity`."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        identity = self.relu(self.bn0(self.stem(x)))
        out = self.bn(self.conv(identity))
        out += identity
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def _recovered(model, data):
    spec = derive_spec(model, data[0])
    perms = random_permutations(spec, torch.Generator().manual_seed(4))
    scrambled = apply_permutation(model, perms, spec).eval()
    with torch.no_grad():
        assert (scrambled(data[0]) - model(data[0])).abs().max() <= 1e-5
    (found,) = find_permutations(model, [scrambled], data, spec=spec)
    return spec, [g.name for g in spec.groups if not torch.equal(found[g.name], invert(perms[g.name]))]


def test_layernorm_subclass_with_its_own_forward_is_traced_through():
    torch.manual_seed(0)
    model = ConvNormNet(c=8).eval()
    for p in (model.norm.weight, model.norm.bias):
        p.data = torch.randn(8)
    # a width equal to the channels: classified as a LayerNorm over the last axis, the spec was accepted
    data = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    spec, wrong = _recovered(model, data)
    conv_units = next(g for g in spec.groups if ("conv.weight", 0) in g.axes)
    assert {("norm.weight", 0), ("norm.bias", 0), ("conv2.weight", 1)} <= set(conv_units.axes)
    assert not wrong


def test_token_mixing_units_are_matched_over_the_permuted_channels():
    torch.manual_seed(0)
    model = TokenMixer().eval()
    data = [torch.randn(64, 6, 5, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    spec, wrong = _recovered(model, data)
    hidden = next(g for g in spec.groups if ("fc1.weight", 0) in g.axes)
    assert hidden.hook_reads == (("act", 2, (1,), None, 12),)  # the channel axis beside them is averaged over
    assert not wrong


def test_hooks_read_a_copy_before_in_place_ops():
    torch.manual_seed(0)
    model = InPlaceBlock()
    distinguish_bn(model, 0)
    # channels the in-place ReLU silences on every sample: what bn0 computed still tells them
    # apart, what is left in its output tensor after the ReLU does not
    model.bn0.bias.data[:4] = -10.0
    model.bn.bias.data[:4] = -10.0
    model.eval()
    data = [torch.randn(64, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    _, wrong = _recovered(model, data)
    assert not wrong


def test_a_wrong_spec_is_caught_naming_its_group():
    from dimat.align.structure import PermutationGroup, PermutationSpec
    from dimat.align.tracing.verify import verify_spec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(2, 4)
    spec = derive_spec(model, x)
    verify_spec(model, spec, x)  # the traced spec passes
    # drop the next layer's input axis from the first group: permuting it now changes the function
    g0 = spec.groups[0]
    broken = PermutationSpec((PermutationGroup(g0.name, g0.size, tuple(a for a in g0.axes if a != ("2.weight", 1)),
                                               g0.hooks, g0.hook_dims), *spec.groups[1:]))
    with pytest.raises(TraceError, match=rf"wrong for group '{g0.name}'.*verify=False"):
        verify_spec(model, broken, x)


class Masked(nn.Module):
    """transformers' habits: torch.all over a mask, gather of position ids from a buffer."""

    def __init__(self, op=None):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.register_buffer("positions", torch.arange(6).unsqueeze(0), persistent=False)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 3)
        self.op = op

    def forward(self, x):
        mask = x >= 0
        if not torch.all(mask):
            raise ValueError("negative token ids")
        pos = self.positions.gather(1, torch.zeros_like(self.positions))
        h = torch.relu(self.fc1(self.emb(x.long()) + pos.unsqueeze(-1).float()))
        if self.op is not None:
            h = self.op(h)
        return self.fc2(h).mean(1)


def test_unknown_ops_on_index_or_mask_tensors_only_do_not_stop_the_trace():
    torch.manual_seed(0)
    x = torch.randint(0, 10, (2, 6))
    spec = derive_spec(Masked(), x)
    assert any(("fc1.weight", 0) in g.axes for g in spec.groups)
    # the same unknown op on the permuted hidden units is named, with its module
    with pytest.raises(TraceError, match=r"op 'cummax' in module '<root>' \(Masked\).*declare permutation_spec"):
        derive_spec(Masked(op=lambda h: torch.cummax(h, dim=1).values), x)
