"""The round loop, written once for every transport and every method.

One round, for the peers hosted by this process::

    train (local steps, the method's step hook) -> exchange the method's payloads with the topology's
    neighbours (transport) -> each peer merges what it received (the method's merge)
    -> evaluate on the global test set -> log -> checkpoint (the method's per-peer state included)

The loop asks the method (:mod:`dimat.methods`) when to exchange, what to send and how to merge; it
never looks at a method's name. The transport sees exchange numbers, not rounds: round ``r`` of a
method that exchanges ``g`` times per round uses exchanges ``(r-1)*g + 1 .. r*g``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dimat.config import ConfigError, RunConfig
from dimat.federation.build import Federation, build_federation
from dimat.federation.checkpoints import Checkpointer
from dimat.federation.evaluation import plan_round, same_models
from dimat.federation.sent_states import SentStates
from dimat.federation.shared_merge import SharedMerges, row_key
from dimat.federation.workers import SERIAL, PeerPool
from dimat.metrics import consensus_distance, write_text_atomic
from dimat.metrics.run_log import RoundResult, RunLog, make_summary, round_result
from dimat.runtime import set_threads
from dimat.topology.membership import renormalise
from dimat.train.schedule import round_lr
from dimat.transport import Transport, build_transport


@dataclass
class RoundOutput:
    """What one round's training and exchanges produced for this process's peers."""

    train: dict[int, dict[str, float]]
    bytes_sent: dict[int, int]
    heard: dict[int, list[int]]
    missing: dict[int, list[int]]
    refused: dict[int, dict[int, str]] = field(default_factory=dict)

    @classmethod
    def empty(cls, peers: Any) -> "RoundOutput":
        return cls({}, {p: 0 for p in peers}, {p: [] for p in peers}, {p: [] for p in peers}, {})


def exchanges_per_round(fed: Federation) -> int:
    """Exchanges in one round (the method's rule, :meth:`Federation.exchanges_per_round`)."""
    return fed.exchanges_per_round()


def exchange_and_merge(fed: Federation, transport: Transport, topo: Any, exchange_idx: int, out: RoundOutput) -> None:
    """One exchange of shared states, then every local peer merges what it received (into ``out``)."""
    # live (uncopied) sent states only in-process without compression: a compressor keeps what was sent
    # as its next reference, which must not change when the sender merges
    live = fed.attack is None and fed.compressor is None and fed.config.transport.name == "inproc"
    sent = SentStates(fed.peers, fed.method.payload, live=live)
    states = sent.states
    if fed.attack is not None:
        states = fed.attack.outgoing(states)  # model replacement by malicious peers
    in_nb = {pid: list(topo.in_neighbours(pid)) for pid in fed.peers}
    out_nb = {pid: list(topo.out_neighbours(pid)) for pid in fed.peers}
    payloads = states if fed.compressor is None else fed.compressor.encode(exchange_idx, states, out_nb)
    result = transport.exchange(exchange_idx, payloads, in_nb, out_nb, timeout=fed.config.transport.timeout)
    if fed.compressor is not None:  # decoded states, checked against each receiver's own model
        result = fed.compressor.decode(exchange_idx, result, states)
    sent.delivered(result.received)
    rows = {pid: topo.weights_for(pid) for pid in fed.peers}  # O(degree) each: built once an exchange
    shared = None
    if fed.attack is None:  # an attacker's sent state is not its model: its row is not the others'
        shared = SharedMerges((row_key(renormalise(rows[pid], result.received.get(pid, {}), self_id=pid))
                               for pid in fed.peers), reuse=sent.exact)
    for pid, peer in fed.peers.items():
        got = result.received.pop(pid, {})  # dropped once merged: received states are held no longer
        sent.before_merge(pid)
        fed.method.merge(peer, got, rows.pop(pid), shared=shared)
        sent.after_merge(got)
        out.bytes_sent[pid] += int(result.bytes_sent.get(pid, 0))
        out.heard[pid] = sorted(got)
        out.missing[pid] = sorted(set(out.missing[pid]) | set(result.missing.get(pid, [])))
        if result.refused.get(pid):
            out.refused.setdefault(pid, {}).update(result.refused[pid])


def train_round(fed: Federation, transport: Transport, round_idx: int) -> RoundOutput:
    """Local training and the round's exchanges, spread evenly over the local steps (none: train only)."""
    out = RoundOutput.empty(fed.peers)
    if fed.attack is not None:
        fed.attack.before_training(fed.peers)
    g = fed.exchanges_per_round()
    totals = {pid: fed.local_steps(p) for pid, p in fed.peers.items()}
    train = fed.config.train
    lr = round_lr(train.lr, train.lr_schedule, round_idx, fed.config.rounds)
    for p in fed.peers.values():
        p.set_lr(lr)
        fed.method.start_round(p)
    if g == 0:
        out.train = train_steps(fed, totals)
        return out
    topo = fed.topology_at(round_idx)
    parts: dict[int, list[dict[str, float]]] = {pid: [] for pid in fed.peers}
    for k in range(g):
        chunk = train_steps(fed, {pid: t * (k + 1) // g - t * k // g for pid, t in totals.items()})
        for pid in fed.peers:
            parts[pid].append(chunk[pid])
        exchange_and_merge(fed, transport, topo, (round_idx - 1) * g + k + 1, out)
    for pid, chunks in parts.items():
        out.train[pid] = chunks[0] if len(chunks) == 1 else _pooled(chunks)
    return out


def train_steps(fed: Federation, steps: dict[int, int]) -> dict[int, dict[str, float]]:
    """``steps[p]`` SGD steps for each local peer: stacked (``vectorise``) or one peer after another."""
    if fed.stacked is not None:
        return fed.stacked.train_steps(steps)
    return fed.pool.map(lambda pid: fed.peers[pid].train_steps(steps[pid]), steps)


def _pooled(chunks: list[dict[str, float]]) -> dict[str, float]:
    """Loss and accuracy of several training chunks, weighted by their steps."""
    n = sum(x["steps"] for x in chunks) or 1
    return {"loss": sum(x["loss"] * x["steps"] for x in chunks) / n,
            "acc": sum(x["acc"] * x["steps"] for x in chunks) / n, "steps": sum(x["steps"] for x in chunks)}


def round_train_samples(fed: Federation) -> float:
    """Samples one round trains on over the whole federation (every process computes the same)."""
    run = fed.config
    if run.local_steps:
        return float(run.local_steps * run.train.batch_size * len(fed.partition_sizes))
    return float(run.local_epochs * sum(fed.partition_sizes.values()))


def evaluate_round(fed: Federation, round_idx: int, out: RoundOutput, elapsed: float) -> tuple[list[dict[str, Any]], RoundResult]:
    """Evaluate the local peers the round's evaluation plan names (``eval:``; the run's last round:
    every peer on the whole test set) on the global test set and on their validation splits.

    Every local peer gets a record; one not evaluated this round has ``None`` accuracies and losses.
    """
    run = fed.config
    plan = plan_round(run.eval, round_idx, final=round_idx >= run.rounds, num_peers=fed.num_peers,
                      test_size=len(fed.test_data[1]), seed=run.seed, train_samples=round_train_samples(fed))
    test = fed.test_data if plan.test_rows is None else tuple(t[plan.test_rows] for t in fed.test_data)
    records: list[dict[str, Any]] = []
    scored: dict[int, dict[str, float]] = {}
    if fed.stacked is not None:  # every evaluated peer on the same test batches at once
        scored = fed.stacked.evaluate([pid for pid in sorted(fed.peers) if plan.evaluates(pid)], test)
    evaluated = [pid for pid in sorted(fed.peers) if plan.evaluates(pid)]
    # peers that hold one and the same model (after a plain average of the whole graph) score the
    # test set once; each still scores its own validation split
    twin = same_models({pid: fed.peers[pid].model for pid in evaluated if not scored.get(pid)})
    on_test = fed.pool.map(lambda pid: fed.peers[pid].evaluate(test), sorted(set(twin.values())))
    vals = fed.pool.map(lambda pid: fed.peers[pid].evaluate_val(), evaluated)  # independent: on every worker
    for pid, p in sorted(fed.peers.items()):
        if plan.evaluates(pid):
            got, val = scored.get(pid) or dict(on_test[twin[pid]]), vals[pid]
        else:
            got, val = {"acc": None, "loss": None}, None
        tr = out.train.get(pid, {})
        rec = {
            "round": round_idx, "peer": pid, "method": fed.method.name,
            "test_acc": got["acc"], "test_loss": got["loss"],
            "val_acc": None if val is None else val["acc"], "val_loss": None if val is None else val["loss"],
            "train_loss": tr.get("loss"), "train_acc": tr.get("acc"), "local_steps": tr.get("steps", 0),
            "neighbours": out.heard.get(pid, []), "missing": out.missing.get(pid, []),
            "bytes_sent": int(out.bytes_sent.get(pid, 0)),
            "eval": plan.kind, "test_samples": plan.test_samples if plan.evaluates(pid) else 0,
        }
        if out.refused.get(pid):
            rec["refused"] = {str(j): why for j, why in sorted(out.refused[pid].items())}
        if fed.attack is not None:
            rec.update({"malicious": fed.attack.is_malicious(pid), "clean_acc": got["acc"],
                        "asr": fed.attack.evaluate(p.model, *test) if plan.evaluates(pid) else None})
        records.append(rec)
    return records, round_result(round_idx, records, consensus=consensus_of(fed), time_s=elapsed)


def consensus_of(fed: Federation) -> float | None:
    """Consensus distance over every peer of the federation; None when this process does not host them all."""
    if len(fed.peers) != fed.num_peers or not fed.peers:
        return None
    # the live state dicts, not copies: the distance only reads them
    return float(consensus_distance([p.model.state_dict() for p in fed.peers.values()]))


def summary_of(fed: Federation, rounds: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    run = fed.config
    return make_summary(
        title=f"{fed.method.name} · {run.model.name} · {run.data.name} · {fed.num_peers} peer(s) · {run.topology.name}",
        method=fed.method.name, num_peers=fed.num_peers, local_peers=sorted(fed.peers), rounds_planned=run.rounds,
        rounds=rounds, wall_s=wall_s, model_bytes=int(fed.info.get("model_bytes", 0)),
        one_merge_bytes=one_merge_bytes(fed, [int(r["round"]) for r in rounds if int(r["round"]) > 0]), info=fed.info)


def one_merge_bytes(fed: Federation, rounds: list[int]) -> int:
    """Bytes one uncompressed merge per round sends over the whole federation in ``rounds``: every
    directed edge of each round's graph carries the model state once (0 for a method that never exchanges)."""
    if fed.schedule is None:
        return 0
    edges = sum(len(list(fed.topology_at(r).out_neighbours(p))) for r in rounds for p in range(fed.num_peers))
    return int(fed.info.get("model_bytes", 0)) * edges


def run_rounds(
    fed: Federation,
    transport: Transport,
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
    run = fed.config
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    total = run.rounds
    ckpt = Checkpointer(run_dir, keep_last=run.checkpoint.keep_last, tag=process_tag)
    log = RunLog(run_dir, tag=process_tag, tensorboard=run.tensorboard)
    start = 0
    if resume:
        last = ckpt.last_round()
        if last is None:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no finished round recorded")
        ckpt.restore(last, fed.peers, fed.method)
        start = last
    log.start(start if resume else None)

    say = echo or (lambda s: None)
    # the run's worker threads (``workers``); none when this process hosts one peer or stacks them
    workers = run.workers if len(fed.peers) > 1 and fed.stacked is None else 1
    fed.pool = PeerPool(workers)
    try:
        return _run(fed, transport, run_dir, start, total, ckpt, log, say, progress)
    finally:
        fed.pool.close()
        fed.pool = SERIAL


def _run(fed: Federation, transport: Transport, run_dir: Path, start: int, total: int, ckpt: Checkpointer,
         log: RunLog, say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """The rounds of :func:`run_rounds` from round ``start + 1``, with ``fed.pool`` set."""
    run = fed.config
    t_run = time.perf_counter()
    if start == 0 and run.pretrain_epochs > 0:
        t0 = time.perf_counter()
        out = RoundOutput.empty(fed.peers)
        for p in fed.peers.values():
            fed.method.start_round(p)
        out.train = fed.pool.map(lambda pid: fed.peers[pid].train_steps(
            round(run.pretrain_epochs * fed.peers[pid].steps_per_epoch)), fed.peers)
        records, res = evaluate_round(fed, 0, out, time.perf_counter() - t0)
        log.log(records, res)
        say(res.line(total))
        if run.checkpoint.enabled:
            ckpt.save(0, fed.peers, fed.method)

    bar = None
    if progress and start < total:
        bar = tqdm(total=total, initial=start, desc=f"{fed.method.name}", unit="round", leave=False, dynamic_ncols=True)
    for r in range(start + 1, total + 1):
        t0 = time.perf_counter()
        out = train_round(fed, transport, r)
        records, res = evaluate_round(fed, r, out, 0.0)
        res.time_s = time.perf_counter() - t0
        log.log(records, res)
        if run.checkpoint.enabled:
            ckpt.save(r, fed.peers, fed.method)
        if bar is not None:
            bar.update(1)
            bar.write(res.line(total))
        else:
            say(res.line(total))
    if bar is not None:
        bar.close()

    summary = summary_of(fed, log.rounds, time.perf_counter() - t_run)
    log.finish(summary)
    return summary


def simulate(cfg: Any, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build every peer in this process and run the federation with the in-process transport.

    The run folder gets ``config.yaml`` (the resolved config that ran) besides the run's outputs.
    """
    run = RunConfig.from_config(cfg)
    if run.transport.name != "inproc":
        raise ConfigError(f"`dimat simulate` runs every peer in one process; transport={run.transport.name} "
                          "has its own launcher")
    set_threads(run.threads)
    fed = build_federation(run)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(run.raw)))
    if echo is not None:
        echo(f"dimat: {fed.method.name} · {run.model.name} · {run.data.name} · {fed.num_peers} peer(s) · "
             f"{run.topology.name} · {run.rounds} rounds x {run.local_epochs} epochs → {run_dir}")
    # every peer lives here: receivers read the sent states themselves (held once, sent_states.py)
    transport = build_transport(run.transport, n_peers=run.num_peers, share_states=True)
    try:
        return run_rounds(fed, transport, run_dir, resume=resume, progress=progress and run.progress, echo=echo)
    finally:
        transport.close()
