"""Building a federation from a :class:`~dimat.config.RunConfig`: data, partition, schedule, method, peers.

Every process builds the same partition and schedule from the same config, so processes only need
to agree on the config, never to ship data.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dimat.attacks import Attack, build_attack as _build_attack
from dimat.config import ConfigError, RunConfig
from dimat.data import load_dataset, partition, train_val_split
from dimat.data.bundle import get_loader
from dimat.exchange import Compressor
from dimat.federation.stacked import StackedPeers, stack_peers
from dimat.federation.workers import SERIAL, PeerPool
from dimat.methods import Method, build_method
from dimat.models import available_models, build_model as _build_model
from dimat.peer import Peer, as_tensors
from dimat.seeds import INIT, PROXY, VAL_SPLIT, derive_seed
from dimat.topology import build_schedule as _build_schedule
from dimat.transport.inproc import state_nbytes


@dataclass
class Federation:
    """Everything a process needs to run rounds for its local peers."""

    config: RunConfig
    peers: dict[int, Peer]
    test_data: tuple[torch.Tensor, torch.Tensor]
    schedule: Any | None
    partition_sizes: dict[int, int]
    num_peers: int
    #: the algorithm (dimat.methods): when peers exchange, what they send, how they merge
    method: Method
    info: dict[str, Any] = field(default_factory=dict)
    attack: Attack | None = None  # when some peers are malicious
    compressor: Compressor | None = None  # when `exchange` changes what is sent
    #: the local peers as one stacked computation (``vectorise``), when they can be stacked
    stacked: StackedPeers | None = None
    #: the threads local training and evaluation run on (``workers``; set by the round loop for its run)
    pool: PeerPool = SERIAL

    def topology_at(self, round_idx: int) -> Any:
        """The topology used in round ``round_idx`` (time-varying schedules change it)."""
        return self.schedule.at(round_idx)

    def local_steps(self, peer: Peer) -> int:
        """SGD steps ``peer`` takes in one round: ``local_steps``, else ``local_epochs`` passes over its data."""
        run = self.config
        return int(run.local_steps) if run.local_steps else round(run.local_epochs * peer.steps_per_epoch)

    def exchanges_per_round(self) -> int:
        """Exchanges in one round: the method's rule over every peer's local steps (0: never).

        From the partition sizes, which every process knows, so all agree without talking.
        """
        run = self.config
        if run.local_steps:
            steps = [int(run.local_steps)] * len(self.partition_sizes)
        else:
            steps = [-(-n // run.train.batch_size) * run.local_epochs for n in self.partition_sizes.values()]
        return self.method.exchanges_per_round(steps)


def _first_arg(exc: BaseException) -> Any:
    return exc.args[0] if exc.args else exc


# a TypeError of these shapes is an option the builder does not take (the user's to fix); any other
# TypeError, and every KeyError, is a bug in the code and stays a traceback with its cause
_BAD_OPTION = re.compile(r"unexpected keyword argument|required (positional|keyword-only) argument|"
                         r"takes \d+ positional|takes no (keyword )?arguments")


def configured(what: str, build: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """``build(*args, **options)`` for options from the config: what the user can fix is one ConfigError line.

    A ``ValueError`` (a value the builder refuses, by this project's convention) or an option the
    builder does not take becomes a :class:`ConfigError` starting with ``what``; anything else
    propagates unchanged, so a bug in the code never reads as a mistake in the config.

    Args:
        what: the config key or component, e.g. ``"partition 'dirichlet'"``.
        build: the builder.
    """
    try:
        return build(*args, **options)
    except ConfigError:
        raise
    except ValueError as exc:
        msg = str(_first_arg(exc))
        raise ConfigError(msg if msg.startswith(what.split()[0]) else f"{what}: {msg}") from exc
    except TypeError as exc:
        if _BAD_OPTION.search(str(exc)):
            raise ConfigError(f"{what}: {exc}") from exc
        raise


def build_model(run: RunConfig, num_classes: int, input_shape: Sequence[int], seed: int) -> torch.nn.Module:
    """The configured model with its initial weights drawn from ``seed``."""
    name = run.model.name
    width = run.model.options.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0):
        raise ConfigError(f"model.width must be a positive number (got {width!r})")
    kw = {"num_classes": int(num_classes), "input_shape": tuple(int(s) for s in input_shape), **run.model.options}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = configured(f"model {name!r}", _build_model, name, **kw)
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
    if run.model.name not in available_models():
        raise ConfigError(f"unknown model {run.model.name!r} (available: {', '.join(sorted(available_models()))})")


def load_data(run: RunConfig) -> Any:
    d = run.data
    if d.root is not None and not Path(d.root).expanduser().exists():
        raise ConfigError(f"data folder {d.root} does not exist (data.root for data set {d.name!r})")
    options = dict(d.options)
    if d.samples_per_peer is not None:  # a generated set grows with the federation (the loader sizes it)
        if "min_train" not in inspect.signature(get_loader(d.name)).parameters:
            raise ConfigError(f"data.samples_per_peer: data set {d.name!r} has a fixed size (only generated sets take it)")
        options["min_train"] = d.samples_per_peer * run.num_peers
    try:
        return configured(f"data set {d.name!r}", load_dataset, d.name, root=d.root, **options)
    except FileNotFoundError as exc:
        raise ConfigError(f"data set {d.name!r}: {exc}") from exc


def split_peers(run: RunConfig, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Partition the training set, then carve each peer's local validation split."""
    scheme = run.partition.name
    parts = configured(f"partition {scheme!r}", partition, labels, run.num_peers, scheme=scheme, seed=run.seed,
                       **run.partition.options)
    out = []
    for i, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            raise ConfigError(f"partition {scheme!r} left peer {i} with no data ({run.num_peers} peers)")
        if run.data.val_fraction > 0:
            tr, va = train_val_split(idx, val_fraction=run.data.val_fraction, seed=derive_seed(run.seed, VAL_SPLIT, i) % 2**32)
            out.append((np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)))
        else:
            out.append((idx, np.empty(0, dtype=np.int64)))
    return out


