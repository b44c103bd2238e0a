"""Worker run by tests/test_torchdist.py under ``torchrun --nproc_per_node=4`` (gloo, CPU).

Each scenario exchanges known, seeded states over a per-round topology and writes what every
rank received to ``OUT/<scenario>.rank<r>.safetensors`` (keys ``round/receiver/sender/name``)
and what happened to ``OUT/<scenario>.rank<r>.json``. The test recomputes the expected states
from :func:`make_state` and the same edge functions and compares bit for bit.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from dimat.topology import OnePeerExponential, RandomMatching, Topology, ring
from dimat.transport.base import TransportError
from dimat.transport.torchdist import TorchDistTransport

Edges = dict[int, list[int]]


def make_state(peer: int, round_idx: int, wide: bool = False) -> dict[str, torch.Tensor]:
    """A state with several dtypes, a scalar, a bool mask and a zero-size entry."""
    g = torch.Generator().manual_seed(1000 * round_idx + peer)
    return {
        "layer.weight": torch.randn(7 if wide else 6, 3, generator=g),
        "layer.bias": torch.randn(6, generator=g),
        "bn.running_var": torch.rand(6, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(100 * peer + round_idx, dtype=torch.int64),
        "half": torch.randn(4, generator=g).to(torch.float16),
        "bf": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.zeros(0, 3, dtype=torch.int32),
    }


def from_topology(topo: "Topology") -> Edges:
    return {i: sorted(topo.out_neighbours(i)) for i in range(topo.n)}


def ring_out(n: int, r: int) -> Edges:
    return from_topology(ring(n))


def one_peer_exponential_out(n: int, r: int) -> Edges:
    """Time-varying: round r sends to i + 2^(r mod log2 n); a different neighbour each round."""
    return from_topology(OnePeerExponential(n).at(r))


def random_matching_out(n: int, r: int) -> Edges:
    return from_topology(RandomMatching(n, seed=5).at(r))


def random_out(n: int, r: int) -> Edges:
    """Directed (asymmetric) random graph, 3 out-neighbours each, reseeded per round."""
    rng = random.Random(7919 * r + n)
    return {i: sorted(rng.sample([j for j in range(n) if j != i], 3)) for i in range(n)}


def invert(out: Edges, n: int) -> Edges:
    ins: Edges = {i: [] for i in range(n)}
    for p, qs in out.items():
        for q in qs:
            ins[q].append(p)
    return {q: sorted(ps) for q, ps in ins.items()}


# name -> (n_peers, rounds, out-edge function)
SCENARIOS: dict[str, tuple[int, int, Callable[[int, int], Edges]]] = {
    "ring4": (4, 2, ring_out),
    "tv8": (8, 3, one_peer_exponential_out),
    "many10": (10, 2, random_out),
    "match16": (16, 3, random_matching_out),
    "ring16": (16, 2, ring_out),
}


def run_scenario(out_dir: Path, name: str, transport: TorchDistTransport) -> None:
    n, rounds, edges = SCENARIOS[name]
    rank = transport.rank
    local = list(transport.local_peers)
    received: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        out = edges(n, r)
        ins = invert(out, n)
        states = {p: make_state(p, r) for p in local}
        got = transport.exchange(r, states, {p: ins[p] for p in local}, {p: out[p] for p in local}, timeout=30).received
        for q, by_sender in got.items():
            for p, state in by_sender.items():
                for key, t in state.items():
                    received[f"{r}/{q}/{p}/{key}"] = t.contiguous()
    save_file(received, str(out_dir / f"{name}.rank{rank}.safetensors"))
    (out_dir / f"{name}.rank{rank}.json").write_text(json.dumps({"local_peers": local, "bytes": transport.last_bytes_sent}))


def run_mismatches(out_dir: Path, transport: TorchDistTransport) -> None:
    """Schema and topology disagreements must raise on every rank and leave the group usable."""
    n = transport.n_peers
    rank = transport.rank
    local = list(transport.local_peers)
    out, report = ring_out(n, 0), {}
    ins = invert(out, n)
    ins_l, out_l = {p: ins[p] for p in local}, {p: out[p] for p in local}

    def attempt(label: str, states, in_map, out_map) -> None:
        try:
            transport.exchange(10, states, in_map, out_map, timeout=30)
            report[label] = "ok"
        except TransportError as exc:
            report[label] = f"TransportError: {exc}"
        except ValueError as exc:
            report[label] = f"ValueError: {exc}"

    # rank 2's model has a wider layer: a schema mismatch, detected before any payload moves
    attempt("schema", {p: make_state(p, 0, wide=(rank == 2)) for p in local}, ins_l, out_l)
    # rank 1 thinks its peer also feeds peer n-1 (an edge nobody else expects)
    bad_out = {p: (out[p] + [(p + 2) % n] if rank == 1 else out[p]) for p in local}
    attempt("topology", {p: make_state(p, 0) for p in local}, ins_l, bad_out)
    # rank 3 names a peer it does not host
    bad_states = {p: make_state(p, 0) for p in local} | ({0: make_state(0, 0)} if rank == 3 else {})
    attempt("foreign", bad_states, ins_l, out_l)
    # after all that, a good exchange still works
    got = None
    try:
        got = transport.exchange(11, {p: make_state(p, 11) for p in local}, ins_l, out_l, timeout=30).received
        report["after"] = "ok"
        report["after_equal"] = all(
            all(torch.equal(t, make_state(s, 11)[k]) for k, t in st.items())
            for by in got.values()
            for s, st in by.items()
        )
    except Exception as exc:  # recorded for the test to show
        report["after"] = f"{type(exc).__name__}: {exc}"
    (out_dir / f"mismatch.rank{rank}.json").write_text(json.dumps(report))


def main() -> None:
    out_dir = Path(sys.argv[1])
    names = sys.argv[2:] or list(SCENARIOS)
    first = TorchDistTransport(n_peers=SCENARIOS[names[0]][0])  # initialises the group from torchrun's env
    assert first.backend == "gloo", first.backend
    transports = [first]
    for name in names:
        t = first if SCENARIOS[name][0] == first.n_peers else TorchDistTransport(n_peers=SCENARIOS[name][0])
        transports.append(t)
        run_scenario(out_dir, name, t)
    run_mismatches(out_dir, TorchDistTransport(n_peers=4))
    for t in reversed(transports):  # the first owns the group and destroys it last
        t.close()
    assert not torch.distributed.is_initialized()
    (out_dir / f"done.rank{int(os.environ['RANK'])}").write_text("ok")


if __name__ == "__main__":
    main()
