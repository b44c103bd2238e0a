"""Label-skew remedies: restricted softmax (FedRS), proximal term (FedProx), local steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimat.entry import default_train_config
from dimat.models import build_model
from dimat.peer import Peer
from dimat.train import LocalObjective


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_absent_class_logits_get_gradient_at_the_configured_strength(alpha: float) -> None:
    labels = torch.tensor([1, 3, 3, 1])  # own data has classes 1 and 3 of 5
    obj = LocalObjective(labels, absent_logit_scale=alpha, prox_mu=0.0)
    torch.manual_seed(0)
    z = torch.randn(4, 5, requires_grad=True)
    obj(z, labels, []).backward()
    restricted = z.detach() * torch.tensor([alpha, 1, alpha, 1, alpha])
    expected = (F.softmax(restricted, dim=1) - F.one_hot(labels, 5)) / len(labels)  # d CE / d restricted
    expected[:, [0, 2, 4]] *= alpha
    torch.testing.assert_close(z.grad, expected)


def _peer(alpha: float, mu: float = 0.0) -> Peer:
    torch.manual_seed(0)
    x = torch.randn(96, 12)
    y = torch.tensor([0, 2] * 48)  # classes 1 and 3 absent
    model = build_model("mlp", num_classes=4, input_dim=12, hidden=(16,))
    cfg = default_train_config(batch_size=16, lr=0.1, weight_decay=0.0, align_batches=1,
                               absent_logit_scale=alpha, prox_mu=mu)
    return Peer(0, model, (x, y), config=cfg, seed=1)


def _head(peer: Peer) -> torch.Tensor:
    linears = [m for m in peer.model.modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1].weight.detach().clone()


def test_hard_mask_leaves_absent_class_head_rows_untouched() -> None:
    for alpha, untouched in ((0.0, True), (1.0, False)):
        peer = _peer(alpha)
        before = _head(peer)
        peer.train(epochs=2)
        after = _head(peer)
        assert torch.equal(after[[1, 3]], before[[1, 3]]) is untouched
        assert not torch.equal(after[[0, 2]], before[[0, 2]])


def test_proximal_term_holds_the_model_near_the_round_start() -> None:
    def drift(mu: float) -> float:
        peer = _peer(1.0, mu)
        start = [p.detach().clone() for p in peer.model.parameters()]
        peer.train(steps=12)
        return sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(peer.model.parameters(), start))

    assert drift(5.0) < 0.5 * drift(0.0)


def test_local_steps_replace_epochs_in_a_federation(tmp_path) -> None:
    from dimat.entry import load
    from dimat.federation import read_metrics, simulate

    run = load(["model=mlp", "model.width=0.25", "rounds=2", "local_steps=3", "progress=false",
                "checkpoint.enabled=false", "train.absent_logit_scale=0"])
    simulate(run, tmp_path)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert {r["local_steps"] for r in recs} == {3} and len(recs) == 10


@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_kept_momentum_is_permuted_with_its_parameters(name: str) -> None:
    import copy

    from dimat.align.permute import permute_state
    from dimat.align.spec import get_spec

    torch.manual_seed(0)
    x = torch.randn(64, 1, 40) if name == "cnn1d" else torch.randn(64, 12)
    y = torch.randint(0, 4, (64,))
    kw = {"input_shape": (1, 40)} if name == "cnn1d" else {"input_dim": 12, "hidden": (16, 16)}
    model = build_model(name, num_classes=4, **kw)
    peer = Peer(0, model, (x, y), config=default_train_config(batch_size=16, lr=0.1, align_batches=1), seed=3)
    peer.train(steps=5)  # momentum buffers now hold 5 steps of history
    spec = get_spec(peer.model)
    perms = {g.name: torch.randperm(g.size) for g in spec.groups}
    twin = copy.deepcopy(peer)
    twin.permute_units(perms)
    peer.train_steps(3)
    twin.train_steps(3)
    want = permute_state(peer.model.state_dict(), spec, perms)
    for k, v in twin.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same relabelling without the momentum's: the next steps differ
    lost = copy.deepcopy(peer)
    lost.model.load_state_dict(permute_state(lost.model.state_dict(), spec, perms))
    ref = copy.deepcopy(twin)
    lost.train_steps(2)
    ref.train_steps(2)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(lost.model.parameters(), ref.model.parameters()))
