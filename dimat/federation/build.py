"""Building a federation from a :class:`~dimat.config.RunConfig`: data, partition, schedule, peers.

Every process builds the same partition and schedule from the same config, so processes only need
to agree on the config, never to ship data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dimat.config import MERGE_METHODS, ConfigError, RunConfig
from dimat.peer import Peer, as_tensors


@dataclass
class Federation:
    """Everything a process needs to run rounds for its local peers."""

    config: RunConfig
    peers: dict[int, Peer]
    test_data: tuple[torch.Tensor, torch.Tensor]
    schedule: Any | None
    partition_sizes: dict[int, int]
    num_peers: int
    info: dict[str, Any] = field(default_factory=dict)
    attack: Any | None = None  # a dimat.attacks.Attack when some peers are malicious
    compressor: Any | None = None  # a dimat.exchange.Compressor when `exchange` changes what is sent
    #: the local peers as one stacked computation (``vectorise``), when they can be stacked
    stacked: Any | None = None

    @property
    def method(self) -> str:
        return self.config.merge.method

    def topology_at(self, round_idx: int) -> Any:
        """The topology used in round ``round_idx`` (time-varying schedules change it)."""
        return self.schedule.at(round_idx)


def _first_arg(exc: BaseException) -> Any:
    return exc.args[0] if exc.args else exc


def build_model(run: RunConfig, num_classes: int, input_shape: Sequence[int], seed: int) -> torch.nn.Module:
    """The configured model with its initial weights drawn from ``seed``."""
    from dimat.models import build_model as _build

    name = run.model.name
    width = run.model.options.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0):
        raise ConfigError(f"model.width must be a positive number (got {width!r})")
    kw = {"num_classes": int(num_classes), "input_shape": tuple(int(s) for s in input_shape), **run.model.options}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = _build(name, **kw)
        except (TypeError, ValueError) as exc:  # an option the model does not take
            msg = str(exc)
            raise ConfigError(msg if msg.startswith("model") else f"model {name!r}: {msg}") from exc
    check_model_fits(model, run, input_shape)
    return model


def check_model_fits(model: torch.nn.Module, run: RunConfig, input_shape: Sequence[int]) -> None:
    """A forward pass on two zero inputs of the data's shape: a model that cannot take the data is a config error.

    Run in eval mode without gradients (no randomness, no BatchNorm statistics touched).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *(int(s) for s in input_shape)))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model {run.model.name!r} does not fit data {run.data.name!r} "
                          f"(input shape {list(input_shape)}): {first}") from None
    finally:
        model.train(was_training)


def check_model_name(run: RunConfig) -> None:
    from dimat.models import available_models

    if run.model.name not in available_models():
        raise ConfigError(f"unknown model {run.model.name!r} (available: {', '.join(sorted(available_models()))})")


def load_data(run: RunConfig) -> Any:
    import inspect

    from dimat.data import load_dataset
    from dimat.data.bundle import get_loader

    d = run.data
    if d.root is not None and not Path(d.root).expanduser().exists():
        raise ConfigError(f"data folder {d.root} does not exist (data.root for data set {d.name!r})")
    options = dict(d.options)
    if d.samples_per_peer is not None:  # a generated set grows with the federation (the loader sizes it)
        if "min_train" not in inspect.signature(get_loader(d.name)).parameters:
            raise ConfigError(f"data.samples_per_peer: data set {d.name!r} has a fixed size (only generated sets take it)")
        options["min_train"] = d.samples_per_peer * run.num_peers
    try:
        return load_dataset(d.name, root=d.root, **options)
    except FileNotFoundError as exc:
        raise ConfigError(f"data set {d.name!r}: {exc}") from exc
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"data set {d.name!r}: {_first_arg(exc)}") from exc


