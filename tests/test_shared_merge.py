"""A merge whose inputs and weights are the same for several peers is computed once, and equals the per-peer merge."""
from __future__ import annotations

import pytest
import torch

from dimat.federation import build_federation
from dimat.federation.shared_merge import SharedMerges, row_key
from dimat.topology.membership import renormalise
from dimat.transport.inproc import InProcTransport
from tests.test_federation import compose


def _trained(*overrides: str):
    fed = build_federation(compose("num_peers=6", "partition=iid", *overrides))
    for p in fed.peers.values():
        p.train(steps=2)
    return fed


def _exchange(fed):
    topo = fed.topology_at(1)
    states = {pid: p.shared_state() for pid, p in fed.peers.items()}
    nb = {pid: list(topo.in_neighbours(pid)) for pid in fed.peers}
    got = InProcTransport().exchange(1, states, nb, {pid: list(topo.out_neighbours(pid)) for pid in fed.peers}).received
    return topo, got


def _merge_all(fed, topo, got, shared):
    return {pid: fed.method.merge(p, got[pid], topo.weights_for(pid), shared=shared) for pid, p in fed.peers.items()}


@pytest.mark.parametrize("model", [["model=mlp"], ["model=cnn1d", "model.width=0.25", "merge.bn_stats=own"],
                                   ["model=cnn1d", "model.width=0.25", "merge.bn_stats=mixture"]],
                         ids=["mlp", "cnn1d-bn-own", "cnn1d-bn-mixture"])
def test_fully_connected_average_is_computed_once_and_equals_each_peers_own(model: list[str]) -> None:
    over = ["topology=fully_connected", "merge=average", *model]
    fed_shared, fed_own = _trained(*over), _trained(*over)
    topo, got = _exchange(fed_shared)
    shared = SharedMerges(row_key(renormalise(topo.weights_for(p), got[p], self_id=p)) for p in fed_shared.peers)
    merged = _merge_all(fed_shared, topo, got, shared)
    assert (shared.computed, shared.reused) == (1, 5) and not shared._kept  # freed after its last user
    topo, got = _exchange(fed_own)
    reference = _merge_all(fed_own, topo, got, None)
    for pid in merged:
        for k, v in reference[pid].items():
            torch.testing.assert_close(merged[pid][k], v, rtol=1e-5, atol=1e-6, msg=f"peer {pid} {k}")
        loaded = fed_shared.peers[pid].model.state_dict()
        assert all(torch.equal(loaded[k], merged[pid][k]) for k in merged[pid])
    # BatchNorm is reset per peer on its own data, so with BN the peers' buffers differ after the shared average
    if "merge.bn_stats=own" in model:
        a, b = merged[0]["bn.0.running_mean"], merged[1]["bn.0.running_mean"]
        assert not torch.allclose(a, b)
        assert torch.equal(merged[0]["conv.0.weight"], merged[1]["conv.0.weight"])


def test_a_ring_shares_nothing_and_keeps_nothing() -> None:
    fed = _trained("topology=ring", "merge=average")
    topo, got = _exchange(fed)
    shared = SharedMerges(row_key(renormalise(topo.weights_for(p), got[p], self_id=p)) for p in fed.peers)
    _merge_all(fed, topo, got, shared)
    assert (shared.computed, shared.reused) == (6, 0) and not shared._kept


def test_alignment_and_defences_are_never_shared() -> None:
    from dimat.methods.aligned import is_plain_average as applies

    assert applies(None, None, None, None)
    assert applies(None, "activation", [True, True], None)  # one basis already: a plain mean
    assert not applies(None, "activation", [True, False], None)  # someone must be matched
    assert not applies(None, "activation", None, None)  # no basis tags: every neighbour matched
    assert not applies(None, "activation", [True], 0)  # relabelled into another basis
    assert not applies(object(), None, None, None)  # a robust aggregator


def test_no_reuse_when_peers_received_copies() -> None:
    # a remote or compressing transport: each receiver holds its own decoded copy, so one peer's
    # average (own live model + the others' copies) is not another's; each computes its own
    fed = _trained("topology=fully_connected", "merge=average", "model=mlp")
    topo, got = _exchange(fed)
    got = {q: {p: {k: v.clone() for k, v in s.items()} for p, s in g.items()} for q, g in got.items()}
    shared = SharedMerges((row_key(renormalise(topo.weights_for(p), got[p], self_id=p)) for p in fed.peers),
                          reuse=False)
    _merge_all(fed, topo, got, shared)
    assert (shared.computed, shared.reused) == (6, 0) and not shared._kept
