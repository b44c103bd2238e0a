"""Models from torchvision, timm and transformers: a planted permutation is recovered exactly, or one error.

Every family is built from a config at test size with random weights (tests/third_party.py).
"""
import pytest
import torch

from dimat.align import (apply_permutation, derive_spec, find_permutations, invert, random_permutations,
                         weight_matching)

from third_party import ALIGNS, build


@pytest.mark.parametrize("name", sorted(ALIGNS))
def test_planted_permutation_is_recovered(name):
    model, inputs = build(name)
    spec = derive_spec(model, inputs(2, 0))  # verifies itself: a planted permutation leaves the function
    perms = random_permutations(spec, torch.Generator().manual_seed(1))
    scrambled = apply_permutation(model, perms, spec).eval()
    x = inputs(8, 5)
    with torch.no_grad():
        a, b = model(x), scrambled(x)
    a, b = (t.to_tuple()[0] if hasattr(t, "to_tuple") else t for t in (a, b))  # logits or last hidden state
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    data = [inputs(32, s) for s in range(2)]
    (found,) = find_permutations(model, [scrambled], data, spec=spec)
    wrong = [g.name for g in spec.groups if not torch.equal(found[g.name], invert(perms[g.name]))]
    assert not wrong, f"activation matching got {wrong} wrong"
    found = weight_matching(model.state_dict(), scrambled.state_dict(), spec)
    wrong = [g.name for g in spec.groups if not torch.equal(found[g.name], invert(perms[g.name]))]
    assert not wrong, f"weight matching got {wrong} wrong"