def split_peers(run: RunConfig, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Partition the training set, then carve each peer's local validation split."""
    from dimat.data import partition, train_val_split

    scheme = run.partition.name
    try:
        parts = partition(labels, run.num_peers, scheme=scheme, seed=run.seed, **run.partition.options)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"partition {scheme!r}: {_first_arg(exc)}") from exc
    out = []
    for i, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            raise ConfigError(f"partition {scheme!r} left peer {i} with no data ({run.num_peers} peers)")
        if run.data.val_fraction > 0:
            tr, va = train_val_split(idx, val_fraction=run.data.val_fraction, seed=run.seed + i)
            out.append((np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)))
        else:
            out.append((idx, np.empty(0, dtype=np.int64)))
    return out


def build_schedule(run: RunConfig) -> Any:
    """The (possibly time-varying) topology schedule named by ``run.topology``."""
    from dimat.topology import build_schedule as _build

    name, kw = run.topology.name, dict(run.topology.options)
    if name == "matrix" and kw.get("path") in (None, "", "???"):
        raise ConfigError("topology=matrix needs topology.path=<file> (a mixing matrix as .npy, .txt or .csv)")
    if name in ("erdos_renyi", "random_matching"):
        kw.setdefault("seed", run.seed)  # random graphs follow the run's seed unless the config pins one
    try:
        schedule = _build(name, run.num_peers, **kw)
    except FileNotFoundError as exc:
        raise ConfigError(f"topology {name!r}: {exc}") from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"topology {name!r} with {run.num_peers} peers: {_first_arg(exc)}") from exc
    if getattr(schedule.at(1), "n", run.num_peers) != run.num_peers:
        raise ConfigError(f"topology has {schedule.at(1).n} peers, but num_peers={run.num_peers}")
    return schedule


def proxy_indices(run: RunConfig, labels: np.ndarray) -> np.ndarray | None:
    """The public proxy set (``merge.proxy_samples``): a class-balanced sample of the training set.

    Drawn from its own stream of the run seed, so the partition is the same with and without it; the
    samples stay in the peers' partitions too (the reference code uses the whole training set).
    """
    n = run.merge.proxy_samples
    if n == 0:
        return None
    if n > len(labels):
        raise ConfigError(f"merge.proxy_samples={n} exceeds the training set ({len(labels)} samples)")
    rng = np.random.default_rng([abs(int(run.seed)), 0x9E37])
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:  # round robin over classes: balanced while every class has samples left
        for idx in by_class:
            if depth < len(idx) and len(picked) < n:
                picked.append(int(idx[depth]))
        depth += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


def peer_seed(seed: int, peer_id: int) -> int:
    """Per-peer seed: distinct, stable, and far from neighbouring base seeds."""
    return int(seed) * 100_003 + 1_009 * (int(peer_id) + 1)


def build_aggregator(run: RunConfig) -> Any | None:
    """``None`` for the default weighted mean, else the configured aggregator object."""
    from dimat.merge.aggregators import get_aggregator

    name = run.merge.aggregator
    if name == "mean":
        return None
    try:
        return get_aggregator(name, **run.merge.aggregator_kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"aggregator {name!r}: {_first_arg(exc)}") from exc


def consensus_basis(run: RunConfig, aggregator: Any | None) -> bool:
    """``merge.consensus_basis``; auto (None) = on unless a robust/safety aggregator is set.

    Under a defence, neighbours are not trusted, and the lowest basis tag (which any neighbour can
    claim) makes its model the anchor every peer aligns to in the round the federation switches
    basis; that makes it central in distance-based defences (docs/safety.md measures it).
    """
    return aggregator is None if run.merge.consensus_basis is None else run.merge.consensus_basis


def build_attack(run: RunConfig, num_classes: int) -> Any | None:
    from dimat.attacks import build_attack as _build

    try:
        return _build(run.attack, run.num_peers, num_classes)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"attack: {_first_arg(exc)}") from exc


