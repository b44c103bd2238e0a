"""Basis tags: peers converge to one unit ordering (dimat.merge.basis), on real models and runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dimat.align.permute import apply_permutation
from dimat.align.spec import get_spec
from dimat.federation import simulate
from dimat.merge import BASIS_KEY, attach_basis, merge_states, split_basis
from dimat.merge.basis import plan_rebase
from dimat.models import build_model
from dimat.entry import default_method, default_train_config
from dimat.peer import Peer

from test_federation import compose


def _data(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=4, input_dim=12, hidden=(16, 16))


def _permuted_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    spec = get_spec(model)
    g = torch.Generator().manual_seed(seed)
    return apply_permutation(model, {grp.name: torch.randperm(grp.size, generator=g) for grp in spec.groups}, spec)


def test_attach_split_round_trip_and_bad_tags() -> None:
    state = {"w": torch.ones(2)}
    tagged = attach_basis(state, 3)
    assert BASIS_KEY not in state and tagged[BASIS_KEY].dtype == torch.int64
    back, tag = split_basis(tagged)
    assert tag == 3 and set(back) == {"w"}
    assert split_basis(state) == (state, None)
    for bad in (torch.tensor(-1), torch.tensor(2.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=f"'{BASIS_KEY}' must be a non-negative int64 scalar"):
            split_basis({"w": torch.ones(2), BASIS_KEY: bad}, label="state from peer 7")
    with pytest.raises(ValueError, match="already has"):
        attach_basis(tagged, 1)


def test_plan_rebase() -> None:
    assert plan_rebase(2, [2, 5]) == ([True, False], None, 2)       # nobody lower: stay
    assert plan_rebase(2, [1, 0, None]) == ([False, False, False], 1, 0)  # lowest tag wins
    assert plan_rebase(0, [None]) == ([False], None, 0)             # untagged: always matched


def test_merge_relabels_into_the_neighbours_basis_exactly() -> None:
    ref = _mlp(0)
    nb = _permuted_copy(ref, seed=1)  # the same function in another basis
    data = [_data()]
    own = merge_states(ref, [nb.state_dict()], [0.5, 0.5], data, alignment="activation", bn_stats="average")
    into = merge_states(ref, [nb.state_dict()], [0.5, 0.5], data, alignment="activation", bn_stats="average", into=0)
    for k, v in ref.state_dict().items():
        assert torch.allclose(own[k], v, atol=1e-6), k                     # aligned: the average is ref itself
        assert torch.allclose(into[k], nb.state_dict()[k], atol=1e-6), k  # relabelled: nb's ordering


def test_same_basis_is_not_rematched() -> None:
    ref = _mlp(0)
    nb = _permuted_copy(ref, seed=1)
    merged = merge_states(ref, [nb.state_dict()], [0.5, 0.5], [_data()], alignment="activation", bn_stats="average",
                          same_basis=[True])
    for k, v in ref.state_dict().items():
        assert torch.allclose(merged[k], 0.5 * v + 0.5 * nb.state_dict()[k], atol=1e-6), k
    with pytest.raises(ValueError, match="same_basis has 2 entries for 1"):
        merge_states(ref, [nb.state_dict()], [0.5, 0.5], [_data()], alignment="activation", bn_stats="own", same_basis=[True, False])


def test_peer_adopts_the_lowest_basis_and_rejects_a_bad_tag() -> None:
    cfg = default_train_config(batch_size=32, lr=0.05, align_batches=2)
    a = Peer(2, _mlp(2), _data(), config=cfg)
    b = Peer(1, _mlp(1), _data(seed=1), config=cfg)
    dimat = default_method("dimat")
    assert (a.basis, b.basis) == (2, 1)
    before = a.state()
    with pytest.raises(ValueError, match="state from peer 1"):
        dimat.merge(a, {1: {**b.state(), BASIS_KEY: torch.tensor(-3)}}, {2: 0.5, 1: 0.5})
    assert all(torch.equal(v, before[k]) for k, v in a.state().items())  # untouched
    dimat.merge(a, {1: b.shared_state()}, {2: 0.5, 1: 0.5})
    assert a.basis == 1 and a.checkpoint()["basis"] == 1
    off = Peer(2, _mlp(2), _data(), config=cfg)
    default_method("dimat", consensus_basis=False).merge(off, {1: b.shared_state()}, {2: 0.5, 1: 0.5})
    assert off.basis == 2


def _last_consensus(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["rounds"][-1]["consensus"]


def test_ring_reaches_one_basis_and_consensus(tmp_path: Path) -> None:
    # 5 peers on a ring (diameter 2), different inits: after round 1 the tags are {0, 0, 1, 2, 0},
    # after round 2 every peer is in peer 0's basis; without tags every peer keeps its own.
    simulate(compose("rounds=1", "merge=dimat"), tmp_path / "r1")
    tags = {p: torch.load(tmp_path / "r1" / "checkpoints" / f"peer_{p:03d}" / "round_0001.pt",
                          weights_only=True)["basis"] for p in range(5)}
    assert tags == {0: 0, 1: 0, 2: 1, 3: 2, 4: 0}
    simulate(compose("rounds=4", "merge=dimat"), tmp_path / "on")
    simulate(compose("rounds=4", "merge=dimat", "merge.consensus_basis=false"), tmp_path / "off")
    for p in range(5):
        on = torch.load(tmp_path / "on" / "checkpoints" / f"peer_{p:03d}" / "round_0004.pt", weights_only=True)
        off = torch.load(tmp_path / "off" / "checkpoints" / f"peer_{p:03d}" / "round_0004.pt", weights_only=True)
        assert (on["basis"], off["basis"]) == (0, p)
    # one basis lets the peers actually agree; own bases keep them apart in weight space
    assert _last_consensus(tmp_path / "on") < 0.5 * _last_consensus(tmp_path / "off")


def test_consensus_basis_setting() -> None:
    from dimat.federation import ConfigError, build_federation

    assert build_federation(compose()).method.consensus_basis  # auto + mean
    # auto + a defence: no neighbour may become everyone's alignment anchor
    assert not build_federation(compose("merge.aggregator=multi_krum")).method.consensus_basis
    assert build_federation(compose("merge.aggregator=multi_krum", "merge.consensus_basis=true")).method.consensus_basis
    with pytest.raises(ConfigError, match="merge.consensus_basis must be true, false or auto"):
        build_federation(compose("merge.consensus_basis=maybe"))


def test_a_fetched_state_brings_its_basis() -> None:
    # a rejoining peer loads a neighbour's state (dimat.grpc_peer): it must adopt that state's basis
    cfg = default_train_config(batch_size=32, lr=0.05, align_batches=2)
    late = Peer(3, _mlp(3), _data(), config=cfg)
    src = Peer(1, _mlp(1), _data(seed=1), config=cfg)
    src.basis = 0
    late.load_state(src.shared_state())
    assert late.basis == 0
    assert all(torch.equal(v, src.state()[k]) for k, v in late.state().items())
    late.load_state(src.state())  # an untagged state leaves the tag alone
    assert late.basis == 0


def _tagged_peer(pid: int, model: torch.nn.Module, rebase: str) -> Peer:
    cfg = default_train_config(batch_size=32, lr=0.05, weight_decay=0.0, align_batches=2)
    return Peer(pid, model, _data(seed=pid), config=cfg, seed=pid)


def _dimat(rebase: str, keep_momentum: bool = False):
    return default_method("dimat", bn_stats="average", rebase=rebase, keep_momentum=keep_momentum)


def test_rebase_before_relabels_the_own_model_then_averages_only_its_new_basis() -> None:
    """merge.rebase=before: the own model joins the lowest neighbour's basis by a pure relabelling
    (its function and its next step unchanged), and only neighbours already in that basis are averaged."""
    x = _data(64, seed=9)[0]
    own = _tagged_peer(2, _mlp(2), "before")
    own.train(steps=2)  # momentum to carry along
    before_out = own.model(x).detach()
    low = attach_basis(_mlp(0).state_dict(), 0)
    other = attach_basis(_mlp(1).state_dict(), 1)
    # weight 0 on the low neighbour: the merge result is the relabelled own model itself
    _dimat("before", keep_momentum=True).merge(own, {0: low, 1: other}, {2: 0.5, 0: 0.0, 1: 0.5})
    assert own.basis == 0
    torch.testing.assert_close(own.model(x).detach(), before_out, rtol=1e-5, atol=1e-5)  # the tag-1 state was left out
    twin = _tagged_peer(2, _mlp(2), "after")
    twin.train(steps=2)
    twin_perm = {g: p for g, p in own_perms(own, twin).items()}
    twin.permute_units(twin_perm)
    for p_own, p_twin in zip(own.model.parameters(), twin.model.parameters()):
        torch.testing.assert_close(p_own, p_twin)
    own.train_steps(1)
    twin.train_steps(1)  # the same data order and, permuted, the same momentum: the same step
    torch.testing.assert_close(own.model(x).detach(), twin.model(x).detach(), rtol=1e-4, atol=1e-5)
    # with weight on the low neighbour the result is the average of the relabelled model and it
    second = _tagged_peer(2, _mlp(2), "before")
    merged = _dimat("before").merge(second, {0: low, 1: other}, {2: 0.5, 0: 0.5, 1: 0.5})
    relabelled = _tagged_peer(2, _mlp(2), "before")
    _dimat("before").merge(relabelled, {0: low}, {2: 1.0, 0: 0.0})
    for k, v in low.items():
        if k != BASIS_KEY:
            torch.testing.assert_close(merged[k], (relabelled.model.state_dict()[k] + v) / 2)


def own_perms(relabelled: Peer, original: Peer) -> dict[str, torch.Tensor]:
    """The permutation that maps ``original``'s units onto ``relabelled``'s (exact: same weights, other order)."""
    from dimat.align import weight_matching

    return weight_matching(relabelled.model.state_dict(), original.model.state_dict(), get_spec(relabelled.model))
