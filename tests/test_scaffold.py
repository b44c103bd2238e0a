"""Drift correction (merge=scaffold): its state moves with the units, reduces to local SGD when there
is no drift, is counted on the wire and survives a resume. The transports agree on it in
tests/test_topologies_everywhere.py (cases ring_scaffold_*)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dimat.entry import compose, default_method, default_train_config
from dimat.federation import simulate
from dimat.models import build_model
from dimat.peer import Peer

TINY = ["data=digits", "model=mlp", "model.hidden=[16]", "num_peers=4", "rounds=2", "local_epochs=0.5",
        "progress=false", "baseline=null", "topology=ring", "merge=scaffold"]


def _data(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(9))[y] * 2 + torch.randn(n, 12, generator=g), y


def _peer(pid: int = 0, model_seed: int = 0) -> Peer:
    torch.manual_seed(model_seed)
    model = build_model("mlp", num_classes=4, input_dim=12, hidden=(16, 16))
    return Peer(pid, model, _data(), config=default_train_config(batch_size=16, lr=0.05, align_batches=2), seed=3)


@pytest.mark.parametrize("variates", ["local", "sent"])
def test_a_relabelled_peer_takes_the_same_corrected_step(variates: str) -> None:
    """The variates are permuted with their units: relabel (model, momentum, correction) then step
    equals step then relabel."""
    from dimat.align.permute import permute_state
    from dimat.align.spec import get_spec

    ma, mb = default_method("scaffold", variates=variates), default_method("scaffold", variates=variates)
    a, b = _peer(), _peer()
    ma.setup(a)
    mb.setup(b)
    a.train_steps(3)  # momentum to carry
    g = torch.Generator().manual_seed(5)
    for v in ma.peer_state[a.id].values():  # a non-trivial correction (and variates)
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    # b is the same peer: same weights, momentum, data order and correction ...
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # load_state_dict would share the buffers
    b.generator.set_state(a.generator.get_state())
    b._perm, b._cursor = a._perm.clone(), a._cursor
    mb.peer_state[b.id] = {k: v.clone() for k, v in ma.peer_state[a.id].items()}
    # ... in another unit order
    perms = {gr.name: torch.randperm(gr.size, generator=g) for gr in get_spec(b.model).groups}
    mb.relabel(b, perms)
    assert any(not torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    a.train_steps(2)
    b.train_steps(2)
    expected = permute_state(a.model.state_dict(), get_spec(a.model), perms)
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    if variates == "sent":  # what is sent moves with the units too
        got, want = mb.extras(b), ma.extras(a)
        moved = permute_state({k[2:]: v for k, v in want.items()}, get_spec(a.model), perms, partial=True)
        for k, v in got.items():
            torch.testing.assert_close(v, moved[k[2:]], rtol=1e-5, atol=1e-6)


def test_without_drift_it_is_local_sgd() -> None:
    """Identical peers on identical data (IID taken to its end): the merge changes nothing, the correction
    stays zero, and training is exactly a lone peer's local SGD."""
    method = default_method("scaffold")
    a, b, lone = _peer(0), _peer(1), _peer(2)
    for p in (b, lone):
        p.generator.set_state(a.generator.get_state())
        p.basis = a.basis = 0  # one init: one basis
    for p in (a, b):
        method.setup(p)
    for _ in range(3):
        for p in (a, b, lone):
            p.train_steps(4)
        sa, sb = method.payload(a), method.payload(b)
        method.merge(a, {1: sb}, {0: 0.5, 1: 0.5})
        method.merge(b, {0: sa}, {0: 0.5, 1: 0.5})
    d = [v for k, v in method.peer_state[0].items() if k.startswith("d/")]
    assert d and all(float(t.abs().max()) == 0.0 for t in d)
    for k, v in lone.model.state_dict().items():
        torch.testing.assert_close(a.model.state_dict()[k], v, rtol=0, atol=0)


def test_sent_variates_are_counted_and_local_ones_cost_nothing(tmp_path: Path) -> None:
    local = simulate(compose([*TINY, f"run_dir={tmp_path / 'l'}"]), tmp_path / "l", progress=False)
    sent = simulate(compose([*TINY, "merge.variates=sent", f"run_dir={tmp_path / 's'}"]), tmp_path / "s",
                    progress=False)
    plain = simulate(compose([*TINY, "merge=dimat", "merge.every_steps=null", "merge.merges_per_round=2",
                              f"run_dir={tmp_path / 'd'}"]), tmp_path / "d", progress=False)
    b_local, b_sent, b_plain = (s["rounds"][-1]["bytes_sent"] for s in (local, sent, plain))
    assert b_local == b_plain  # the variate-free correction sends nothing extra
    assert 1.9 * b_plain < b_sent < 2.0 * b_plain  # a variate per parameter (BN buffers and the tag are not)


@pytest.mark.parametrize("variates", ["local", "sent"])
def test_resume_restores_the_correction(tmp_path: Path, variates: str) -> None:
    args = [*TINY, f"merge.variates={variates}", "rounds=3"]
    simulate(compose([*args, f"run_dir={tmp_path / 'whole'}"]), tmp_path / "whole", progress=False)
    simulate(compose([*args, "rounds=1", f"run_dir={tmp_path / 'part'}"]), tmp_path / "part", progress=False)
    simulate(compose([*args, f"run_dir={tmp_path / 'part'}", "resume=true"]), tmp_path / "part", resume=True,
             progress=False)

    def last(run: Path) -> list[float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [r["test_loss"] for r in rows if r["round"] == 3]

    assert last(tmp_path / "part") == pytest.approx(last(tmp_path / "whole"), rel=1e-6, abs=1e-7)


def test_bad_options_are_one_line() -> None:
    from dimat.config import ConfigError
    from dimat.federation import build_federation

    for override, message in [("merge.variates=maybe", "merge.variates must be one of local, sent"),
                              ("merge.alignment=magic", "merge.alignment must be one of"),
                              ("merge.every_steps=5", "set one of them"),
                              ("train.optimizer=adam", "merge=scaffold corrects SGD steps")]:
        with pytest.raises(ConfigError, match=message):
            build_federation(compose([*TINY, override]))
