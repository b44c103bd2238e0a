"""Metrics files on disk, plots, consensus distance, atomic writes."""
from __future__ import annotations

import csv
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch

from dimat.metrics import (
    MetricsLogger,
    accuracy_by_round,
    consensus_distance,
    plot_accuracy,
    plot_accuracy_runs,
    prune_jsonl,
    read_jsonl,
    write_json_atomic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log_run(run_dir, n_peers=3, rounds=4, offset=0.0, **kw):
    with MetricsLogger(run_dir, **kw) as logger:
        for r in range(rounds):
            for p in range(n_peers):
                logger.log({"round": r, "peer": p, "test_acc": 0.5 + offset + 0.1 * r + 0.01 * p,
                            "loss": np.float32(1.0 / (r + 1))})
    return run_dir / "metrics.jsonl"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    # first chunk is IHDR: length(4) type(4) width(4) height(4); check its CRC too
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR"
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(data[12:16 + length])
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def test_logger_writes_flushed_jsonl_and_csv(tmp_path):
    run = tmp_path / "run"
    logger = MetricsLogger(run)
    logger.log({"round": 0, "peer": 1, "test_acc": np.float64(0.75), "bytes": torch.tensor(123)})
    # flushed per line: another reader sees it before close
    assert read_jsonl(run / "metrics.jsonl") == [{"round": 0, "peer": 1, "test_acc": 0.75, "bytes": 123}]
    logger.log({"round": 0, "consensus": float("nan")})  # run-wide record without a peer; NaN -> null
    logger.log({"round": 1, "peer": 1, "test_acc": 0.8, "extra": 2})
    csv_path = logger.write_csv()
    logger.close()
    logger.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        logger.log({"round": 2})
    with pytest.raises(TypeError, match="mapping"):
        MetricsLogger(run).log([1, 2])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1]) == {"round": 0, "consensus": None}
    rows = list(csv.DictReader(open(csv_path)))
    assert csv_path == run / "metrics.csv"
    assert list(rows[0]) == ["round", "peer", "test_acc", "bytes", "consensus", "extra"]
    assert rows[2]["test_acc"] == "0.8" and rows[2]["extra"] == "2" and rows[0]["extra"] == ""


def test_read_jsonl_skips_truncated_last_line_and_logger_repairs_it(tmp_path):
    path = _log_run(tmp_path, n_peers=2, rounds=2)
    with open(path, "a") as fh:
        fh.write('{"round": 2, "peer": 0, "test_a')  # killed mid-write
    records = read_jsonl(path)
    assert len(records) == 4 and records[-1] == {"round": 1, "peer": 1, "test_acc": pytest.approx(0.61),
                                                 "loss": 0.5}
    # resuming appends on a clean line: the partial record is gone, nothing else
    with MetricsLogger(tmp_path) as logger:
        logger.log({"round": 2, "peer": 0, "test_acc": 0.9})
    records = read_jsonl(path)
    assert len(records) == 5 and records[-1]["test_acc"] == 0.9
    # a complete last record that lacks only its newline is kept
    with open(path, "a") as fh:
        fh.write('{"round": 3, "peer": 0}')
    with MetricsLogger(tmp_path) as logger:
        logger.log({"round": 3, "peer": 1})
    assert [r["peer"] for r in read_jsonl(path)[-2:]] == [0, 1]
    # damage in the middle is not silently skipped
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_prune_jsonl_drops_unfinished_rounds(tmp_path):
    path = _log_run(tmp_path, n_peers=2, rounds=4)
    assert prune_jsonl(path, max_round=1) == 4
    assert sorted({r["round"] for r in read_jsonl(path)}) == [0, 1]


def test_tensorboard_scalars_per_metric_and_peer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_run(tmp_path, n_peers=2, rounds=3, tensorboard=True)
    tb_dir = tmp_path / "tensorboard"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb_dir))
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"test_acc/peer_0", "test_acc/peer_1", "loss/peer_0", "loss/peer_1"}
    events = acc.Scalars("test_acc/peer_1")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == pytest.approx([0.51, 0.61, 0.71])


def test_accuracy_by_round_mean_min_max(tmp_path):
    s = accuracy_by_round(_log_run(tmp_path, n_peers=3, rounds=2))
    np.testing.assert_allclose(s["round"], [0, 1])
    np.testing.assert_allclose(s["mean"], [0.51, 0.61])
    np.testing.assert_allclose(s["min"], [0.50, 0.60])
    np.testing.assert_allclose(s["max"], [0.52, 0.62])
    with pytest.raises(ValueError, match="'val_acc'"):
        accuracy_by_round(tmp_path / "metrics.jsonl", key="val_acc")


def test_plot_accuracy_writes_valid_png(tmp_path):
    path = _log_run(tmp_path / "a", n_peers=3, rounds=5)
    out = plot_accuracy(path, tmp_path / "plots" / "accuracy.png")
    assert out.is_file() and out.stat().st_size > 10_000  # axes, labels, a line and a band
    w, h = _png_size(out)
    assert (w, h) == (840, 540)


def test_plot_accuracy_runs_one_line_per_method(tmp_path):
    runs = {
        "dimat": _log_run(tmp_path / "dimat", offset=0.1),
        "average": _log_run(tmp_path / "avg", offset=0.0),
        "isolated": _log_run(tmp_path / "iso", offset=-0.2),
    }
    single = plot_accuracy(runs["dimat"], tmp_path / "one.png")
    out = plot_accuracy_runs(runs, tmp_path / "cmp.png", title="MNIST-1D ring")
    _png_size(out)
    assert out.stat().st_size > 10_000 and out.read_bytes() != single.read_bytes()
    with pytest.raises(ValueError, match="at least one run"):
        plot_accuracy_runs({}, tmp_path / "x.png")


def test_consensus_distance_identical_states_is_zero():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(4)]
    assert consensus_distance(states) == 0.0
    assert consensus_distance(states[:1]) == 0.0


def test_consensus_distance_known_pair_by_hand():
    a = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([2.0, 4.0]), "b": torch.tensor([3.0]), "n": torch.tensor(9)}
    # mean: w = [1, 2], b = [2]; each peer is at squared distance 1 + 4 + 1 = 6; integer 'n' ignored
    assert consensus_distance([a, b]) == pytest.approx(6.0)
    # three peers on a line at 0, 3, 6: mean 3, distances 9, 0, 9 -> 6
    states = [{"x": torch.tensor([v])} for v in (0.0, 3.0, 6.0)]
    assert consensus_distance(states) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="shape"):
        consensus_distance([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    with pytest.raises(ValueError, match="lacks entry 'x'"):
        consensus_distance([{"x": torch.zeros(2)}, {"y": torch.zeros(2)}])
    with pytest.raises(ValueError, match="at least one"):
        consensus_distance([])


def test_write_json_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "summary.json"
    write_json_atomic(target, {"acc": np.float32(0.5), "rounds": np.arange(3), "path": tmp_path})
    assert json.loads(target.read_text()) == {"acc": 0.5, "rounds": [0, 1, 2], "path": str(tmp_path)}
    write_json_atomic(target, {"acc": 0.9})
    assert json.loads(target.read_text()) == {"acc": 0.9}
    # an unserialisable object fails before the old file is touched, and the temp file is removed
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"acc": 0.9}
    assert os.listdir(target.parent) == ["summary.json"]
