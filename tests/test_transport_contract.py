"""One exchange contract, three transports: InProc (3 peers in one process), gRPC (3 real servers on
127.0.0.1) and gloo (3 real processes, one peer each, ``init_process_group('gloo')`` on a free port).

The same scripted rounds run on each: a directed ring, a NaN state, a wrong shape, a wrong dtype,
an in-neighbour that is not addressed, and a clean round after all that. What each peer received
(bit for bit), missed, refused (with the text) and sent (bytes) is compared with what the script
implies, so the three transports are held to the same answers. Where torchdist's structural checks
raise on every rank instead (a schema or topology that differs between ranks), the test says so and
checks that the group still works afterwards.

Run as a script (``python tests/test_transport_contract.py RANK WORLD PORT OUT``) it is one gloo rank.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
N = 3
FULL = {i: [j for j in range(N) if j != i] for i in range(N)}


def good_state(peer: int, round_idx: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * round_idx + peer)
    return {
        "fc.weight": torch.randn(4, 3, generator=g),
        "fc.bias": torch.randn(4, generator=g),
        "bn.running_var": torch.rand(4, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(100 * peer + round_idx),
        "mask": torch.rand(5, generator=g) > 0.5,
    }


def _nan(s: dict[str, torch.Tensor]) -> None:
    s["fc.weight"][1, 2] = float("nan")


def _shape(s: dict[str, torch.Tensor]) -> None:
    s["fc.weight"] = torch.zeros(5, 3)


def _dtype(s: dict[str, torch.Tensor]) -> None:
    s["fc.bias"] = s["fc.bias"].double()


@dataclass(frozen=True)
class Step:
    """One exchange of the script: who sends to whom, who expects whom, whose state is bad."""

    name: str
    outs: dict[int, list[int]]
    extra_ins: dict[int, list[int]]  # in-neighbours a receiver lists although they do not address it
    bad: dict[int, Callable[[dict[str, torch.Tensor]], None]]
    # the reason every transport must give when the bad peer's state reaches a good one, and (for a
    # schema that differs) when a good state reaches the bad peer: it checks with its own schema
    refusal: str | None
    refusal_at_bad: str | None = None
    timeout: float = 20.0

    def refused(self, q: int, p: int) -> str | None:
        """The expected reason receiver ``q`` refuses sender ``p``'s state (None: accepted)."""
        if p in self.bad and q not in self.bad:
            return self.refusal
        if q in self.bad and p not in self.bad:
            return self.refusal_at_bad
        return None

    def ins(self) -> dict[int, list[int]]:
        ins = {q: [p for p in range(N) if q in self.outs[p]] for q in range(N)}
        return {q: sorted(ins[q] + self.extra_ins.get(q, [])) for q in range(N)}

    def state(self, peer: int, round_idx: int) -> dict[str, torch.Tensor]:
        s = good_state(peer, round_idx)
        if peer in self.bad:
            self.bad[peer](s)
        return s


STEPS = [
    Step("ring", {0: [1], 1: [2], 2: [0]}, {}, {}, None),
    Step("nan", FULL, {}, {2: _nan}, "tensor 'fc.weight' contains NaN"),
    Step("shape", FULL, {}, {1: _shape}, "tensor 'fc.weight' has shape [5, 3], expected [4, 3]",
         "tensor 'fc.weight' has shape [4, 3], expected [5, 3]"),
    Step("dtype", FULL, {}, {0: _dtype}, "tensor 'fc.bias' has dtype float64, expected float32",
         "tensor 'fc.bias' has dtype float32, expected float64"),
    # peer 1 expects peer 2, which does not address it: missing (gRPC waits out the deadline)
    Step("unaddressed", {0: [1, 2], 1: [0, 2], 2: [0]}, {1: [2]}, {}, None, timeout=3.0),
    Step("after", FULL, {}, {}, None),
]
#: steps torchdist refuses as a whole, on every rank (its preamble compares schema and edges across ranks)
STRUCTURAL = {"shape": "state schema mismatch", "dtype": "state schema mismatch", "unaddressed": "neighbour maps disagree"}


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------- one record per peer and step


def record(res, peers) -> dict:
    """What a step's ExchangeResult says about ``peers``, as plain data (states kept as tensors)."""
    return {
        "received": {q: dict(res.received.get(q, {})) for q in peers},
        "missing": {q: res.missing.get(q, []) for q in peers},
        "refused": {q: dict(res.refused.get(q, {})) for q in peers},
        "bytes_sent": {p: res.bytes_sent.get(p, 0) for p in peers},
    }


