"""A peer under hostile traffic (issue 12): real servers on 127.0.0.1, attackers written from the proto alone.

Every attacker here is a raw gRPC client built on the generated ``dimat.v1`` stubs (no dimat client
code), every loop is bounded in count and time, and the honest side is a real ``GrpcTransport`` (or
real ``dimat peer`` processes in the load test).
"""
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dimat.transport.grpc import pb2, pb2_grpc
from test_grpc_federation import _records
from test_grpc_transport import _tls, certs, grpc_transport  # noqa: F401 (certs: a fixture, 3 peer certificates)

ROOT = Path(__file__).resolve().parents[1]


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(32, 16, generator=g), "fc1.bias": torch.randn(32, generator=g)}


def _pair(**kw):
    """Receiver 1 (expects peer 0's pushes for round 0) and sender 0, no token, no TLS unless ``kw`` says so."""
    settings = {"timeout": 3.0, "retries": 3, "heartbeat_interval": None, **kw}
    ts = [grpc_transport(i, {i: "127.0.0.1:0"}, **settings) for i in range(2)]
    book = {t.peer_id: t.address for t in ts}
    for t in ts:
        t.set_peers(book)
    ts[1].set_schema(_state())
    ts[1].begin_round(0, [0])
    return ts


def _close(ts):
    for t in ts:
        t.close(grace=0)


def _health_ms(address: str, timeout: float = 1.0, creds=None) -> float:
    """One standard health check; its latency in ms (raises if it is not SERVING within ``timeout``)."""
    ch = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    try:
        t0 = time.monotonic()
        rep = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="dimat.v1.Peer"), timeout=timeout)
        assert rep.status == health_pb2.HealthCheckResponse.SERVING
        return (time.monotonic() - t0) * 1000
    finally:
        ch.close()


class StalledStreams:
    """``n`` PushWeights streams over ``channels`` connections that send nothing, reopened when the server ends them."""

    def __init__(self, address: str, n: int, channels: int = 4, first=None, seconds: float = 60.0, metadata=()):
        self.stop = threading.Event()
        self.metadata = tuple(metadata)
        # a connection each (gRPC shares one between identical channels of a process otherwise)
        self.chs = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(channels)]
        self.codes: list = []
        self.opened = 0
        self.end = time.monotonic() + seconds
        self.first = first
        self.threads = [threading.Thread(target=self._hold, args=(self.chs[i % channels],), daemon=True) for i in range(n)]
        for th in self.threads:
            th.start()

    def _gen(self):
        if self.first is not None:
            yield self.first() if callable(self.first) else self.first
        self.stop.wait(max(0.0, self.end - time.monotonic()))  # stall: nothing more, until told to stop

    def _hold(self, ch):
        push = pb2_grpc.PeerStub(ch).PushWeights
        for _ in range(200):  # bounded reopen loop
            if self.stop.is_set() or time.monotonic() > self.end:
                return
            self.opened += 1
            try:
                push(self._gen(), timeout=max(0.1, self.end - time.monotonic()), metadata=self.metadata)
            except grpc.RpcError as exc:
                self.codes.append(exc.code())
            if not self.stop.is_set():
                time.sleep(0.05)

    def close(self):
        self.stop.set()
        for th in self.threads:
            th.join(timeout=5)
        for ch in self.chs:
            ch.close()


# --------------------------------------------------------------------------- finding 1: stalled streams


def test_stalled_streams_do_not_take_a_peer_offline():
    """64 streams that send nothing: health, heartbeats and a real push still answer; stalls are cut off."""
    ts = _pair()
    sender, receiver = ts
    receiver.stream_idle_timeout = 1.0  # (the config key transport.stream_idle_timeout)
    attack = StalledStreams(receiver.address, 64, channels=4, seconds=20.0)
    try:
        time.sleep(0.5)  # every attacker stream is open or refused
        assert max(_health_ms(receiver.address) for _ in range(5)) < 1000
        assert sender.heartbeat(1, timeout=1.0) == 0
        sender.send(1, 0, _state(3), deadline=3.0)
        got = receiver.receive(0, [0], timeout=3.0)[0]
        assert torch.equal(got["fc1.weight"], _state(3)["fc1.weight"])
        # a header followed by a stall is aborted by the server at the idle bound, not left open
        header = pb2.WeightChunk(round=1, sender=0, header=pb2.PayloadHeader(
            tensors=[pb2.TensorSpec(name=k, dtype="float32", shape=list(v.shape), offset=o, nbytes=v.numel() * 4)
                     for (k, v), o in zip(_state().items(), (0, 2048))], total_bytes=2048 + 128))
        stall = StalledStreams(receiver.address, 1, channels=1, first=header, seconds=12.0)
        t0 = time.monotonic()
        while not stall.codes and time.monotonic() - t0 < 12.0:
            time.sleep(0.05)
        stall.close()
        assert stall.codes and stall.codes[0] == grpc.StatusCode.DEADLINE_EXCEEDED, stall.codes
        assert time.monotonic() - t0 < 3.0
        assert any("stream idle timeout" in e for e in receiver.errors)
    finally:
        attack.close()
        _close(ts)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in attack.codes  # the excess was refused at once, not queued
    assert receiver.slots.used == 0 and not receiver.slots.by_caller  # every slot came back


