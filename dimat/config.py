"""The run configuration as typed records, validated once from the composed Hydra config.

Every default lives in ``configs/`` (the YAML files); nothing here supplies a value the config did
not give. :func:`RunConfig.from_config` checks types and ranges once and raises
:class:`ConfigError` with one line naming the key; builders, the round loop and every entry point
read the typed record, never the raw config. ``RunConfig.raw`` keeps the resolved plain mapping so a
run folder can record exactly what ran.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import OmegaConf

from dimat.exchange.codecs import CHANGE_ONLY, CODECS, LOSSLESS, SPARSE
from dimat.merge.api import BN_STATS
from dimat.merge.basis import REBASE_MODES
from dimat.train.schedule import SCHEDULES
from dimat.transport.settings import TransportSettings

# keys an earlier release had, and what replaced them (an old command line or saved config gets the way forward)
RENAMED = {
    "merge.reset_bn": "merge.bn_stats: own (was reset_bn=true), average (was false) or mixture",
    "transport.half": "exchange.compress=fp16 or bf16 (on every transport)",
}


class ConfigError(ValueError):
    """The configuration cannot describe a federation (reported as one line, exit code 2)."""


def plain(node: Any) -> dict[str, Any]:
    """A plain dict copy of a config node (OmegaConf or mapping); ``{}`` for None."""
    if node is None:
        return {}
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


class _Reader:
    """Typed access to one config section; every failure names ``<section>.<key>``."""

    def __init__(self, data: Mapping[str, Any], where: str = "") -> None:
        self.data = dict(data)
        self.where = where
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, *, optional: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if optional:
                return None
            raise ConfigError(f"config is missing {self.name(key)} (every default lives in configs/)")
        return self.data[key]

    def number(self, key: str, kind: type, minimum: float | None = None, maximum: float | None = None, *,
               positive: bool = False, optional: bool = False) -> Any:
        raw = self.raw(key, optional=optional)
        if raw is None:
            if optional:
                return None
            raise ConfigError(f"{self.name(key)} must be set (got null)")
        try:
            if isinstance(raw, bool):
                raise ValueError
            val = kind(raw)
            if kind is int and float(raw) != val:
                raise ValueError
        except (TypeError, ValueError):
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(f"{self.name(key)} must be {noun} (got {raw!r})") from None
        if minimum is not None and val < minimum:
            raise ConfigError(f"{self.name(key)} must be at least {minimum} (got {val})")
        if maximum is not None and val > maximum:
            raise ConfigError(f"{self.name(key)} must be at most {maximum} (got {val})")
        if positive and not val > 0:
            raise ConfigError(f"{self.name(key)} must be positive (got {val})")
        return val

    def flag(self, key: str, *, absent: bool | None = None) -> bool:
        """A boolean key; ``absent`` (when given) is what a run folder saved before the key existed meant."""
        if absent is not None and key not in self.data:
            self.used.add(key)
            return absent
        raw = self.raw(key)
        if not isinstance(raw, bool):
            raise ConfigError(f"{self.name(key)} must be true or false (got {raw!r})")
        return raw

    def text(self, key: str, choices: tuple[str, ...] | None = None, *, optional: bool = False) -> str | None:
        raw = self.raw(key, optional=optional)
        if raw is None and optional:
            return None
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ConfigError(f"{self.name(key)} must be a string (got {raw!r})")
        val = str(raw)
        if choices is not None and val not in choices:
            raise ConfigError(f"{self.name(key)} must be one of {', '.join(choices)} (got {val!r})")
        return val

    def section(self, key: str) -> dict[str, Any]:
        raw = self.raw(key)
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{self.name(key)} must be a mapping (got {raw!r})")
        return dict(raw)

    def rest(self) -> dict[str, Any]:
        """The keys not read yet (options passed through to a builder), without nulls."""
        return {k: v for k, v in self.data.items() if k not in self.used and v is not None}

    def no_others(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"unknown {self.where or 'config'} option(s): {', '.join(unknown)}")


@dataclass
class TrainConfig:
    """How a peer trains. ``align_batches`` bounds the own data used for alignment and BN reset.

    No field has a default: the defaults live in ``configs/`` (``dimat.entry.default_train_config``).
    """

    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    optimizer: str
    nesterov: bool
    align_batches: int
    eval_batch_size: int
    #: FedRS restricted softmax: logits of classes absent from own data x this (1 = off, 0 = hard mask)
    absent_logit_scale: float
    #: FedProx: + prox_mu / 2 * ||theta - theta_round_start||^2 (0 = off)
    prox_mu: float
    #: the learning rate over the rounds: constant | cosine (dimat.train.schedule)
    lr_schedule: str


@dataclass(frozen=True)
class Component:
    """A pluggable part named in the config (model, data set, partition, topology): name + options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSettings:
    name: str
    root: str | None
    val_fraction: float
    options: dict[str, Any]
    #: generated data sets: at least this many training samples per peer (None: the set's own size)
    samples_per_peer: int | None


