"""NCCL smoke test for TorchDistTransport (needs CUDA; CI has none, so the lead runs it on a GPU box).

    torchrun --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) bench/nccl_smoke.py [--peers-per-rank 4] [--rounds 5]

NCCL allows one rank per GPU, so on a single-GPU machine the world is 1: that covers NCCL
initialisation, the device preamble and packing to/from the GPU, but no cross-rank traffic; with
2+ GPUs every ring round also crosses ranks. ``--backend gloo`` runs the same check on CPU.
Rank 0 prints one line per round and ``NCCL smoke OK`` (exit 0) when every received state is
bit-identical to what its sender holds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dimat.transport.torchdist import TorchDistTransport  # noqa: E402


def make_state(peer: int, round_idx: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * round_idx + peer)
    return {
        "w": torch.randn(numel, generator=g),
        "b": torch.randn(64, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(peer * 100 + round_idx),
        "mask": torch.rand(33, generator=g) > 0.5,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers-per-rank", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--numel", type=int, default=1 << 20, help="float32 elements per state (default 4 MiB)")
    ap.add_argument("--backend", default=None, help="default: nccl if CUDA is available, else gloo")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    n = args.peers_per_rank * world
    t = TorchDistTransport(n_peers=n, backend=args.backend)
    if t.rank == 0:
        print(f"backend={t.backend} device={t.device} world={t.world_size} peers={n} "
              f"cuda={torch.cuda.is_available()} torch={torch.__version__}", flush=True)
    ok = True
    for r in range(args.rounds):
        out = {i: sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)}
        ins = out  # the ring is symmetric
        local = list(t.local_peers)
        states = {p: make_state(p, r, args.numel) for p in local}
        t0 = time.perf_counter()
        got = t.exchange(r, states, {p: ins[p] for p in local}, {p: out[p] for p in local}, timeout=120).received
        dt = time.perf_counter() - t0
        for q, by in got.items():
            assert sorted(by) == ins[q], (q, sorted(by))
            for p, st in by.items():
                want = make_state(p, r, args.numel)
                for k, v in st.items():
                    if v.device.type != "cpu" or v.dtype != want[k].dtype or not torch.equal(v, want[k]):
                        ok = False
                        print(f"rank {t.rank}: MISMATCH round {r} {p}->{q} {k}", flush=True)
        if t.rank == 0:
            print(f"round {r}: exchange {dt * 1e3:.1f} ms, rank 0 sent {t.last_bytes_sent / 2**20:.1f} MiB cross-rank", flush=True)
    flag = torch.tensor([0 if ok else 1], device=t.device)
    torch.distributed.all_reduce(flag)
    t.close()
    if flag.item() != 0:
        print(f"{t.backend.upper()} smoke FAILED", flush=True)
        sys.exit(1)
    if t.rank == 0:
        print(f"{t.backend.upper()} smoke OK", flush=True)


if __name__ == "__main__":
    main()