# --------------------------------------------------------------------------- issue 23: stalls cannot outlast an honest push


def _header(round_idx=0, sender=0, transfer_id=0):
    """A valid header for :func:`_state` (what a stalled insider sends before sending nothing)."""
    return pb2.WeightChunk(round=round_idx, sender=sender, header=pb2.PayloadHeader(transfer_id=transfer_id,
        tensors=[pb2.TensorSpec(name=k, dtype="float32", shape=list(v.shape), offset=o, nbytes=v.numel() * 4)
                 for (k, v), o in zip(_state().items(), (0, 2048))], total_bytes=2048 + 128))


def _until(cond, what, limit=30.0):
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("insider", [True, False])
def test_stalled_slots_are_reclaimed_for_an_admitted_push(insider):
    """Streams that send nothing hold every slot an honest push needs: with the token, 50 pushes that
    send sender 0's header and then nothing fill sender 0's 8 slots; without auth, 6 connections of 8
    header-less streams fill all 48. Sender 0's real push still lands: the longest-idle silent stream
    gives up its slot. The idle bound (60 s) is far beyond the push deadline (30 s), so only reclaiming
    can let it in (before: 5 retries in about 1.5 s, then RESOURCE_EXHAUSTED)."""
    ts = sender, receiver = _pair(token="tok" if insider else None, timeout=30.0, stream_idle_timeout=60.0)
    md = (("authorization", "Bearer tok"),) if insider else ()
    if insider:
        tids = iter(range(1, 10 ** 6))  # a transfer of its own per stream, as a real client would send
        attack = StalledStreams(receiver.address, 50, channels=7, first=lambda: _header(transfer_id=next(tids)),
                                seconds=60.0, metadata=md)
        _until(lambda: receiver.slots.by_caller.get("sender:0") == 8, "the insider to hold sender 0's 8 slots")
    else:
        attack = StalledStreams(receiver.address, 64, channels=6, seconds=60.0)
        _until(lambda: receiver.slots.used == receiver.slots.total, "the attacker to hold all 48 slots")
    try:
        sender.send(1, 0, _state(3), deadline=30.0)
        got = receiver.receive(0, [0], timeout=5.0)[0]
        assert torch.equal(got["fc1.weight"], _state(3)["fc1.weight"])
        assert receiver.slots.reclaimed >= 1
    finally:
        attack.close()
        _close(ts)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in attack.codes  # the reclaimed ones were told so
    assert receiver.slots.used == 0 and not receiver.slots.by_caller and not receiver.slots.held


def test_without_the_token_a_connection_gets_no_slot():
    """With a token configured, 40 stalled pushes without it are refused UNAUTHENTICATED before any
    handler runs: not one takes a slot, and an honest push is not even slowed by them."""
    ts = sender, receiver = _pair(token="tok", timeout=30.0)
    attack = StalledStreams(receiver.address, 40, channels=5, first=_header(), seconds=20.0)
    try:
        _until(lambda: attack.codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 40, "40 refusals")
        assert receiver.slots.used == 0 and receiver.slots.refused == 0
        sender.send(1, 0, _state(4), deadline=30.0)
        assert torch.equal(receiver.receive(0, [0], timeout=5.0)[0]["fc1.weight"], _state(4)["fc1.weight"])
    finally:
        attack.close()
        _close(ts)
    assert set(attack.codes) == {grpc.StatusCode.UNAUTHENTICATED}


