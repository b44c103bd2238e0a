"""A hostile wire in front of a real transport, for tests/test_compression.py: peer 0's compressed
payloads are edited in flight, peer 1 must refuse them with one line and keep its model.

Run as a script (``python tests/compression_wire.py RANK PORT OUT CASE``) it is one gloo rank of a
two-peer federation on the torchdist transport; the result goes to ``OUT/rank<RANK>.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

TINY = ["merge=dimat", "data=digits", "model=mlp", "model.hidden=[16]", "rounds=2", "local_epochs=0.5", "num_peers=2",
        "progress=false", "threads=1", "topology=fully_connected", "merge.every_steps=null", "merge.keep_momentum=false",
        "merge.bn_stats=own", "baseline=null"]


def _scale_nan(s: dict) -> None:  # caught by the transport's own receive checks
    s["fc.0.weight#s"] = torch.full_like(s["fc.0.weight#s"], float("nan"))


def _index(s: dict) -> None:  # a well-formed payload whose sparse indices point past the tensor
    s["fc.0.weight#i"] = s["fc.0.weight#i"] + 1_000_000


def _meta(s: dict) -> None:
    s["_dimat.x.meta"] = torch.tensor([1, 7, 9, 0])


def _chunk(s: dict) -> None:  # a sign chunk whose int4 codes are -8 (never written by the encoder)
    s["fc.0.weight#q"] = torch.full_like(s["fc.0.weight#q"], 0x88)


#: case -> (exchange overrides, tamper, the refusal's reason)
CASES: dict[str, tuple[list[str], Callable[[dict], None], str]] = {
    "nan-scale": (["exchange.compress=int8"], _scale_nan, "tensor 'fc.0.weight#s' contains NaN"),
    "sparse-index": (["exchange.compress=topk"], _index, "tensor 'fc.0.weight': sparse index out of range [0, "),
    "metadata": (["exchange.compress=int8"], _meta, "malformed exchange metadata [1, 7, 9, 0]"),
    "sign-chunk": (["exchange.compress=sign"], _chunk, "tensor 'fc.0.weight': int4 code below -7"),
}


class TamperWire:
    """A real transport whose outgoing payloads from peer 0 pass through ``tamper`` first."""

    def __init__(self, inner: Any, tamper: Callable[[dict], None]) -> None:
        self.inner, self.tamper = inner, tamper

    def exchange(self, round_idx, states, in_neighbours, out_neighbours, timeout=None):
        states = {p: dict(s) for p, s in states.items()}
        if 0 in states:
            self.tamper(states[0])
        return self.inner.exchange(round_idx, states, in_neighbours, out_neighbours, timeout)


def federation(case: str, local: int):
    """Peer ``local``'s federation for ``case`` (its own process's share of the two peers)."""
    from dimat.config import RunConfig
    from dimat.entry import compose
    from dimat.federation.build import build_federation

    return build_federation(RunConfig.from_config(compose([*TINY, *CASES[case][0]])), local_ids=[local])


def one_exchange(fed: Any, transport: Any, case: str) -> dict:
    """Exchange 1 through the real round loop; what the local peer saw and whether its model moved."""
    from dimat.federation.rounds import RoundOutput, exchange_and_merge

    (pid,) = fed.peers
    before = {k: v.clone() for k, v in fed.peers[pid].state().items()}
    out = RoundOutput.empty(fed.peers)
    exchange_and_merge(fed, TamperWire(transport, CASES[case][1]), fed.topology_at(1), 1, out)
    after = fed.peers[pid].state()
    return {"peer": pid, "refused": {str(k): v for k, v in out.refused.get(pid, {}).items()}, "heard": out.heard[pid],
            "missing": out.missing[pid], "untouched": all(torch.equal(v, before[k]) for k, v in after.items())}


def gloo_rank(rank: int, port: int, out_dir: Path, case: str) -> None:
    import torch.distributed as dist

    from dimat.transport.torchdist import TorchDistTransport

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    fed = federation(case, rank)
    t = TorchDistTransport(n_peers=2)
    try:
        res = one_exchange(fed, t, case)
    finally:
        t.close()
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))


if __name__ == "__main__":
    gloo_rank(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
