"""GrpcTransport with real servers on 127.0.0.1 (free ports): exchange, large payloads, TLS, rejections."""
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dimat.transport.base import TransportError
from dimat.transport.grpc import GrpcTransport, pb2, stream_messages
from dimat.transport.security import TlsConfig, token_metadata
from dimat.transport.wire import OutgoingPayload

ROOT = Path(__file__).resolve().parents[1]
GRPC_CONFIG = ROOT / "configs" / "transport" / "grpc.yaml"


def grpc_transport(peer_id, peers, **kw):
    """A GrpcTransport with the settings of configs/transport/grpc.yaml (the one source of its defaults);
    transport config keys in ``kw`` override them, the rest go to the constructor."""
    return GrpcTransport.from_config_file(peer_id, peers, GRPC_CONFIG, **kw)


def federation(n, per_peer=None, **kw):
    """n transports on free loopback ports that know each other's addresses (``per_peer(i)`` -> kwargs)."""
    ts = [grpc_transport(i, {i: "127.0.0.1:0"}, **kw, **(per_peer(i) if per_peer else {})) for i in range(n)]
    book = {t.peer_id: t.address for t in ts}
    for t in ts:
        t.set_peers(book)
    return ts


def close_all(ts):
    for t in ts:
        t.close(grace=0)


def model_state(seed, scale=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(32 * scale, 16, generator=g),
        "fc1.bias": torch.randn(32 * scale, generator=g),
        "bn.running_var": torch.rand(32 * scale, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


def run_round(ts, r, states, ins, outs, timeout=20.0, full=False):
    """One exchange on every transport at once (a thread each); ``{peer: received}`` or, ``full``, ``{peer: ExchangeResult}``."""
    results, errors = {}, []

    def one(t):
        try:
            res = t.exchange(r, {t.peer_id: states[t.peer_id]}, {t.peer_id: ins[t.peer_id]},
                             {t.peer_id: outs[t.peer_id]}, timeout)
            results[t.peer_id] = res if full else res.received
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(t,)) for t in ts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("n", [2, 3])
def test_exchange_two_rounds(n):
    ts = federation(n)
    try:
        ins = {i: [j for j in range(n) if j != i] for i in range(n)}
        for r in range(2):
            states = {i: model_state(10 * r + i) for i in range(n)}
            res = run_round(ts, r, states, ins, ins)
            for i in range(n):
                assert sorted(res[i][i]) == ins[i]
                for j in ins[i]:
                    assert_same(res[i][i][j], states[j])
                assert ts[i].last_report.missing == [] and ts[i].last_report.send_failed == {}
    finally:
        close_all(ts)


def test_ring_directed_neighbours_only():
    """Directed ring 0->1->2->0: each peer gets exactly its in-neighbour's state."""
    ts = federation(3)
    try:
        outs = {i: [(i + 1) % 3] for i in range(3)}
        ins = {i: [(i - 1) % 3] for i in range(3)}
        states = {i: model_state(i) for i in range(3)}
        res = run_round(ts, 0, states, ins, outs)
        for i in range(3):
            assert list(res[i][i]) == ins[i]
            assert_same(res[i][i][ins[i][0]], states[ins[i][0]])
    finally:
        close_all(ts)


@pytest.mark.parametrize("num_streams", [1, 3])
def test_large_payload_bit_exact(num_streams):
    """>= 64 MiB, far past gRPC's default 4 MiB message limit, arrives bit-exact."""
    ts = federation(2, num_streams=num_streams)
    try:
        big = {"a.weight": torch.randn(40 << 18), "b.weight": torch.randn(24 << 18), "c": torch.arange(1000)}
        assert sum(v.numel() * v.element_size() for v in big.values()) >= 64 << 20
        ts[1].set_schema(big)
        ts[1].begin_round(0, [0])
        ts[0].send(1, 0, big, deadline=60)
        got = ts[1].receive(0, [0], timeout=5)
        assert_same(got[0], big)
    finally:
        close_all(ts)


def test_half_precision_on_the_wire():
    """A payload encoded in half precision by the wire layer (what bench/transport.py measures; runs
    compress with exchange.compress=fp16 before the transport) is cast back to the schema's dtype."""
    ts = federation(2)
    try:
        s = model_state(1)
        ts[1].set_schema(s)
        ts[1].begin_round(0, [0])
        ts[0].send(1, 0, OutgoingPayload(s, half="float16"))
        got = ts[1].receive(0, [0], timeout=5)[0]
        assert got["fc1.weight"].dtype == torch.float32
        assert torch.allclose(got["fc1.weight"], s["fc1.weight"], atol=5e-3)
        assert torch.equal(got["bn.num_batches_tracked"], s["bn.num_batches_tracked"])
    finally:
        close_all(ts)


def test_neighbour_a_round_ahead_is_buffered():
    ts = federation(2)
    try:
        s1 = model_state(5)
        ts[1].set_schema(s1)
        ts[1].begin_round(0, [0])
        ts[0].send(1, 1, s1)  # round 1 arrives while peer 1 is still in round 0
        assert ts[1].receive(0, [0], timeout=0.2) == {}
        res = ts[1].exchange(1, {1: model_state(6)}, {1: [0]}, {1: []}, timeout=2).received
        assert_same(res[1][0], s1)
    finally:
        close_all(ts)


def test_health_membership_and_fetch():
    ts = federation(2)
    try:
        ch = grpc.insecure_channel(ts[0].address)
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="dimat.v1.Peer"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        ch.close()
        s0 = model_state(3)
        run_round(ts, 0, {0: s0, 1: model_state(4)}, {0: [1], 1: [0]}, {0: [1], 1: [0]})
        assert ts[1].heartbeat(0) == 0
        assert ts[0].members[1].alive
        rnd, members = ts[1].join(0)
        assert rnd == 0 and members == {0: ts[0].address, 1: ts[1].address}
        rnd, state = ts[1].fetch_state(0)
        assert rnd == 0
        assert_same(state, s0)
        ts[1].leave([0])
        assert not ts[0].members[1].alive
    finally:
        close_all(ts)


# --------------------------------------------------------------------------- security


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(ROOT / "launch" / "make_certs.sh"), str(out), "3"], check=True, capture_output=True)
    return out