def merge(records: list[dict]) -> dict:
    out: dict = {"received": {}, "missing": {}, "refused": {}, "bytes_sent": {}}
    for rec in records:
        for k in ("received", "missing", "refused", "bytes_sent"):
            out[k].update(rec[k])
    return out


def run_inproc() -> list[dict | str]:
    from dimat.transport.inproc import InProcTransport

    t = InProcTransport()
    out: list[dict | str] = []
    for r, step in enumerate(STEPS):
        res = t.exchange(r, {p: step.state(p, r) for p in range(N)}, step.ins(), step.outs, timeout=step.timeout)
        out.append(merge([record(res, range(N))]))
    t.close()
    return out


def run_grpc() -> list[dict | str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_grpc_transport import close_all, federation, run_round  # real servers, one thread per peer per round

    ts = federation(N, timeout=20.0)
    out: list[dict | str] = []
    try:
        for r, step in enumerate(STEPS):
            res = run_round(ts, r, {p: step.state(p, r) for p in range(N)}, step.ins(), step.outs, step.timeout,
                            full=True)
            out.append(merge([record(res[p], [p]) for p in range(N)]))
    finally:
        close_all(ts)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(tmp: Path) -> list[dict | str]:
    from safetensors.torch import load_file

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(N), str(port), str(tmp)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(N)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
    out: list[dict | str] = []
    for r, step in enumerate(STEPS):
        recs = []
        for rank in range(N):
            meta = json.loads((tmp / f"{r}.rank{rank}.json").read_text())
            if "error" in meta:
                recs.append(meta["error"])
                continue
            tensors = load_file(str(tmp / f"{r}.rank{rank}.safetensors"))
            received: dict[int, dict[int, dict[str, torch.Tensor]]] = {rank: {}}
            for key, t in tensors.items():
                sender, name = key.split("/", 1)
                received[rank].setdefault(int(sender), {})[name] = t
            received[rank] = {s: {k: st[k] for k in good_state(0, 0)} for s, st in received[rank].items()}
            recs.append({
                "received": received,
                "missing": {rank: meta["missing"]},
                "refused": {rank: {int(k): v for k, v in meta["refused"].items()}},
                "bytes_sent": {rank: meta["bytes_sent"]},
            })
        if all(isinstance(x, str) for x in recs):
            out.append(" | ".join(recs))
        else:
            assert not any(isinstance(x, str) for x in recs), recs  # all ranks decide alike
            out.append(merge(recs))
    return out


def gloo_rank(rank: int, world: int, port: int, out_dir: Path) -> None:
    """One rank of :func:`run_gloo`: the script's steps with peer == rank, results to ``out_dir``."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dimat.transport.base import TransportError
    from dimat.transport.torchdist import TorchDistTransport

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t = TorchDistTransport(n_peers=world)
    p = rank
    for r, step in enumerate(STEPS):
        ins = step.ins()
        stem = str(out_dir / f"{r}.rank{rank}")
        try:
            res = t.exchange(r, {p: step.state(p, r)}, {p: ins[p]}, {p: step.outs[p]}, timeout=step.timeout)
        except TransportError as exc:
            Path(stem + ".json").write_text(json.dumps({"error": f"TransportError: {exc}"}))
            continue
        save_file({f"{s}/{k}": v.contiguous() for s, st in res.received[p].items() for k, v in st.items()},
                  stem + ".safetensors")
        Path(stem + ".json").write_text(json.dumps({
            "missing": res.missing[p], "refused": res.refused[p], "bytes_sent": res.bytes_sent[p],
        }))
    t.close()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict | str]]:
    return {"inproc": run_inproc(), "grpc": run_grpc(), "gloo": run_gloo(tmp_path_factory.mktemp("gloo"))}


KINDS = ["inproc", "grpc", "gloo"]


def _structural(kind: str, step: Step) -> bool:
    return kind == "gloo" and step.name in STRUCTURAL


CASES = [(kind, r) for r, step in enumerate(STEPS) for kind in KINDS if not _structural(kind, step)]
CASE_IDS = [f"{STEPS[r].name}-{kind}" for kind, r in CASES]


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_torchdist_refuses_rank_level_mismatches_on_every_rank(results: dict, name: str) -> None:
    got = results["gloo"][[s.name for s in STEPS].index(name)]
    assert isinstance(got, str) and got.count(STRUCTURAL[name]) == N, got  # and the next steps still ran


@pytest.mark.parametrize("kind, r", CASES, ids=CASE_IDS)
def test_exchange_semantics(results: dict, kind: str, r: int) -> None:
    step, got = STEPS[r], results[kind][r]
    assert isinstance(got, dict), got
    ins = step.ins()
    for q in range(N):
        addressed = [p for p in ins[q] if q in step.outs[p]]
        good = [p for p in addressed if step.refused(q, p) is None]
        assert sorted(got["received"][q]) == good, (q, got["received"][q].keys())
        for p in good:
            want = step.state(p, r)
            have = got["received"][q][p]
            assert list(have) == list(want)
            for k in want:  # bit for bit, dtype and shape included
                assert have[k].dtype == want[k].dtype and have[k].shape == want[k].shape and torch.equal(have[k], want[k]), (q, p, k)
        assert got["missing"][q] == sorted(set(ins[q]) - set(good)), q
        bad = [p for p in addressed if step.refused(q, p) is not None]
        assert got["refused"][q] == {p: f"state from peer {p} for round {r}: {step.refused(q, p)}" for p in bad}, q


@pytest.mark.parametrize("kind, r", CASES, ids=CASE_IDS)
def test_bytes_sent(results: dict, kind: str, r: int) -> None:
    step, got = STEPS[r], results[kind][r]
    ins = step.ins()
    for p in range(N):
        delivered = [q for q in step.outs[p] if p in ins[q]]
        assert got["bytes_sent"][p] == nbytes(step.state(p, r)) * len(delivered), p


@pytest.mark.parametrize("r", [i for i, s in enumerate(STEPS) if s.name not in STRUCTURAL])
def test_same_answers_on_every_transport(results: dict, r: int) -> None:
    a = results["inproc"][r]
    for kind in ("grpc", "gloo"):
        b = results[kind][r]
        assert a["missing"] == b["missing"] and a["refused"] == b["refused"] and a["bytes_sent"] == b["bytes_sent"], kind
        assert {q: sorted(v) for q, v in a["received"].items()} == {q: sorted(v) for q, v in b["received"].items()}, kind



# ----------------------------------------------------------------------------- settings and the factory


def _config(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "transport" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["inproc", "grpc", "torchdist"])
def test_settings_read_every_config_key(name: str) -> None:
    from dimat.transport import TransportSettings

    cfg = _config(name)
    s = TransportSettings.from_mapping(cfg)
    for key, value in cfg.items():
        got = getattr(s, key)
        if key == "tls":
            assert {k: getattr(got, k) for k in value} == value
        else:
            assert got == value, key
    # the keys this transport does not take are None, not some default of the dataclass
    assert all(getattr(s, f) is None for f in s.__dataclass_fields__ if f not in cfg)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("grpc", {"chunk_bytes": "x"}, "transport.chunk_bytes must be a positive integer (got 'x')"),
        ("grpc", {"chunk_bytes": 128 << 20}, "transport.chunk_bytes must be at most 67108864 (64 MiB) (got 134217728)"),
        ("grpc", {"retries": True}, "transport.retries must be a non-negative integer (got True)"),
        ("grpc", {"timeout": 0}, "transport.timeout must be a positive number (got 0)"),
        ("grpc", {"half": "float16"}, "transport.half is not a transport setting"),  # exchange.compress=fp16 owns it
        ("grpc", {"hash": "md5"}, "transport.hash must be one of ['xxh3_128', 'sha256', 'blake2b'] (got 'md5')"),
        ("grpc", {"retries": None}, "transport.retries must be a non-negative integer (got None)"),
        ("grpc", {"chunk_bytse": 5}, "transport.chunk_bytse is not a transport setting"),
        ("grpc", {"pg_timeout": 5}, "transport.pg_timeout does not apply to the grpc transport"),
        ("grpc", {"require_cert_identity": True}, "transport.require_cert_identity needs transport.tls.mutual: true"),
        ("grpc", {"tls": {"dir": None}}, "transport.tls.cert is missing"),
        ("torchdist", {"backend": "mpi"}, "transport.backend must be one of [None, 'gloo', 'nccl'] (got 'mpi')"),
        ("inproc", {"name": "carrier-pigeon"}, "transport.name must be one of ['inproc', 'grpc', 'torchdist'] (got 'carrier-pigeon')"),
    ],
)
def test_settings_errors_are_one_line_naming_the_key(name: str, change: dict, message: str) -> None:
    from dimat.transport import TransportSettings

    cfg = _config(name) | change
    with pytest.raises(ValueError) as info:
        TransportSettings.from_mapping(cfg)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("key", ["timeout", "startup_timeout", "max_missed_heartbeats", "tls"])
def test_settings_a_needed_key_missing_is_an_error(key: str) -> None:
    from dimat.transport import TransportSettings

    cfg = _config("grpc")
    del cfg[key]
    with pytest.raises(ValueError, match=f"^transport.{key} is missing \\(the grpc transport needs it\\)$"):
        TransportSettings.from_mapping(cfg)


def test_build_transport_grpc_passes_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TLS from a folder with {id} paths, the token from the named variable, and every wire option."""
    from dimat.transport import TransportError, TransportSettings, build_transport
    from dimat.transport.grpc import GrpcTransport

    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "launch" / "make_certs.sh"), str(certs), "2"], check=True, capture_output=True)
    cfg = _config("grpc") | {
        "timeout": 7.5, "retries": 2, "chunk_bytes": 1 << 16, "num_streams": 2, "hash": "blake2b",
        "max_rounds_ahead": 3, "heartbeat_interval": 0.25, "max_missed_heartbeats": 4, "delay": 0.01,
        "token_env": "CONTRACT_TEST_TOKEN", "require_cert_identity": True,
        "tls": {"dir": None, "cert": str(certs / "peer-{id}.pem"), "key": str(certs / "peer-{id}.key"),
                "ca": str(certs / "ca.pem"), "mutual": True, "server_name_override": None},
    }
    s = TransportSettings.from_mapping(cfg)
    monkeypatch.setenv("CONTRACT_TEST_TOKEN", "t0ken")
    ts = [build_transport(s, peer_id=i, peers={i: "127.0.0.1:0"}) for i in range(2)]
    try:
        assert all(isinstance(t, GrpcTransport) for t in ts)
        t = ts[0]
        assert t.settings is s  # every value from the config, none repeated in the transport
        assert (t.deadline, t.client.retry.retries, t.chunk_bytes, t.num_streams, t.hash_algorithm) == (
            s.timeout, s.retries, s.chunk_bytes, s.num_streams, s.hash)
        assert (t.max_rounds_ahead, t.membership.heartbeat_interval, t.membership.max_missed_heartbeats, t.delay) == (
            s.max_rounds_ahead, s.heartbeat_interval, s.max_missed_heartbeats, s.delay)
        assert t.token == "t0ken" and t.require_cert_identity and t.tls is not None and t.tls.mutual
        assert str(t.tls.cert).endswith("peer-0.pem") and str(ts[1].tls.key).endswith("peer-1.key")
        book = {x.peer_id: x.address for x in ts}
        for x in ts:
            x.set_peers(book)
        ts[0].wait_for_peers([1], timeout=10)
        state = good_state(0, 0)
        ts[1].set_schema(state)
        ts[1].begin_round(0, [0])
        ts[0].send(1, 0, state)  # mTLS + identity + token all line up
        got = ts[1].receive(0, [0], timeout=5)[0]
        assert torch.equal(got["fc.weight"], state["fc.weight"])
        monkeypatch.delenv("CONTRACT_TEST_TOKEN")
        tokenless = build_transport(s, peer_id=0, peers={0: "127.0.0.1:0", 1: ts[1].address})
        try:
            assert tokenless.token is None
            with pytest.raises(TransportError, match="UNAUTHENTICATED"):
                tokenless.send(1, 0, state, deadline=3)
        finally:
            tokenless.close(grace=0)
    finally:
        for x in ts:
            x.close(grace=0)


def test_build_transport_inproc_and_torchdist_arguments() -> None:
    from dimat.transport import TransportSettings, build_transport
    from dimat.transport.inproc import InProcTransport

    assert isinstance(build_transport(TransportSettings.from_mapping(_config("inproc"))), InProcTransport)
    with pytest.raises(ValueError, match="needs n_peers"):
        build_transport(TransportSettings.from_mapping(_config("torchdist")))
    with pytest.raises(ValueError, match="needs peer_id and peers"):
        build_transport(TransportSettings.from_mapping(_config("grpc")))


if __name__ == "__main__":
    gloo_rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
