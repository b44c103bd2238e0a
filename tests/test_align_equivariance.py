"""Permutations leave function unchanged; alignment recovers a known permutation exactly."""
import pytest
import torch

from dimat.align import (align, apply_permutation, collect_cross_stats, find_permutations, get_spec, invert,
                         random_permutations, reset_bn_stats)
from dimat.models import available_models

from helpers_models import SMALL, inputs, small_model

MODELS = sorted(SMALL)


def test_every_registered_model_is_covered():
    # model=hf declares no spec (it is traced) and needs transformers: tests/test_third_party_models.py
    assert set(available_models()) - {"hf"} <= set(SMALL), "add new models to tests/helpers_models.py"


@pytest.mark.parametrize("name", MODELS)
def test_random_permutation_preserves_function(name):
    model = small_model(name)
    spec = get_spec(model)
    spec.validate(model.state_dict(), dict(model.named_modules()))
    perms = random_permutations(spec, torch.Generator().manual_seed(1))
    assert any((p != torch.arange(len(p))).any() for p in perms.values())
    permuted = apply_permutation(model, perms).eval()
    x = inputs(name, 16)
    with torch.no_grad():
        diff = (model(x) - permuted(x)).abs().max().item()
    assert diff <= 1e-5
    # the permutation really moved the weights
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, permuted.state_dict()[k])]
    assert moved


@pytest.mark.parametrize("name", MODELS)
def test_activation_matching_recovers_every_live_unit(name):
    """Dead units (constant on the data) tie with each other; every other unit must match exactly."""
    reference = small_model(name, seed=3)
    spec = get_spec(reference)
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    scrambled = apply_permutation(reference, perms)
    data = [inputs(name, 64, seed=s) for s in range(4)]
    (found,) = find_permutations(reference, [scrambled], data, method="activation")
    (stats,) = collect_cross_stats(reference, [scrambled], data, spec)
    live_total = units_total = 0
    for g in spec.groups:
        s = stats[g.name][0]
        live = s.var_a > 1e-12
        truth = invert(perms[g.name])
        assert torch.equal(found[g.name][live], truth[live]), f"group {g.name} mismatched on live units"
        live_total += int(live.sum())
        units_total += g.size
    assert live_total >= 0.9 * units_total
    (aligned,) = align(reference, [scrambled], data)
    with torch.no_grad():
        x = torch.cat(data)
        assert (aligned.eval()(x) - reference(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["activation", "weight"])
@pytest.mark.parametrize("name", MODELS)
def test_alignment_recovers_identity(name, method):
    reference = small_model(name, seed=3)
    data = [inputs(name, 64, seed=s) for s in range(4)]
    # Statistics from the data (with the positive BN shifts of small_model) keep every unit alive,
    # so no two units tie and the recovery must be exact.
    reset_bn_stats(reference, data).eval()
    spec = get_spec(reference)
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    scrambled = apply_permutation(reference, perms)
    before = {k: v.clone() for k, v in scrambled.state_dict().items()}
    data = data if method == "activation" else None
    (aligned,) = align(reference, [scrambled], data, method=method)
    for key, value in reference.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], value), f"{key} not recovered"
    # inputs untouched
    for key, value in scrambled.state_dict().items():
        assert torch.equal(before[key], value)