def _tls(certs, i, mutual):
    return TlsConfig(cert=certs / f"peer-{i}.pem", key=certs / f"peer-{i}.key", ca=certs / "ca.pem", mutual=mutual)


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_exchange(certs, mutual):
    ts = federation(2, lambda i: {"tls": _tls(certs, i, mutual), "token": "s3cret", "require_cert_identity": mutual})
    try:
        states = {0: model_state(0), 1: model_state(1)}
        res = run_round(ts, 0, states, {0: [1], 1: [0]}, {0: [1], 1: [0]})
        assert_same(res[0][0][1], states[1])
        assert_same(res[1][1][0], states[0])
    finally:
        close_all(ts)


def test_mtls_rejects_client_without_certificate_and_wrong_identity(certs):
    server = grpc_transport(1, {1: "127.0.0.1:0"}, tls=_tls(certs, 1, True), require_cert_identity=True, schema=model_state(0))
    no_cert = grpc_transport(0, {0: "127.0.0.1:0", 1: server.address}, tls=_tls(certs, 0, False), timeout=1.5, retries=2)
    # a client presenting peer-2's certificate while claiming to be peer 0
    impostor = grpc_transport(0, {0: "127.0.0.1:0", 1: server.address}, tls=_tls(certs, 2, True))
    try:
        server.begin_round(0, [0])
        with pytest.raises(TransportError, match="push of round 0 to peer 1 failed"):  # TLS handshake refused
            no_cert.send(1, 0, model_state(0))
        with pytest.raises(TransportError, match=r"PERMISSION_DENIED.*does not match the client certificate \['peer-2'\]"):
            impostor.send(1, 0, model_state(0))
        assert server.receive(0, [0], timeout=0.1) == {}
    finally:
        close_all([server, no_cert, impostor])


# --------------------------------------------------------------------------- rejections


@pytest.fixture()
def pair():
    """Receiver 1 (accepts only peer 0, token required) and a well-behaved sender 0."""
    ts = federation(2, lambda i: {"token": "tok", "timeout": 5.0, "allowed_senders": {0} if i == 1 else None})
    own = model_state(100)
    ts[1].set_schema(own)
    ts[1].begin_round(0, [0])
    yield ts[0], ts[1], own
    close_all(ts)


def _raw_push(sender, receiver, msgs, token="tok"):
    stub = sender.client.stub(receiver.peer_id)
    return stub.PushWeights(iter(msgs), timeout=5, metadata=token_metadata(token))


def _assert_unchanged_and_serving(sender, receiver, own, snapshot):
    assert receiver.receive(0, [0], timeout=0.1) == {}  # nothing (partial or corrupt) was buffered
    assert_same(own, snapshot)
    good = model_state(7)
    sender.send(receiver.peer_id, 0, good)  # the server still serves
    assert_same(receiver.receive(0, [0], timeout=5)[0], good)


