"""The federation: building peers from a config, and the round loop, written once for every transport.

One round, for the peers hosted by this process::

    train (E local epochs) -> exchange with topology neighbours -> align -> merge -> BN reset
    -> evaluate on the global test set -> log -> checkpoint

Simulation hosts all peers with :class:`~dimat.transport.inproc.InProcTransport`; the gRPC and
torchrun entry points call :func:`build_federation` with their ``local_ids`` and :func:`run_rounds`
with their transport and a ``process_tag`` (so processes sharing a run folder write separate files).

Methods (``cfg.merge.method``), all on the same data and epoch budget:

* ``dimat`` — activation-matched alignment then mixing-weight average (the paper's method);
* ``weight_matching`` — alignment by weight matching, then average;
* ``average`` — plain mixing-weight averaging without alignment (the paper's WA baseline);
* ``gossip`` — consensus decentralized SGD: every ``gossip_every`` local steps, average with the
  mixing weights (no alignment, optimizer momentum kept, BN statistics averaged);
* ``isolated`` — peers never communicate;
* ``centralized`` — one model trained on the union of all peers' training data.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dimat.atomic import atomic_write
from dimat.confutil import plain as _plain
from dimat.merge.basis import attach_basis
from dimat.metrics import write_text_atomic as atomic_write_text
from dimat.peer import MERGE_METHODS, Peer, TrainConfig, as_tensors, merge_weights_for, state_nbytes

METHODS = (*MERGE_METHODS, "gossip", "isolated", "centralized")


class ConfigError(ValueError):
    """The configuration cannot describe a federation (reported as one line, exit code 2)."""


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` for dicts and OmegaConf nodes alike, with a default for absent/None keys."""
    if cfg is None:
        return default
    val = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if val is None else val


# ------------------------------------------------------------------------------------ building
@dataclass
class Federation:
    """Everything a process needs to run rounds for its local peers."""

    cfg: Any
    method: str
    num_peers: int
    peers: dict[int, Peer]
    test_data: tuple[torch.Tensor, torch.Tensor]
    schedule: Any | None
    partition_sizes: dict[int, int]
    model_bytes: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    attack: Any | None = None  # a dimat.attacks.Attack when some peers are malicious

    def topology_at(self, round_idx: int) -> Any:
        """The topology used in round ``round_idx`` (time-varying schedules change it)."""
        return self.schedule.at(round_idx)


def _model_kwargs(num_classes: int, input_shape: Sequence[int], extra: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_classes": int(num_classes), "input_shape": tuple(int(s) for s in input_shape)}
    kw.update({k: v for k, v in extra.items() if k != "name" and v is not None})
    return kw


def build_model_from_config(cfg: Any, num_classes: int, input_shape: Sequence[int], seed: int) -> torch.nn.Module:
    """Build the configured model with its initial weights drawn from ``seed``."""
    from dimat.models import available_models, build_model

    mcfg = _plain(cfg.model)
    name = str(mcfg.get("name", ""))
    if name not in available_models():
        raise ConfigError(f"unknown model {name!r} (available: {', '.join(sorted(available_models()))})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            return build_model(name, **_model_kwargs(num_classes, input_shape, mcfg))
        except (TypeError, ValueError) as exc:  # an option the model does not take
            msg = str(exc)
            raise ConfigError(msg if msg.startswith("model") else f"model {name!r}: {msg}") from exc


def _load_data(cfg: Any) -> Any:
    from dimat.data import load_dataset

    dcfg = _plain(cfg.data)
    name = dcfg.pop("name", None)
    root = dcfg.pop("root", None)
    dcfg.pop("val_fraction", None)
    if root is not None and not Path(str(root)).expanduser().exists():
        raise ConfigError(f"data folder {root} does not exist (data.root for data set {name!r})")
    try:
        return load_dataset(str(name), root=root, **{k: v for k, v in dcfg.items() if v is not None})
    except FileNotFoundError as exc:
        raise ConfigError(f"data set {name!r}: {exc}") from exc
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"data set {name!r}: {exc.args[0] if exc.args else exc}") from exc


def _split_peers(cfg: Any, labels: np.ndarray, num_peers: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Partition the training set, then carve each peer's local validation split."""
    from dimat.data import partition, train_val_split

    pcfg = _plain(cfg.partition)
    scheme = pcfg.pop("scheme", "iid")
    try:
        parts = partition(labels, num_peers, scheme=scheme, seed=seed, **{k: v for k, v in pcfg.items() if v is not None})
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"partition {scheme!r}: {exc.args[0] if exc.args else exc}") from exc
    val_fraction = float(_get(cfg.data, "val_fraction", 0.0))
    out = []
    for i, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            raise ConfigError(f"partition {scheme!r} left peer {i} with no data ({num_peers} peers)")
        if val_fraction > 0:
            tr, va = train_val_split(idx, val_fraction=val_fraction, seed=seed + i)
            out.append((np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)))
        else:
            out.append((idx, np.empty(0, dtype=np.int64)))
    return out


