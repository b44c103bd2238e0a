"""The federation under torchrun: ``torchrun --nproc_per_node=N -m dimat.launch [hydra overrides]``.

Every rank composes the same Hydra config (``transport=torchdist`` unless told otherwise), hosts
the block of peers :func:`dimat.transport.torchdist.peers_for_rank` gives it (rank = peer id when
``num_peers`` equals the world size) and runs the simulation's round loop
(:func:`dimat.federation.run_rounds`) with a :class:`TorchDistTransport`. So the same config and
seed give the same metrics as ``dimat simulate``.

Outputs: ONE run folder for all ranks. Rank 0 resolves ``run_dir`` (``outputs/<timestamp>`` by
default) and broadcasts it; it also records it under ``outputs/.torchrun/<TORCHELASTIC_RUN_ID>``
so that, when torchrun restarts the workers after a failure, they find the same folder and resume
from the last round every rank has checkpointed. Each rank writes ``rank<r>/metrics.jsonl``,
``rank<r>/summary.json`` and its peers' checkpoints; rank 0 gathers every rank's records over the
process group (no shared file system needed) and writes ``metrics.jsonl``, ``summary.json``,
``accuracy.png`` and ``config.yaml`` / ``.hydra/``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dimat.transport.torchdist import TorchDistTransport

_PATH_BYTES = 4096


def _fail(message: str, code: int = 2) -> None:
    rank = os.environ.get("RANK", "?")
    print(f"dimat.launch[rank {rank}]: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def compose_config(overrides: Sequence[str]) -> Any:
    """The Hydra config for ``overrides`` (``transport=torchdist`` added when no transport is named)."""
    from hydra import compose, initialize_config_dir

    from dimat.cli import config_dir

    overrides = list(overrides)
    if not any(o.split("=", 1)[0].lstrip("+~") == "transport" for o in overrides):
        overrides.insert(0, "transport=torchdist")
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _broadcast_text(text: str, transport: TorchDistTransport) -> str:
    """Rank 0's ``text`` on every rank (a byte tensor: nothing is pickled)."""
    raw = text.encode()
    if len(raw) > _PATH_BYTES:
        raise ValueError(f"run_dir is longer than {_PATH_BYTES} bytes")
    buf = torch.zeros(_PATH_BYTES + 8, dtype=torch.uint8)
    buf[:8] = torch.tensor(list(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
    buf[8 : 8 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    buf = buf.to(transport.device)
    dist.broadcast(buf, 0)
    buf = buf.cpu()
    n = int.from_bytes(bytes(buf[:8].tolist()), "little")
    return bytes(buf[8 : 8 + n].tolist()).decode()


def _all_gather_bytes(data: bytes, transport: TorchDistTransport) -> list[bytes]:
    """Every rank's ``data`` (variable length), on every rank."""
    dev = transport.device
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(transport.world_size)]
    dist.all_gather(sizes, n)
    lens = [int(s.item()) for s in sizes]
    width = max(max(lens), 1)
    mine = torch.zeros(width, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(dev)
    bufs = [torch.empty_like(mine) for _ in range(transport.world_size)]
    dist.all_gather(bufs, mine)
    return [bytes(b.cpu()[:k].numpy().tobytes()) for b, k in zip(bufs, lens)]


def agree_run_dir(cfg: Any, user_set_run_dir: bool, transport: TorchDistTransport) -> Path:
    """One run folder for all ranks, decided by rank 0 (and found again after a torchrun restart)."""
    chosen = ""
    if transport.rank == 0:
        chosen = str(cfg.run_dir)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if not user_set_run_dir and run_id and run_id != "none":
            # torchrun keeps the run id across restarts of the workers: remember our folder under it
            pointer = Path(chosen).parent / ".torchrun" / run_id
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and pointer.is_file():
                chosen = pointer.read_text().strip()
            else:
                from dimat.metrics import write_text_atomic as atomic_write_text

                atomic_write_text(pointer, chosen + "\n")
    return Path(_broadcast_text(chosen, transport))


def agree_resume(run_dir: Path, tag: str, want: bool, restarted: bool, transport: TorchDistTransport) -> bool:
    """Resume from the last round that *every* rank checkpointed (ranks may differ by one round).

    A rank ahead of the others rolls its progress marker back to the common round, whose
    checkpoints are still on disk (``checkpoint.keep_last`` >= 2).
    """
    from dimat.federation import Checkpointer
    from dimat.metrics import write_text_atomic as atomic_write_text

    ck = Checkpointer(run_dir, tag=tag)
    last = ck.last_round()
    mine = torch.tensor([-1 if last is None else last], dtype=torch.int64, device=transport.device)
    lo = mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    common = int(lo.item())
    if not (want or restarted):
        return False
    if common < 0:
        if want:
            raise FileNotFoundError(f"nothing to resume in {run_dir}: some rank has no finished round")
        return False  # restarted before any round was checkpointed everywhere: start over
    if last is not None and last > common:
        old = json.loads(ck.progress.read_text())
        old["last_round"] = common
        atomic_write_text(ck.progress, json.dumps(old))
    return True


def merge_outputs(fed: Any, run_dir: Path, local_summary: dict, transport: TorchDistTransport) -> dict | None:
    """Gather every rank's records; rank 0 writes the run's metrics.jsonl/csv, summary.json and plot."""
    from dimat.federation import RoundResult, RunLog, make_summary, read_metrics

    metrics = RunLog(run_dir, tag=f"rank{transport.rank}").metrics_path  # where run_rounds logged
    payload = json.dumps({
        "records": read_metrics(metrics) if metrics.exists() else [],
        "rounds": local_summary.get("rounds", []),
        "wall": local_summary.get("wall_time_s_this_session", 0.0),
    }).encode()
    parts = [json.loads(p) for p in _all_gather_bytes(payload, transport)]
    if transport.rank != 0:
        return None
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: (r["round"], r["peer"]))
    time_by_round: dict[int, float] = {}
    for p in parts:
        for r in p["rounds"]:
            time_by_round[r["round"]] = max(time_by_round.get(r["round"], 0.0), float(r.get("time_s") or 0.0))
    log = RunLog(run_dir)
    log.start(None)
    for k in sorted({r["round"] for r in records}):
        recs = [r for r in records if r["round"] == k]
        accs = [r["test_acc"] for r in recs]
        log.log(recs, RoundResult(
            round=k, mean_acc=sum(accs) / len(accs), min_acc=min(accs), max_acc=max(accs),
            # each rank only sees its own peers' weights; the global distance is not computed
            consensus=None,  # type: ignore[arg-type]
            bytes_sent=int(sum(r.get("bytes_sent") or 0 for r in recs)), time_s=time_by_round.get(k, 0.0),
        ))
    summary = make_summary(fed, log.rounds, max(p["wall"] for p in parts), int(fed.cfg.rounds))
    summary["local_peers"] = sorted({r["peer"] for r in records})
    summary["world_size"] = transport.world_size
    summary["backend"] = transport.backend
    summary["peers_per_rank"] = {str(r): [b.start, b.stop - 1] for r, b in enumerate(_blocks(transport))}
    log.finish(summary)
    return summary


def _blocks(transport: TorchDistTransport) -> list[range]:
    from dimat.transport.torchdist import peers_for_rank

    return [peers_for_rank(r, transport.world_size, transport.n_peers) for r in range(transport.world_size)]


def _write_config(cfg: Any, overrides: Sequence[str], run_dir: Path) -> None:
    from omegaconf import OmegaConf

    from dimat.metrics import write_text_atomic as atomic_write_text

    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))
    atomic_write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(resolved))
    atomic_write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def main(argv: Sequence[str] | None = None) -> int:
    """Run this rank's peers for the configured rounds; rank 0 writes the run summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in args:
        args = [a for a in args if a != "--resume"] + ["resume=true"]
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        _fail("dimat.launch runs under torchrun, e.g. `torchrun --standalone --nproc_per_node=4 -m dimat.launch`")
    from dimat.federation import ConfigError, build_federation, run_rounds

    try:
        cfg = compose_config(args)
    except Exception as exc:  # Hydra's composition errors: one line, not a traceback per rank
        _fail(f"config: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    world = int(os.environ["WORLD_SIZE"])
    n = int(cfg.num_peers)
    method = str(cfg.merge.get("method", "dimat"))
    if str(cfg.transport.get("name")) != "torchdist":
        _fail(f"dimat.launch needs transport=torchdist (got {cfg.transport.get('name')!r})")
    if method == "centralized":
        _fail("merge=centralized trains one model; run it with `dimat simulate`")
    if n < world:
        _fail(f"num_peers={n} is smaller than the {world} ranks; every rank must host at least one peer")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))

    tcfg = cfg.transport
    transport = TorchDistTransport(
        n_peers=n,
        backend=tcfg.get("backend") or None,
        pg_timeout=float(tcfg.get("pg_timeout") or 600.0),
    )
    rank = transport.rank
    try:
        user_dir = any(a.startswith("run_dir=") for a in args)
        run_dir = agree_run_dir(cfg, user_dir, transport)
        cfg.run_dir = str(run_dir)
        if transport.backend == "nccl" and str(cfg.get("device", "cpu")) == "cpu":
            cfg.device = str(transport.device)  # peers train where their NCCL buffers live
        try:
            fed = build_federation(cfg, local_ids=list(transport.local_peers))
        except (ConfigError, FileNotFoundError, NotADirectoryError) as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        tag = f"rank{rank}"
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        resume = agree_resume(run_dir, tag, bool(cfg.get("resume", False)), restarted, transport)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                _write_config(cfg, args, run_dir)
            print(f"dimat.launch: {fed.method} · {cfg.model.name} · {cfg.data.name} · {n} peers on {world} "
                  f"rank(s) ({transport.backend}) · {cfg.topology.name} · {cfg.rounds} rounds"
                  f"{' (resuming)' if resume else ''} → {run_dir}", flush=True)
        local = run_rounds(
            fed, transport, run_dir, resume=resume, process_tag=tag,
            progress=bool(cfg.get("progress", True)) and rank == 0,
            echo=(lambda s: print(f"[rank 0 peers {list(transport.local_peers)}] {s}", flush=True)) if rank == 0 else None,
        )
        summary = merge_outputs(fed, run_dir, local, transport)
        if summary is not None:
            print(f"dimat.launch: final test accuracy mean {summary['final_mean_acc']:.4f} "
                  f"(min {summary['final_min_acc']:.4f}, max {summary['final_max_acc']:.4f}) over {n} peers; "
                  f"outputs in {run_dir}", flush=True)
    finally:
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
