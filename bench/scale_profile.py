"""Where one round of a simulated federation spends its time, by phase (docs/scale.md, "Profile").

Builds the federation ``dimat simulate`` would build from the given overrides (the default recipe
unless told otherwise), runs round 1 (the first merge of different inits, and warm-up), then
profiles round 2 with cProfile on one worker (``workers=1``: cProfile sees one thread, and a
phase's share is what it costs a core) and prints each phase's cumulative seconds and share of
the round. Phases nest (the shared average is part of the merges); "bookkeeping" is what the
merges spend outside the arithmetic: mixing rows, tags, row keys, receive checks.

    PYTHONPATH=. python bench/scale_profile.py num_peers=64 partition=iid
    PYTHONPATH=. python bench/scale_profile.py num_peers=1000 partition=iid local_epochs=1
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

#: phase -> (file suffix, function name) of the functions whose cumulative time it is
PHASES = {
    "local training (all steps)": [("dimat/peer.py", "train_steps")],
    "  drift correction (scaffold, per step)": [("dimat/methods/scaffold.py", "before_step")],
    "exchange: in-process transport": [("dimat/transport/inproc.py", "exchange")],
    "exchange: sent-state bookkeeping": [("dimat/federation/sent_states.py", "__init__"),
                                         ("dimat/federation/sent_states.py", "delivered"),
                                         ("dimat/federation/sent_states.py", "before_merge"),
                                         ("dimat/federation/sent_states.py", "after_merge")],
    "merges (method.merge, every peer)": [("dimat/methods/scaffold.py", "merge"), ("dimat/methods/aligned.py", "merge")],
    "  shared average (once per exchange)": [("dimat/federation/shared_merge.py", "merge")],
    "    BatchNorm mixture (moments)": [("dimat/align/batchnorm.py", "to_second_moments"),
                                       ("dimat/align/batchnorm.py", "from_second_moments")],
    "  per-peer merges (matching, rebase)": [("dimat/merge/api.py", "merge_states"),
                                             ("dimat/methods/aligned.py", "_join_lowest_basis")],
    "  loading merged states": [("dimat/peer.py", "load_state")],
    "  mixing rows (renormalise, row keys)": [("dimat/topology/membership.py", "renormalise"),
                                              ("dimat/federation/shared_merge.py", "row_key")],
    "  basis tags": [("dimat/merge/basis.py", "basis_of")],
    "evaluation": [("dimat/federation/rounds.py", "evaluate_round")],
}


def main(overrides: list[str]) -> None:
    import torch

    from dimat.entry import load
    from dimat.federation import build_federation
    from dimat.federation.rounds import evaluate_round, train_round
    from dimat.transport.inproc import InProcTransport

    torch.set_num_threads(1)
    run = ["baseline=null", "progress=false", "checkpoint.enabled=false", "workers=1", "rounds=20", *overrides]
    fed = build_federation(load(run))
    transport = InProcTransport(share_states=True)
    t0 = time.perf_counter()
    evaluate_round(fed, 1, train_round(fed, transport, 1), 0.0)
    first = time.perf_counter() - t0
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    evaluate_round(fed, 2, train_round(fed, transport, 2), 0.0)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    print(f"{' '.join(run)}\nround 1 (first merge, unprofiled): {first:.2f} s; round 2 profiled: {wall:.2f} s\n")
    print("| phase | s | share of round 2 |\n|---|---|---|")
    for phase, funcs in PHASES.items():
        cum = 0.0
        for (path, _line, name), (_cc, _nc, _tt, ct, callers) in stats.items():
            if name in [f for _, f in funcs] and any(path.endswith(p) and f == name for p, f in funcs):
                # nested calls of a listed function inside another listed one are counted once
                if not any(c[2] in [f for _, f in funcs] and any(c[0].endswith(p) for p, _ in funcs)
                           for c in callers):
                    cum += ct
        print(f"| {phase} | {cum:.2f} | {cum / wall:.0%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
