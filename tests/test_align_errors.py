"""Bad input to align/merge gets a ValueError that names the problem."""
import pytest
import torch
from torch import nn

from dimat.align import align, reset_bn_stats
from dimat.merge import merge
from dimat.models import build_model


def mlp(hidden=(16, 16), seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", input_dim=10, hidden=hidden, num_classes=3)


DATA = [torch.randn(8, 10) for _ in range(2)]


def test_mismatched_architectures():
    with pytest.raises(ValueError, match="shape"):
        merge([mlp(), mlp(hidden=(16, 17))], [0.5, 0.5], DATA)
    with pytest.raises(ValueError, match="missing"):
        align(mlp(), [mlp(hidden=(16, 16, 16))], DATA)


def test_mismatched_dtype():
    other = mlp().double()
    with pytest.raises(ValueError, match="dtype"):
        merge([mlp(), other], [0.5, 0.5], DATA)


def test_model_without_permutation_structure():
    plain = [nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(2)]
    # with data, the structure is traced on its first batch (dimat.align.derive_spec)
    assert isinstance(merge(plain, [0.5, 0.5], DATA, alignment="activation"), nn.Sequential)
    assert len(align(plain[0], plain[1:], DATA)) == 1
    # without data there is nothing to trace it on (a model once traced keeps its spec)
    plain = [nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(2)]
    with pytest.raises(ValueError, match="permutation structure"):
        merge(plain, [0.5, 0.5], alignment="weight")
    with pytest.raises(ValueError, match="permutation structure"):
        align(plain[0], plain[1:], method="weight")
    # plain averaging needs no structure
    merged = merge(plain, [0.5, 0.5], alignment=None)
    assert torch.allclose(merged[0].weight, (plain[0][0].weight + plain[1][0].weight) / 2)


@pytest.mark.parametrize("empty", [[], iter([])])
def test_empty_data(empty):
    with pytest.raises(ValueError, match="empty"):
        merge([mlp(), mlp(seed=1)], [0.5, 0.5], empty)
    with pytest.raises(ValueError, match="empty"):
        align(mlp(), [mlp(seed=1)], empty)


def test_missing_data_for_activation_matching():
    with pytest.raises(ValueError, match="data is required"):
        align(mlp(), [mlp(seed=1)], None)


def test_bad_data_items():
    with pytest.raises(ValueError, match="input tensors"):
        align(mlp(), [mlp(seed=1)], ["not a tensor"])


@pytest.mark.parametrize("weights, match", [
    ([1.0], "2 models"),
    ([0.3, 0.3, 0.4], "2 models"),
    ([-0.5, 1.5], "non-negative"),
    ([float("nan"), 1.0], "finite"),
    ([0.0, 0.0], "zero"),
])
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        merge([mlp(), mlp(seed=1)], weights, DATA)


def test_unknown_methods_and_models():
    with pytest.raises(ValueError, match="unknown alignment 'magic'"):
        merge([mlp(), mlp(seed=1)], [0.5, 0.5], DATA, alignment="magic")
    with pytest.raises(ValueError, match="unknown alignment method"):
        align(mlp(), [mlp(seed=1)], DATA, method="magic")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_model")
    with pytest.raises(ValueError, match="does not take"):
        build_model("mlp", depth=3)


def test_batchnorm_model_needs_data_to_reset():
    a, b = build_model("cnn1d", channels=(4, 4)), build_model("cnn1d", channels=(4, 4))
    with pytest.raises(ValueError, match="BatchNorm"):
        merge([a, b], [0.5, 0.5], alignment=None)
    merged = merge([a, b], [0.5, 0.5], alignment=None, bn_stats="average")
    assert isinstance(merged, nn.Module)


def test_merge_leaves_inputs_untouched_and_weights_normalised():
    a, b = mlp(), mlp(seed=1)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    merged = merge([a, b], [1, 3], DATA, alignment=None)
    for m, s in zip((a, b), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, s[k])
    assert torch.allclose(merged.head.bias, 0.25 * a.head.bias + 0.75 * b.head.bias)


def test_reset_bn_stats_matches_data_statistics():
    model = build_model("cnn1d", channels=(4, 4))
    x = torch.randn(64, 1, 40) * 3 + 1
    reset_bn_stats(model, [x[:32], x[32:]])
    with torch.no_grad():
        pre = model.conv[0](x)
    assert torch.allclose(model.bn[0].running_mean, pre.mean(dim=(0, 2)), atol=1e-5)


def test_merge_states_uses_weights_as_given():
    # the round renormalises once (Peer.merge); merge_states only checks, it does not rescale again
    from dimat.merge import merge_states

    a, b = mlp(), mlp(seed=1)
    with pytest.raises(ValueError, match="sum to 1"):
        merge_states(a, [b.state_dict()], [1, 3], alignment=None, bn_stats="own")
    merged = merge_states(a, [b.state_dict()], [0.25, 0.75], alignment=None, bn_stats="own")
    assert torch.allclose(merged["head.bias"], 0.25 * a.head.bias + 0.75 * b.head.bias)
