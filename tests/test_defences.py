"""Each aggregator on hand-built tensors does what it claims."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from dimat.merge import weighted_average
from dimat.merge.aggregators import AggregationContext, available_aggregators, get_aggregator

SIGMA = 0.01
ROBUST = ["median", "trimmed_mean", "multi_krum", "safety_mask"]


def _own(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(30, 20, generator=g),
        "layer.bias": torch.randn(30, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _near(own: dict[str, torch.Tensor], seed: int, sigma: float = SIGMA) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: (v + sigma * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + seed for k, v in own.items()}
    return out


def _outlier(own: dict[str, torch.Tensor], seed: int = 99) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 5.0 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + 100 for k, v in own.items()}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])


def _wmean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * s[k] for s, w in zip(states, weights)) for k in states[0] if states[0][k].is_floating_point()}


def _setup(n_honest: int = 4):
    own = _own()
    honest = [_near(own, seed=i + 1) for i in range(n_honest)]
    bad = _outlier(own)
    m = 2 + n_honest
    weights = [1.0 / m] * m
    # the mean over own + honest only, weights renormalised: what "no influence" of the outlier means
    honest_mean = _wmean([own] + honest, [1.0 / (m - 1)] * (m - 1))
    plain = _wmean([own] + honest + [bad], weights)
    return own, honest, bad, weights, honest_mean, plain


def test_registry_lists_everything() -> None:
    names = available_aggregators()
    for n in ["mean", "median", "trimmed_mean", "norm_clip", "multi_krum", "sign_consensus", "safety_mask"]:
        assert n in names
    with pytest.raises(ValueError, match="unknown aggregator"):
        get_aggregator("geometric_mean_of_vibes")
    with pytest.raises(ValueError, match="bad options"):
        get_aggregator("median", nonsense=1)


def test_mean_is_weighted_average_and_keeps_integer_buffers() -> None:
    own, honest, bad, weights, _, plain = _setup()
    out = get_aggregator("mean")(own, honest + [bad], weights)
    for k, v in plain.items():
        torch.testing.assert_close(out[k], v)
    assert int(out["bn.num_batches_tracked"]) == 7
    assert out["layer.weight"].dtype == own["layer.weight"].dtype
    # no neighbours: own is returned (a copy)
    alone = get_aggregator("mean")(own, [], [1.0])
    assert torch.equal(alone["layer.weight"], own["layer.weight"]) and alone["layer.weight"] is not own["layer.weight"]


def test_the_registry_mean_is_the_default_merge_mean() -> None:
    # aggregator=mean and no aggregator must give the same run, bit for bit
    own, honest, bad, weights, _, _ = _setup()
    out = get_aggregator("mean")(own, honest + [bad], weights)
    default = weighted_average(own, honest + [bad], weights)
    assert all(torch.equal(out[k], v) for k, v in default.items())


@pytest.mark.integration
@pytest.mark.parametrize("module", ["base", "robust", "safety", "registry"])
def test_each_aggregator_module_imports_alone(module: str, repo_root) -> None:
    # a fresh interpreter: an import cycle between the contract, the registry and a plugin shows here
    run = subprocess.run([sys.executable, "-c", f"import dimat.merge.aggregators.{module}"], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("name", ROBUST)
def test_one_outlier_among_four_honest_is_removed(name: str) -> None:
    own, honest, bad, weights, honest_mean, plain = _setup()
    out = get_aggregator(name)(own, honest + [bad], weights)
    err = (_flat(out) - _flat(honest_mean)).abs().max().item()
    plain_err = (_flat(plain) - _flat(honest_mean)).abs().max().item()
    assert plain_err > 1.0  # the outlier does drag the plain mean
    assert err < 3 * SIGMA, f"{name} still follows the outlier: max error {err:.4f}"
    assert int(out["bn.num_batches_tracked"]) == 7


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "safety_mask", "multi_krum"])
def test_ring_neighbourhood_outlier_is_removed(name: str) -> None:
    # two neighbours (a ring): own's vote is what lets the estimator tell which one is wrong
    own, honest, bad, _, _, _ = _setup(n_honest=1)
    out = get_aggregator(name)(own, [honest[0], bad], [1 / 3] * 3)
    dev_from_own = (_flat(out) - _flat(own)).abs().max().item()
    assert dev_from_own < 5 * SIGMA, f"{name}: {dev_from_own:.4f}"


def test_multi_krum_selects_the_honest() -> None:
    own, honest, bad, weights, honest_mean, _ = _setup()
    agg = get_aggregator("multi_krum", num_byzantine=1)
    out = agg(own, [honest[0], bad, *honest[1:]], weights)
    assert agg.last_selected == [0, 2, 3, 4]
    for k, v in honest_mean.items():
        torch.testing.assert_close(out[k], v)


def test_norm_clipping_bounds_the_outlier() -> None:
    own, honest, bad, weights, _, plain = _setup()
    agg = get_aggregator("norm_clip")
    out = agg(own, honest + [bad], weights)
    # the result had the outlier sent own's weights (a zero delta)
    without_outlier = _flat(_wmean([own] + honest + [own], weights))
    honest_norms = sorted(float((_flat(h) - _flat(own)).norm()) for h in honest)
    tau = agg.last_tau
    assert tau is not None and honest_norms[0] <= tau <= honest_norms[-1]
    pull = float((_flat(out) - without_outlier).norm())
    assert pull <= weights[-1] * tau + 1e-5
    assert float((_flat(plain) - without_outlier).norm()) > 100 * pull
    # a fixed bound
    agg2 = get_aggregator("norm_clip", max_norm=0.01)
    out2 = agg2(own, honest + [bad], weights)
    assert float((_flat(out2) - _flat(own)).norm()) <= 0.01 * sum(weights[1:]) + 1e-6


ALL = ["median", "trimmed_mean", "norm_clip", "multi_krum", "sign_consensus", "safety_mask"]


@pytest.mark.parametrize("name", ALL)
def test_honest_only_is_nearly_the_plain_mean(name: str) -> None:
    # honest peers drift together (similar data) plus individual noise
    own = _own()
    g = torch.Generator().manual_seed(42)
    drift = {k: 2 * SIGMA * torch.randn(v.shape, generator=g) for k, v in own.items() if v.is_floating_point()}
    honest = []
    for i in range(5):
        h = _near(own, seed=i + 1)
        honest.append({k: v + drift[k] if k in drift else v for k, v in h.items()})
    weights = [1 / 6] * 6
    mean = _flat(_wmean([own] + honest, weights))
    agg = get_aggregator(name)
    out = _flat(agg(own, honest, weights))
    typical_delta = sum(float((_flat(h) - _flat(own)).norm()) for h in honest) / 5
    # the defence moves the result by well under a typical neighbour's distance from own
    assert float((out - mean).norm()) < 0.5 * typical_delta, name
    if name == "safety_mask":
        assert max(agg.last_masked_share) < 0.05


def test_norm_clip_and_sign_consensus_reduce_to_mean_on_agreeing_inputs() -> None:
    own = _own()
    shift = {k: v + 0.1 if v.is_floating_point() else v for k, v in own.items()}
    others = [shift, {k: v + 0.2 if v.is_floating_point() else v for k, v in own.items()}]
    weights = [0.5, 0.3, 0.2]
    mean = _wmean([own] + others, weights)
    for agg in (get_aggregator("sign_consensus", density=1.0), get_aggregator("norm_clip", max_norm=1e6)):
        out = agg(own, others, weights)
        for k, v in mean.items():
            torch.testing.assert_close(out[k], v)


def test_sign_consensus_elects_and_merges_agreeing() -> None:
    own = {"w": torch.zeros(3)}
    # coordinate 0: deltas +1, +1, -3 ; coordinate 1: -1, -1, +0.5 ; coordinate 2: 0, +2, 0
    others = [{"w": torch.tensor([1.0, -1.0, 0.0])}, {"w": torch.tensor([1.0, -1.0, 2.0])}, {"w": torch.tensor([-3.0, 0.5, 0.0])}]
    weights = [0.4, 0.2, 0.2, 0.2]
    mass = get_aggregator("sign_consensus", density=1.0, elect="mass")(own, others, weights)["w"]
    # mass elects '-' on coord 0 (sum -1): only -3 agrees; '-' on coord 1: mean of -1, -1; '+' on coord 2
    torch.testing.assert_close(mass, torch.tensor([-3.0, -1.0, 2.0]) * 0.6)
    count = get_aggregator("sign_consensus", density=1.0, elect="count")(own, others, weights)["w"]
    torch.testing.assert_close(count, torch.tensor([1.0, -1.0, 2.0]) * 0.6)
    # trimming: density 1/3 keeps each neighbour's single largest-magnitude coordinate
    trimmed = get_aggregator("sign_consensus", density=1 / 3, elect="mass")(own, others, weights)["w"]
    # kept: nb0 -> coord 0 (+1, ties with coord 1 keep both), nb1 -> coord 2 (+2), nb2 -> coord 0 (-3)
    assert float(trimmed[2]) == pytest.approx(2.0 * 0.6)
    assert float(trimmed[0]) == pytest.approx(-3.0 * 0.6)


def test_safety_mask_flags_the_outlier_only() -> None:
    own, honest, bad, weights, _, _ = _setup()
    agg = get_aggregator("safety_mask")
    agg(own, honest + [bad], weights)
    shares = agg.last_masked_share
    assert shares[-1] > 0.9
    assert max(shares[:-1]) < 0.05


def test_safety_mask_isolated_criterion() -> None:
    # a neighbour that alone moves a few coordinates (a backdoor-like sparse change), moderately
    own = {"w": torch.zeros(200)}
    g = torch.Generator().manual_seed(0)
    honest = [{"w": 0.01 * torch.randn(200, generator=g)} for _ in range(3)]
    bad = {"w": honest[0]["w"].clone() * 0}
    bad["w"][:5] = 0.2
    weights = [0.25, 0.25, 0.25, 0.125, 0.125]
    agg = get_aggregator("safety_mask", criteria=("isolated",))
    out = agg(own, honest + [bad], weights)["w"]
    # the plain mean carries the attacker's 0.125 * 0.2 = 0.025 into those coordinates; the mask removes it
    plain = get_aggregator("mean")(own, honest + [bad], weights)["w"]
    assert (out[:5] - plain[:5]).abs().min() > 0.02


def test_validation_errors() -> None:
    own, honest, bad, weights, _, _ = _setup()
    agg = get_aggregator("median")
    with pytest.raises(ValueError, match="sum to 1"):
        agg(own, honest, [0.5] * 5)
    with pytest.raises(ValueError, match="expected 5 weights"):
        agg(own, honest, [0.5, 0.5])
    broken = dict(honest[0])
    broken["layer.weight"] = broken["layer.weight"][:, :3]
    with pytest.raises(ValueError, match="shape"):
        agg(own, [broken], [0.5, 0.5])
    with pytest.raises(ValueError, match="keys"):
        agg(own, [{"layer.weight": own["layer.weight"]}], [0.5, 0.5])
    with pytest.raises(ValueError, match="refine=True needs"):
        get_aggregator("safety_mask", refine=True)(own, honest, [0.2] * 5)


def test_safety_mask_refinement_removes_trigger_weights() -> None:
    """DAM-style refinement with the heuristic off: the neighbour that wired an unused input to a
    class (a trigger) is masked there, because a synthesised perturbation exposes it."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2, bias=False)
    own = {"weight": torch.tensor([[1.0, 0.0], [-1.0, 0.0]])}
    honest = {"weight": torch.tensor([[1.2, 0.0], [-1.2, 0.0]])}
    bad = {"weight": torch.tensor([[1.1, -4.0], [-1.1, 4.0]])}
    x = torch.randn(128, 2)
    x[:, 1] = 0.0  # clean data never uses input 1: the entropy term alone cannot see the trigger
    ctx = AggregationContext(model=model, data=[(x, torch.zeros(128, dtype=torch.long))], seed=0)
    agg = get_aggregator("safety_mask", criteria=(), refine=True, refine_steps=30, adv_eps=1.0, keep_weight=0.1)
    out = agg(own, [honest, bad], [1 / 3] * 3, ctx)["weight"]
    before = model.weight.detach().clone()
    assert out[:, 1].abs().max() < 0.5, out  # plain mean would give +-4/3
    assert out[0, 0] > 1.0  # the honest signal on input 0 is kept
    assert torch.equal(model.weight.detach(), before)  # the reference model is not modified