def _messages(state, r=0, sender=0, chunk_bytes=512):
    return list(stream_messages(OutgoingPayload(state), r, sender, transfer_id=1, chunk_bytes=chunk_bytes))


def test_wrong_token_rejected(pair):
    sender, receiver, own = pair
    snap = {k: v.clone() for k, v in own.items()}
    bad = grpc_transport(0, {0: "127.0.0.1:0", 1: receiver.address}, token="wrong")
    try:
        with pytest.raises(TransportError, match="UNAUTHENTICATED.*missing or wrong authentication token"):
            bad.send(1, 0, model_state(1))
    finally:
        bad.close(grace=0)
    _assert_unchanged_and_serving(sender, receiver, own, snap)


def test_unknown_sender_rejected(pair):
    sender, receiver, own = pair
    snap = {k: v.clone() for k, v in own.items()}
    stranger = grpc_transport(2, {2: "127.0.0.1:0", 1: receiver.address}, token="tok")
    try:
        with pytest.raises(TransportError, match=r"PERMISSION_DENIED.*push from peer 2 for round 0: unknown sender 2 \(accepted: \[0\]\)"):
            stranger.send(1, 0, model_state(1))
    finally:
        stranger.close(grace=0)
    assert any("unknown sender 2" in e for e in receiver.errors)
    _assert_unchanged_and_serving(sender, receiver, own, snap)


@pytest.mark.parametrize(
    "tamper, code, match",
    [
        ("truncate", grpc.StatusCode.DATA_LOSS, r"truncated stream 0: got \d+ of \d+ bytes"),
        ("no_trailer", grpc.StatusCode.DATA_LOSS, "ended without its trailer"),
        ("bad_hash", grpc.StatusCode.DATA_LOSS, "hash mismatch"),
        ("foreign_round", grpc.StatusCode.INVALID_ARGUMENT, "message for round 3 from peer 0 inside the stream"),
    ],
)
def test_corrupt_streams_rejected(pair, tamper, code, match):
    sender, receiver, own = pair
    snap = {k: v.clone() for k, v in own.items()}
    msgs = _messages(model_state(1))
    if tamper == "truncate":
        del msgs[-2]  # the last data chunk never arrives
    elif tamper == "no_trailer":
        del msgs[-1]
    elif tamper == "bad_hash":
        msgs[-1] = pb2.WeightChunk(round=0, sender=0, trailer=pb2.PayloadTrailer(digest=b"\x01" * 32))
    elif tamper == "foreign_round":
        msgs[2].round = 3
    with pytest.raises(grpc.RpcError) as info:
        _raw_push(sender, receiver, msgs)
    assert info.value.code() == code
    assert pytest.importorskip("re").search(match, info.value.details()), info.value.details()
    _assert_unchanged_and_serving(sender, receiver, own, snap)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.update({"fc1.weight": torch.randn(16, 32)}), r"'fc1.weight' has shape \[16, 32\], expected \[32, 16\]"),
        (lambda s: s.update({"fc1.bias": s["fc1.bias"].double()}), r"'fc1.bias' has dtype float64, expected float32"),
        (lambda s: s["fc1.weight"].__setitem__((3, 4), float("nan")), r"'fc1.weight' contains NaN"),
        (lambda s: s["bn.running_var"].__setitem__(0, float("inf")), r"'bn.running_var' contains Inf"),
        (lambda s: s.pop("fc1.bias"), r"missing tensors \['fc1.bias'\]"),
    ],
)
def test_bad_content_rejected(pair, mutate, match):
    sender, receiver, own = pair
    snap = {k: v.clone() for k, v in own.items()}
    bad = model_state(1)
    mutate(bad)
    with pytest.raises(TransportError, match="INVALID_ARGUMENT.*" + match):
        sender.send(1, 0, bad)
    assert any(pytest.importorskip("re").search(match, e) for e in receiver.errors)
    _assert_unchanged_and_serving(sender, receiver, own, snap)


def test_deadline_when_neighbour_absent():
    t = grpc_transport(0, {0: "127.0.0.1:0", 1: "127.0.0.1:1"}, timeout=1.0)
    try:
        t0 = time.monotonic()
        res = t.exchange(0, {0: model_state(0)}, {0: [1]}, {0: [1]}, timeout=1.0).received
        assert res == {0: {}}
        assert t.last_report.missing == [1] and 1 in t.last_report.send_failed
        assert time.monotonic() - t0 < 4.0
    finally:
        t.close(grace=0)


