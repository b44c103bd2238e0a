"""Every bad file a run reads ends in one ``dimat: error: <file>: <problem>`` line and exit code 2 (issue 12).

The commands run in-process (``dimat.cli.main``, the same entry as the console script) on real
files: CIFAR batches, checkpoints and progress files of a real run, peers files, certificates.
"""
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from dimat.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["experiment=mnist1d_fast", "model=mlp", "model.width=0.25", "num_peers=2", "topology=fully_connected", "local_epochs=0.5",
        "train.batch_size=64", "merge.align_batches=2", "progress=false", "threads=1"]


def _error_line(capsys, argv) -> str:
    """Run ``dimat <argv>``; assert exit code 2 and exactly one ``dimat: error:`` line on stderr; return it."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    errors = [line for line in err if line.startswith("dimat: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


# --------------------------------------------------------------------------- data files


class _Refused:
    def __reduce__(self):
        return (getattr, (object, "__name__"))  # any global outside the allow-list


def _cifar_folder(tmp_path: Path, first: bytes) -> Path:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / f).write_bytes(first)
    return d


def _bytearray_bomb() -> bytes:
    """A tiny pickle that calls ``builtins.bytearray(2**40)`` (1 TiB of zeros)."""
    return (b"\x80\x02cbuiltins\nbytearray\nq\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x85q\x01Rq\x02.")


@pytest.mark.parametrize("kind, problem", [
    ("refused_global", "builtin__.getattr'; only numpy arrays"),
    ("bytearray_bomb", "refusing bytearray(int)"),
    ("garbage", "not a readable CIFAR batch file"),
])
def test_bad_cifar_batch_is_one_line(tmp_path, capsys, kind, problem):
    data = {"refused_global": pickle.dumps({b"data": _Refused()}, protocol=2), "bytearray_bomb": _bytearray_bomb(),
            "garbage": b"\x80\x02garbage"}[kind]
    assert len(_bytearray_bomb()) < 130
    folder = _cifar_folder(tmp_path, data)
    line = _error_line(capsys, ["simulate", "data=cifar10", f"data.root={folder}", "model=mlp", "num_peers=2",
                                "rounds=1", "progress=false", f"run_dir={tmp_path / 'run'}"])
    assert f"{folder / 'data_batch_1'}: " in line and problem in line, line


# --------------------------------------------------------------------------- checkpoints and progress


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real 1-round, 2-peer simulated run with its checkpoints (copied per test)."""
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["simulate", *FAST, "rounds=1", f"run_dir={run}"]) == 0
    assert (run / "checkpoints" / "peer_000" / "round_0001.pt").is_file()
    return run


