"""Scale (issue 26): the first merge of many bases costs one matching per peer, and `workers`
spreads a simulation's peers over threads without changing a single metric."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dimat.entry import default_method
from dimat.federation import build_federation, read_metrics, simulate
from dimat.federation.rounds import RoundOutput, exchange_and_merge
from dimat.federation.workers import PeerPool
from dimat.merge import attach_basis
from dimat.merge.basis import rebase_mode
from dimat.transport.inproc import InProcTransport

from test_basis import _data, _mlp, _tagged_peer
from test_federation import compose


def test_rebase_auto_is_before_only_where_after_would_match_many_neighbours_of_several_bases() -> None:
    assert rebase_mode("auto", 5, [0, 1, 2], limit=2) == "before"   # the first merge of different inits
    assert rebase_mode("auto", 5, [0, 1, 2], limit=3) == "after"    # few enough to match one by one
    assert rebase_mode("auto", 5, [0] * 9, limit=2) == "after"      # one other basis: as before
    assert rebase_mode("auto", 0, [0, 0], limit=0) == "after"       # one basis (a flooded graph, a shared init)
    assert rebase_mode("auto", 2, [None, None], limit=1) == "before"  # untagged states are bases of their own
    assert rebase_mode("after", 5, [0, 1, 2], limit=0) == "after"
    assert rebase_mode("before", 0, [0], limit=9) == "before"
    with pytest.raises(ValueError, match="merge.rebase"):
        rebase_mode("sometimes", 0, [], limit=1)


@pytest.mark.parametrize("limit, matchings", [(4, 5), (5, 6 * 5)])
def test_the_first_merge_of_six_bases_matches_each_peer_once(limit: int, matchings: int) -> None:
    """Six peers of different inits, fully connected: each is in a basis of its own and sees 5
    other bases. With a match limit below 5 (the default recipe at 64 or 1,000 peers: 16) every
    peer but the lowest is matched once, into peer 0's basis; with a limit of 5 (`after`) every
    neighbour is matched at every peer. Either way every peer leaves the merge in basis 0."""
    fed = build_federation(compose("num_peers=6", "partition=iid", "topology=fully_connected", "merge=dimat",
                                   "merge.rebase=auto", f"merge.match_limit={limit}"))
    for p in fed.peers.values():
        p.train(steps=2)
    x = fed.test_data[0][:64]
    before = {pid: p.model.eval()(x).detach() for pid, p in fed.peers.items()}
    out = RoundOutput.empty(fed.peers)
    exchange_and_merge(fed, InProcTransport(share_states=True), fed.topology_at(1), 1, out)
    assert fed.method.matchings == matchings
    assert {p.basis for p in fed.peers.values()} == {0}
    assert all(len(heard) == 5 for heard in out.heard.values())
    # joining first changes every model but peer 0's (nobody in its basis yet: it waits a merge)
    changed = {pid for pid, p in fed.peers.items() if not torch.allclose(p.model.eval()(x), before[pid])}
    assert changed == (set(range(1, 6)) if matchings == 5 else set(range(6)))


def test_auto_merges_exactly_as_after_where_the_neighbours_share_one_basis() -> None:
    """A peer in basis 2 whose neighbours are both in basis 0: auto is `after` (both matched, the
    result relabelled into basis 0), to the last bit, whatever the match limit."""
    low_a, low_b = attach_basis(_mlp(0).state_dict(), 0), attach_basis(_mlp(1).state_dict(), 0)
    merged = {}
    for rebase in ("auto", "after"):
        peer = _tagged_peer(2, _mlp(2), rebase)
        peer.train(steps=2)
        method = default_method("dimat", bn_stats="average", rebase=rebase, keep_momentum=True, match_limit=0)
        merged[rebase] = method.merge(peer, {0: low_a, 1: low_b}, {2: 0.4, 0: 0.3, 1: 0.3})
        assert peer.basis == 0 and method.matchings == 2
    assert merged["auto"].keys() == merged["after"].keys()
    assert all(torch.equal(v, merged["after"][k]) for k, v in merged["auto"].items())


def test_peer_pool_maps_in_order_and_raises_what_a_worker_raised() -> None:
    with PeerPool(3) as pool:
        assert list(pool.map(lambda pid: pid * 10, [4, 1, 3, 2])) == [4, 1, 3, 2]
        assert pool.map(lambda pid: torch.get_num_threads(), [0, 1, 2]) == {i: torch.get_num_threads() for i in range(3)}

        def fail(pid: int) -> int:
            if pid == 2:
                raise KeyError("peer 2")
            return pid
        with pytest.raises(KeyError, match="peer 2"):
            pool.map(fail, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="workers"):
        PeerPool(0)


def test_workers_change_no_metric_of_the_default_recipe(tmp_path: Path) -> None:
    """Four peers of the default recipe (scaffold, 2 merges a round, activation alignment, BatchNorm
    mixture, cosine lr) for two rounds on one worker and on three: the same records, bit for bit,
    and one run folder each with the same files."""
    common = ["num_peers=4", "rounds=2", "partition=iid", "topology=fully_connected", "merge=scaffold",
              "merge.keep_momentum=true", "merge.bn_stats=mixture", "model=cnn1d", "model.width=0.25",
              "train.lr_schedule=cosine"]
    simulate(compose(*common, "workers=1"), tmp_path / "one")
    simulate(compose(*common, "workers=3"), tmp_path / "three")
    one, three = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "three"))
    assert len(one) == 8 and one == three
    assert {p.name for p in (tmp_path / "one").iterdir()} == {p.name for p in (tmp_path / "three").iterdir()}
    last = Path("checkpoints") / "peer_003" / "round_0002.pt"
    a, b = (torch.load(tmp_path / d / last, weights_only=False) for d in ("one", "three"))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_workers_auto_is_one_per_core() -> None:
    import os

    from dimat.config import RunConfig

    run = RunConfig.from_config(compose())
    assert run.workers == len(os.sched_getaffinity(0))


def test_peers_holding_one_model_score_the_test_set_once_with_each_peers_own_figures() -> None:
    """After a plain average of the whole graph every peer holds the same model: the round's
    records equal each peer's own evaluation, and the peers group as one (a ring's do not)."""
    from dimat.federation.evaluation import same_models
    from dimat.federation.rounds import evaluate_round, train_round

    for topology, groups in (("fully_connected", 1), ("ring", 6)):
        fed = build_federation(compose("num_peers=6", "partition=iid", "init=shared", "merge=average",
                                       f"topology={topology}", "merge.bn_stats=average", "rounds=1"))
        out = train_round(fed, InProcTransport(share_states=True), 1)
        assert len(set(same_models({pid: p.model for pid, p in fed.peers.items()}).values())) == groups
        records, _ = evaluate_round(fed, 1, out, 0.0)
        for rec in records:
            own = fed.peers[rec["peer"]].evaluate(fed.test_data)
            assert (rec["test_acc"], rec["test_loss"]) == (own["acc"], own["loss"])
            assert rec["val_acc"] == fed.peers[rec["peer"]].evaluate_val()["acc"]


def test_a_run_folder_saved_before_workers_and_match_limit_still_resumes(tmp_path: Path) -> None:
    """A config.yaml written before these keys existed (rebase=after, no workers, no match_limit)
    resumes; rebase=auto without a match limit is one config error."""
    import yaml

    from dimat.config import ConfigError, RunConfig

    simulate(compose("rounds=1", "num_peers=3"), tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["workers"], saved["merge"]["match_limit"]
    saved["merge"]["rebase"] = "after"
    old = RunConfig.from_config({**saved, "rounds": 2, "resume": True})
    assert old.merge.match_limit is None and old.workers >= 1
    summary = simulate({**saved, "rounds": 2}, tmp_path / "run", resume=True)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    saved["merge"]["rebase"] = "auto"
    with pytest.raises(ConfigError, match="match_limit"):
        RunConfig.from_config(saved)
