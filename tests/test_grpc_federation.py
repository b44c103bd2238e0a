"""Real peer processes over gRPC (mutual TLS + token) finish 2 rounds and match `dimat simulate`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