# --------------------------------------------------------------------------- finding 2: header arithmetic


def _bomb(round_idx=0, sender=0, dims=32768):
    return pb2.WeightChunk(round=round_idx, sender=sender, header=pb2.PayloadHeader(
        tensors=[pb2.TensorSpec(name="fc1.weight", dtype="float32", shape=[2 ** 62] * dims, offset=0, nbytes=4)],
        total_bytes=4, hash_algorithm="xxh3_128", num_streams=1, segment_end=4))


def test_shape_bomb_is_refused_fast_as_invalid_argument_and_recorded():
    ts = _pair()
    receiver = ts[1]
    ch = grpc.insecure_channel(receiver.address)
    try:
        assert len(_bomb().SerializeToString()) > 280_000
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pb2_grpc.PeerStub(ch).PushWeights(iter([_bomb()]), timeout=10)
        took = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "dimensions (at most 32)" in info.value.details() and len(info.value.details()) < 1000
        assert took < 1.0, took
        assert any("dimensions (at most 32)" in e for e in receiver.errors)
        assert _health_ms(receiver.address) < 1000
    finally:
        ch.close()
        _close(ts)


# --------------------------------------------------------------------------- finding 3: identity under mTLS


def test_heartbeat_leave_join_are_bound_to_the_certificate(certs):
    receiver = grpc_transport(0, {0: "127.0.0.1:0", 1: "127.0.0.1:1", 2: "127.0.0.1:2"}, tls=_tls(certs, 0, True),
                             require_cert_identity=True, heartbeat_interval=None)
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(),
                                         private_key=(certs / "peer-2.key").read_bytes(),
                                         certificate_chain=(certs / "peer-2.pem").read_bytes())
    ch = grpc.secure_channel(receiver.address, creds)  # peer 2, holding its own certificate
    stub = pb2_grpc.PeerStub(ch)
    try:
        calls = [
            lambda: stub.Heartbeat(pb2.HeartbeatRequest(round=10 ** 9, sender=1), timeout=5),
            lambda: stub.Leave(pb2.LeaveRequest(round=0, sender=1), timeout=5),
            lambda: stub.Join(pb2.JoinRequest(round=10 ** 9, sender=1, address="127.0.0.1:9"), timeout=5),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "does not match the client certificate ['peer-2']" in info.value.details()
        assert receiver.known_round(1) == -1 and 1 not in receiver.members
        assert receiver.peers[1] == "127.0.0.1:1" and receiver.is_up(1)
        # in its own name it is heard
        assert stub.Heartbeat(pb2.HeartbeatRequest(round=4, sender=2), timeout=5).sender == 0
        assert receiver.known_round(2) == 4
    finally:
        ch.close()
        receiver.close(grace=0)


# --------------------------------------------------------------------------- finding 4: membership


def test_membership_is_the_peers_file_and_bounded():
    ts = _pair()
    receiver = ts[1]
    ch = grpc.insecure_channel(receiver.address)
    stub = pb2_grpc.PeerStub(ch)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(pb2.JoinRequest(round=0, sender=99, address="127.0.0.1:9"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "peer 99 is not in the peers file" in info.value.details()
        codes = []
        for batch in range(20):  # 2,000 heartbeats from made-up ids, 100 in flight at a time
            fs = [stub.Heartbeat.future(pb2.HeartbeatRequest(round=1, sender=1000 + batch * 100 + i), timeout=10)
                  for i in range(100)]
            for f in fs:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 2000
        assert 99 not in receiver.peers and set(receiver.peers) == {0, 1}
        assert set(receiver.members) <= {0}
        # a member is still heard
        assert stub.Heartbeat(pb2.HeartbeatRequest(round=2, sender=0), timeout=5).sender == 1
        assert receiver.known_round(0) == 2
    finally:
        ch.close()
        _close(ts)


# --------------------------------------------------------------------------- finding 7: proto defaults


def test_outside_client_with_proto_defaults_is_accepted():
    """Built from peer.proto alone: no hash_algorithm (the default xxh3_128), no num_streams, no segment."""
    ts = _pair()
    receiver = ts[1]
    state = _state(5)
    raw = b"".join(v.numpy().tobytes() for v in state.values())
    specs, off = [], 0
    for k, v in state.items():
        specs.append(pb2.TensorSpec(name=k, dtype="float32", shape=list(v.shape), offset=off, nbytes=v.numel() * 4))
        off += v.numel() * 4
    msgs = [pb2.WeightChunk(round=0, sender=0, header=pb2.PayloadHeader(tensors=specs, total_bytes=len(raw))),
            pb2.WeightChunk(round=0, sender=0, data=pb2.PayloadData(offset=0, data=raw)),
            pb2.WeightChunk(round=0, sender=0, trailer=pb2.PayloadTrailer(digest=xxhash.xxh3_128(raw).digest()))]
    ch = grpc.insecure_channel(receiver.address)
    try:
        reply = pb2_grpc.PeerStub(ch).PushWeights(iter(msgs), timeout=5)
        assert reply.complete and reply.bytes_received == len(raw)
        got = receiver.receive(0, [0], timeout=2)[0]
        assert all(torch.equal(got[k], state[k]) for k in state)
    finally:
        ch.close()
        _close(ts)


# --------------------------------------------------------------------------- the federation under load


OVERRIDES = ["experiment=mnist1d_fast", "rounds=2", "progress=false"]


def test_federation_finishes_with_undisturbed_metrics_under_attack(tmp_path):
    """3 ``dimat peer`` processes (no token, no TLS: the default) against one attacker: 64 stalled
    streams, 2,000 heartbeats from made-up ids and a shape bomb; health answers within 1 s throughout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpc_local", ROOT / "launch" / "grpc_local.py")
    grpc_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpc_local)
    env = dict(os.environ, DIMAT_TOKEN="", PYTHONPATH=str(ROOT))
    sim_dir = tmp_path / "sim"
    sim = subprocess.Popen([sys.executable, "-m", "dimat", "simulate", *OVERRIDES, "num_peers=3", f"run_dir={sim_dir}"],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fed = grpc_local.LocalFederation(tmp_path / "grpc", 3, OVERRIDES, env=env)
    from dimat.grpc_peer import load_peers_file

    addresses = load_peers_file(fed.peers_file)
    worst, failures, stop = {k: 0.0 for k in addresses}, [], threading.Event()
    attack_log: dict[str, object] = {}

    def finished(k):
        return (fed.run_dir / f"peer_{k}" / "summary.json").exists() or fed.procs[k].poll() is not None

    def probe():
        up = set()
        while not stop.is_set() and time.monotonic() < deadline:
            for k, addr in addresses.items():
                try:
                    ms = _health_ms(addr, timeout=1.0)
                    up.add(k)
                    worst[k] = max(worst[k], ms)
                except (grpc.RpcError, AssertionError) as exc:
                    time.sleep(0.5)
                    if k in up and not finished(k):
                        failures.append((k, repr(exc)[:200]))
            time.sleep(0.1)

    def serving(k):
        """Wait until peer k serves (bounded); False once it has finished its rounds (nothing left to attack)."""
        while time.monotonic() < deadline and not stop.is_set() and not finished(k):
            try:
                _health_ms(addresses[k], timeout=1.0)
                return True
            except (grpc.RpcError, AssertionError):
                time.sleep(0.2)
        return False

    def attack():
        if not serving(0):
            attack_log["heartbeats"] = []
            return
        stalled = StalledStreams(addresses[0], 64, channels=4, seconds=max(1.0, deadline - time.monotonic()))
        attack_log["stalled"] = stalled
        codes = []
        for k, addr in addresses.items():
            if not serving(k):  # on a fast machine a peer may finish before the attack reaches it
                continue
            ch = grpc.insecure_channel(addr)
            stub = pb2_grpc.PeerStub(ch)
            n = 700 if k == 0 else 650  # 2,000 in all
            for batch in range(0, n, 50):
                fs = [stub.Heartbeat.future(pb2.HeartbeatRequest(round=10 ** 6, sender=500 + batch + i), timeout=5)
                      for i in range(min(50, n - batch))]
                batch_codes = []
                for f in fs:
                    try:
                        f.result()
                        batch_codes.append("OK")
                    except grpc.RpcError as exc:
                        batch_codes.append(exc.code().name)
                codes.append((k, batch_codes))
            for _ in range(50 if k == 1 else 0):  # a shape bomb claiming a real neighbour, for a round never reached
                try:
                    stub.PushWeights(iter([_bomb(round_idx=6, sender=0)]), timeout=10)
                except grpc.RpcError as exc:
                    attack_log["bomb"] = exc.code()
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:  # UNAVAILABLE: no model schema yet
                        break
                time.sleep(0.2)
            ch.close()
        attack_log["heartbeats"] = codes

    deadline = time.monotonic() + 240
    threads = [threading.Thread(target=probe, daemon=True), threading.Thread(target=attack, daemon=True)]
    for k in range(3):
        fed.start(k)
    for th in threads:
        th.start()
    try:
        codes = fed.wait_all(timeout=240)
        sim_out, _ = sim.communicate(timeout=240)
    finally:
        stop.set()
        fed.stop()
        if sim.poll() is None:
            sim.kill()
        for th in threads:
            th.join(timeout=10)
        if "stalled" in attack_log:
            attack_log["stalled"].close()
    assert codes == {0: 0, 1: 0, 2: 0}, fed.logs_text()
    assert sim.returncode == 0, sim_out
    assert not threads[1].is_alive(), "the attack thread did not end"
    batches = attack_log["heartbeats"]
    hb = [c for _, batch in batches for c in batch]
    # none accepted; UNAVAILABLE or CANCELLED (in flight when the server stopped) only where that peer had
    # already finished its rounds and closed: once a batch to a peer met its shutdown, every later batch does too
    # 700 to peer 0 and 650 to each other peer still serving when the attack reached it
    assert len(hb) >= 700 and len(hb) % 50 == 0 and set(hb) <= {"PERMISSION_DENIED", "UNAVAILABLE", "CANCELLED"}, set(hb)
    for k in addresses:
        met_shutdown = [set(batch) != {"PERMISSION_DENIED"} for j, batch in batches if j == k]
        first = met_shutdown.index(True) if True in met_shutdown else len(met_shutdown)
        assert all(met_shutdown[first:]), (k, met_shutdown)
    assert hb.count("PERMISSION_DENIED") >= len(hb) // 2, hb.count("PERMISSION_DENIED")
    # refused, never UNKNOWN: by admission (a round outside the schedule has no senders) or by the header check
    assert attack_log["bomb"] in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    assert attack_log["stalled"].opened >= 64
    assert not failures, failures
    # every health check met its 1 s deadline (a missed one is in `failures`); the latency measured here also
    # counts this test process's own scheduling among 2,000 heartbeats in flight (measured: 1,225 ms on a 2-core
    # machine for a check the server answered in time), so its bound only catches a starved server
    assert all(ms < 5000 for ms in worst.values()), worst
    # every round finished, with the metrics of the undisturbed (simulated) run
    want = _records([sim_dir / "metrics.jsonl"])
    got = _records([fed.run_dir / f"peer_{k}" / "metrics.jsonl" for k in range(3)])
    assert sorted(got) == sorted(want) == [(r, p) for r in (1, 2) for p in range(3)]
    differ = [(key, m, got[key][m], want[key][m]) for key in want for m in ("test_acc", "test_loss", "train_loss", "train_acc")
              if not math.isclose(got[key][m], want[key][m], rel_tol=1e-5, abs_tol=1e-6)]
    assert not differ and all(got[key]["neighbours"] == want[key]["neighbours"] for key in want), differ


# --------------------------------------------------------------------------- exposed without authentication


def test_listening_beyond_loopback_without_token_or_tls_warns_loudly(caplog, certs):
    from dimat.transport.security import warn_if_exposed

    with caplog.at_level("WARNING", logger="dimat.transport.grpc"):
        assert warn_if_exposed("0.0.0.0", token=None, tls=None)
        assert warn_if_exposed("10.1.2.3", token=None, tls=None)
        assert warn_if_exposed("[::]", token=None, tls=None)
    assert "NO authentication" in caplog.text and "launch/make_certs.sh" in caplog.text
    assert not warn_if_exposed("127.0.0.1", token=None, tls=None) and not warn_if_exposed("[::1]", token=None, tls=None)
    assert not warn_if_exposed("localhost", token=None, tls=None)
    assert not warn_if_exposed("0.0.0.0", token="s3cret", tls=None)
    assert not warn_if_exposed("0.0.0.0", token=None, tls=_tls(certs, 0, True))
    caplog.clear()
    with caplog.at_level("WARNING", logger="dimat.transport.grpc"):  # a real peer on loopback is quiet
        grpc_transport(0, {0: "127.0.0.1:0"}, heartbeat_interval=None).close(grace=0)
    assert "NO authentication" not in caplog.text