def build_schedule(cfg: Any, num_peers: int, seed: int) -> Any:
    """The (possibly time-varying) topology schedule named by ``cfg.topology``."""
    from dimat.topology import build_schedule as _build

    tcfg = _plain(cfg.topology)
    name = tcfg.pop("name", "ring")
    kw = {k: v for k, v in tcfg.items() if v is not None}
    if name in ("erdos_renyi", "random_matching"):
        kw.setdefault("seed", seed)  # random graphs follow the run's seed unless the config pins one
    try:
        return _build(name, num_peers, **kw)
    except FileNotFoundError as exc:
        raise ConfigError(f"topology {name!r}: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"topology {name!r} with {num_peers} peers: {exc.args[0] if exc.args else exc}") from exc


def train_config(cfg: Any) -> TrainConfig:
    """The :class:`TrainConfig` for ``cfg.train`` and ``cfg.merge.align_batches``."""
    t = _plain(cfg.train)
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = set(t) - known
    if unknown:
        raise ConfigError(f"unknown train option(s): {', '.join(sorted(unknown))}")
    try:
        tc = TrainConfig(**{k: v for k, v in t.items() if v is not None})
        tc.batch_size, tc.lr = int(tc.batch_size), float(tc.lr)
        tc.momentum, tc.weight_decay = float(tc.momentum), float(tc.weight_decay)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"train options: {exc}") from None
    tc.align_batches = int(_get(cfg.merge, "align_batches", tc.align_batches))
    if tc.batch_size <= 0 or tc.lr <= 0:
        raise ConfigError(f"train.batch_size and train.lr must be positive (got {tc.batch_size}, {tc.lr})")
    return tc


def _number(cfg: Any, key: str, kind: type, minimum: float, default: Any) -> Any:
    """``cfg.key`` as ``kind`` (int/float), at least ``minimum``, or a :class:`ConfigError` naming it."""
    raw = _get(cfg, key, default)
    try:
        val = kind(raw)
        if isinstance(raw, bool) or (kind is int and float(raw) != val):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'} (got {raw!r})") from None
    if val < minimum:
        raise ConfigError(f"{key} must be at least {minimum} (got {val})")
    return val


def validate_run_options(cfg: Any) -> None:
    """Check the root scalar options (rounds, epochs, seed...) before anything is built."""
    _number(cfg, "seed", int, -(2**31), 0)
    _number(cfg, "num_peers", int, 1, 5)
    _number(cfg, "rounds", int, 0, 20)
    _number(cfg, "local_epochs", float, 0, 2)
    _number(cfg, "pretrain_epochs", float, 0, 0)
    _number(cfg.merge, "align_batches", int, 1, 8)
    _number(cfg.merge, "gossip_every", int, 1, 10)


def peer_seed(seed: int, peer_id: int) -> int:
    """Per-peer seed: distinct, stable, and far from neighbouring base seeds."""
    return int(seed) * 100_003 + 1_009 * (int(peer_id) + 1)


