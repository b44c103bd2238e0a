"""Real peer processes over gRPC (mutual TLS + token) finish 2 rounds and match `dimat simulate`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["experiment=mnist1d_fast", "num_peers=3", "rounds=2", "progress=false"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _records(paths):
    out = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            out[(r["round"], r["peer"])] = r
    return out


def test_grpc_peers_match_simulation(tmp_path):
    sim_dir, grpc_dir, certs = tmp_path / "sim", tmp_path / "grpc", tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "launch" / "make_certs.sh"), str(certs), "3"], check=True, capture_output=True)
    sim = subprocess.Popen([sys.executable, "-m", "dimat", "simulate", *OVERRIDES, f"run_dir={sim_dir}"],
                           env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "grpc_local.py"), "-n", "3", "--run-dir", str(grpc_dir),
                          "--certs", str(certs), "--timeout", "240", *OVERRIDES],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    sim_out, _ = sim.communicate(timeout=300)
    logs = "\n".join((grpc_dir / f"peer_{k}.log").read_text() for k in range(3) if (grpc_dir / f"peer_{k}.log").exists())
    assert run.returncode == 0, run.stdout + run.stderr + logs
    assert sim.returncode == 0, sim_out
    assert "all 3 peers finished" in run.stdout

    sim_rec = _records([sim_dir / "metrics.jsonl"])
    grpc_rec = _records([grpc_dir / f"peer_{k}" / "metrics.jsonl" for k in range(3)])
    assert sorted(grpc_rec) == sorted(sim_rec) == [(r, p) for r in (1, 2) for p in range(3)]
    for key, s in sim_rec.items():
        g = grpc_rec[key]
        assert g["neighbours"] == s["neighbours"], key
        for m in ("test_acc", "test_loss", "train_loss", "train_acc"):
            assert math.isclose(g[m], s[m], rel_tol=1e-5, abs_tol=1e-6), (key, m, g[m], s[m])
    # every peer checkpointed both rounds under its own tag
    for k in range(3):
        assert json.loads((grpc_dir / "checkpoints" / f"progress_peer_{k}.json").read_text())["last_round"] == 2


@pytest.mark.slow
def test_gossip_peer_killed_and_resumed_rejoins_by_round(tmp_path):
    """Finding 8: a restarted gossip peer compares rounds with rounds, not with a neighbour's exchange number.

    3 peers, gossip with 3 exchanges per round; peer 2 is killed in round 2 and restarted with
    --resume while the others go on. It must finish every round (no ``round_4000001.pt``, no
    "done: 0 rounds") and record a rejoin at a round of the run.
    """
    import importlib.util
    import signal

    spec = importlib.util.spec_from_file_location("grpc_local", ROOT / "launch" / "grpc_local.py")
    local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(local)
    rounds = 8
    env = _env()
    env["DIMAT_TOKEN"] = "gossip-rejoin-token"
    fed = local.LocalFederation(tmp_path, 3, [
        "data=digits", "model=mlp", "model.hidden=[16]", f"rounds={rounds}", "local_epochs=0.25", "merge=gossip",
        "merge.gossip_every=1", "topology=ring", "progress=false", "threads=1", "transport.heartbeat_interval=0.3",
        "transport.max_missed_heartbeats=3", "transport.timeout=20", "transport.delay=0.3"], env=env)
    try:
        for k in range(3):
            fed.start(k)
        fed.wait_log(2, r"round +2/", timeout=120)
        fed.procs[2].send_signal(signal.SIGKILL)
        fed.procs[2].wait()
        fed.wait_log(1, r"peer 2 is down", timeout=60)
        fed.start(2, resume=True)
        codes = fed.wait_all(timeout=240)
        assert codes == {0: 0, 1: 0, 2: 0}, fed.logs_text()
    finally:
        fed.stop()
    log2 = fed.logs[2].read_text()
    assert "rejoin:" in log2 and "done: 0 rounds" not in log2, log2[-3000:]
    done = [r["round"] for r in fed.metrics(2)]
    assert done[-1] == rounds and done == sorted(done), (done, log2[-3000:])
    record = tmp_path / "peer_2" / "rejoins.jsonl"
    if not record.exists():  # no catching up was needed: it resumed from its own checkpoint, and said so
        assert "is current" in log2 or "resuming from own checkpoint" in log2, log2[-3000:]
        return
    rejoin = json.loads(record.read_text().splitlines()[-1])
    if rejoin["fetched_round"] is None:  # the others had finished: it completed its own rounds without them
        assert rejoin["neighbour_round"] == rounds and 1 <= rejoin["completed_alone_from"] < rounds, rejoin
        assert done == sorted(set(done)) and done[-1] == rounds and "completing rounds" in log2, (done, rejoin)
    else:
        assert 2 <= rejoin["fetched_round"] < rounds and rejoin["neighbour_round"] <= rounds, rejoin
    saved = [int(p.stem.split("_")[1]) for p in (tmp_path / "checkpoints").rglob("round_*.pt")]
    assert saved and max(saved) <= rounds, saved
