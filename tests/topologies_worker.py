"""Run several federations in one process, one after another (the equivalence tests' worker).

    python tests/topologies_worker.py grpc K plan.json      # peer K of every gRPC run in the plan
    torchrun --nproc_per_node=N tests/topologies_worker.py torchdist plan.json

``plan.json`` is a list of ``{"args": [hydra overrides...], "peers": peers.yaml}`` (``peers`` for
gRPC only). gRPC runs go through the peer CLI (:func:`dimat.grpc_peer.peer_main`), exactly as
``dimat peer --id K --peers FILE ARGS`` does; torchrun runs share one process group and go through
:func:`dimat.launch.run_on`, exactly as ``torchrun -m dimat.launch ARGS`` does. Starting the
interpreter, torch and the process group once for the whole plan is what keeps the tests short.
"""
from __future__ import annotations

import json
import os
import sys


def grpc_runs(peer_id: int, plan: list[dict]) -> int:
    from dimat.grpc_peer import peer_main

    for item in plan:
        rc = peer_main(["--id", str(peer_id), "--peers", item["peers"], *item["args"]])
        if rc != 0:
            return rc
    return 0


def torchdist_runs(plan: list[dict]) -> int:
    from dimat.entry import set_threads
    from dimat.launch import prepare, run_on
    from dimat.transport import build_transport

    world = int(os.environ["WORLD_SIZE"])
    transport = None
    try:
        for item in plan:
            args = [*item["args"], "transport=torchdist"]
            cfg, run = prepare(args, world)
            set_threads(run.threads)
            if transport is None:
                transport = build_transport(run.transport, n_peers=run.num_peers)
            elif transport.n_peers != run.num_peers:
                raise SystemExit(f"every run of a plan needs num_peers={transport.n_peers}")
            run_on(transport, cfg, args)
    finally:
        if transport is not None:
            transport.close()
    return 0


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "grpc":
        sys.exit(grpc_runs(int(sys.argv[2]), json.loads(open(sys.argv[3]).read())))
    sys.exit(torchdist_runs(json.loads(open(sys.argv[2]).read())))
