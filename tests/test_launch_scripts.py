"""Every launch path as documented (issue 13): the shipped scripts, and what a new user runs into.

Real processes on loopback: the two-host torchrun script as a two-node rendezvous on this host,
the SLURM script with stand-ins for ``scontrol`` and ``srun``, the single-node script, and the
``dimat peer`` / ``dimat simulate`` command lines on the mistakes and edge cases the issue found.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), ROOT / "launch" / "slurm.sbatch"])
TINY = ["merge=dimat", "data=digits", "model=mlp", "model.hidden=[16]", "rounds=2", "local_epochs=0.25", "num_peers=4",
        "progress=false", "threads=1", "topology=ring", "merge.every_steps=null", "merge.keep_momentum=false", "merge.bn_stats=own", "baseline=null"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(path: Path) -> dict:
    return {(r["round"], r["peer"]): r for r in map(json.loads, path.read_text().splitlines()) if r}


def _same(a: Path, b: Path) -> None:
    ra, rb = _records(a), _records(b)
    assert sorted(ra) == sorted(rb) and ra
    for k, x in ra.items():
        y = rb[k]
        assert x["neighbours"] == y["neighbours"] and x["bytes_sent"] == y["bytes_sent"], k
        for f in ("test_acc", "test_loss", "train_loss"):
            assert math.isclose(x[f], y[f], rel_tol=1e-5, abs_tol=1e-6), (k, f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dimat.entry import compose
    from dimat.federation import simulate

    out = tmp_path_factory.mktemp("sim")
    simulate(compose([*TINY, f"run_dir={out}"]), out, progress=False)
    return out


# ----------------------------------------------------------------------------- shipped scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_shipped_script_parses(script: Path) -> None:
    """Finding 3: launch/torchrun_two_hosts.sh had an apostrophe inside ${HEAD:?...} (bash exit 2)."""
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_two_host_script_as_two_nodes_on_one_host(reference: Path, tmp_path: Path) -> None:
    """The two-host script, run twice on this host (HEAD=127.0.0.1), rendezvous and match the simulation."""
    port = _free_port()
    env = _env(HEAD="127.0.0.1", PORT=str(port), NPROC="1", JOB_ID=f"two-hosts-{port}", RUN_DIR=str(tmp_path / "run"),
               MAX_RESTARTS="0")
    cmd = ["bash", str(ROOT / "launch" / "torchrun_two_hosts.sh"), *TINY]
    hosts = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [h.communicate(timeout=240)[0] for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert any("2 rank(s)" in o for o in outs), outs
    _same(reference / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl")


def test_slurm_script_with_stand_ins_and_resume_folder(reference: Path, tmp_path: Path) -> None:
    """launch/slurm.sbatch with stand-in scontrol/srun (one node, 2 workers); RUN_DIR names the folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "old-run"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_NODELIST="x",
               SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2", SLURM_JOB_ID="4242", RDZV_PORT=str(_free_port()),
               RUN_DIR=str(run_dir))
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), *TINY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _same(reference / "metrics.jsonl", run_dir / "metrics.jsonl")
    assert not (ROOT / "outputs" / "slurm-4242").exists()


def test_single_node_script(reference: Path, tmp_path: Path) -> None:
    env = _env(NPROC="2", MAX_RESTARTS="0")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun_single_node.sh"), *TINY, f"run_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _same(reference / "metrics.jsonl", tmp_path / "run" / "metrics.jsonl")


# ----------------------------------------------------------------------------- dimat peer: binding, TLS overrides

ISOLATED = ["data=digits", "model=mlp", "model.hidden=[16]", "rounds=1", "local_epochs=0.25", "num_peers=1",
            "merge=isolated", "progress=false", "threads=1", "transport.startup_timeout=20"]


