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


# ---------------------------------------------------------------- model=hf
def _hf_model(seed=0, **kw):
    pytest.importorskip("transformers")
    from dimat.models import build_model
    torch.manual_seed(seed)
    return build_model("hf", num_classes=20, input_shape=(8,), **kw).eval()


GPT2 = dict(n_embd=16, n_layer=1, n_head=2, n_positions=16)


def test_hf_builder_makes_a_next_token_classifier_that_aligns():
    model = _hf_model(source="GPT2Config", config=GPT2)
    x = torch.randint(0, 20, (4, 8)).float()  # dimat's text windows hold float ids
    assert model(x).shape == (4, 20)
    spec = derive_spec(model, x)
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    scrambled = apply_permutation(model, perms, spec).eval()
    data = [torch.randint(0, 20, (32, 8), generator=torch.Generator().manual_seed(s)).float() for s in range(2)]
    (found,) = find_permutations(model, [scrambled], data, spec=spec)
    assert all(torch.equal(found[g.name], invert(perms[g.name])) for g in spec.groups)


def test_hf_builder_loads_a_local_folder_with_weights_and_builds_one_without(tmp_path):
    model = _hf_model(source="gpt2", config=GPT2)  # a model type works as well as a config class
    model.model.save_pretrained(tmp_path / "with")
    loaded = _hf_model(source=str(tmp_path / "with"))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    model.model.config.save_pretrained(tmp_path / "config_only")
    fresh = _hf_model(seed=1, source=str(tmp_path / "config_only"))  # random weights from the same config
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(fresh.state_dict()["model.transformer.h.0.mlp.c_fc.weight"],
                           model.state_dict()["model.transformer.h.0.mlp.c_fc.weight"])
    with pytest.raises(ValueError, match="neither a local folder, a transformers config class"):
        _hf_model(source="NoSuchConfig")


def test_multi_query_attention_raises_one_error_naming_the_module():
    from third_party import _LLAMA, _hf
    from dimat.align import TraceError
    model = _hf("LlamaForCausalLM", "LlamaConfig", **{**_LLAMA, "num_key_value_heads": 1}).eval()
    with pytest.raises(TraceError, match=r"module 'model.layers.0.self_attn' \(LlamaAttention\).*multi-query.*"
                                         r"declare permutation_spec"):
        derive_spec(model, torch.randint(0, 50, (2, 8)))