def build_federation(cfg: Any, local_ids: Sequence[int] | None = None) -> Federation:
    """Load data, partition it, build the schedule and the peers hosted here (all by default).

    Every process builds the same partition and schedule from the same config, so processes only
    need to agree on the config, never to ship data. Raises :class:`ConfigError` on bad configs.
    """
    method = str(_get(cfg.merge, "method", "dimat"))
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r} (expected one of {', '.join(METHODS)})")
    validate_run_options(cfg)
    seed = int(_get(cfg, "seed", 0))
    num_peers = int(_get(cfg, "num_peers", 5))
    init = str(_get(cfg, "init", "different"))
    if init not in ("different", "shared"):
        raise ConfigError(f"init must be 'different' or 'shared' (got {init!r})")
    tc = train_config(cfg)
    device = str(_get(cfg, "device", "cpu"))

    # Validate the model name before the (slower) data loading.
    from dimat.models import available_models

    if str(_get(cfg.model, "name", "")) not in available_models():
        raise ConfigError(
            f"unknown model {_get(cfg.model, 'name')!r} (available: {', '.join(sorted(available_models()))})"
        )
    bundle = _load_data(cfg)
    x_train, y_train = as_tensors(bundle.train)
    test = as_tensors(bundle.test)
    splits = _split_peers(cfg, y_train.numpy(), num_peers, seed)
    schedule = None if method in ("isolated", "centralized") else build_schedule(cfg, num_peers, seed)
    if schedule is not None and getattr(schedule.at(1), "n", num_peers) != num_peers:
        raise ConfigError(f"topology has {schedule.at(1).n} peers, but num_peers={num_peers}")

    ids = list(range(num_peers)) if local_ids is None else [int(i) for i in local_ids]
    if any(i < 0 or i >= num_peers for i in ids):
        raise ConfigError(f"local peer ids {ids} out of range for {num_peers} peers")
    peer_method = method if method in MERGE_METHODS else "average"
    reset_bn = bool(_get(cfg.merge, "reset_bn", True))
    aggregator = _make_aggregator(cfg)
    consensus_basis = _consensus_basis(_get(cfg.merge, "consensus_basis", "auto"), aggregator)

    def make(pid: int, tr: np.ndarray, va: np.ndarray) -> Peer:
        init_seed = seed if init == "shared" else peer_seed(seed, pid)
        model = build_model_from_config(cfg, bundle.num_classes, bundle.input_shape, init_seed)
        val = (x_train[va], y_train[va]) if len(va) else None
        return Peer(pid, model, (x_train[tr], y_train[tr]), val, config=tc, seed=peer_seed(seed, pid) + 1,
                    device=device, merge_method=peer_method, reset_bn=reset_bn, aggregator=aggregator,
                    basis=0 if init == "shared" else pid, consensus_basis=consensus_basis)

    if method == "centralized":
        tr = np.concatenate([s[0] for s in splits])
        va = np.concatenate([s[1] for s in splits])
        peers = {0: make(0, tr, va)} if 0 in ids else {}
        sizes = {0: len(tr)}
        n_logical = 1
    else:
        peers = {pid: make(pid, *splits[pid]) for pid in ids}
        sizes = {i: len(s[0]) for i, s in enumerate(splits)}
        n_logical = num_peers
    attack = _make_attack(cfg, num_peers, bundle.num_classes) if method != "centralized" else None
    if attack is not None:
        attack.poison_peers(peers)
    any_peer = next(iter(peers.values()), None)
    model_bytes = state_nbytes(any_peer.shared_state()) if any_peer is not None else 0
    info = {"num_classes": bundle.num_classes, "input_shape": list(bundle.input_shape),
            "train_size": int(len(y_train)), "test_size": int(len(test[1]))}
    if attack is not None:
        info["attack"] = {"malicious": attack.malicious, "trigger": attack.trigger_name,
                          "target_class": attack.target_class, "poison_rate": attack.poison_rate,
                          "scale": attack.scale}
    return Federation(cfg, method, n_logical, peers, test, schedule, sizes, model_bytes, info, attack)


def _make_attack(cfg: Any, num_peers: int, num_classes: int) -> Any | None:
    from dimat.attacks import build_attack

    try:
        return build_attack(cfg, num_peers, num_classes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"attack: {exc.args[0] if exc.args else exc}") from exc