@pytest.mark.parametrize("round_idx, sender, offset", [(0, 0, 0), (1, 2, 5), (300, -1, 1 << 40), (2**63, 2**62, 127)])
def test_fast_chunk_encoding_matches_protobuf(round_idx, sender, offset):
    from dimat.transport.grpc import encode_data_chunk

    pieces = [memoryview(b"abc"), memoryview(bytes(range(256)) * 3)]
    fast = encode_data_chunk(round_idx, sender, offset, pieces)
    ref = pb2.WeightChunk(round=round_idx, sender=sender, data=pb2.PayloadData(offset=offset, data=b"abc" + bytes(range(256)) * 3))
    assert fast == ref.SerializeToString()
    assert pb2.WeightChunk.FromString(fast) == ref


def test_heartbeats_mark_a_dead_peer_down_and_back_up():
    """Once both survivors' heartbeats marked peer 2 down, neither pushes to it nor waits for it.

    The round starts only after *both* marked it (the old version waited for peer 0 only, so peer 1
    could still push to the dead address and hold the round to its 20 s deadline): what is checked
    is what each peer did, not how long it took."""
    ts = federation(3, heartbeat_interval=0.2, max_missed_heartbeats=3, timeout=20.0)
    try:
        for t in ts:
            t.start_heartbeats()
        addr2 = ts[2].address
        ts[2].close(grace=0)  # peer 2 dies
        _wait_for(lambda: not ts[0].is_up(2) and not ts[1].is_up(2), "both survivors to mark peer 2 down")
        assert ts[0].down_peers() == [2] and ts[1].down_peers() == [2]
        ins = {0: [1, 2], 1: [0, 2]}
        res = run_round(ts[:2], 0, {0: model_state(0), 1: model_state(1)}, ins, ins)
        for p, other in ((0, 1), (1, 0)):
            assert sorted(res[p][p]) == [other] and ts[p].last_report.missing == [2]
            assert ts[p].last_report.send_failed[2].endswith("missed heartbeats); not sent"), ts[p].last_report
        # it comes back on the same address: marked up again
        back = grpc_transport(2, {0: ts[0].address, 1: ts[1].address, 2: addr2})
        try:
            _wait_for(lambda: ts[0].is_up(2), "peer 0 to see peer 2 back")
        finally:
            back.close(grace=0)
    finally:
        close_all(ts[:2])


def test_a_push_in_flight_stops_when_its_peer_is_marked_down():
    """A push waiting on a dead address (wait_for_ready) ends when the peer is marked down, not at the
    push deadline; the exchange reports it. The marking is done by hand: no heartbeat timing involved."""
    import socket

    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    t = grpc_transport(0, {0: "127.0.0.1:0", 1: f"127.0.0.1:{dead}"}, heartbeat_interval=None, timeout=120.0)
    out = {}
    try:
        th = threading.Thread(target=lambda: out.update(res=t.exchange(0, {0: model_state(0)}, {0: [1]}, {0: [1]})))
        th.start()
        _wait_for(lambda: t.client.pushing.get(1), "the push to peer 1 to be under way")
        t.membership.missed[1] = t.membership.max_missed_heartbeats  # what the heartbeat loop does
        with t.inbox.cv:
            t.inbox.cv.notify_all()
        th.join(60)
        assert not th.is_alive(), "the exchange still waits for the push to a peer marked down"
        assert out["res"].missing == {0: [1]}
        assert "abandoned: peer 1 is down" in t.last_report.send_failed[1], t.last_report.send_failed
    finally:
        t.close(grace=0)


def test_fast_chunk_decoding_matches_protobuf():
    from dimat.transport.grpc import RawDataChunk, decode_chunk, encode_data_chunk

    for r, s, off in [(0, 0, 0), (7, -3, 12345), (2**63, 5, 1 << 40)]:
        raw = encode_data_chunk(r, s, off, [memoryview(b"payload-bytes")])
        fast = decode_chunk(raw)
        assert isinstance(fast, RawDataChunk)
        ref = pb2.WeightChunk.FromString(raw)
        assert (fast.round, fast.sender, fast.data.offset, bytes(fast.data.data)) == (ref.round, ref.sender, ref.data.offset, ref.data.data)
    header = pb2.WeightChunk(round=1, sender=2, header=pb2.PayloadHeader(total_bytes=9)).SerializeToString()
    assert decode_chunk(header).header.total_bytes == 9  # everything else: the generated parser
    odd = encode_data_chunk(1, 2, 3, [memoryview(b"x")]) + b"\x28\x01"  # an unknown field 5 varint
    assert decode_chunk(odd) == pb2.WeightChunk.FromString(odd)


