"""The stalled-slot attack of issue 23, measured: how long until an honest push lands (not in CI).

    PYTHONPATH=. python bench/stalled_slots.py [--reps 5] [--stalled 50] [--deadline 30]

Two real ``GrpcTransport`` peers on 127.0.0.1 (receiver 1 in round 0, expecting sender 0) and an
attacker written from the generated ``dimat.v1`` stubs alone:

- ``insider``: the receiver has a token and the attacker holds it: ``--stalled`` pushes that send a
  valid header naming sender 0 (each its own transfer id) and then nothing, reopened as soon as
  the server ends them; they fill sender 0's ``max_streams_per_sender`` slots.
- ``unauthenticated``: no token (the default); header-less stalled pushes over 6 connections of 8
  fill all ``max_concurrent_streams`` slots.
- ``outsider``: a token is set and the attacker lacks it (every stream is refused before it holds
  anything).

Per case and repetition it prints the seconds from the honest ``send`` until its state is in the
receiver's inbox (or the failure), with the server's default ``stream_idle_timeout`` (10 s).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_grpc_transport import grpc_transport  # noqa: E402  (configs/transport/grpc.yaml's settings)
from test_hostile import StalledStreams, _header, _pair, _state, _until  # noqa: E402  (the tests' attacker)

from dimat.transport.base import TransportError  # noqa: E402


def one(case: str, stalled: int, deadline: float) -> str:
    token = None if case == "unauthenticated" else "tok"
    ts = sender, receiver = _pair(token=token, timeout=deadline)
    tids = iter(range(1, 10 ** 7))
    if case == "insider":
        attack = StalledStreams(receiver.address, stalled, channels=7, first=lambda: _header(transfer_id=next(tids)),
                                seconds=deadline + 30, metadata=(("authorization", "Bearer tok"),))
        _until(lambda: receiver.slots.by_caller.get("sender:0") == receiver.slots.per_caller, "insider slots")
    elif case == "unauthenticated":
        attack = StalledStreams(receiver.address, 64, channels=6, seconds=deadline + 30)
        _until(lambda: receiver.slots.used == receiver.slots.total, "all slots")
    else:
        attack = StalledStreams(receiver.address, stalled, channels=7, first=lambda: _header(transfer_id=next(tids)),
                                seconds=deadline + 30)
        _until(lambda: len(attack.codes) >= stalled, "refusals")
    time.sleep(1.0)  # the attack in its steady state
    t0 = time.monotonic()
    try:
        sender.send(1, 0, _state(3), deadline=deadline)
        got = receiver.receive(0, [0], timeout=deadline)
        out = f"{time.monotonic() - t0:7.3f} s" if 0 in got and torch.equal(got[0]["fc1.weight"], _state(3)["fc1.weight"]) \
            else "not received"
    except TransportError as exc:
        out = f"failed after {time.monotonic() - t0:.1f} s: {str(exc)[:120]}"
    finally:
        attack.close()
        for t in ts:
            t.close(grace=0)
    return out + f"  (slots reclaimed {receiver.slots.reclaimed}, refused {receiver.slots.refused})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--stalled", type=int, default=50)
    ap.add_argument("--deadline", type=float, default=30.0)
    ns = ap.parse_args()
    for case in ("insider", "unauthenticated", "outsider"):
        for r in range(ns.reps):
            print(f"{case:16s} rep {r}: honest push landed in {one(case, ns.stalled, ns.deadline)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
