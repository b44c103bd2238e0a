"""The federation: building peers from a config (:mod:`.build`), the round loop (:mod:`.rounds`)
and per-peer checkpoints (:mod:`.checkpoints`). Run logging and summaries live in
:mod:`dimat.metrics.run_log`; the typed configuration in :mod:`dimat.config`.

Simulation hosts all peers with the in-process transport (:func:`simulate`); the gRPC and torchrun
entry points call :func:`build_federation` with their ``local_ids`` and :func:`run_rounds` with
their transport and a ``process_tag`` (so processes sharing a run folder write separate files).
"""
from dimat.config import ConfigError
from dimat.federation.build import Federation, build_federation
from dimat.federation.checkpoints import Checkpointer, atomic_torch_save
from dimat.federation.rounds import RoundOutput, evaluate_round, run_rounds, simulate, train_round
from dimat.metrics import consensus_distance, read_jsonl as read_metrics
from dimat.metrics.run_log import RoundResult, RunLog

__all__ = [
    "ConfigError", "Federation", "build_federation", "run_rounds", "simulate", "train_round",
    "evaluate_round", "RoundOutput", "Checkpointer", "RunLog", "RoundResult", "consensus_distance",
    "read_metrics", "atomic_torch_save",
]
