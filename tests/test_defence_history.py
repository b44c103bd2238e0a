"""Defences under label skew: what they may see (senders, memory), what they keep, what they refuse.

The probe-trust defence on a planted trigger, its history carried in the method's per-peer state
through a real resume, every defence on identical inputs, non-finite and misshapen neighbours, the
clipping defence's noise, which defences keep one basis, and the adaptive attackers' levers.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dimat.attacks.federation import Attack
from dimat.attacks.triggers import build_trigger
from dimat.config import ConfigError
from dimat.entry import compose, default_method, default_train_config
from dimat.federation import build_federation, simulate
from dimat.federation.checkpoints import Checkpointer
from dimat.merge.aggregators import AggregationContext, available_aggregators, get_aggregator
from dimat.models import build_model
from dimat.peer import Peer

TINY = ["data=digits", "model=mlp", "model.hidden=[16]", "num_peers=4", "rounds=2", "local_epochs=0.5",
        "progress=false", "baseline=null", "topology=ring", "merge=dimat", "merge.aggregator=probe_trust",
        "+merge.aggregator_kwargs.steps=3", "+merge.aggregator_kwargs.max_samples=32"]


def _linear_case() -> tuple[nn.Module, dict, dict, dict, torch.Tensor]:
    """A 3-class linear model on 8 inputs; own data holds classes 0 and 1 only (label skew).

    The backdoored neighbour wires input 7 (always 0 in clean data) strongly to class 2: a small
    perturbation there sends every input to class 2, which no clean input is predicted as.
    """
    g = torch.Generator().manual_seed(0)
    protos = torch.zeros(3, 8)
    protos[0, 0], protos[1, 1], protos[2, 2] = 4.0, 4.0, 4.0
    y = torch.randint(0, 2, (64,), generator=g)
    x = protos[y] + 0.3 * torch.randn(64, 8, generator=g)
    x[:, 7] = 0.0
    model = nn.Linear(8, 3)
    own = {"weight": 2.0 * protos.clone(), "bias": torch.zeros(3)}
    honest = {"weight": own["weight"] + 0.05 * torch.randn(3, 8, generator=g), "bias": torch.zeros(3)}
    bad = {"weight": own["weight"].clone(), "bias": torch.zeros(3)}
    bad["weight"][2, 7] = 200.0
    return model, own, honest, bad, x


def test_probe_trust_leaves_out_a_planted_trigger_and_remembers_it() -> None:
    model, own, honest, bad, x = _linear_case()
    memory: dict[str, torch.Tensor] = {}
    ctx = AggregationContext(model=model, data=[(x, torch.zeros(64, dtype=torch.long))], senders=(3, 7), memory=memory)
    agg = get_aggregator("probe_trust")
    out = agg(own, [honest, bad], [1 / 3] * 3, ctx)
    assert agg.last_excluded == [1] and agg.last_suspicion[1] > 0.95 > 0.5 > agg.last_suspicion[0]
    torch.testing.assert_close(out["weight"], (own["weight"] + honest["weight"]) / 2)  # the mean of the rest
    assert {"rate@3", "target@3", "rate@7", "target@7"} <= set(memory) and int(memory["target@7"].argmax()) == 2
    # the history is per sender: the same state arriving from another sender starts from nothing
    again = get_aggregator("probe_trust", threshold=0.99)
    again(own, [honest, bad], [1 / 3] * 3, AggregationContext(model=model, data=[x], senders=(3, 7), memory=memory))
    assert float(memory["rate@7"]) > 0.95  # (1 - decay) * new + decay * old, both near 1


def test_every_defence_is_the_plain_mean_on_identical_inputs() -> None:
    model, own, _, _, x = _linear_case()
    for name in available_aggregators():
        kwargs = {"noise": 1.0} if name == "norm_clip" else {}
        agg = get_aggregator(name, **kwargs)
        ctx = AggregationContext(model=model, data=[x], senders=(1, 2, 3), memory={})
        out = agg(own, [dict(own), dict(own), dict(own)], [0.25] * 4, ctx)
        for k in own:
            torch.testing.assert_close(out[k], own[k], msg=f"{name}: {k}")


def test_no_defence_lets_a_non_finite_or_misshapen_neighbour_through() -> None:
    model, own, honest, _, x = _linear_case()
    nan = {**honest, "weight": honest["weight"].clone()}
    nan["weight"][1, 1] = float("nan")
    inf = {**honest, "bias": torch.tensor([0.0, float("inf"), 0.0])}
    wide = {**honest, "weight": torch.zeros(3, 9)}
    for name in available_aggregators():
        if name == "mean":
            continue  # the plain mean is not a defence: the receive checks stop these before it (tests/test_hostile.py)
        for bad, message in ((nan, "NaN or Inf"), (inf, "NaN or Inf"), (wide, "shape")):
            ctx = AggregationContext(model=model, data=[x], senders=(1, 2), memory={})
            with pytest.raises(ValueError, match=message):
                get_aggregator(name)(own, [honest, bad], [1 / 3] * 3, ctx)


def test_norm_clip_noise_is_seeded_and_sized() -> None:
    g = torch.Generator().manual_seed(1)
    own = {"w": torch.zeros(4000)}
    others = [{"w": torch.randn(4000, generator=g)} for _ in range(3)]
    clip = get_aggregator("norm_clip")(own, others, [0.25] * 4)["w"]
    noisy = [get_aggregator("norm_clip", noise=0.5)(own, others, [0.25] * 4, AggregationContext(seed=s))["w"]
             for s in (7, 7, 8)]
    torch.testing.assert_close(noisy[0], noisy[1])
    assert not torch.equal(noisy[0], noisy[2])
    tau = sorted(float(o["w"].norm()) for o in others)[1]
    assert abs(float((noisy[0] - clip).norm()) / (0.5 * tau) - 1) < 0.1  # expected norm noise * tau
    with pytest.raises(ValueError, match="needs an AggregationContext"):
        get_aggregator("norm_clip", noise=0.5)(own, others, [0.25] * 4)


def test_which_defences_keep_one_basis() -> None:
    """Under label skew per-peer bases cost the default recipe most of its accuracy (docs/safety.md):
    a defence that selects by distance needs them, one that bounds or probes does not."""
    assert default_method("dimat").consensus_basis
    for name, one_basis in (("probe_trust", True), ("norm_clip", True), ("multi_krum", False), ("median", False)):
        assert default_method("dimat", aggregator=name).consensus_basis is one_basis, name
    assert default_method("dimat", aggregator="multi_krum", consensus_basis=True).consensus_basis


def test_the_trust_history_survives_a_resume(tmp_path: Path) -> None:
    """Two rounds straight and one round + resume end with the same metrics and the same history."""
    whole = simulate(compose([*TINY, f"run_dir={tmp_path / 'whole'}"]), tmp_path / "whole", progress=False)
    simulate(compose([*TINY, "rounds=1", f"run_dir={tmp_path / 'part'}"]), tmp_path / "part", progress=False)
    saved = torch.load(tmp_path / "part" / "checkpoints" / "peer_000" / "round_0001.pt", weights_only=True)["method"]
    assert any(k.startswith("defence/rate@") for k in saved), sorted(saved)
    fed = build_federation(compose([*TINY, f"run_dir={tmp_path / 'part'}", "resume=true"]))
    Checkpointer(tmp_path / "part").restore(1, fed.peers, fed.method)
    for k, v in saved.items():
        torch.testing.assert_close(fed.method.peer_state[0][k], v)
    resumed = simulate(compose([*TINY, f"run_dir={tmp_path / 'part'}", "resume=true"]), tmp_path / "part",
                       resume=True, progress=False)
    assert resumed["final_mean_acc"] == whole["final_mean_acc"]
    rows = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "part")}
    assert [(r["round"], r["peer"], r["test_acc"]) for r in rows["whole"]] == \
        [(r["round"], r["peer"], r["test_acc"]) for r in rows["part"]]


def _peers(n: int = 4) -> dict[int, Peer]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64,), generator=g)
    x = torch.randn(4, 12, generator=g)[y] + torch.randn(64, 12, generator=g)
    peers = {}
    for pid in range(n):
        torch.manual_seed(pid)
        model = build_model("mlp", num_classes=4, input_dim=12, hidden=(8,))
        peers[pid] = Peer(pid, model, (x, y), config=default_train_config(batch_size=16, lr=0.05 * (pid + 1)), seed=pid)
    return peers


def _norm(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in b if b[k].is_floating_point()) ** 0.5


def test_stealth_attackers_hide_in_the_honest_spread_and_colluders_send_one_state() -> None:
    peers = _peers()
    trigger = build_trigger("badnets", value=3.0, size=2)
    stealth = Attack([0, 1], trigger, 0, 0.3, scale=5.0, stealth="clip", collude=False)
    colluding = Attack([0, 1], trigger, 0, 0.3, collude=True)
    stealth.before_training(peers)
    base = {pid: p.state() for pid, p in peers.items()}
    for p in peers.values():
        p.train_steps(4)
    states = {pid: p.shared_state() for pid, p in peers.items()}
    sent = stealth.outgoing(states)
    honest = sorted(_norm(states[p], base[p]) for p in (2, 3))
    spread = honest[0]  # the lower median (as norm_clip takes it)
    for pid in (0, 1):
        assert abs(_norm(sent[pid], base[pid]) - min(spread, 5.0 * _norm(states[pid], base[pid]))) < 1e-4 * spread
    assert all(sent[p] is states[p] for p in (2, 3))  # honest peers send what they hold
    assert colluding.outgoing(states)[1] is states[1]  # in another basis than the lowest colluder: left alone
    peers[1].basis = peers[0].basis  # one basis, as the consensus basis gives after a few rounds
    states[1] = peers[1].shared_state()
    shared = colluding.outgoing(states)
    for k, v in shared[0].items():
        torch.testing.assert_close(shared[1][k], v)
        if v.is_floating_point():
            torch.testing.assert_close(v, (states[0][k] + states[1][k]) / 2)
    assert all(shared[p] is states[p] for p in (2, 3))


def test_attack_stealth_is_checked_in_one_line() -> None:
    with pytest.raises(ConfigError, match="attack.stealth must be one of none, clip"):
        build_federation(compose([*TINY, "attack=badnets", "attack.stealth=invisible"]))


@pytest.mark.parametrize("recipe", [["merge=dimat"], ["merge=scaffold"], ["merge=dimat", "merge.every_steps=1"]],
                         ids=["one_merge_a_round", "default_recipe", "every_step"])
@pytest.mark.parametrize("defence", [["merge.aggregator=norm_clip", "+merge.aggregator_kwargs.noise=0.2"],
                                     ["merge.aggregator=probe_trust", "+merge.aggregator_kwargs.steps=2",
                                      "+merge.aggregator_kwargs.max_samples=16"]], ids=["clip_noise", "probe_trust"])
def test_defences_run_with_alignment_on_every_recipe(tmp_path: Path, recipe: list[str], defence: list[str]) -> None:
    """Different inits (so the first merges align), an attacker, each recipe: the federation learns."""
    args = [*[a for a in TINY if not a.startswith(("merge", "+merge"))], *recipe, *defence, "attack=badnets",
            "attack.trigger_kwargs={value: 2.0, size: 3}", "num_peers=3", "topology=fully_connected", "rounds=3",
            "local_epochs=2",
            f"run_dir={tmp_path}"]
    summary = simulate(compose(args), tmp_path, progress=False)
    assert summary["final_mean_acc"] > 0.3, summary["final_mean_acc"]  # chance is 0.1


def test_a_run_folder_saved_before_the_attack_and_vector_keys_resumes(tmp_path: Path) -> None:
    """A config.yaml written before attack.stealth, attack.collude and exchange.raw_vectors existed
    resumes as it ran (no adaptive attacker, every tensor compressed)."""
    import yaml

    from dimat.config import RunConfig

    args = [*TINY, "attack=badnets", "exchange.compress=int8", f"run_dir={tmp_path}"]
    simulate(compose([*args, "rounds=1"]), tmp_path, progress=False)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["attack"]["stealth"], saved["attack"]["collude"], saved["exchange"]["raw_vectors"]
    old = RunConfig.from_config({**saved, "rounds": 2, "resume": True})
    assert (old.attack.stealth, old.attack.collude, old.exchange.raw_vectors) == ("none", False, False)
    summary = simulate({**saved, "rounds": 2}, tmp_path, resume=True, progress=False)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    saved["attack"]["collude"] = None
    with pytest.raises(ConfigError, match="attack.collude must be true or false"):
        RunConfig.from_config(saved)
