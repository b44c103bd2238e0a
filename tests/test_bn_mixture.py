"""BatchNorm statistics by gossip (merge.bn_stats=mixture): the statistics of the federation's data."""
from __future__ import annotations

import pytest
import torch

from dimat.align.batchnorm import bn_moments, bn_names, moments_into_state
from dimat.align.permute import permute_state
from dimat.align.spec import get_spec, random_permutations
from dimat.config import ConfigError, RunConfig
from dimat.entry import compose
from dimat.merge import merge_states
from helpers_models import small_model


def _peer_batches(k: int, n_batches: int = 3, bs: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    # each peer's data has its own distribution (label skew shows up as shifted activations)
    return [torch.randn(bs, 1, 40, generator=g) * (1 + k) + 2.0 * k for _ in range(n_batches)]


def _sent(model, batches) -> dict[str, torch.Tensor]:
    """A peer's state whose BN buffers are the exact moments of its own data for this model."""
    return moments_into_state(model.state_dict(), bn_moments(model, batches))


def _assert_pooled(merged, model, pooled) -> None:
    ref = bn_moments(model, pooled)
    assert ref
    for name in bn_names(model):
        mean, sq, _ = ref[name]
        torch.testing.assert_close(merged[f"{name}.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged[f"{name}.running_var"].double(), sq - mean**2, rtol=1e-5, atol=1e-5)


def test_bn_mixture_equals_pooled_statistics_when_every_peer_uses_the_same_model() -> None:
    model = small_model("cnn1d", 0)
    data = [_peer_batches(k) for k in range(3)]
    model.load_state_dict(_sent(model, data[0]))
    states = [_sent(model, data[k]) for k in (1, 2)]
    merged = merge_states(model, states, [1 / 3] * 3, data[0], alignment=None, bn_stats="mixture")
    _assert_pooled(merged, model, [b for d in data for b in d])
    # averaging the variances misses the spread between the peers' means; recomputing sees own data only
    name = bn_names(model)[0]
    pooled_var = merged[f"{name}.running_var"]
    for other in ("average", "own"):
        got = merge_states(model, states, [1 / 3] * 3, data[0], alignment=None, bn_stats=other)
        assert not torch.allclose(got[f"{name}.running_var"], pooled_var, rtol=0.05), other


def test_unequal_weights_mix_as_unequal_shares_of_the_data() -> None:
    model = small_model("cnn1d", 0)
    data = [_peer_batches(0, n_batches=1), _peer_batches(1, n_batches=3)]  # 16 and 48 samples
    model.load_state_dict(_sent(model, data[0]))
    merged = merge_states(model, [_sent(model, data[1])], [0.25, 0.75], None, alignment=None, bn_stats="mixture")
    _assert_pooled(merged, model, data[0] + data[1])


def test_bn_statistics_are_aligned_with_the_weights_permutation() -> None:
    """Neighbours hold the same function in other unit orders; their statistics, measured in their own
    basis, are permuted with the weights, so the mixture is still the pooled statistics."""
    model = small_model("cnn1d", 0)
    spec = get_spec(model)
    data = [_peer_batches(k) for k in range(3)]
    model.load_state_dict(_sent(model, data[0]))
    states = []
    for k in (1, 2):
        other = small_model("cnn1d", 0)
        perms = random_permutations(spec, torch.Generator().manual_seed(k))
        other.load_state_dict(permute_state(model.state_dict(), spec, perms))
        states.append(_sent(other, data[k]))
    merged = merge_states(model, states, [1 / 3] * 3, data[0], alignment="weight", bn_stats="mixture")
    _assert_pooled(merged, model, [b for d in data for b in d])


def test_a_defence_aggregates_the_statistics_too() -> None:
    """The aggregator combines the moments: a median ignores one peer's poisoned statistics."""
    model = small_model("cnn1d", 0)
    data = [_peer_batches(0) for _ in range(4)]
    model.load_state_dict(_sent(model, data[0]))
    honest = [_sent(model, d) for d in data[1:]]
    name = bn_names(model)[0]
    poisoned = dict(honest[0])
    poisoned[f"{name}.running_mean"] = torch.full_like(poisoned[f"{name}.running_mean"], 1e6)
    merged = merge_states(model, [poisoned, *honest[1:]], [0.25] * 4, None, alignment=None,
                          bn_stats="mixture", aggregator="median")
    assert merged[f"{name}.running_mean"].abs().max() < 10


def test_old_reset_bn_key_is_one_clear_error() -> None:
    from dimat.config import plain

    saved = plain(compose([]))  # a config.yaml saved by an earlier release still has the old key
    saved["merge"]["reset_bn"] = True
    with pytest.raises(ConfigError, match="merge.reset_bn was replaced by merge.bn_stats"):
        RunConfig.from_config(saved)
    with pytest.raises(ConfigError, match="merge.bn_stats must be one of own, average, mixture"):
        RunConfig.from_config(compose(["merge.bn_stats=gossip"]))


# ---------------------------------------------------------------- the explicit public proxy set
def _federation(*overrides: str):
    from dimat.federation import build_federation

    return build_federation(compose(["num_peers=3", *overrides]))


def test_proxy_set_is_used_only_when_configured() -> None:
    off = _federation()
    assert off.info["shared_data"] is None
    for peer in off.peers.values():  # own data only: every alignment label is one of the peer's classes
        own = set(peer.y.tolist())
        assert {int(c) for _, y in peer.alignment_batches() for c in y} <= own
        assert len(own) < 10
    on = _federation("merge.proxy_samples=50")
    assert "public proxy set: 50" in on.info["shared_data"]
    batches = [on.peers[p].alignment_batches() for p in on.peers]
    labels = torch.cat([y for _, y in batches[0]])
    assert len(labels) == 50 and torch.bincount(labels, minlength=10).tolist() == [5] * 10  # class-balanced
    for other in batches[1:]:  # the same public set for every peer
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches[0], other))
    # the partition does not move when the proxy set is switched on
    assert all(torch.equal(off.peers[p].y, on.peers[p].y) for p in off.peers)


def test_proxy_set_larger_than_the_training_set_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="merge.proxy_samples=5000 exceeds the training set"):
        _federation("merge.proxy_samples=5000")


def test_a_run_with_the_proxy_set_says_so(tmp_path, capsys) -> None:
    import json

    from dimat.cli import main

    run_dir = tmp_path / "run"
    assert main(["simulate", "num_peers=3", "rounds=1", "local_steps=2", "merge.every_steps=null",
                 "merge.proxy_samples=30", "baseline=null", "progress=false", "checkpoint.enabled=false",
                 f"run_dir={run_dir}"]) == 0
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert "SHARED DATA: public proxy set: 30 training samples" in closing
    assert "public proxy set" in json.loads((run_dir / "summary.json").read_text())["data"]["shared_data"]


def test_old_keys_on_the_command_line_name_their_replacement() -> None:
    for override, replacement in (("merge.reset_bn=true", "merge.bn_stats"), ("transport.half=fp16", "exchange.compress")):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]} was replaced by {replacement}"):
            compose([override])
