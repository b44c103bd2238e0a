"""What a round holds per peer: no gradients between rounds, sent states copied only when they must be."""
from __future__ import annotations

import torch

from dimat.federation import build_federation
from dimat.federation.rounds import RoundOutput, exchange_and_merge
from dimat.federation.sent_states import SentStates
from dimat.transport.inproc import InProcTransport
from tests.test_federation import compose

RING = ["num_peers=6", "partition=iid", "model=cnn1d", "model.width=0.25", "merge=dimat"]


def _trained(*overrides: str):
    fed = build_federation(compose(*RING, *overrides))
    for p in fed.peers.values():
        p.train(steps=2)
    return fed


def test_a_peer_holds_no_gradients_between_rounds() -> None:
    fed = _trained()
    assert all(q.grad is None for p in fed.peers.values() for q in p.model.parameters())


def test_live_sent_states_merge_exactly_like_copies_and_are_released() -> None:
    live, copied = _trained(), _trained()
    topo = live.topology_at(1)
    out = RoundOutput.empty(live.peers)
    exchange_and_merge(live, InProcTransport(share_states=True), topo, 1, out)

    # the reference: every peer's state copied before anyone merges (what a remote transport sends)
    sent = SentStates(copied.peers, copied.method.payload, live=False)
    nb = {p: list(topo.in_neighbours(p)) for p in copied.peers}
    got = InProcTransport().exchange(1, sent.states, nb, {p: list(topo.out_neighbours(p)) for p in copied.peers}).received
    before = {q: {p: {k: v.clone() for k, v in s.items()} for p, s in g.items()} for q, g in got.items()}
    for pid, peer in copied.peers.items():
        copied.method.merge(peer, got[pid], topo.weights_for(pid))
    for q, g in got.items():  # merging never writes into a received state
        assert all(torch.equal(g[p][k], before[q][p][k]) for p in g for k in g[p])
    for pid in live.peers:
        a, b = live.peers[pid].model.state_dict(), copied.peers[pid].model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), pid
        assert out.heard[pid] == sorted(got[pid])


def test_a_sent_state_is_copied_only_while_an_unmerged_receiver_holds_it() -> None:
    fed = _trained()
    topo = fed.topology_at(1)
    sent = SentStates(fed.peers, fed.method.payload, live=True)
    model0 = fed.peers[0].model.state_dict()
    assert all(sent.states[0][k].data_ptr() == model0[k].data_ptr() for k in model0)  # no copy up front
    nb = {p: list(topo.in_neighbours(p)) for p in fed.peers}
    got = InProcTransport(share_states=True).exchange(1, sent.states, nb,
                                                      {p: list(topo.out_neighbours(p)) for p in fed.peers}).received
    sent.delivered(got)
    sent.before_merge(0)  # peers 1 and 5 still need peer 0's state as it was
    assert all(sent.states[0][k].data_ptr() != model0[k].data_ptr() for k in model0)
    assert got[1][0] is sent.states[0]
    for q in (1, 5):
        sent.after_merge(got[q])
    assert sent.states[0] is None  # its last reader merged: released


def test_generated_data_grows_with_the_federation_and_the_test_set_does_not() -> None:
    import pytest

    from dimat.config import ConfigError, RunConfig
    from dimat.federation.build import load_data

    small = load_data(RunConfig.from_config(compose("num_peers=5")))
    big = load_data(RunConfig.from_config(compose("num_peers=130")))  # 130 x 40 = 5,200 > 4,000
    assert len(small.train) == 4000 and len(big.train) == 130 * 40
    assert len(big.test) == len(small.test) == 1000
    with pytest.raises(ConfigError, match="has a fixed size"):
        load_data(RunConfig.from_config(compose("data=digits", "+data.samples_per_peer=40")))


def test_delivery_is_exact_only_when_receivers_hold_the_sent_states() -> None:
    fed = _trained()
    topo = fed.topology_at(1)
    nb = {p: list(topo.in_neighbours(p)) for p in fed.peers}
    out_nb = {p: list(topo.out_neighbours(p)) for p in fed.peers}
    sent = SentStates(fed.peers, fed.method.payload, live=True)
    got = InProcTransport(share_states=True).exchange(1, sent.states, nb, out_nb).received
    sent.delivered(got)
    assert sent.exact
    copied = SentStates(fed.peers, fed.method.payload, live=True)
    got = InProcTransport().exchange(1, copied.states, nb, out_nb).received  # private copies: the contract's default
    copied.delivered(got)
    assert not copied.exact
