"""TorchDistTransport: real ``torchrun --standalone --nproc_per_node=4`` runs with gloo on CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dimat.transport.torchdist import (
    TorchDistTransport,
    _Layout,
    peers_for_rank,
    rank_of_peer,
    schema_hash,
    state_schema,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchdist_worker as worker  # noqa: E402

NPROC = 4


def torchrun_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # never inherit a parent's group
    return env


# ----------------------------------------------------------------------------- placement (no torchrun)


@pytest.mark.parametrize("n_peers,world", [(4, 4), (64, 4), (10, 4), (3, 4), (1, 1), (17, 5)])
def test_contiguous_blocks_cover_all_peers(n_peers: int, world: int) -> None:
    blocks = [list(peers_for_rank(r, world, n_peers)) for r in range(world)]
    assert sum(blocks, []) == list(range(n_peers))  # contiguous, ordered, disjoint, complete
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    for r, block in enumerate(blocks):
        for p in block:
            assert rank_of_peer(p, world, n_peers) == r


def test_placement_examples_and_errors() -> None:
    assert [list(peers_for_rank(r, 4, 64))[::15] for r in range(4)] == [[0, 15], [16, 31], [32, 47], [48, 63]]
    assert [list(peers_for_rank(r, 4, 10)) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="peer 10 out of range"):
        rank_of_peer(10, 4, 10)
    with pytest.raises(ValueError, match="rank 4 out of range"):
        peers_for_rank(4, 4, 10)


def test_layout_round_trip_is_bit_exact() -> None:
    state = worker.make_state(3, 1)
    layout = _Layout.of(state_schema(state))
    assert layout.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    back = layout.unpack(layout.pack(state, torch.device("cpu")), list(state))
    assert list(back) == list(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k


def test_schema_hash_sees_shape_dtype_and_name() -> None:
    s = worker.make_state(0, 0)
    h = schema_hash(state_schema(s))
    assert h == schema_hash(state_schema(dict(reversed(list(s.items())))))  # key order is irrelevant
    assert h != schema_hash(state_schema(worker.make_state(0, 0, wide=True)))
    assert h != schema_hash(state_schema(s | {"half": s["half"].float()}))
    assert h != schema_hash(state_schema({("x" + k): v for k, v in s.items()}))


def test_needs_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        TorchDistTransport(n_peers=4)


# ----------------------------------------------------------------------------- real torchrun


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torchdist")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={NPROC}",
        str(Path(__file__).resolve().parent / "torchdist_worker.py"), str(out),
    ]
    proc = subprocess.run(cmd, env=torchrun_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert sorted(p.name for p in out.glob("done.rank*")) == [f"done.rank{r}" for r in range(NPROC)]
    return out


@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_exchange_delivers_exact_states(torchrun_results: Path, name: str) -> None:
    n, rounds, edges = worker.SCENARIOS[name]
    expected_keys: set[str] = set()
    for r in range(rounds):
        ins = worker.invert(edges(n, r), n)
        for q in range(n):
            for p in ins[q]:
                expected_keys |= {f"{r}/{q}/{p}/{k}" for k in worker.make_state(p, r)}
    seen: set[str] = set()
    for rank in range(NPROC):
        meta = json.loads((torchrun_results / f"{name}.rank{rank}.json").read_text())
        assert meta["local_peers"] == list(peers_for_rank(rank, NPROC, n))
        got = load_file(str(torchrun_results / f"{name}.rank{rank}.safetensors"))
        for key, tensor in got.items():
            r, q, p, entry = key.split("/", 3)
            assert int(q) in meta["local_peers"], f"{key} delivered to rank {rank}, which does not host {q}"
            want = worker.make_state(int(p), int(r))[entry]
            assert tensor.dtype == want.dtype and tensor.shape == want.shape, key
            assert torch.equal(tensor, want), key
        assert not (seen & got.keys())
        seen |= got.keys()
    assert seen == expected_keys


def test_time_varying_topology_changes_neighbours(torchrun_results: Path) -> None:
    # the tv8 scenario really had different senders per round (peer 0 hears 7, 6, 4)
    got = load_file(str(torchrun_results / "tv8.rank0.safetensors"))
    senders = {r: sorted({int(k.split("/")[2]) for k in got if k.startswith(f"{r}/0/")}) for r in range(3)}
    assert senders == {0: [7], 1: [6], 2: [4]}


def test_mismatches_raise_on_every_rank_and_group_survives(torchrun_results: Path) -> None:
    for rank in range(NPROC):
        rep = json.loads((torchrun_results / f"mismatch.rank{rank}.json").read_text())
        assert rep["schema"].startswith("TransportError") and "schema mismatch" in rep["schema"], rep
        assert "rank 2" in rep["schema"]
        assert rep["topology"].startswith("TransportError") and "neighbour maps disagree" in rep["topology"], rep
        if rank == 3:
            assert rep["foreign"].startswith("ValueError") and "does not host" in rep["foreign"], rep
        else:
            assert rep["foreign"].startswith("TransportError") and "ranks [3]" in rep["foreign"], rep
        assert rep["after"] == "ok" and rep["after_equal"] is True, rep
