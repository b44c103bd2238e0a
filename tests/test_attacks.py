"""Triggers, poisoning, model replacement and ASR on hand-built cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dimat.attacks import (
    BadNetsTrigger,
    BlendedTrigger,
    attack_success_rate,
    build_trigger,
    clean_accuracy,
    poison_dataset,
    scale_update,
)


def test_badnets_1d_writes_exact_pattern_and_nothing_else() -> None:
    x = torch.randn(5, 1, 40)
    t = BadNetsTrigger(value=2.5, size=4)
    out = t(x)
    # default position: the patch ends one before the last sample -> indices 35..38
    assert torch.equal(out[:, 0, 35:39], torch.tensor([2.5, -2.5, 2.5, -2.5]).expand(5, 4))
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[35:39] = False
    assert torch.equal(out[..., untouched], x[..., untouched])
    assert not torch.equal(out, x) and x.shape == out.shape  # input not modified in place
    # explicit position, 2-D (N, L) batch, custom pattern
    t2 = BadNetsTrigger(size=3, position=2, pattern=torch.tensor([1.0, 2.0, 3.0]))
    out2 = t2(torch.zeros(2, 10))
    assert out2[0].tolist() == [0, 0, 1, 2, 3, 0, 0, 0, 0, 0]


def test_badnets_image_corner_checkerboard() -> None:
    x = torch.zeros(3, 2, 8, 8)
    out = BadNetsTrigger(value=3.0, size=3, corner="br")(x)
    expected = torch.tensor([[3.0, -3.0, 3.0], [-3.0, 3.0, -3.0], [3.0, -3.0, 3.0]])
    for n in range(3):
        for c in range(2):
            assert torch.equal(out[n, c, 5:, 5:], expected)
    assert float(out[..., :5, :].abs().sum()) == 0.0 and float(out[..., :, :5].abs().sum()) == 0.0
    tl = BadNetsTrigger(size=2, corner="tl")(torch.zeros(1, 1, 4, 4))
    assert tl[0, 0, :2, :2].abs().min() > 0 and float(tl[0, 0, 2:, :].abs().sum()) == 0.0


def test_badnets_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        BadNetsTrigger(size=5)(torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="batch"):
        BadNetsTrigger()(torch.zeros(10))
    with pytest.raises(ValueError, match="corner"):
        BadNetsTrigger(corner="middle")
    with pytest.raises(ValueError, match="unknown trigger"):
        build_trigger("sticker")


def test_blended_formula_and_fixed_pattern() -> None:
    x = torch.randn(4, 1, 40)
    t = BlendedTrigger(alpha=0.25, seed=7)
    p = t.pattern_for((1, 40))
    torch.testing.assert_close(t(x), 0.75 * x + 0.25 * p.expand_as(x))
    # the pattern depends only on (seed, shape), not on global RNG state or call order
    torch.manual_seed(123)
    again = BlendedTrigger(alpha=0.25, seed=7)
    assert torch.equal(again.pattern_for((1, 40)), p)
    assert not torch.equal(BlendedTrigger(seed=8).pattern_for((1, 40)), p)
    with pytest.raises(ValueError, match="alpha"):
        BlendedTrigger(alpha=0.0)


def test_poison_dataset_exact_rate_and_labels() -> None:
    y = torch.tensor([0, 1, 2, 3] * 25)  # 100 samples, 75 non-target for target 0
    x = torch.zeros(100, 1, 20)
    trig = BadNetsTrigger(value=1.0, size=2)
    xp, yp, idx = poison_dataset(x, y, trig, target_class=0, rate=0.2, seed=3)
    assert len(idx) == round(0.2 * 75) == 15
    assert len(np.unique(idx)) == 15 and np.all(np.diff(idx) > 0)
    assert bool((y[idx] != 0).all())  # only non-target samples are chosen
    assert bool((yp[idx] == 0).all())
    others = np.setdiff1d(np.arange(100), idx)
    assert torch.equal(yp[others], y[others]) and torch.equal(xp[others], x[others])
    assert torch.equal(xp[idx], trig(x[idx]))
    assert torch.equal(x, torch.zeros(100, 1, 20)) and torch.equal(y, torch.tensor([0, 1, 2, 3] * 25))
    # deterministic in the seed, different across seeds
    assert np.array_equal(poison_dataset(x, y, trig, 0, 0.2, seed=3)[2], idx)
    assert not np.array_equal(poison_dataset(x, y, trig, 0, 0.2, seed=4)[2], idx)
    assert len(poison_dataset(x, y, trig, 0, 0.0)[2]) == 0
    assert len(poison_dataset(x, y, trig, 0, 1.0)[2]) == 75
    with pytest.raises(ValueError, match="rate"):
        poison_dataset(x, y, trig, 0, 1.5)
    with pytest.raises(ValueError, match="number of samples"):
        poison_dataset(x, y[:10], trig, 0, 0.1)


def test_scale_update_model_replacement() -> None:
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    own = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(5)}
    out = scale_update(own, base, factor=5.0)
    torch.testing.assert_close(out["w"], torch.tensor([6.0, -8.0]))
    assert int(out["n"]) == 5
    torch.testing.assert_close(scale_update(own, base, 1.0)["w"], own["w"])
    with pytest.raises(ValueError, match="keys"):
        scale_update(own, {"w": base["w"]}, 2.0)


class _TriggerDetector(nn.Module):
    """Hand-built: predicts class 2 when feature 38 is large (the BadNets cell), else sign of feature 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        out = torch.zeros(x.shape[0], 3)
        out[:, 0] = (x[:, 0] > 0).float()
        out[:, 1] = (x[:, 0] <= 0).float()
        out[:, 2] = 10.0 * (x[:, 37] > 2.0).float()  # index 37 is +value in the default size-4 patch
        return out


