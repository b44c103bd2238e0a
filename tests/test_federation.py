"""The simulated federation end to end: outputs, resume, determinism, methods and config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dimat.cli import config_dir, main
from dimat.federation import build_federation, read_metrics, simulate
from dimat.methods import available_methods

METHODS = [m for m in available_methods() if m != "custom"]

REPO = Path(__file__).resolve().parents[1]

# Small and fast: MNIST-1D with a narrow MLP, 5 peers, one local epoch per round.
# The paper's protocol (one merge per round, on a ring), which these tests were written for.
PAPER = ["merge=dimat", "topology=ring", "merge.every_steps=null", "merge.keep_momentum=false", "merge.bn_stats=own", "baseline=null"]
FAST = [*PAPER, "model=mlp", "model.width=0.25", "local_epochs=1", "train.batch_size=64", "merge.align_batches=2",
        "progress=false", "threads=1"]


def compose(*overrides: str):
    from hydra import compose as _compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return _compose("config", overrides=[*FAST, *overrides])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dimat", "simulate", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_two_round_cli_run_writes_every_output_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _cli(*FAST, "rounds=2", "tensorboard=true", f"run_dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "round   2/2" in res.stdout and "consensus" in res.stdout
    recs = read_metrics(run / "metrics.jsonl")
    assert sorted((r["round"], r["peer"]) for r in recs) == [(r, p) for r in (1, 2) for p in range(5)]
    assert all(0.0 <= r["test_acc"] <= 1.0 and r["val_acc"] is not None for r in recs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_done"] == 2 and summary["method"] == "dimat" and summary["total_bytes_sent"] > 0
    assert (run / "config.yaml").is_file() and (run / "accuracy.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for p in range(5):
        ckpt = torch.load(run / "checkpoints" / f"peer_{p:03d}" / "round_0002.pt", weights_only=True)
        assert ckpt["round"] == 2 and ckpt["peer"] == p and "optimizer" in ckpt and "generator" in ckpt
    # --resume with a larger round count continues from round 2
    res = _cli("--resume", "rounds=3", f"run_dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "round   3/3" in res.stdout and "round   1/3" not in res.stdout
    assert max(r["round"] for r in read_metrics(run / "metrics.jsonl")) == 3


def _strip(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items()} for r in recs]


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = simulate(compose("rounds=3"), tmp_path / "full")
    simulate(compose("rounds=1"), tmp_path / "cut")
    # Simulate a crash mid-round 2: a stray metrics line and a half-written checkpoint round.
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 2, "peer": 0, "test_acc": 0.0}) + "\n")
    resumed = simulate(compose("rounds=3"), tmp_path / "cut", resume=True)
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert a == b
    assert full["final_mean_acc"] == resumed["final_mean_acc"]
    for p in range(5):
        sa = torch.load(tmp_path / "full" / "checkpoints" / f"peer_{p:03d}" / "round_0003.pt", weights_only=True)
        sb = torch.load(tmp_path / "cut" / "checkpoints" / f"peer_{p:03d}" / "round_0003.pt", weights_only=True)
        for k in sa["model"]:
            assert torch.equal(sa["model"][k], sb["model"][k]), k


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path: Path) -> None:
    simulate(compose("rounds=2", "seed=3"), tmp_path / "a")
    simulate(compose("rounds=2", "seed=3"), tmp_path / "b")
    simulate(compose("rounds=2", "seed=4"), tmp_path / "c")
    a, b, c = (read_metrics(tmp_path / x / "metrics.jsonl") for x in "abc")
    assert a == b
    assert [r["test_acc"] for r in a] != [r["test_acc"] for r in c]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs(tmp_path: Path, method: str) -> None:
    # scaffold's correction is scaled for momentum that runs on across merges (its recipe keeps it)
    own = ["merge.keep_momentum=true"] if method == "scaffold" else []
    summary = simulate(compose("rounds=1", f"merge={method}", "merge.gossip_every=4", "partition=iid", "init=shared",
                               "train.lr=0.05", *own),
                       tmp_path / method)
    recs = read_metrics(tmp_path / method / "metrics.jsonl")
    n = 1 if method == "centralized" else 5
    assert summary["method"] == method and len(recs) == n and summary["num_peers"] == n
    assert summary["final_mean_acc"] > 0.15  # better than chance (0.1) after one IID epoch
    sent = summary["total_bytes_sent"]
    if method in ("isolated", "centralized"):
        assert sent == 0
    else:
        # ring: every peer sends its model to 2 neighbours per exchange
        exchanges = sent / (5 * 2 * summary["model_bytes"])
        assert exchanges == int(exchanges) and exchanges >= 1
        if method == "gossip":
            assert exchanges > 1


def test_different_vs_shared_init() -> None:
    fed_d = build_federation(compose("init=different"))
    fed_s = build_federation(compose("init=shared"))
    w = lambda fed, p: next(iter(fed.peers[p].state().values()))  # noqa: E731
    assert not torch.equal(w(fed_d, 0), w(fed_d, 1))
    assert torch.equal(w(fed_s, 0), w(fed_s, 1))


def test_partitions_are_class_disjoint_with_validation_splits() -> None:
    fed = build_federation(compose())
    seen = []
    for p in fed.peers.values():
        assert p.val is not None and len(p.val[1]) > 0
        classes = set(p.y.tolist()) | set(p.val[1].tolist())
        assert classes == {p.id, p.id + 5}
        seen.append(len(p.y) + len(p.val[1]))
    assert sum(seen) == fed.info["train_size"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model=resnet99"], "unknown model 'resnet99'"),
        (["model.name=nonsense"], "unknown model 'nonsense'"),
        (["data=imagenet"], "unknown data set 'imagenet'"),
        (["data.root=/definitely/not/here"], "/definitely/not/here"),
        (["merge.method=magic"], "unknown merge method 'magic'"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys, overrides, needle) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", *FAST, "rounds=1", f"run_dir={tmp_path / 'r'}", *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dimat: error:") and needle in err[0], err


def test_topology_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "w.npy"
    np.save(bad, np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]))  # row 0 sums to 0.8
    cases = [
        ["num_peers=3", "topology=matrix", f"topology.path={bad}"],
        ["num_peers=3", "topology=matrix", f"topology.path={tmp_path / 'missing.npy'}"],
        ["num_peers=1", "topology=ring"],
    ]
    for overrides in cases:
        with pytest.raises(SystemExit) as exc:
            main(["simulate", *FAST, "rounds=1", f"run_dir={tmp_path / 'r'}", *overrides])
        assert exc.value.code == 2, overrides
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dimat: error:"), (overrides, err)


@pytest.mark.integration
def test_cli_bad_config_subprocess_has_no_traceback(tmp_path: Path) -> None:
    res = _cli("model=nope", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Traceback" not in res.stderr
    assert "unknown model 'nope'" in res.stderr


@pytest.mark.integration
def test_multirun_sweep_runs_each_method(tmp_path: Path) -> None:
    res = _cli("-m", "merge=dimat,average", "rounds=1", "local_epochs=0.25", *PAPER[1:3], "progress=false",
               f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert [json.loads(p.read_text())["method"] for p in summaries] == ["dimat", "average"]


def test_resume_removes_temporary_files_of_a_killed_checkpoint_write(tmp_path: Path) -> None:
    from dimat.federation import Checkpointer

    cfg = compose("rounds=1")
    simulate(cfg, tmp_path / "run")
    ck = Checkpointer(tmp_path / "run")
    stale = ck.path(0, 0).parent / ".round_0002.pt.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    fed = build_federation(cfg)
    ck.restore(ck.last_round(), fed.peers)
    assert not stale.exists()
    assert ck.path(0, ck.last_round()).exists()
