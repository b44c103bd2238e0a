"""The method interface: built-ins by name, a user's method from outside dimat, extras, errors.

``SharedMomentum`` below is a method defined here, outside dimat: DIMAT that also sends its
optimizer momentum as an extra tensor and averages the neighbours' (aligned with their weights)
into its own. ``tests/test_topologies_everywhere.py`` runs it on simulate, gRPC and torchrun and
checks that every transport gives the same metrics and the same ``bytes_sent``.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping

import pytest
import torch

from dimat.config import ConfigError
from dimat.entry import compose, default_method
from dimat.federation import build_federation, simulate
from dimat.methods import Dimat, Method, available_methods
from dimat.peer import Peer
from dimat.topology.membership import renormalise

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data=digits", "model=mlp", "model.hidden=[16]", "num_peers=4", "rounds=2", "local_epochs=0.25",
        "progress=false", "checkpoint.enabled=true", "baseline=null", "merge.every_steps=null"]


class SharedMomentum(Dimat):
    """DIMAT whose peers also send their momentum and average the neighbours' into their own."""

    name = "shared_momentum"

    def extras(self, peer: Peer) -> dict[str, torch.Tensor]:
        state = peer.optimizer.state
        return {n: state[q]["momentum_buffer"] if "momentum_buffer" in state.get(q, {}) else torch.zeros_like(q)
                for n, q in peer.model.named_parameters()}

    def merge(self, peer: Peer, received: Mapping[int, Mapping[str, torch.Tensor]], weights: Mapping[int, float],
              *, shared=None) -> dict[str, torch.Tensor]:
        own = {k: v.clone() for k, v in self.extras(peer).items()}
        merged = super().merge(peer, received, weights, shared=shared)
        # own momentum moved with the relabelling the merge did, the neighbours' with their alignment
        own = self.extras(peer) if not self.reset_optimizer else own
        row = renormalise(weights, received, self_id=peer.id)
        got = self.received_extras(peer, received)
        for n, q in peer.model.named_parameters():
            avg = row[peer.id] * own[n] + sum(row[j] * got[j][n] for j in got)
            peer.optimizer.state[q]["momentum_buffer"] = avg.clone()
        self.peer_state[peer.id] = {"merges": torch.tensor(self._merges(peer) + 1)}
        return merged

    def _merges(self, peer: Peer) -> int:
        return int(self.peer_state.get(peer.id, {}).get("merges", torch.tensor(0)))


def test_every_builtin_is_one_registered_module() -> None:
    names = set(available_methods())
    assert {"dimat", "weight_matching", "average", "gossip", "isolated", "centralized", "custom"} <= names
    for name in names - {"custom"}:
        assert (ROOT / "dimat" / "methods" / f"{name}.py").exists(), name
        assert (ROOT / "configs" / "merge" / f"{name}.yaml").exists(), name


def test_no_method_name_is_compared_outside_the_methods_package() -> None:
    """The loop asks the method; a string comparison with a method's name elsewhere is a second owner."""
    names = set(available_methods())
    offenders = []
    for path in (ROOT / "dimat").rglob("*.py"):
        if "methods" in path.relative_to(ROOT / "dimat").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.Eq, ast.NotEq)):  # x == "gossip"
                    sides = [node.left, right]
                elif isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                    sides = list(right.elts)  # x in ("dimat", "average")
                else:
                    continue
                for lit in sides:
                    if isinstance(lit, ast.Constant) and lit.value in names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lit.value!r}")
    assert not offenders, offenders


def test_peer_is_a_trainer_with_at_most_eight_arguments() -> None:
    params = [p for p in inspect.signature(Peer.__init__).parameters if p != "self"]
    assert len(params) <= 8, params
    assert not any(hasattr(Peer, a) for a in ("merge", "merge_method", "aggregator", "rebase"))


