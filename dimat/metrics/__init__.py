"""Run metrics: the JSONL/CSV/TensorBoard logger, accuracy plots, consensus distance, atomic JSON."""
from dimat.metrics.consensus import consensus_distance
from dimat.metrics.io import prune_jsonl, read_jsonl, repair_jsonl, write_csv, write_json_atomic, write_text_atomic
from dimat.metrics.logger import MetricsLogger
from dimat.metrics.plots import accuracy_by_round, plot_accuracy, plot_accuracy_runs

__all__ = [
    "MetricsLogger", "read_jsonl", "repair_jsonl", "prune_jsonl", "write_csv", "write_json_atomic",
    "write_text_atomic", "plot_accuracy", "plot_accuracy_runs", "accuracy_by_round", "consensus_distance",
]