def _peer(tmp_path: Path, address: str, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    peers = tmp_path / "peers.yaml"
    peers.write_text(f"peers:\n  0: {address}\n")
    return subprocess.run([sys.executable, "-m", "dimat", "peer", "--id", "0", "--peers", str(peers), *ISOLATED,
                           f"run_dir={tmp_path / 'run'}", *overrides],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dimat: error: "), (proc.returncode, proc.stderr)
    return lines[0]


def test_a_second_peer_on_a_taken_port_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """Findings 5 and 6: SO_REUSEPORT is off, so the port is not shared; the error names the port."""
    from test_grpc_transport import grpc_transport

    first = grpc_transport(0, {0: "127.0.0.1:0"}, heartbeat_interval=None)  # a running peer 0
    try:
        proc = _peer(tmp_path, first.address, timeout=60)
    finally:
        first.close()
    line = _one_error_line(proc)
    assert f"port {first.port}" in line and "in use" in line, line


def test_an_address_not_on_this_host_is_one_line(tmp_path: Path) -> None:
    line = _one_error_line(_peer(tmp_path, f"192.0.2.1:{_free_port()}", timeout=60))  # TEST-NET-1: never local
    assert "192.0.2.1" in line and "transport.bind" in line, line


def test_bind_address_apart_from_the_advertised_one(tmp_path: Path) -> None:
    """Behind NAT: advertise a name this host does not have, listen on transport.bind; TLS paths with {id} unquoted."""
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "launch" / "make_certs.sh"), str(certs), "1"], check=True, capture_output=True)
    port = _free_port()
    proc = _peer(tmp_path, f"public.example.invalid:{port}", "transport.bind=127.0.0.1",
                 f"transport.tls.cert={certs}/peer-{{id}}.pem", f"transport.tls.key={certs}/peer-{{id}}.key",
                 f"transport.tls.ca={certs}/ca.pem")  # finding 4: Hydra's grammar refused the unquoted {id}
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "done: 1 rounds" in proc.stdout


@pytest.mark.parametrize("bind, message", [
    ("host:", "transport.bind must be host or host:port"),
    ("::1:50051", "transport.bind: write an IPv6 address in brackets"),
    ("h:99999", "port in 0..65535"),
])
def test_bind_setting_errors_name_the_key(bind: str, message: str) -> None:
    import yaml

    from dimat.transport import TransportSettings

    cfg = yaml.safe_load((ROOT / "configs" / "transport" / "grpc.yaml").read_text())
    with pytest.raises(ValueError, match=message):
        TransportSettings.from_mapping(cfg | {"bind": bind})
    for good in ("0.0.0.0", "[::]", "[::]:50051", "10.0.0.5:7000", "peer-host"):
        assert TransportSettings.from_mapping(cfg | {"bind": good}).bind == good


