"""A restarted ``dimat peer`` catching up (issue 23, finding 3), in-process with real gRPC on 127.0.0.1.

The neighbour is a real :class:`GrpcTransport` that is already in the run's last round and serves its
final state; the peer that rejoins is built by the same code as ``dimat peer`` (``build_federation``,
``build_transport``, :func:`dimat.grpc_peer.rejoin`, ``run_rounds``).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimat.config import RunConfig
from dimat.entry import compose
from dimat.federation import Checkpointer, build_federation, run_rounds
from dimat.federation.rounds import exchanges_per_round
from dimat.grpc_peer import rejoin
from dimat.transport import build_transport
from dimat.transport.wire import OutgoingPayload
from test_grpc_transport import grpc_transport

pytestmark = pytest.mark.integration  # real gRPC servers

ROUNDS = 3
OVERRIDES = ["data=digits", "model=mlp", "model.hidden=[16]", f"rounds={ROUNDS}", "local_epochs=0.25", "num_peers=2",
             "merge.every_steps=null", "topology=fully_connected", "progress=false", "threads=1",
             "transport.heartbeat_interval=null",
             "transport.timeout=10", "checkpoint.keep_last=5"]


def test_a_peer_that_rejoins_after_its_neighbours_finished_completes_its_own_rounds(tmp_path: Path) -> None:
    """Peer 1 finished round 1 and was down while peer 0 ran to the last round. Before, it fetched
    peer 0's final state, recorded it as its checkpoint of round 3 and stopped without rounds 2-3
    (data lost). Now it says so in one line and completes rounds 2-3 itself from its own checkpoint."""
    run = RunConfig.from_config(compose([*OVERRIDES, f"run_dir={tmp_path}"], transport="grpc"))
    fed = build_federation(run, local_ids=[1])
    ck = Checkpointer(tmp_path, keep_last=5, tag="peer_1")
    ck.save(1, fed.peers)  # its last finished round before it went down
    state = fed.peers[1].shared_state()
    neighbour = grpc_transport(0, {0: "127.0.0.1:0", 1: "127.0.0.1:1"}, heartbeat_interval=None, schema=state)
    me = build_transport(run.transport, peer_id=1, peers={0: neighbour.address, 1: "127.0.0.1:0"})
    neighbour.set_peers({1: me.address})
    lines: list[str] = []
    try:
        last = ROUNDS * exchanges_per_round(fed)  # the transport counts exchanges, not rounds
        neighbour.begin_round(last, [1])  # peer 0 is in the last round and serves its final state
        neighbour.latest = (last, OutgoingPayload(state))
        me.set_schema(state)
        (tmp_path / "peer_1").mkdir()
        resume = rejoin(fed, me, [0], tmp_path, "peer_1", echo=lines.append)
        assert resume is True and ck.last_round() == 1, lines  # it did not jump to round 3
        said = [line for line in lines if "rejoin:" in line]
        assert said == [f"[peer 1] rejoin: neighbours finished the run (round {ROUNDS} of {ROUNDS}); completing "
                        f"rounds 2..{ROUNDS} without them from own checkpoint (round 1)"], lines
        summary = run_rounds(fed, me, tmp_path, resume=True, process_tag="peer_1", progress=False, echo=lines.append)
    finally:
        me.close(grace=0)
        neighbour.close(grace=0)
    assert summary["rounds_done"] == ROUNDS
    logged = [json.loads(x)["round"] for x in (tmp_path / "peer_1" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 3] and ck.last_round() == ROUNDS
    record = json.loads((tmp_path / "peer_1" / "rejoins.jsonl").read_text().splitlines()[-1])
    assert record["fetched_round"] is None and record["completed_alone_from"] == 1
