"""``torchrun --standalone --nproc_per_node=4 -m dimat.launch`` against ``dimat simulate``.

Real torchrun processes with gloo on CPU train a small MLP on MNIST-1D; their merged metrics
must equal the in-process simulation of the same config and seed (within float tolerance).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dimat.federation", reason="the federation runner (dimat.federation) is not merged yet")

REPO = Path(__file__).resolve().parents[1]
NPROC = 4
# small and fast: MLP on MNIST-1D, 1 local epoch, 2 rounds
COMMON = ["experiment=mnist1d_fast", "model=mlp", "model.hidden=[32,32]", "rounds=2", "threads=1",
          "progress=false", "checkpoint.keep_last=2"]


def torchrun_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def torchrun(args: list[str], cwd: Path, *, script: list[str] | None = None, restarts: int = 0,
             env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
           f"--max_restarts={restarts}", *(script or ["-m", "dimat.launch"]), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env or torchrun_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def simulate(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    from dimat.federation import simulate as run
    from dimat.launch import compose_config

    cfg = compose_config([*overrides, "transport=inproc", f"run_dir={run_dir}"])
    return run(cfg, run_dir, progress=False)


def metrics(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["round"], r["peer"]): r for r in recs}


def assert_same_metrics(sim: Path, dist: Path) -> None:
    a, b = metrics(sim), metrics(dist)
    assert a.keys() == b.keys()
    for k in a:
        for field in ("test_acc", "test_loss", "train_loss", "val_acc"):
            assert b[k][field] == pytest.approx(a[k][field], abs=1e-4, rel=1e-4), (k, field, a[k][field], b[k][field])
        assert b[k]["neighbours"] == a[k]["neighbours"], k
        assert b[k]["bytes_sent"] == a[k]["bytes_sent"], k


@pytest.fixture(scope="module")
def ring_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    args = [*COMMON, "num_peers=4", "topology=ring"]
    out = tmp_path_factory.mktemp("sim_ring")
    simulate(args, out)
    return args, out


def test_ring_four_ranks_matches_simulation(ring_reference: tuple[list[str], Path], tmp_path: Path) -> None:
    args, sim = ring_reference
    run_dir = tmp_path / "run"
    proc = torchrun([*args, f"run_dir={run_dir}"], cwd=tmp_path)
    assert "final test accuracy" in proc.stdout
    assert_same_metrics(sim / "metrics.jsonl", run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    ref = json.loads((sim / "summary.json").read_text())
    assert summary["rounds_done"] == 2 and summary["world_size"] == NPROC and summary["backend"] == "gloo"
    assert summary["final_mean_acc"] == pytest.approx(ref["final_mean_acc"], abs=1e-4)
    assert summary["local_peers"] == [0, 1, 2, 3]
    # one folder: every rank's files and every peer's checkpoints side by side, config from rank 0
    for r in range(NPROC):
        assert (run_dir / f"rank{r}" / "metrics.jsonl").is_file() and (run_dir / f"rank{r}" / "summary.json").is_file()
        assert (run_dir / "checkpoints" / f"peer_{r:03d}" / "round_0002.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config.yaml").is_file()
    assert not list(tmp_path.glob("outputs/*"))  # no stray per-rank timestamped folders


def test_time_varying_topology_more_peers_than_ranks(tmp_path: Path) -> None:
    # 8 peers on 4 ranks (2 each), one-peer exponential: a different neighbour every round
    # every peer evaluated every round (eval.peers=auto samples 5 of 8 in round 1): every record compared
    args = [*COMMON, "num_peers=8", "topology=one_peer_exponential", "eval.peers=null"]
    simulate(args, tmp_path / "sim")
    run_dir = tmp_path / "run"
    torchrun([*args, f"run_dir={run_dir}"], cwd=tmp_path)
    assert_same_metrics(tmp_path / "sim" / "metrics.jsonl", run_dir / "metrics.jsonl")
    m = metrics(run_dir / "metrics.jsonl")
    assert m[(1, 0)]["neighbours"] != m[(2, 0)]["neighbours"]
    assert json.loads((run_dir / "rank1" / "summary.json").read_text())["local_peers"] == [2, 3]


@pytest.mark.slow
def test_crash_restarts_all_workers_and_resumes(ring_reference: tuple[list[str], Path], tmp_path: Path) -> None:
    # rank 2 dies entering round 2; torchrun restarts every worker, which resume from round 1's
    # checkpoints in the same (timestamped, rank-0-chosen) folder and finish as if nothing happened
    args, sim = ring_reference
    # max_restarts=2, as one would run it: once in about five full-suite runs here a restarted worker
    # aborted in gloo ("Connection closed by peer"; cause not found, see the release note), and a
    # further restart must then resume just the same
    proc = torchrun(args, cwd=tmp_path, restarts=2, script=[str(REPO / "tests" / "launch_crash_worker.py")],
                    env=torchrun_env(DIMAT_TEST_CRASH="2:2"))
    assert "crashing on purpose" in proc.stderr
    assert "(resuming)" in proc.stdout
    runs = [p for p in (tmp_path / "outputs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1, runs
    assert_same_metrics(sim / "metrics.jsonl", runs[0] / "metrics.jsonl")