_DAMAGE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"not a checkpoint at all\n" * 10),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_simulate_resume_over_a_bad_checkpoint_is_one_line(finished_run, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ck = run / "checkpoints" / "peer_001" / "round_0001.pt"
    _DAMAGE[damage](ck)
    line = _error_line(capsys, ["simulate", "--resume", "rounds=2", f"run_dir={run}"])
    assert f"{ck}: not a readable checkpoint" in line, line


@pytest.mark.parametrize("text", ["", "{\"last_round\": 1", "[1, 2]", "{\"last_round\": \"x\"}"])
def test_simulate_resume_over_a_bad_progress_file_is_one_line(finished_run, tmp_path, capsys, text):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    prog = run / "checkpoints" / "progress.json"
    prog.write_text(text)
    line = _error_line(capsys, ["simulate", "--resume", "rounds=2", f"run_dir={run}"])
    assert line.startswith(f"dimat: error: {prog}: "), line


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _peers_file(tmp_path: Path, text: str | None = None) -> Path:
    p = tmp_path / "peers.yaml"
    if text is None:
        a, b = _free_ports(2)
        text = f"peers:\n  0: 127.0.0.1:{a}\n  1: 127.0.0.1:{b}\n"
    p.write_text(text)
    return p


def _peer_run(finished_run: Path, tmp_path: Path) -> Path:
    """The simulated run's files laid out as peer 0 of a 2-peer gRPC run would leave them."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.copy(run / "checkpoints" / "progress.json", run / "checkpoints" / "progress_peer_0.json")
    return run


@pytest.mark.integration
def test_peer_resume_over_a_bad_progress_file_is_one_line(finished_run, tmp_path, capsys):
    run = _peer_run(finished_run, tmp_path)
    prog = run / "checkpoints" / "progress_peer_0.json"
    prog.write_bytes(b"\x00\xff garbage")
    line = _error_line(capsys, ["peer", "--id", "0", "--peers", str(_peers_file(tmp_path)), "--resume", *FAST,
                                "rounds=2", f"run_dir={run}", "transport.startup_timeout=2"])
    assert line.startswith(f"dimat: error: {prog}: not a readable progress file"), line


@pytest.mark.integration
def test_peer_resume_over_a_truncated_checkpoint_is_one_line(finished_run, tmp_path, capsys):
    run = _peer_run(finished_run, tmp_path)
    ck = run / "checkpoints" / "peer_000" / "round_0001.pt"
    _DAMAGE["truncated"](ck)
    line = _error_line(capsys, ["peer", "--id", "0", "--peers", str(_peers_file(tmp_path)), "--resume", *FAST,
                                "rounds=2", f"run_dir={run}", "transport.startup_timeout=2"])
    assert f"{ck}: not a readable checkpoint" in line, line


# --------------------------------------------------------------------------- peers files


@pytest.mark.parametrize("body, problem", [
    ("  0: 127.0.0.1:{a}\n  1: 127.0.0.1:{b}\n  1: 127.0.0.1:{c}\n", "key 1 appears twice"),
    ("  0: 127.0.0.1:{a}\n  1: 127.0.0.1:{b}\n  '01': 127.0.0.1:{c}\n", "peer ids 1 and '01' both name peer 1"),
    ("  0: 127.0.0.1:{a}\n  1: 127.0.0.1:99999\n", "port '99999' is not in 1-65535"),
    ("  0: 127.0.0.1:{a}\n  1: 'no such host!:{b}'\n", "host 'no such host!' is not a host name or IP address"),
    ("  0: 127.0.0.1:{a}\n  1: 127.0.0.1:{a}\n", "peers 0 and 1 share the address 127.0.0.1:{a}"),
    ("  0: 127.0.0.1:{a}\n  1: 127.0.0.1:0\n", "port '0' is not in 1-65535"),
    ("  0: [127.0.0.1:{a}\n", "not readable YAML"),
])
def test_bad_peers_file_is_one_line_at_once(tmp_path, capsys, body, problem):
    a, b, c = _free_ports(3)
    p = _peers_file(tmp_path, "peers:\n" + body.format(a=a, b=b, c=c))
    line = _error_line(capsys, ["peer", "--id", "0", "--peers", str(p), *FAST, "rounds=1",
                                f"run_dir={tmp_path / 'run'}", "transport.startup_timeout=2"])
    assert line.startswith(f"dimat: error: {p}: ") and problem.format(a=a) in line, line


# --------------------------------------------------------------------------- certificates


@pytest.mark.integration
def test_bad_certificate_files_are_one_line(tmp_path, capsys):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "launch" / "make_certs.sh"), str(certs), "2"], check=True, capture_output=True)
    args = ["peer", "--id", "0", "--peers", str(_peers_file(tmp_path)), *FAST, "rounds=1", f"run_dir={tmp_path / 'run'}",
            "transport.startup_timeout=2", f"transport.tls.dir={certs}", "transport.tls.mutual=true"]
    (certs / "peer-0.pem").write_text("garbage\n")
    line = _error_line(capsys, args)
    assert line.startswith(f"dimat: error: {certs / 'peer-0.pem'}: not a PEM certificate"), line
    shutil.copy(certs / "peer-1.pem", certs / "peer-0.pem")  # a certificate whose key is another one
    line = _error_line(capsys, args)
    assert line.startswith(f"dimat: error: {certs / 'peer-0.key'}: not a PEM private key, or not the key of"), line


# --------------------------------------------------------------------------- topology matrix files


@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "object_array", "not_numbers"])
def test_bad_topology_matrix_file_is_one_line(tmp_path, capsys, damage):
    """A truncated or corrupt ``topology.path`` matrix is one line naming the file (was an EOFError traceback)."""
    import numpy as np

    good = tmp_path / "good.npy"
    np.save(good, np.full((2, 2), 0.5))
    path = tmp_path / ("w.txt" if damage == "not_numbers" else "w.npy")
    if damage == "truncated":
        path.write_bytes(good.read_bytes()[:-9])
    elif damage == "garbage_header":
        path.write_bytes(b"\x93NUMPY\x01\x00\xff\xff" + b"\xfe" * 40)
    elif damage == "object_array":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    else:
        path.write_text("a b\nc d\n")
    line = _error_line(capsys, ["simulate", *FAST, "topology=matrix", f"topology.path={path}", f"run_dir={tmp_path / 'run'}"])
    assert f"{path}: cannot read a weight matrix from it, truncated or corrupt (" in line, line