@dataclass(frozen=True)
class MergeSettings:
    """``merge:``: the shared options every method reads; the method itself is :mod:`dimat.methods`."""

    #: a name from ``dimat.methods.available_methods()`` (checked when the method is built)
    method: str
    #: merge=custom: the user's ``package.module:Class`` (a ``dimat.methods.Method`` subclass)
    method_class: str | None
    align_batches: int
    #: what a merge does with BatchNorm statistics: own | average | mixture (dimat.merge.BN_STATS)
    bn_stats: str
    #: keep optimizer momentum across merges (permuted with the units when the model is relabelled)
    keep_momentum: bool
    #: True / False, or None for "auto" (on unless a defence aggregates)
    consensus_basis: bool | None
    #: when a peer joins a lower basis: after (relabel its merged model) | before (relabel itself, then average)
    #: | auto (before where a merge would match more than ``match_limit`` neighbours of other bases)
    rebase: str
    #: rebase=auto: the most neighbours of other bases a merge matches one by one (dimat.merge.basis)
    match_limit: int | None
    aggregator: str
    aggregator_kwargs: dict[str, Any]
    #: merge every this many local steps within a round (None: once per round, after local training)
    every_steps: int | None
    #: exactly this many exchanges per round, spread evenly over its local steps (None: every_steps decides)
    merges_per_round: int | None
    #: consensus SGD (merge=gossip): local steps between averagings
    gossip_every: int
    #: size of the explicit public proxy set (0: off): labelled training samples every peer may use
    #: for alignment statistics and BatchNorm reset instead of its own data (shared data: marked)
    proxy_samples: int
    #: the other keys of ``merge:``, for the method's own options (it declares them: ``Method.options``)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSettings:
    enabled: bool
    keep_last: int


@dataclass(frozen=True)
class EvalSettings:
    """Which rounds evaluate, how many peers and how much of the test set (``eval:``).

    The last round always evaluates every peer on the whole test set, whatever these say.
    """

    #: evaluate in rounds divisible by this (and always the last)
    every: int
    #: a seeded sample of this many peers per evaluated round (None: every peer; "auto": see ``share``)
    peers: int | str | None
    #: a fixed seeded subsample of the test set of this size (None: the whole test set)
    test_samples: int | None
    #: ``peers: auto`` samples as many peers as keep evaluation's forward passes within this share
    #: of the round's training passes (a training sample counted as 3: forward, backward), and at
    #: least ``min_peers`` (small federations keep their full per-round curve)
    share: float
    min_peers: int


@dataclass(frozen=True)
class AttackSettings:
    malicious: tuple[int, ...]
    trigger: str
    trigger_kwargs: dict[str, Any]
    target_class: int
    poison_rate: float
    scale: float
    stealth: str  # none | clip
    collude: bool
    seed: int

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> "AttackSettings":
        """Validate a complete ``attack`` section (one :class:`ConfigError` line naming the key)."""
        return _attack_settings(_Reader(section, "attack"))