def _consensus_basis(value: Any, aggregator: Any | None) -> bool:
    """``merge.consensus_basis``: true, false, or auto = on unless a robust/safety aggregator is set.

    Under a defence, neighbours are not trusted, and the lowest basis tag (which any neighbour can
    claim) makes its model the anchor every peer aligns to in the round the federation switches
    basis; that makes it central in distance-based defences (docs/safety.md measures it).
    """
    if isinstance(value, bool):
        return value
    if str(value) == "auto":
        return aggregator is None
    raise ConfigError(f"merge.consensus_basis must be true, false or auto (got {value!r})")


def _make_aggregator(cfg: Any) -> Any | None:
    """``None`` for the default weighted mean, else a name or aggregator object for merge_states."""
    name = _get(cfg.merge, "aggregator", None)
    if name in (None, "mean"):
        return None
    kwargs = _plain(_get(cfg.merge, "aggregator_kwargs", {}))
    try:
        from dimat.merge.aggregators import get_aggregator
    except ImportError as exc:
        raise ConfigError(f"aggregator {name!r}: robust aggregators are not installed ({exc})") from exc
    try:
        return get_aggregator(str(name), **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"aggregator {name!r}: {exc.args[0] if exc.args else exc}") from exc


# ---------------------------------------------------------------------------------- checkpoints
def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`dimat.atomic.atomic_write`: never a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


class Checkpointer:
    """Per-peer, per-round checkpoints under ``<run>/checkpoints/peer_XXX/round_XXXX.pt``.

    ``progress[_tag].json`` records the last round whose checkpoints are *all* on disk; it is
    written last, so a crash mid-round resumes from the previous finished round.
    """

    def __init__(self, run_dir: Path, keep_last: int = 2, tag: str | None = None) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = max(int(keep_last), 1)
        self.progress = self.root / (f"progress_{tag}.json" if tag else "progress.json")

    def path(self, peer_id: int, round_idx: int) -> Path:
        return self.root / f"peer_{peer_id:03d}" / f"round_{round_idx:04d}.pt"

    def save(self, round_idx: int, peers: Mapping[int, Peer]) -> None:
        for pid, peer in peers.items():
            ckpt = peer.checkpoint()
            ckpt["round"] = round_idx
            ckpt["torch_rng"] = torch.get_rng_state()
            atomic_torch_save(ckpt, self.path(pid, round_idx))
        atomic_write_text(self.progress, json.dumps({"last_round": round_idx, "peers": sorted(peers)}))
        for pid in peers:
            for old in sorted(self.path(pid, 0).parent.glob("round_*.pt"))[: -self.keep_last]:
                old.unlink(missing_ok=True)

    def last_round(self) -> int | None:
        if not self.progress.exists():
            return None
        return int(json.loads(self.progress.read_text())["last_round"])

    def remove_partial_writes(self, peers: Mapping[int, Peer]) -> int:
        """Delete temporary files a killed process left mid-write (they were never renamed into place)."""
        removed = 0
        for pid in peers:
            for tmp in self.path(pid, 0).parent.glob(".round_*.tmp"):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def restore(self, round_idx: int, peers: Mapping[int, Peer]) -> None:
        self.remove_partial_writes(peers)
        rng = None
        for pid, peer in peers.items():
            p = self.path(pid, round_idx)
            if not p.exists():
                raise FileNotFoundError(f"checkpoint {p} is missing; cannot resume round {round_idx}")
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
            if int(ckpt["round"]) != round_idx:
                raise ValueError(f"checkpoint {p} is for round {ckpt['round']}, expected {round_idx}")
            peer.restore(ckpt)
            rng = ckpt.get("torch_rng", rng)
        if rng is not None:
            torch.set_rng_state(rng)