def build_federation(cfg: Any, local_ids: Sequence[int] | None = None) -> Federation:
    """Load data, partition it, build the schedule and the peers hosted here (all by default).

    ``cfg`` is a :class:`RunConfig` or a composed config (validated here). Raises
    :class:`ConfigError` on bad configs.
    """
    run = RunConfig.from_config(cfg)
    method = run.merge.method
    check_model_name(run)  # before the (slower) data loading
    bundle = load_data(run)
    x_train, y_train = as_tensors(bundle.train)
    test = as_tensors(bundle.test)
    splits = split_peers(run, y_train.numpy())
    schedule = None if method in ("isolated", "centralized") else build_schedule(run)

    ids = list(range(run.num_peers)) if local_ids is None else [int(i) for i in local_ids]
    if any(i < 0 or i >= run.num_peers for i in ids):
        raise ConfigError(f"local peer ids {ids} out of range for {run.num_peers} peers")
    aggregator = build_aggregator(run)
    one_basis = consensus_basis(run, aggregator)
    proxy_idx = proxy_indices(run, y_train.numpy())
    proxy = (x_train[proxy_idx], y_train[proxy_idx]) if proxy_idx is not None else None

    def make(pid: int, tr: np.ndarray, va: np.ndarray) -> Peer:
        init_seed = run.seed if run.init == "shared" else peer_seed(run.seed, pid)
        model = build_model(run, bundle.num_classes, bundle.input_shape, init_seed)
        val = (x_train[va], y_train[va]) if len(va) else None
        return Peer(pid, model, (x_train[tr], y_train[tr]), val, config=run.train, seed=peer_seed(run.seed, pid) + 1,
                    device=run.device, merge_method=method if method in MERGE_METHODS else "average",
                    bn_stats=run.merge.bn_stats, aggregator=aggregator,
                    basis=0 if run.init == "shared" else pid, consensus_basis=one_basis, proxy=proxy,
                    rebase=run.merge.rebase)

    if method == "centralized":
        tr = np.concatenate([s[0] for s in splits])
        va = np.concatenate([s[1] for s in splits])
        peers = {0: make(0, tr, va)} if 0 in ids else {}
        sizes, n_logical, attack = {0: len(tr)}, 1, None
    else:
        peers = {pid: make(pid, *splits[pid]) for pid in ids}
        sizes = {i: len(s[0]) for i, s in enumerate(splits)}
        n_logical = run.num_peers
        attack = build_attack(run, bundle.num_classes)
    if attack is not None:
        attack.poison_peers(peers)
    any_peer = next(iter(peers.values()), None)
    info = {"num_classes": bundle.num_classes, "input_shape": list(bundle.input_shape),
            "train_size": int(len(y_train)), "test_size": int(len(test[1])),
            "model_bytes": state_bytes(any_peer.shared_state()) if any_peer is not None else 0}
    # results made with data every peer sees are marked as such (summary.json, the closing line)
    info["shared_data"] = (None if proxy is None else
                           f"public proxy set: {len(proxy_idx)} training samples used by every peer for merging")
    if attack is not None:
        info["attack"] = {"malicious": attack.malicious, "trigger": attack.trigger_name,
                          "target_class": attack.target_class, "poison_rate": attack.poison_rate,
                          "scale": attack.scale}
    stacked = None
    if run.vectorise:
        from dimat.federation.stacked import stack_peers

        stacked = stack_peers(peers, run.vectorise_chunk)
        info["executor"] = "stacked" if stacked is not None else "per-peer (these peers cannot be stacked)"
    return Federation(run, peers, test, schedule, sizes, n_logical, info, attack, _compressor(run, n_logical), stacked)


def _compressor(run: RunConfig, n_peers: int) -> Any | None:
    """The exchange's compression step, or None when payloads would equal the states."""
    from dimat.exchange import Compressor

    c = Compressor(run.exchange, n_peers=n_peers, seed=run.seed)
    return c if c.active else None


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Raw tensor bytes of a state (one uncompressed message's payload; reported, not counted)."""
    return sum(t.numel() * t.element_size() for t in state.values())