@dataclass(frozen=True)
class ExchangeSettings:
    """``exchange``: what a peer's shared state becomes on the wire, on every transport (:mod:`dimat.exchange`)."""

    compress: str  # none | fp16 | bf16 | int8 | int4 | sign | topk | randk
    block: int | None  # int8/int4: entries per absmax scale (None: one per tensor)
    stochastic: bool  # int8/int4: stochastic rounding
    ratio: float  # topk/randk: fraction of each tensor's entries sent
    error_feedback: bool  # keep what compression dropped, add it to the next message
    delta: bool  # send the change since the reference both ends keep (``auto`` resolved: every lossy codec)
    #: consensus step with delta: a number, "auto" (the sender's measured contraction), None (plain merge)
    choco_step: float | str | None
    raw_vectors: bool  # floating tensors of <= 1 dimension (biases, norms, BN statistics) travel uncompressed


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _workers(root: "_Reader") -> int:
    """``workers``: a positive number, or ``auto`` (one per core this process may use).

    A run folder saved before the key existed has none: ``auto`` then, which changes no result.
    """
    if root.raw("workers", optional=True) in ("auto", None):
        return cores()
    return int(root.number("workers", int, 1))


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, typed and checked; built by :meth:`from_config`."""

    seed: int
    num_peers: int
    rounds: int
    local_epochs: float
    #: SGD steps per round instead of epochs (None: local_epochs decides)
    local_steps: int | None
    pretrain_epochs: float
    init: str
    device: str
    threads: int | None
    #: `dimat simulate`: threads its peers' training and evaluation are spread over ("auto": one per core)
    workers: int
    tensorboard: bool
    #: train and evaluate same-architecture peers as one stacked computation (dimat.federation.stacked)
    vectorise: bool
    #: peers per stacked call (bounds the activations one call holds for its backward pass)
    vectorise_chunk: int
    progress: bool
    resume: bool
    run_dir: str
    #: after the run, train this reference on the same budget and compare ("centralized" or None)
    baseline: str | None
    train: TrainConfig
    merge: MergeSettings
    checkpoint: CheckpointSettings
    transport: Any  # dimat.transport.settings.TransportSettings
    model: Component
    data: DataSettings
    partition: Component
    topology: Component
    attack: AttackSettings
    exchange: ExchangeSettings
    eval: EvalSettings
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def method(self) -> str:
        return self.merge.method

    @classmethod
    def from_config(cls, cfg: Any) -> "RunConfig":
        """Validate a composed config (OmegaConf node or mapping); a :class:`RunConfig` passes through."""
        if isinstance(cfg, RunConfig):
            return cfg
        try:
            raw = plain(cfg)
        except Exception as exc:  # interpolation errors (${oc.env:...}, missing ???) are config errors
            raise ConfigError("config cannot be resolved") from exc
        raw.pop("hydra", None)
        root = _Reader(raw)
        merge = _merge_settings(_Reader(root.section("merge"), "merge"))
        run = cls(
            seed=root.number("seed", int, -(2**31)),
            num_peers=root.number("num_peers", int, 1),
            rounds=root.number("rounds", int, 0),
            local_epochs=root.number("local_epochs", float, 0),
            local_steps=root.number("local_steps", int, 1, optional=True),
            pretrain_epochs=root.number("pretrain_epochs", float, 0),
            init=root.text("init", ("different", "shared")),  # type: ignore[arg-type]
            device=root.text("device"),  # type: ignore[arg-type]
            threads=root.number("threads", int, 1, optional=True),
            workers=_workers(root),
            tensorboard=root.flag("tensorboard"),
            vectorise=root.flag("vectorise"),
            vectorise_chunk=root.number("vectorise_chunk", int, 1),
            progress=root.flag("progress"),
            resume=root.flag("resume"),
            run_dir=root.text("run_dir"),  # type: ignore[arg-type]
            baseline=root.text("baseline", ("centralized",), optional=True),
            train=_train_settings(_Reader(root.section("train"), "train"), merge.align_batches),
            merge=merge,
            checkpoint=_checkpoint_settings(_Reader(root.section("checkpoint"), "checkpoint")),
            transport=_transport_settings(root.section("transport")),
            model=_component(_Reader(root.section("model"), "model"), "name"),
            data=_data_settings(_Reader(root.section("data"), "data")),
            partition=_component(_Reader(root.section("partition"), "partition"), "scheme"),
            topology=_component(_Reader(root.section("topology"), "topology"), "name"),
            attack=_attack_settings(_Reader(root.section("attack"), "attack")),
            exchange=_exchange_settings(_Reader(root.section("exchange"), "exchange")),
            eval=_eval_settings(_Reader(root.section("eval"), "eval")),
            raw=raw,
        )
        root.raw("experiment", optional=True)  # a preset's own keys were merged into the others
        root.no_others()
        return run


def _merge_settings(r: _Reader) -> MergeSettings:
    method = r.text("method")
    basis = r.raw("consensus_basis")
    if basis == "auto":
        basis = None
    elif not isinstance(basis, bool):
        raise ConfigError(f"merge.consensus_basis must be true, false or auto (got {basis!r})")
    if "reset_bn" in r.data:  # a saved config.yaml of an earlier release
        raise ConfigError(f"merge.reset_bn was replaced by {RENAMED['merge.reset_bn']}")
    kwargs = r.raw("aggregator_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError(f"merge.aggregator_kwargs must be a mapping (got {kwargs!r})")
    out = MergeSettings(
        method=method,  # type: ignore[arg-type]
        method_class=r.text("class", optional=True),
        align_batches=r.number("align_batches", int, 1),
        bn_stats=r.text("bn_stats", BN_STATS),
        keep_momentum=r.flag("keep_momentum"),
        consensus_basis=basis,
        rebase=r.text("rebase", REBASE_MODES),
        # optional: a run folder saved before the key existed says rebase=after, which never reads it
        match_limit=r.number("match_limit", int, 0, optional=True),
        aggregator=r.text("aggregator"),  # type: ignore[arg-type]
        aggregator_kwargs=dict(kwargs or {}),
        every_steps=r.number("every_steps", int, 1, optional=True),
        merges_per_round=r.number("merges_per_round", int, 1, optional=True),
        gossip_every=r.number("gossip_every", int, 1),
        proxy_samples=r.number("proxy_samples", int, 0),
        options={k: v for k, v in r.data.items() if k not in r.used},
    )
    if out.every_steps is not None and out.merges_per_round is not None:
        raise ConfigError(f"merge.every_steps={out.every_steps} and merge.merges_per_round={out.merges_per_round}: "
                          "set one of them (the other to null)")
    if out.rebase == "auto" and out.match_limit is None:
        raise ConfigError("merge.rebase=auto needs merge.match_limit (configs/config.yaml: 16)")
    return out


def _train_settings(r: _Reader, align_batches: int) -> TrainConfig:
    tc = TrainConfig(
        batch_size=r.number("batch_size", int, 1),
        lr=r.number("lr", float, positive=True),
        momentum=r.number("momentum", float, 0),
        weight_decay=r.number("weight_decay", float, 0),
        optimizer=r.text("optimizer", ("sgd", "adam", "adamw")),  # type: ignore[arg-type]
        nesterov=r.flag("nesterov"),
        align_batches=align_batches,
        eval_batch_size=r.number("eval_batch_size", int, 1),
        absent_logit_scale=r.number("absent_logit_scale", float, 0, 1),
        prox_mu=r.number("prox_mu", float, 0),
        lr_schedule=r.text("lr_schedule", SCHEDULES),  # type: ignore[arg-type]
    )
    r.no_others()
    return tc


def _checkpoint_settings(r: _Reader) -> CheckpointSettings:
    out = CheckpointSettings(enabled=r.flag("enabled"), keep_last=r.number("keep_last", int, 1))
    r.no_others()
    return out


def _eval_settings(r: _Reader) -> EvalSettings:
    peers = "auto" if r.raw("peers", optional=True) == "auto" else r.number("peers", int, 1, optional=True)
    out = EvalSettings(every=r.number("every", int, 1), peers=peers,
                       test_samples=r.number("test_samples", int, 1, optional=True),
                       share=r.number("share", float, positive=True), min_peers=r.number("min_peers", int, 1))
    r.no_others()
    return out


def _transport_settings(section: Mapping[str, Any]) -> Any:
    try:
        return TransportSettings.from_mapping(section)
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def _component(r: _Reader, key: str) -> Component:
    name = r.text(key)
    return Component(name=name, options=r.rest())  # type: ignore[arg-type]


def _data_settings(r: _Reader) -> DataSettings:
    name = r.text("name")
    root = r.text("root", optional=True)
    val = r.number("val_fraction", float, 0)
    if val >= 1:
        raise ConfigError(f"data.val_fraction must be below 1 (got {val})")
    per_peer = r.number("samples_per_peer", int, 1, optional=True)
    return DataSettings(name=name, root=root, val_fraction=val, options=r.rest(),  # type: ignore[arg-type]
                        samples_per_peer=per_peer)


#: ``attack.stealth``: how a malicious peer hides its update (none, or clipped to the honest spread)
STEALTH = ("none", "clip")


def _attack_settings(r: _Reader) -> AttackSettings:
    malicious = r.raw("malicious") or []
    if not isinstance(malicious, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in malicious):
        raise ConfigError(f"attack.malicious must be a list of peer ids (got {malicious!r})")
    kwargs = r.raw("trigger_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"attack.trigger_kwargs must be a mapping (got {kwargs!r})")
    out = AttackSettings(
        malicious=tuple(sorted({int(i) for i in malicious})),
        trigger=r.text("trigger"),  # type: ignore[arg-type]
        trigger_kwargs=dict(kwargs),
        target_class=r.number("target_class", int, 0),
        poison_rate=r.number("poison_rate", float, 0, 1),
        scale=r.number("scale", float, positive=True),
        # a run folder saved before these keys existed had neither: it resumes as it ran
        stealth=r.text("stealth", STEALTH, optional=True) or "none",
        collude=r.flag("collude", absent=False),
        seed=r.number("seed", int),
    )

    r.no_others()
    return out


def _exchange_settings(r: _Reader) -> ExchangeSettings:
    compress = r.text("compress", CODECS)
    error_feedback = r.flag("error_feedback")
    delta_raw = r.raw("delta")
    if delta_raw == "auto":  # a lossy codec compresses a change; error feedback alone asks for full states
        delta = compress not in LOSSLESS and not error_feedback
    elif isinstance(delta_raw, bool):
        delta = delta_raw
    else:
        raise ConfigError(f"exchange.delta must be true, false or auto (got {delta_raw!r})")
    step_raw = r.raw("choco_step")
    step: float | str | None
    if step_raw == "auto":
        step = "auto" if delta else None  # the consensus step needs the public copies delta mode keeps
    else:
        step = r.number("choco_step", float, maximum=1, positive=True, optional=True)
    out = ExchangeSettings(
        compress=compress,  # type: ignore[arg-type]
        block=r.number("block", int, 1, optional=True),
        stochastic=r.flag("stochastic"),
        ratio=r.number("ratio", float, maximum=1, positive=True),
        error_feedback=error_feedback,
        delta=delta,
        choco_step=step,
        # a run folder saved before the key existed compressed every tensor: it resumes as it ran
        raw_vectors=r.flag("raw_vectors", absent=False),
    )
    r.no_others()
    # the combinations that cannot mean anything, each refused in one line
    if out.compress in CHANGE_ONLY and not out.delta:
        why = ("a sparse full state would zero most weights; entries not sent keep the reference's value"
               if out.compress in SPARSE else "the signs of a whole state would give every weight of a block one magnitude")
        raise ConfigError(f"exchange.compress={out.compress} needs exchange.delta=true or auto ({why})")
    if out.error_feedback and out.delta:
        raise ConfigError("exchange.error_feedback=true with exchange.delta=true: the reference already carries "
                          "what was not sent (set one of them)")
    if out.choco_step is not None and not out.delta:
        raise ConfigError("exchange.choco_step is the CHOCO consensus step: it needs exchange.delta=true "
                          "(got exchange.delta=false)")
    return out


__all__ = ["ConfigError", "RunConfig", "ExchangeSettings", "TrainConfig", "MergeSettings", "CheckpointSettings", "AttackSettings", "DataSettings",
           "EvalSettings",
           "Component", "plain"]
