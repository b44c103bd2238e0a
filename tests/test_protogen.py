"""Generated gRPC code comes from the proto at build/import time and is regenerated when stale."""
import os
import subprocess
import sys
from pathlib import Path

from dimat.transport import protogen

ROOT = Path(__file__).resolve().parents[1]


def test_generate_is_idempotent_and_detects_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(protogen, "OUT_DIR", tmp_path / "_generated")
    assert protogen.generate() is True
    files = {p.name for p in (tmp_path / "_generated").iterdir()}
    assert {"__init__.py", "peer_pb2.py", "peer_pb2_grpc.py", "STAMP"} <= files
    assert "from . import peer_pb2" in (tmp_path / "_generated" / "peer_pb2_grpc.py").read_text()
    assert protogen.generate() is False  # up to date: nothing written
    (tmp_path / "_generated" / "STAMP").write_text("stale\n")  # e.g. the proto or protobuf changed
    assert protogen.generate() is True
    assert (tmp_path / "_generated" / "STAMP").read_text().strip() == protogen._stamp_text(protogen._proto_text())


def test_concurrent_generation_never_leaves_a_broken_package():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c",
           "from dimat.transport import protogen; protogen.generate(force=True); "
           "pb2, pb2_grpc = protogen.load(); assert pb2.WeightChunk(round=1).round == 1 and pb2_grpc.PeerStub"]
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