def test_wait_for_peers_waits_for_a_late_server_and_times_out_on_an_absent_one():
    import socket

    with socket.socket() as s:  # a port nobody serves (yet)
        s.bind(("127.0.0.1", 0))
        late_port = s.getsockname()[1]
    t = grpc_transport(0, {0: "127.0.0.1:0", 1: f"127.0.0.1:{late_port}", 2: "127.0.0.1:1"})
    late = []
    try:
        timer = threading.Timer(1.0, lambda: late.append(grpc_transport(1, {1: f"127.0.0.1:{late_port}"})))
        timer.start()
        t0 = time.monotonic()
        t.wait_for_peers([1], timeout=20)
        assert late and time.monotonic() - t0 >= 0.9  # it really waited for the server to come up
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"peer 0: peer 2 at 127.0.0.1:1 did not come up within 2s"):
            t.wait_for_peers([1, 2], timeout=2)
        assert time.monotonic() - t0 < 8
    finally:
        timer.join()
        close_all([t, *late])


# --------------------------------------------------------------------------- one commit per (sender, exchange)


def _held_back(msgs, release, keep):
    """``msgs`` as a request stream that sends its first ``keep`` messages, then waits for ``release``."""
    yield from msgs[:keep]
    release.wait(30)
    yield from msgs[keep:]


def _wait_for(cond, what, limit=30.0):
    """Poll ``cond`` until it holds (a bounded wait for a state, not a timing assertion)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("held", ["after_header", "before_trailer"])
def test_exactly_one_push_commits_per_sender_and_round(pair, held):
    """Two complete pushes from sender 0 for round 0, interleaved: the first is held back (after its
    header, or with everything but its trailer sent) while the second runs to the end.

    The second is the first complete, verified push: it commits. Released, the first gets
    ALREADY_EXISTS and its state never reaches the inbox (before: both got OK and the inbox ended
    with the first one, after the second had been told it was accepted). A replay after the
    exchange took the state gets ALREADY_EXISTS too."""
    sender, receiver, own = pair
    first_state, second_state = model_state(1), model_state(2)
    first = list(stream_messages(OutgoingPayload(first_state), 0, 0, transfer_id=111, chunk_bytes=512))
    second = list(stream_messages(OutgoingPayload(second_state), 0, 0, transfer_id=222, chunk_bytes=512))
    release = threading.Event()
    stub = sender.client.stub(receiver.peer_id)
    md = token_metadata("tok")
    keep = 1 if held == "after_header" else len(first) - 1
    held_call = stub.PushWeights.future(_held_back(first, release, keep), timeout=30, metadata=md)
    total = OutgoingPayload(first_state).total_bytes

    def first_is_in():
        cur = receiver.inbox.pending.get((0, 0), {})
        return 111 in cur and (keep == 1 or cur[111].received_bytes == total)

    try:
        _wait_for(first_is_in, "the first transfer to be under way")
        assert stub.PushWeights(iter(second), timeout=30, metadata=md).complete
    finally:
        release.set()
    with pytest.raises(grpc.RpcError) as info:
        held_call.result(timeout=30)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
    assert receiver.inbox.pending == {} and receiver.inbox.refused == {}
    assert_same(receiver.receive(0, [0], timeout=5)[0], second_state)
    with pytest.raises(grpc.RpcError) as info:  # a replay after the exchange took the state
        stub.PushWeights(iter(first), timeout=30, metadata=md)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert receiver.receive(0, [0], timeout=0.1) == {}


# --------------------------------------------------------------------------- a push that is early for its schema


def test_an_early_push_is_not_judged_by_the_previous_rounds_model(pair):
    """Receiver 1 is in round 0 with model A; sender 0 pushes round 1 with model B (what round 1
    uses: the schema may change between exchanges). It is told to retry (UNAVAILABLE), nothing is
    recorded against it, and once the receiver enters round 1 with model B the push lands."""
    sender, receiver, own = pair
    wider = {**model_state(3), "fc1.weight": torch.randn(32, 17)}
    with pytest.raises(grpc.RpcError) as info:
        _raw_push(sender, receiver, _messages(wider, r=1))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "retry once it enters round 1" in info.value.details()
    assert receiver.inbox.refused == {} and receiver.inbox.states == {}
    done = {}
    th = threading.Thread(target=lambda: done.update(res=receiver.exchange(1, {1: {**own, "fc1.weight": torch.zeros(32, 17)}},
                                                                         {1: [0]}, {1: []}, timeout=30)))
    th.start()
    sender.send(1, 1, wider, deadline=30)  # retried until the receiver's round-1 model accepts it
    th.join(60)
    assert done["res"].refused == {1: {}}
    assert_same(done["res"].received[1][0], wider)