def test_a_custom_method_runs_and_its_extras_are_sent_and_checkpointed(tmp_path: Path) -> None:
    args = [*TINY, "merge=custom", f"merge.class={__name__}:SharedMomentum", f"run_dir={tmp_path / 'c'}"]
    summary = simulate(compose(args), tmp_path / "c", progress=False)
    plain = simulate(compose([*TINY, "merge=dimat", f"run_dir={tmp_path / 'd'}"]), tmp_path / "d", progress=False)
    assert summary["final_mean_acc"] is not None and summary["method"] == "shared_momentum"
    # the momentum (one tensor per parameter) doubles the parameters' share of every message
    sent = summary["rounds"][-1]["bytes_sent"]
    assert sent > 1.8 * plain["rounds"][-1]["bytes_sent"]
    ckpt = torch.load(tmp_path / "c" / "checkpoints" / "peer_000" / "round_0002.pt", weights_only=True)
    assert int(ckpt["method"]["merges"]) == 2  # the method's per-peer state travels with the peer


def test_resume_restores_the_methods_state(tmp_path: Path) -> None:
    args = [*TINY, "merge=custom", f"merge.class={__name__}:SharedMomentum"]
    simulate(compose([*args, "rounds=1", f"run_dir={tmp_path}"]), tmp_path, progress=False)
    cfg = compose([*args, f"run_dir={tmp_path}", "resume=true"])
    fed = build_federation(cfg)
    from dimat.federation.checkpoints import Checkpointer

    Checkpointer(tmp_path).restore(1, fed.peers, fed.method)
    assert all(int(fed.method.peer_state[p]["merges"]) == 1 for p in fed.peers)


def test_configured_methods_and_bad_ones_are_one_line() -> None:
    assert build_federation(compose([*TINY, "merge=gossip"])).method.name == "gossip"
    cases = [
        (["merge.method=magic"], "unknown merge method 'magic'"),
        (["merge=custom"], "merge=custom needs merge.class"),
        (["merge=custom", "merge.class=no_such_module:X"], "cannot import 'no_such_module'"),
        (["merge=custom", "merge.class=collections:OrderedDict"], "not a subclass of dimat.methods.Method"),
        (["+merge.class=tests.test_methods:SharedMomentum"], "merge.class is for merge=custom"),
        (["merge=dimat", "+merge.my_option=3"], "unknown merge option\\(s\\) for merge.method=dimat: my_option"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_federation(compose([*TINY, *overrides]))


class BuggyNet(torch.nn.Module):
    """A model whose constructor has a bug (not a config mistake)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.width = None + num_classes  # TypeError: a bug


def test_a_bug_in_a_builder_is_a_traceback_not_a_config_error() -> None:
    """Only what the user can fix reads as a config error (build.py used to turn every TypeError/ValueError/
    KeyError into one); an option the model does not take still is one line."""
    base = [a for a in TINY if not a.startswith("model")]
    with pytest.raises(TypeError, match="unsupported operand"):
        build_federation(compose([*base, "model=custom", "model.class=tests.test_methods:BuggyNet"]))
    with pytest.raises(ConfigError, match="does not take"):
        build_federation(compose([*base, "model=custom", "model.class=tests.test_methods:BuggyNet",
                                  "+model.depth=3"]))


def test_default_method_is_the_configs() -> None:
    """Defaults have one source: a method built outside a run takes configs/ (bn_stats mixture today)."""
    run_default = build_federation(compose(TINY)).method
    assert run_default.name == "scaffold" and default_method("scaffold").settings == run_default.settings
    assert default_method("dimat").settings.bn_stats == "mixture" == compose([])["merge"]["bn_stats"]


def _code_block(path: Path) -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, path
    return blocks[0]


@pytest.mark.integration
def test_the_docs_method_runs_from_a_file_of_its_own(tmp_path: Path) -> None:
    code = _code_block(ROOT / "docs" / "methods.md")
    assert len(code.strip().splitlines()) <= 40
    (tmp_path / "my_method.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "dimat", "simulate", *TINY, "merge=custom",
                           "merge.class=my_method:NeighbourMedian", f"run_dir={tmp_path / 'run'}", "threads=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "final test accuracy" in proc.stdout
