"""Faults with real peer processes: SIGKILL and rejoin, stragglers, kills during checkpoint writes."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("grpc_local", ROOT / "launch" / "grpc_local.py")
grpc_local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grpc_local)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DIMAT_TOKEN"] = "fault-test-token"
    return env


def Federation(run_dir: Path, n: int, overrides: list[str]):
    return grpc_local.LocalFederation(run_dir, n, overrides, env=_env())


FAST = ["experiment=mnist1d_fast", "progress=false", "transport.heartbeat_interval=0.3",
        "transport.max_missed_heartbeats=3"]


@pytest.mark.slow
def test_sigkill_one_of_five_then_rejoin(tmp_path):
    rounds = 16
    # every peer pauses 0.5 s per round so the federation is still running when peer 2 restarts
    fed = Federation(tmp_path, 5, [*FAST, f"rounds={rounds}", "transport.timeout=20", "transport.delay=0.5"])
    try:
        for k in range(5):
            fed.start(k)
        fed.wait_log(2, r"round +2/", timeout=120)
        fed.procs[2].send_signal(signal.SIGKILL)  # mid-run, no goodbye
        fed.procs[2].wait()
        fed.wait_log(1, r"peer 2 is down", timeout=60)  # heartbeats noticed; the others keep going
        fed.start(2, resume=True)
        codes = fed.wait_all(timeout=240)
        assert codes == {k: 0 for k in range(5)}, fed.logs_text()
    finally:
        fed.stop()
    for k in (0, 1, 3, 4):  # the survivors finished every round
        assert [r["round"] for r in fed.metrics(k)] == list(range(1, rounds + 1)), (k, fed.logs_text())
    # ring neighbours of 2 (1 and 3) went on without it for at least one round
    assert any(2 in rec["missing"] or 2 in rec["send_failed"] for rec in fed.transport_log(1) + fed.transport_log(3))
    # ... and the per-round metrics say who was missing when they merged without it
    assert any(2 in r["missing"] for r in fed.metrics(1) + fed.metrics(3))
    # the restarted peer rejoined, caught up, and finished the last round with its neighbours
    done = [r["round"] for r in fed.metrics(2)]
    assert done[-1] == rounds and done == sorted(done), done
    log2 = fed.logs[2].read_text()
    assert "rejoin:" in log2, log2[-3000:]
    rejoined_at = json.loads((tmp_path / "peer_2" / "rejoins.jsonl").read_text().splitlines()[-1])["fetched_round"]
    after = [r for r in fed.metrics(2) if r["round"] > rejoined_at]
    assert after and any(r["neighbours"] for r in after), after  # it merges with its neighbours again
    # every checkpoint on disk is complete
    for p in (tmp_path / "checkpoints").rglob("round_*.pt"):
        torch.load(p, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_straggler_does_not_hold_the_federation(tmp_path):
    timeout = 3.0
    fed = Federation(tmp_path, 3, [*FAST, "rounds=2", "topology=fully_connected", f"transport.timeout={timeout}"])
    try:
        fed.start(0)
        fed.start(1)
        fed.start(2, extra=("transport.delay=12",))  # ~10x a normal round on this data
        codes = fed.wait_all(timeout=240)
        assert codes == {0: 0, 1: 0, 2: 0}, fed.logs_text()
    finally:
        fed.stop()
    for k in (0, 1):
        for rec in fed.transport_log(k):
            assert rec["seconds"] < timeout + 2.0, rec  # the exchange is bounded by the deadline
        assert any(rec["missing"] == [2] for rec in fed.transport_log(k)), fed.transport_log(k)
        assert [r["round"] for r in fed.metrics(k)] == [1, 2]
    assert [r["round"] for r in fed.metrics(2)] == [1, 2]


_WRITER = r"""
import sys, torch
from pathlib import Path
from dimat.federation import atomic_torch_save
path = Path(sys.argv[1])
i = 0
while True:
    atomic_torch_save({"round": i, "w": torch.full((2_000_000,), float(i))}, path)
    print(i, flush=True)
    i += 1
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "ckpt" / "round_0001.pt"
    for delay in (0.0, 0.02, 0.05):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # one checkpoint is complete; the next 8 MB write is in flight
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        ck = torch.load(path, map_location="cpu", weights_only=True)  # never a half-written file
        assert torch.equal(ck["w"], torch.full((2_000_000,), float(ck["round"])))
    assert [q.name for q in path.parent.glob("round_*.pt")] == ["round_0001.pt"]
