"""The attack and the defences inside a real (small) simulated federation."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dimat.federation import build_federation, simulate


def _cfg(tmp: Path, aggregator: str = "mean", scale: float = 1.0) -> object:
    from dimat.entry import compose

    return compose([
        "seed=0", "num_peers=3", "rounds=2", "local_epochs=1", "pretrain_epochs=0", "init=different",
        "device=cpu", "threads=1", "progress=false",
        "model=mlp", "model.hidden=[16]", "data=digits", "data.val_fraction=0.0",
        "partition=iid", "topology=fully_connected", "topology.rule=uniform",
        "merge=dimat", "merge.align_batches=2", "merge.bn_stats=own", f"merge.aggregator={aggregator}",
        "merge.every_steps=null", "merge.keep_momentum=false", "baseline=null",
        "train.batch_size=32", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=0.0", "train.optimizer=sgd",
        "checkpoint.enabled=false", "checkpoint.keep_last=1",
        "attack=badnets", "attack.malicious=[1]", "attack.trigger=badnets",
        "attack.trigger_kwargs={value: 2.0, size: 3}", "attack.target_class=0", "attack.poison_rate=0.5",
        f"attack.scale={scale}", "attack.seed=0", f"run_dir={tmp}",
    ])


def test_malicious_peer_is_poisoned_and_asr_is_logged(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    fed = build_federation(cfg)
    mal = fed.peers[1]
    x, y = mal.x, mal.y
    stamped = (x[:, 0, -3:, -3:] == 2.0) | (x[:, 0, -3:, -3:] == -2.0)
    poisoned = stamped.flatten(1).all(dim=1)
    assert int(poisoned.sum()) > 0 and bool((y[poisoned] == 0).all())
    assert not bool((fed.peers[0].x[:, 0, -3:, -3:].abs() == 2.0).flatten(1).all(dim=1).any())
    simulate(cfg, tmp_path, progress=False)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in recs} == {1, 2}
    for r in recs:
        assert r["malicious"] == (r["peer"] == 1)
        assert 0.0 <= r["asr"] <= 1.0 and r["clean_acc"] == r["test_acc"]


def test_defence_and_context_are_used_in_the_federation(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, aggregator="safety_mask", scale=3.0)
    cfg.merge.aggregator_kwargs = {"refine": True, "refine_steps": 2}
    summary = simulate(cfg, tmp_path, progress=False)
    assert summary["rounds_done"] == 2
    assert torch.isfinite(torch.tensor(summary["final_mean_acc"]))