def build_schedule(run: RunConfig) -> Any:
    """The (possibly time-varying) topology schedule named by ``run.topology``."""
    name, kw = run.topology.name, dict(run.topology.options)
    if name == "matrix" and kw.get("path") in (None, "", "???"):
        raise ConfigError("topology=matrix needs topology.path=<file> (a mixing matrix as .npy, .txt or .csv)")
    if name in ("erdos_renyi", "random_matching"):
        kw.setdefault("seed", run.seed)  # random graphs follow the run's seed unless the config pins one
    try:
        schedule = configured(f"topology {name!r} with {run.num_peers} peers", _build_schedule, name,
                              run.num_peers, **kw)
    except FileNotFoundError as exc:
        raise ConfigError(f"topology {name!r}: {exc}") from exc
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
    rng = np.random.default_rng(derive_seed(run.seed, PROXY))
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:  # round robin over classes: balanced while every class has samples left
        for idx in by_class:
            if depth < len(idx) and len(picked) < n:
                picked.append(int(idx[depth]))
        depth += 1
    return np.sort(np.asarray(picked, dtype=np.int64))


def build_attack(run: RunConfig, num_classes: int) -> Attack | None:
    return configured("attack", _build_attack, run.attack, run.num_peers, num_classes)


def build_federation(cfg: Any, local_ids: Sequence[int] | None = None) -> Federation:
    """Load data, partition it, build the method, the schedule and the peers hosted here (all by default).

    Args:
        cfg: a :class:`RunConfig` or a composed config (validated here).
        local_ids: the peers this process hosts (None: every peer).

    Raises :class:`ConfigError` on a config that cannot describe a federation.
    """
    run = RunConfig.from_config(cfg)
    method = configured("merge", build_method, run.merge)
    if isinstance(run.exchange.choco_step, float) and not method.choco:
        raise ConfigError("exchange.choco_step is the CHOCO consensus step: it needs a method that mixes states "
                          f"(got merge={method.name})")
    check_model_name(run)  # before the (slower) data loading
    bundle = load_data(run)
    x_train, y_train = as_tensors(bundle.train)
    test = as_tensors(bundle.test)
    splits = split_peers(run, y_train.numpy())

    ids = list(range(run.num_peers)) if local_ids is None else [int(i) for i in local_ids]
    if any(i < 0 or i >= run.num_peers for i in ids):
        raise ConfigError(f"local peer ids {ids} out of range for {run.num_peers} peers")
    proxy_idx = proxy_indices(run, y_train.numpy())
    proxy = (x_train[proxy_idx], y_train[proxy_idx]) if proxy_idx is not None else None

    def make(pid: int, tr: np.ndarray, va: np.ndarray) -> Peer:
        init_seed = derive_seed(run.seed, INIT) if run.init == "shared" else derive_seed(run.seed, INIT, pid)
        model = build_model(run, bundle.num_classes, bundle.input_shape, init_seed)
        val = (x_train[va], y_train[va]) if len(va) else None
        peer = Peer(pid, model, (x_train[tr], y_train[tr]), val, config=run.train, seed=run.seed,
                    device=run.device, proxy=proxy)
        if run.init == "shared":
            peer.basis = 0  # one init: every model starts in one unit ordering (dimat.merge.basis)
        return peer

    attack = None
    if method.centralized:
        tr = np.concatenate([s[0] for s in splits])
        va = np.concatenate([s[1] for s in splits])
        peers = {0: make(0, tr, va)} if 0 in ids else {}
        sizes, n_logical = {0: len(tr)}, 1
    else:
        peers = {pid: make(pid, *splits[pid]) for pid in ids}
        sizes = {i: len(s[0]) for i, s in enumerate(splits)}
        n_logical = run.num_peers
        attack = build_attack(run, bundle.num_classes)
    for peer in peers.values():
        method.setup(peer)
    if attack is not None:
        attack.poison_peers(peers)
    any_peer = next(iter(peers.values()), None)
    info = {"num_classes": bundle.num_classes, "input_shape": list(bundle.input_shape),
            "train_size": int(len(y_train)), "test_size": int(len(test[1])),
            # one model state with its tag: the unit of "one merge" (a method's extras are not in it)
            "model_bytes": state_nbytes(any_peer.shared_state()) if any_peer is not None else 0}
    # results made with data every peer sees are marked as such (summary.json, the closing line)
    info["shared_data"] = (None if proxy is None else
                           f"public proxy set: {len(proxy_idx)} training samples used by every peer for merging")
    if attack is not None:
        info["attack"] = {"malicious": attack.malicious, "trigger": attack.trigger_name,
                          "target_class": attack.target_class, "poison_rate": attack.poison_rate,
                          "scale": attack.scale}
    stacked = None
    if run.vectorise:
        stacked = stack_peers(peers, run.vectorise_chunk)
        info["executor"] = "stacked" if stacked is not None else "per-peer (these peers cannot be stacked)"
    fed = Federation(run, peers, test, None, sizes, n_logical, method, info, attack, _compressor(run, n_logical, consensus=method.choco),
                     stacked)
    if fed.exchanges_per_round() > 0:
        fed.schedule = build_schedule(run)
    return fed


def _compressor(run: RunConfig, n_peers: int, *, consensus: bool = False) -> Compressor | None:
    """The exchange's compression step, or None when payloads would equal the states."""
    c = Compressor(run.exchange, n_peers=n_peers, seed=run.seed, consensus=consensus)
    return c if c.active else None
