"""The evaluation policy (``eval:``): which rounds, which peers, how much of the test set."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimat.config import ConfigError, EvalSettings, RunConfig
from dimat.federation import read_metrics, simulate
from dimat.federation.evaluation import ALL, NONE, SAMPLE, plan_round, sample_size
from tests.test_federation import compose


def test_the_last_round_evaluates_every_peer_on_the_whole_test_set() -> None:
    policy = EvalSettings(every=5, peers=2, test_samples=10, share=0.25, min_peers=1)
    plan = plan_round(policy, 7, final=True, num_peers=9, test_size=100, seed=0)
    assert plan.kind == ALL and plan.peers == frozenset(range(9)) and plan.test_rows is None and plan.test_samples == 100


def test_rounds_between_every_k_do_not_evaluate() -> None:
    policy = EvalSettings(every=3, peers=None, test_samples=None, share=0.25, min_peers=1)
    kinds = [plan_round(policy, r, final=False, num_peers=4, test_size=50, seed=1).kind for r in range(1, 7)]
    assert kinds == [NONE, NONE, ALL, NONE, NONE, ALL]


def test_peer_sample_is_seeded_by_round_and_the_test_subsample_is_fixed() -> None:
    policy = EvalSettings(every=1, peers=3, test_samples=20, share=0.25, min_peers=1)
    a = plan_round(policy, 4, final=False, num_peers=50, test_size=200, seed=3)
    again = plan_round(policy, 4, final=False, num_peers=50, test_size=200, seed=3)
    other_round = plan_round(policy, 5, final=False, num_peers=50, test_size=200, seed=3)
    assert a.kind == SAMPLE and len(a.peers) == 3 and a.peers <= frozenset(range(50))
    assert a.peers == again.peers  # every process draws the same sample
    assert a.peers != other_round.peers  # and it moves from round to round
    assert a.test_samples == 20 and len(set(a.test_rows.tolist())) == 20 and int(a.test_rows.max()) < 200
    assert a.test_rows.tolist() == other_round.test_rows.tolist()  # one subsample for the whole run
    # a sample as large as the federation is everyone
    assert plan_round(EvalSettings(1, 50, None, 0.25, 1), 2, final=False, num_peers=50, test_size=200, seed=3).kind == ALL


def test_auto_keeps_evaluation_a_share_of_training() -> None:
    auto = EvalSettings(every=1, peers="auto", test_samples=None, share=0.25, min_peers=1)
    # 64 IID peers on 3,600 samples, 1,000 test samples: 0.25 * 3 * 3600 / 1000 -> 2 peers
    assert sample_size(auto, 64, 1000, 3600) == 2
    assert sample_size(auto, 1000, 1000, 36000) == 27
    assert sample_size(auto, 5, 1000, 7200) == 5  # the default 5-peer run evaluates everyone
    assert sample_size(auto, 64, 1000, 10) == 1  # at least one
    floor = EvalSettings(every=1, peers="auto", test_samples=None, share=0.25, min_peers=5)
    assert sample_size(floor, 64, 1000, 3600) == 5 and sample_size(floor, 4, 1000, 10) == 4
    plan = plan_round(auto, 3, final=False, num_peers=64, test_size=1000, seed=0, train_samples=3600)
    assert plan.kind == SAMPLE and len(plan.peers) == 2
    assert RunConfig.from_config(compose()).eval.peers == "auto"


def test_eval_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="eval.every must be at least 1"):
        RunConfig.from_config(compose("eval.every=0"))
    with pytest.raises(ConfigError, match="unknown eval option"):
        RunConfig.from_config(compose("+eval.bogus=1"))


def test_a_run_records_what_each_round_evaluated(tmp_path: Path) -> None:
    cfg = compose("num_peers=6", "rounds=3", "eval.every=2", "eval.peers=2", "eval.test_samples=100",
                  "checkpoint.enabled=false", "partition=iid")
    summary = simulate(cfg, tmp_path)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    by_round = {r: [x for x in recs if x["round"] == r] for r in (1, 2, 3)}
    assert all(len(v) == 6 for v in by_round.values())  # every peer has a record every round
    # round 1: not evaluated; training figures are still there
    assert all(x["eval"] == NONE and x["test_acc"] is None and x["test_samples"] == 0 for x in by_round[1])
    assert all(x["train_loss"] is not None for x in by_round[1])
    # round 2: two sampled peers on 100 test samples
    scored = [x for x in by_round[2] if x["test_acc"] is not None]
    assert len(scored) == 2 and all(x["eval"] == SAMPLE and x["test_samples"] == 100 for x in scored)
    assert all(round(x["test_acc"] * 100, 6) == int(round(x["test_acc"] * 100)) for x in scored)
    # round 3 (the last): everyone, whole test set
    test_size = summary["data"]["test_size"]
    assert all(x["eval"] == ALL and x["test_samples"] == test_size and x["test_acc"] is not None for x in by_round[3])
    rounds = json.loads((tmp_path / "summary.json").read_text())["rounds"]
    assert [(r["eval"], r["peers"], r["test_samples"]) for r in rounds] == [
        (NONE, 0, 0), (SAMPLE, 2, 100), (ALL, 6, test_size)]
    assert rounds[0]["mean_acc"] is None
    assert summary["final_mean_acc"] == pytest.approx(sum(x["test_acc"] for x in by_round[3]) / 6)
    assert summary["best_mean_acc"] is not None
