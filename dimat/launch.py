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


def _prog() -> str:
    return f"dimat.launch[rank {os.environ.get('RANK', '?')}]"


def compose_config(overrides: Sequence[str]) -> Any:
    """The composed config for ``overrides`` (``transport=torchdist`` unless a transport is named)."""
    from dimat.entry import compose

    return compose(overrides, transport="torchdist")


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
    from dimat.federation.rounds import summary_of
    from dimat.metrics import read_jsonl
    from dimat.metrics.run_log import RunLog, combine_rounds

    mine = RunLog(run_dir, tag=f"rank{transport.rank}")  # where run_rounds logged
    payload = json.dumps({
        "records": read_jsonl(mine.metrics_path) if mine.metrics_path.exists() else [],
        "rounds": local_summary.get("rounds", []),
        "wall": local_summary.get("wall_time_s_this_session", 0.0),
    }).encode()
    parts = [json.loads(p) for p in _all_gather_bytes(payload, transport)]
    if transport.rank != 0:
        return None
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: (r["round"], r["peer"]))
    log = RunLog(run_dir)
    log.start(None)
    for res in combine_rounds(records, [p["rounds"] for p in parts]):
        log.log([r for r in records if r["round"] == res.round], res)
    summary = summary_of(fed, log.rounds, max(p["wall"] for p in parts))
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


def prepare(args: Sequence[str], world: int) -> tuple[Any, Any]:
    """Compose and check the config of one run on ``world`` ranks: ``(cfg, RunConfig)``; one-line errors."""
    from dimat.config import ConfigError, RunConfig
    from dimat.entry import user_errors
    from dimat.methods import method_class

    with user_errors(_prog()):
        cfg = compose_config(args)
        run = RunConfig.from_config(cfg)
        if run.transport.name != "torchdist":
            raise ConfigError(f"dimat.launch needs transport=torchdist (got {run.transport.name!r})")
        if method_class(run.merge).centralized:
            raise ConfigError(f"merge={run.method} trains one model; run it with `dimat simulate`")
        if run.num_peers < world:
            raise ConfigError(f"num_peers={run.num_peers} is smaller than the {world} ranks; "
                              "every rank must host at least one peer")
    return cfg, run


def run_on(transport: TorchDistTransport, cfg: Any, args: Sequence[str]) -> dict | None:
    """Run one federation (``cfg``, composed from ``args``) over an open process group; rank 0 gets the summary.

    The process group outlives the run: several runs of the same ``num_peers`` may share it.
    """
    from dimat.config import RunConfig
    from dimat.entry import user_errors
    from dimat.federation import build_federation, run_rounds

    rank, world = transport.rank, transport.world_size
    user_dir = any(a.startswith("run_dir=") for a in args)
    run_dir = agree_run_dir(cfg, user_dir, transport)
    cfg.run_dir = str(run_dir)
    if transport.backend == "nccl" and str(cfg.device) == "cpu":
        cfg.device = str(transport.device)  # peers train where their NCCL buffers live
    with user_errors(_prog()):
        run = RunConfig.from_config(cfg)
        fed = build_federation(run, local_ids=list(transport.local_peers))
    tag = f"rank{rank}"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = agree_resume(run_dir, tag, run.resume, restarted, transport)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            _write_config(cfg, args, run_dir)
        print(f"dimat.launch: {fed.method.name} · {run.model.name} · {run.data.name} · {run.num_peers} peers on "
              f"{world} rank(s) ({transport.backend}) · {run.topology.name} · {run.rounds} rounds"
              f"{' (resuming)' if resume else ''} → {run_dir}", flush=True)
    local = run_rounds(
        fed, transport, run_dir, resume=resume, process_tag=tag,
        progress=run.progress and rank == 0,
        echo=(lambda s: print(f"[rank 0 peers {list(transport.local_peers)}] {s}", flush=True)) if rank == 0 else None,
    )
    summary = merge_outputs(fed, run_dir, local, transport)
    if summary is not None:
        print(f"dimat.launch: final test accuracy mean {summary['final_mean_acc']:.4f} "
              f"(min {summary['final_min_acc']:.4f}, max {summary['final_max_acc']:.4f}) over {run.num_peers} "
              f"peers; outputs in {run_dir}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Run this rank's peers for the configured rounds; rank 0 writes the run summary."""
    from dimat.entry import fail, set_threads
    from dimat.transport import build_transport

    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in args:
        args = [a for a in args if a != "--resume"] + ["resume=true"]
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        fail("dimat.launch runs under torchrun, e.g. `torchrun --standalone --nproc_per_node=4 -m dimat.launch`",
             _prog())
    cfg, run = prepare(args, int(os.environ["WORLD_SIZE"]))
    set_threads(run.threads)
    transport = build_transport(run.transport, n_peers=run.num_peers)
    try:
        run_on(transport, cfg, args)
    finally:
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