# --------------------------------------------------------------------------------- round loop
@dataclass
class RoundResult:
    """Aggregate view of one round (what the progress line prints)."""

    round: int
    mean_acc: float
    min_acc: float
    max_acc: float
    consensus: float
    bytes_sent: int
    time_s: float

    def line(self, total: int) -> str:
        return (f"round {self.round:>3}/{total} | test acc mean {self.mean_acc:.4f} min {self.min_acc:.4f} "
                f"max {self.max_acc:.4f} | consensus {self.consensus:.4g} | sent {_fmt_bytes(self.bytes_sent)} "
                f"| {self.time_s:.1f}s")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def consensus_distance(states: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean squared distance of the peers' weights to their average (0 = consensus); see dimat.metrics."""
    from dimat.metrics import consensus_distance as _cd

    return float(_cd(list(states))) if states else 0.0


def _merge_round(fed: Federation, transport: Any, topo: Any, round_idx: int, *, method: str,
                 reset_bn: bool, reset_optimizer: bool, timeout: float | None
                 ) -> tuple[int, dict[int, list[int]], dict[int, list[int]]]:
    """One exchange + merge for every local peer.

    Returns bytes sent, who each peer heard from, and which in-neighbours it missed (a neighbour
    that missed the deadline: the mixing weights were renormalised over the rest).
    """
    states = {pid: p.state() for pid, p in fed.peers.items()}
    if fed.attack is not None:
        states = fed.attack.outgoing(states)  # model replacement by malicious peers
    states = {pid: attach_basis(s, fed.peers[pid].basis) for pid, s in states.items()}
    in_nb = {pid: list(topo.in_neighbours(pid)) for pid in fed.peers}
    out_nb = {pid: list(topo.out_neighbours(pid)) for pid in fed.peers}
    received = transport.exchange(round_idx, states, in_nb, out_nb, timeout=timeout)
    sent = sum(state_nbytes(states[pid]) * len(out_nb[pid]) for pid in fed.peers)
    heard: dict[int, list[int]] = {}
    missing: dict[int, list[int]] = {}
    for pid, peer in fed.peers.items():
        got = received.get(pid, {})
        weights = merge_weights_for(pid, sorted(got), topo.weights_for(pid))
        peer.merge(got, weights, method=method, reset_bn=reset_bn, reset_optimizer=reset_optimizer)
        heard[pid] = sorted(got)
        missing[pid] = sorted(set(in_nb[pid]) - set(got))
    return sent, heard, missing


def _gossip_exchanges(fed: Federation, epochs: float, every: int) -> int:
    """Exchanges per round for consensus SGD: one every ``every`` steps of the median-size peer."""
    bs = fed.peers[next(iter(fed.peers))].config.batch_size if fed.peers else 1
    steps = [math.ceil(n / bs) * epochs for n in fed.partition_sizes.values()]
    return max(1, round(float(np.median(steps)) / max(int(every), 1)))


def train_round(fed: Federation, transport: Any, round_idx: int, epochs: float) -> dict[str, Any]:
    """Local training (and, for gossip, the interleaved averaging) of one round."""
    stats: dict[int, dict[str, float]] = {}
    sent, heard, missing = 0, {pid: [] for pid in fed.peers}, {pid: [] for pid in fed.peers}
    if fed.method == "gossip":
        every = int(_get(fed.cfg.merge, "gossip_every", 10))
        g = _gossip_exchanges(fed, epochs, every)
        topo = fed.topology_at(round_idx)
        totals = {pid: round(epochs * p.steps_per_epoch) for pid, p in fed.peers.items()}
        acc: dict[int, list[dict[str, float]]] = {pid: [] for pid in fed.peers}
        for k in range(g):
            for pid, p in fed.peers.items():
                t = totals[pid]
                acc[pid].append(p.train_steps(t * (k + 1) // g - t * k // g))
            s, heard, missed = _merge_round(fed, transport, topo, round_idx * 1_000_000 + k, method="average",
                                    reset_bn=False, reset_optimizer=False,
                                    timeout=_get(fed.cfg.transport, "timeout", None))
            sent += s
            for pid, m in missed.items():
                missing[pid] = sorted(set(missing[pid]) | set(m))
        for pid, parts in acc.items():
            n = sum(x["steps"] for x in parts) or 1
            stats[pid] = {"loss": sum(x["loss"] * x["steps"] for x in parts) / n,
                          "acc": sum(x["acc"] * x["steps"] for x in parts) / n}
        return {"train": stats, "bytes": sent, "heard": heard, "missing": missing}
    if fed.attack is not None:
        fed.attack.before_training(fed.peers)
    for pid, p in fed.peers.items():
        stats[pid] = p.train(epochs)
    if fed.method in MERGE_METHODS:
        sent, heard, missing = _merge_round(fed, transport, fed.topology_at(round_idx), round_idx, method=fed.method,
                                   reset_bn=bool(_get(fed.cfg.merge, "reset_bn", True)), reset_optimizer=True,
                                   timeout=_get(fed.cfg.transport, "timeout", None))
    return {"train": stats, "bytes": sent, "heard": heard, "missing": missing}


class RunLog:
    """metrics.jsonl (a record per peer per round) + metrics.csv, summary.json, accuracy.png, TensorBoard.

    Processes that share a run folder (gRPC, torchrun) pass a ``tag`` and write under ``<run>/<tag>/``.
    """

    def __init__(self, run_dir: Path, tag: str | None = None, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir) / tag if tag else Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.plot_path = self.run_dir / "accuracy.png"
        self.tensorboard = tensorboard
        self.rounds: list[dict[str, Any]] = []
        self._logger: Any = None

    def start(self, resume_after: int | None) -> None:
        """Open the metrics file: fresh, or (resume) keeping only rounds up to ``resume_after``."""
        from dimat.metrics import MetricsLogger, prune_jsonl

        if resume_after is None:
            self.metrics_path.unlink(missing_ok=True)
        else:
            if self.metrics_path.exists():
                prune_jsonl(self.metrics_path, resume_after)  # a crash mid-round may have logged more
            if self.summary_path.exists():
                old = json.loads(self.summary_path.read_text())
                self.rounds = [r for r in old.get("rounds", []) if r["round"] <= resume_after]
        self._logger = MetricsLogger(self.run_dir, tensorboard=self.tensorboard)

    def log(self, records: list[dict[str, Any]], result: RoundResult) -> None:
        for rec in records:
            self._logger.log(rec)
        self.rounds.append(dict(result.__dict__))

    def finish(self, summary: dict[str, Any]) -> None:
        from dimat.metrics import plot_accuracy, write_json_atomic

        self._logger.write_csv()
        self._logger.close()
        write_json_atomic(self.summary_path, summary)
        if self.metrics_path.stat().st_size > 0:
            plot_accuracy(self.metrics_path, self.plot_path, title=summary.get("title"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    from dimat.metrics import read_jsonl

    return read_jsonl(path)


def evaluate_round(fed: Federation, round_idx: int, train_out: dict[str, Any], elapsed: float) -> tuple[list[dict[str, Any]], RoundResult]:
    """Evaluate every local peer on the global test set and on its validation split."""
    records: list[dict[str, Any]] = []
    accs: list[float] = []
    bytes_per_peer = train_out["bytes"] / max(len(fed.peers), 1)
    for pid, p in sorted(fed.peers.items()):
        test = p.evaluate(fed.test_data)
        val = p.evaluate_val()
        tr = train_out["train"].get(pid, {})
        records.append({
            "round": round_idx, "peer": pid, "method": fed.method,
            "test_acc": test["acc"], "test_loss": test["loss"],
            "val_acc": None if val is None else val["acc"], "val_loss": None if val is None else val["loss"],
            "train_loss": tr.get("loss"), "train_acc": tr.get("acc"),
            "neighbours": train_out["heard"].get(pid, []), "missing": train_out.get("missing", {}).get(pid, []),
            "bytes_sent": int(bytes_per_peer),
        })
        if fed.attack is not None:
            records[-1].update({"malicious": fed.attack.is_malicious(pid), "clean_acc": test["acc"],
                                "asr": fed.attack.evaluate(p.model, *fed.test_data)})
        accs.append(test["acc"])
    cd = consensus_distance([p.state() for p in fed.peers.values()])
    res = RoundResult(round_idx, float(np.mean(accs)), float(np.min(accs)), float(np.max(accs)), cd,
                      int(train_out["bytes"]), elapsed)
    return records, res


def run_rounds(
    fed: Federation,
    transport: Any,
    run_dir: str | Path,
    *,
    resume: bool = False,
    process_tag: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the configured rounds for ``fed``'s local peers; returns the summary.

    ``resume=True`` restores every local peer from the last round finished in ``run_dir`` and
    continues from there; the result equals an uninterrupted run.
    """
    cfg = fed.cfg
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    total = int(_get(cfg, "rounds", 20))
    epochs = float(_get(cfg, "local_epochs", 2))
    pre = float(_get(cfg, "pretrain_epochs", 0))
    ck_cfg = _get(cfg, "checkpoint", {})
    ckpt = Checkpointer(run_dir, keep_last=int(_get(ck_cfg, "keep_last", 2)), tag=process_tag)
    save_ckpt = bool(_get(ck_cfg, "enabled", True))
    log = RunLog(run_dir, tag=process_tag, tensorboard=bool(_get(cfg, "tensorboard", False)))
    start = 0
    if resume:
        last = ckpt.last_round()
        if last is None:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no finished round recorded")
        ckpt.restore(last, fed.peers)
        start = last
    log.start(start if resume else None)

    say = echo or (lambda s: None)
    t_run = time.perf_counter()
    if start == 0 and pre > 0:
        t0 = time.perf_counter()
        out = {"train": {pid: p.train(pre) for pid, p in fed.peers.items()}, "bytes": 0, "heard": {}}
        records, res = evaluate_round(fed, 0, out, time.perf_counter() - t0)
        log.log(records, res)
        say(res.line(total))
        if save_ckpt:
            ckpt.save(0, fed.peers)

    bar = None
    if progress and start < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{fed.method}", unit="round", leave=False, dynamic_ncols=True)
    for r in range(start + 1, total + 1):
        t0 = time.perf_counter()
        out = train_round(fed, transport, r, epochs)
        records, res = evaluate_round(fed, r, out, 0.0)
        res.time_s = time.perf_counter() - t0
        log.log(records, res)
        if save_ckpt:
            ckpt.save(r, fed.peers)
        if bar is not None:
            bar.update(1)
            bar.write(res.line(total))
        else:
            say(res.line(total))
    if bar is not None:
        bar.close()

    summary = make_summary(fed, log.rounds, time.perf_counter() - t_run, total)
    log.finish(summary)
    return summary


def make_summary(fed: Federation, rounds: list[dict[str, Any]], wall: float, total: int) -> dict[str, Any]:
    """Final figures of a run (what summary.json holds)."""
    last = rounds[-1] if rounds else None
    return {
        "title": f"{fed.method} · {_get(fed.cfg.model, 'name')} · {_get(fed.cfg.data, 'name')} · "
                 f"{fed.num_peers} peer(s) · {_get(fed.cfg.topology, 'name')}",
        "method": fed.method,
        "num_peers": fed.num_peers,
        "local_peers": sorted(fed.peers),
        "rounds_planned": total,
        "rounds_done": last["round"] if last else 0,
        "final_mean_acc": last["mean_acc"] if last else None,
        "final_min_acc": last["min_acc"] if last else None,
        "final_max_acc": last["max_acc"] if last else None,
        "best_mean_acc": max((r["mean_acc"] for r in rounds), default=None),
        "total_bytes_sent": int(sum(r["bytes_sent"] for r in rounds)),
        "model_bytes": fed.model_bytes,
        "wall_time_s_this_session": wall,
        "data": fed.info,
        "rounds": rounds,
    }


def simulate(cfg: Any, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build every peer in this process and run the federation with the in-process transport."""
    from dimat.transport.inproc import InProcTransport

    threads = _get(cfg, "threads", None)
    if threads:
        torch.set_num_threads(int(threads))
    transport_name = str(_get(cfg.transport, "name", "inproc"))
    if transport_name != "inproc":
        raise ConfigError(f"`dimat simulate` runs in one process; transport={transport_name!r} needs its own launcher")
    fed = build_federation(cfg)
    transport = InProcTransport()
    try:
        return run_rounds(fed, transport, run_dir, resume=resume, progress=progress and bool(_get(cfg, "progress", True)),
                          echo=echo)
    finally:
        transport.close()


__all__ = [
    "METHODS", "ConfigError", "Federation", "build_federation", "run_rounds", "simulate", "train_round",
    "Checkpointer", "RunLog", "consensus_distance", "read_metrics", "atomic_torch_save", "peer_seed",
]