def test_a_refused_push_is_reported_and_checked_against_its_rounds_topology(tmp_path: Path) -> None:
    """Finding 1: `dimat peer` knows each round's senders from the schedule.

    A push for round 2 (not entered yet) from a peer that is not peer 0's round-2 neighbour is
    refused with that round's senders named; one from its round-2 neighbour is buffered.
    """
    from dimat.entry import compose
    from dimat.federation import build_federation
    from dimat.federation.rounds import exchanges_per_round
    from dimat.transport.base import TransportError
    from test_grpc_transport import grpc_transport

    local = _load_grpc_local()
    args = [*TINY, "topology=random_matching", "seed=4", "rounds=3", "transport=grpc", "transport.timeout=30"]
    fed = build_federation(compose(args))
    n2, n1 = fed.topology_at(2).in_neighbours(0), fed.topology_at(1).in_neighbours(0)
    assert n1 != n2  # seed 4: peer 0's partner changes from round 1 to round 2
    stranger = next(j for j in range(1, 4) if j not in n2)
    ports = local.free_ports(4)
    peers = local.write_peers_file(tmp_path / "peers.yaml", ports)
    others = {j: grpc_transport(j, peers, heartbeat_interval=None, retries=40, backoff=0.05, backoff_max=0.2)
              for j in range(1, 4)}
    log = open(tmp_path / "peer0.log", "w")
    p0 = subprocess.Popen([sys.executable, "-m", "dimat", "peer", "--id", "0", "--peers", str(tmp_path / "peers.yaml"),
                           *args, f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    e2 = exchanges_per_round(fed) + 1  # the transport counts exchanges: round 2's first one
    try:
        state = fed.peers[stranger].shared_state()
        with pytest.raises(TransportError, match=rf"PERMISSION_DENIED.*round {e2}.*accepted: \[{n2[0]}\]"):
            others[stranger].send(0, e2, state, deadline=60)
        others[n2[0]].send(0, e2, fed.peers[n2[0]].shared_state(), deadline=60)  # admitted and buffered
    finally:
        p0.kill()
        p0.wait()
        log.close()
        for t in others.values():
            t.close()


def _load_grpc_local():
    spec = importlib.util.spec_from_file_location("grpc_local", ROOT / "launch" / "grpc_local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- dimat simulate: what a new user runs into


@pytest.mark.parametrize("overrides, message", [
    (["model=vgg11", "data=mnist1d"], "model 'vgg11' does not fit data 'mnist1d'"),
    (["model=resnet20", "data=mnist1d"], "model 'resnet20' does not fit data 'mnist1d'"),
    (["model=cnn1d", "data=digits"], "model 'cnn1d' does not fit data 'digits'"),
    (["model=mlp", "model.width=0"], "model.width must be a positive number (got 0)"),
    (["topology=matrix"], "topology=matrix needs topology.path="),
])
def test_config_mistakes_are_one_line(overrides: list[str], message: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    """Finding 9: one `dimat: error:` line (exit 2), not a traceback from the first forward pass."""
    from dimat.cli import main

    with pytest.raises(SystemExit) as info:
        main(["simulate", *overrides, "num_peers=3", "rounds=1", "local_epochs=0.1", "progress=false",
              f"run_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_one_sample_last_batch_with_batchnorm(tmp_path: Path) -> None:
    """Finding 10: the issue's command (one round); peer 4 holds 65 samples, so its last batch of 32 had one."""
    from dimat.entry import compose
    from dimat.federation import build_federation, simulate

    args = ["data=digits", "model=vgg11", "model.width=0.125", "partition=dirichlet", "partition.alpha=0.5",
            "topology=erdos_renyi", "topology.p=0.4", "num_peers=6", "seed=31", "rounds=1", "local_epochs=1",
            "progress=false", f"run_dir={tmp_path}"]
    summary = simulate(compose(args), tmp_path, progress=False)  # raised "Expected more than 1 value per channel"
    assert summary["rounds_done"] == 1
    fed = build_federation(compose(args), local_ids=[4])
    assert fed.partition_sizes[4] % 32 == 1 and fed.peers[4].steps_per_epoch == fed.partition_sizes[4] // 32


def test_batches_other_than_a_one_sample_tail_are_unchanged() -> None:
    from dimat.peer import batch_slices

    assert batch_slices(64, 32) == [(0, 32), (32, 64)]
    assert batch_slices(66, 32) == [(0, 32), (32, 64), (64, 66)]
    assert batch_slices(65, 32) == [(0, 32), (32, 65)]
    assert batch_slices(1, 32) == [(0, 1)] and batch_slices(3, 1) == [(0, 1), (1, 2), (2, 3)]


_INTERRUPTED = r"""
import os, sys
from dimat.entry import compose
from dimat.federation import simulate
run_dir = sys.argv[1]
def echo(line):
    print(line, flush=True)
    if line.startswith("round   2/"):
        os._exit(9)  # killed after round 2 was checkpointed, before the run could write summary.json
simulate(compose([*sys.argv[2:], f"run_dir={run_dir}"]), run_dir, progress=False, echo=echo)
"""


def test_summary_after_resuming_an_interrupted_run_covers_every_round(reference: Path, tmp_path: Path) -> None:
    """Finding 7: summary.json of a resumed run lists rounds 1..N and all their bytes, as an uninterrupted run."""
    args = [*TINY, "rounds=4"]
    full = tmp_path / "full"
    from dimat.entry import compose
    from dimat.federation import simulate

    simulate(compose([*args, f"run_dir={full}"]), full, progress=False)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _INTERRUPTED, str(run), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9 and not (run / "summary.json").exists(), proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dimat", "simulate", "--resume", f"run_dir={run}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run, full))
    assert [r["round"] for r in got["rounds"]] == [1, 2, 3, 4]
    assert got["total_bytes_sent"] == want["total_bytes_sent"] > 0
    for a, b in zip(got["rounds"], want["rounds"]):
        assert a["bytes_sent"] == b["bytes_sent"] and math.isclose(a["mean_acc"], b["mean_acc"], abs_tol=1e-6), (a, b)