def test_asr_and_clean_accuracy_on_hand_built_model() -> None:
    x = torch.zeros(6, 1, 40)
    x[:, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    model = _TriggerDetector()
    assert clean_accuracy(model, x, y) == pytest.approx(4 / 6)
    trig = BadNetsTrigger(value=3.0, size=4)  # patch 35..38: +3 at 35 and 37
    assert attack_success_rate(model, x, y, trig, target_class=2) == 1.0
    assert attack_success_rate(model, x, y, BadNetsTrigger(value=1.0, size=4), target_class=2) == 0.0
    # target 0: non-target samples are the four of classes 1 and 2; the detector sends them to 2,
    # so none hits 0
    assert attack_success_rate(model, x, y, trig, target_class=0) == 0.0
    # a trigger that only makes feature 0 positive: class-1 and class-2 samples become class 0
    half = BadNetsTrigger(size=1, position=0, pattern=torch.tensor([5.0]))
    assert attack_success_rate(model, x, y, half, target_class=0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="undefined"):
        attack_success_rate(model, x[:1], y[:1], trig, target_class=0)


def test_build_attack_from_config_and_model_replacement_hook() -> None:
    from dimat.attacks import build_attack as _build
    from dimat.config import AttackSettings
    from dimat.entry import compose

    defaults = dict(compose()["attack"])

    def build_attack(cfg, n, c):  # the attack section over configs/attack's defaults, as the run config does
        return _build(AttackSettings.from_mapping({**defaults, **dict(cfg.get("attack", cfg))}), n, c)

    assert build_attack({"attack": {"malicious": []}}, 5, 10) is None
    assert build_attack({}, 5, 10) is None
    cfg = {"attack": {"malicious": [3, 3], "trigger": "badnets", "trigger_kwargs": {"size": 2}, "target_class": 1,
                      "poison_rate": 0.5, "scale": 4.0}}
    atk = build_attack(cfg, 5, 10)
    assert atk is not None and atk.malicious == [3] and atk.is_malicious(3) and not atk.is_malicious(0)
    for bad, msg in [({"malicious": [7]}, "out of range"), ({"malicious": [0], "target_class": 10}, "target_class"),
                     ({"malicious": [0], "poison_rate": 2}, "poison_rate"), ({"malicious": [0], "scale": 0}, "scale"),
                     ({"malicious": [0], "trigger": "nope"}, "unknown trigger")]:
        with pytest.raises(ValueError, match=msg):
            build_attack({"attack": bad}, 5, 10)

    class Holder:  # the attributes the attack touches on a peer: its training tensors and state()
        def __init__(self, w: float) -> None:
            self.x, self.y, self.w = torch.zeros(40, 1, 10), torch.arange(40) % 4, torch.tensor([w])

        def state(self) -> dict[str, torch.Tensor]:
            return {"w": self.w.clone()}

    peers = {0: Holder(1.0), 3: Holder(1.0)}
    counts = atk.poison_peers(peers)
    assert counts == {3: 15}  # 30 non-target samples, half of them
    assert int((peers[3].y == 1).sum()) == 10 + 15 and torch.equal(peers[0].y, torch.arange(40) % 4)
    atk.before_training(peers)
    peers[3].w += 0.5  # local training moved the attacker by 0.5
    sent = atk.outgoing({0: peers[0].state(), 3: peers[3].state()})
    torch.testing.assert_close(sent[3]["w"], torch.tensor([1.0 + 4.0 * 0.5]))
    torch.testing.assert_close(sent[0]["w"], torch.tensor([1.0]))