def test_defences_plug_into_merge_states_with_real_models() -> None:
    """Through the real DIMAT path (activation alignment, BN reset): a permuted copy of own plus a
    wildly perturbed neighbour; the robust merge stays with own, the plain merge does not."""
    from dimat.merge import merge_states
    from dimat.models import build_model

    torch.manual_seed(0)
    ref = build_model("cnn1d", num_classes=4, channels=(8, 8), input_shape=(1, 20))
    data = [torch.randn(32, 1, 20) for _ in range(2)]
    own_state = {k: v.clone() for k, v in ref.state_dict().items()}
    perm = torch.randperm(8)  # the same function with the first layer's channels reordered
    honest = dict(own_state)
    honest["conv.0.weight"] = own_state["conv.0.weight"][perm]
    for k in ("bn.0.weight", "bn.0.bias", "bn.0.running_mean", "bn.0.running_var"):
        honest[k] = own_state[k][perm]
    honest["conv.1.weight"] = own_state["conv.1.weight"][:, perm]
    bad = {k: v + 3.0 * torch.randn_like(v) if v.is_floating_point() else v for k, v in own_state.items()}
    weights = [0.4, 0.3, 0.3]
    x = torch.randn(64, 1, 20)
    # own with BN statistics recomputed on `data` (what any merge ends with): own merged with its own copy
    base = build_model("cnn1d", num_classes=4, channels=(8, 8), input_shape=(1, 20))
    base.load_state_dict(merge_states(ref, [honest], [0.5, 0.5], data, alignment="activation", bn_stats="own"))
    base.eval()
    with torch.no_grad():
        y_own = base(x)
    for name in ("median", "safety_mask", "multi_krum"):
        ctx = AggregationContext(model=ref, data=data, seed=0)
        agg = get_aggregator(name) if name != "safety_mask" else get_aggregator(name, refine=True, refine_steps=3)
        merged = merge_states(ref, [honest, bad], weights, data, alignment="activation", bn_stats="own", aggregator=agg, context=ctx)
        m = build_model("cnn1d", num_classes=4, channels=(8, 8), input_shape=(1, 20))
        m.load_state_dict(merged)
        m.eval()
        with torch.no_grad():
            agree = float((m(x).argmax(1) == y_own.argmax(1)).float().mean())
        assert agree > 0.9, f"{name}: prediction agreement with own {agree:.2f}"
    plain = merge_states(ref, [honest, bad], weights, data, alignment="activation", bn_stats="own")
    m.load_state_dict(plain)
    with torch.no_grad():
        assert float((m(x).argmax(1) == y_own.argmax(1)).float().mean()) < 0.9
