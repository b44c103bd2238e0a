"""Wire format: raw-byte round trips and every rejection the receiver must make (no gRPC involved)."""
import pytest
import torch

from dimat.transport.base import TransportError
from dimat.transport.wire import (
    HASH_ALGORITHMS,
    WIRE_DTYPES,
    IncomingPayload,
    OutgoingPayload,
    Schema,
    TensorEntry,
    decode_local,
    non_finite,
    segments,
)


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(8, 3, 3, generator=g),
        "bn.running_mean": torch.randn(8, generator=g).double(),
        "bn.num_batches_tracked": torch.tensor(7),
        "emb": torch.randn(5, 4, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("num_streams", [1, 3])
@pytest.mark.parametrize("chunk_bytes", [5, 64, 4 << 20])
def test_round_trip_bit_exact(num_streams, chunk_bytes):
    s = _state()
    out = decode_local(s, num_streams=num_streams, chunk_bytes=chunk_bytes)
    assert list(out) == list(s)
    for k in s:
        assert out[k].dtype == s[k].dtype and out[k].shape == s[k].shape
        assert torch.equal(out[k], s[k]), k
        if s[k].numel():
            assert out[k].data_ptr() != s[k].data_ptr()  # fresh tensors the caller may keep


def test_half_precision_halves_float_bytes_and_restores_dtype():
    s = {"w": torch.randn(1000), "n": torch.tensor(3)}
    full, half = OutgoingPayload(s), OutgoingPayload(s, half="float16")
    assert half.total_bytes == 1000 * 2 + 8 and full.total_bytes == 1000 * 4 + 8
    out = decode_local(s, half="float16")
    assert out["w"].dtype == torch.float32 and torch.allclose(out["w"], s["w"], atol=1e-2)
    assert torch.equal(out["n"], s["n"])
    with pytest.raises(TransportError, match="outside the float16 range"):
        OutgoingPayload({"w": torch.tensor([1e6])}, half="float16")


def test_segments_tile_the_payload():
    for total in (0, 1, 63, 64, 1000, 12345):
        for n in (1, 2, 3, 7):
            segs = segments(total, n)
            assert segs[0][0] == 0 and segs[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(segs, segs[1:]))


def test_non_finite_all_float_dtypes():
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(300_000).to(dt)
        assert non_finite(x) is None
        x[299_999] = float("nan")
        assert non_finite(x) == "NaN"
        x[299_999] = float("-inf")
        assert non_finite(x) == "Inf"
    assert non_finite(torch.tensor([1, 2])) is None


def _incoming(state, schema_state, **kw):
    out = OutgoingPayload(state)
    return out, IncomingPayload(out.entries, out.total_bytes, out.hash_algorithm, 1, Schema.from_state(schema_state), **kw)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: s.update(w=torch.randn(3, 5)), r"'w' has shape \[3, 5\], expected \[4, 5\]"),
        (lambda s: s.update(w=torch.randn(4, 5).double()), r"'w' has dtype float64, expected float32"),
        (lambda s: s.update(extra=torch.zeros(2)), r"unexpected tensor 'extra'"),
        (lambda s: s.pop("b"), r"missing tensors \['b'\]"),
    ],
)
def test_schema_mismatch_rejected_before_allocation(mutate, match):
    own = {"w": torch.randn(4, 5), "b": torch.randn(5)}
    sent = dict(own)
    mutate(sent)
    with pytest.raises(TransportError, match=match):
        _incoming(sent, own)


def test_bad_table_rejected():
    own = {"w": torch.randn(4)}
    sch = Schema.from_state(own)
    with pytest.raises(TransportError, match="not in the wire whitelist"):
        IncomingPayload([TensorEntry("w", "complex64", (4,), 0, 32)], 32, "sha256", 1, sch)
    with pytest.raises(TransportError, match="announces 8 bytes"):
        IncomingPayload([TensorEntry("w", "float32", (4,), 0, 8)], 8, "sha256", 1, sch)
    with pytest.raises(TransportError, match="unsupported hash algorithm 'md5'"):
        IncomingPayload([TensorEntry("w", "float32", (4,), 0, 16)], 16, "md5", 1, sch)
    with pytest.raises(TransportError, match="exceeds the limit"):
        IncomingPayload([TensorEntry("w", "float32", (4,), 0, 16)], 16, "sha256", 1, sch, max_total_bytes=8)
    assert set(WIRE_DTYPES) >= {"float32", "int64", "bfloat16", "bool"}


def test_truncated_bad_hash_out_of_order_nan():
    own = {"w": torch.randn(100), "b": torch.randn(10)}
    out, inc = _incoming(own, own)
    inc.open_stream(0, 0, out.total_bytes)
    chunks = list(out.chunks(0, out.total_bytes, 64))
    for off, data in chunks[:-1]:
        inc.write(0, off, data)
    with pytest.raises(TransportError, match=r"truncated stream 0: got 384 of 440 bytes; incomplete tensors \['w', 'b'\]"):
        inc.close_stream(0, out.digest())
    inc.abort()

    out, inc = _incoming(own, own)
    inc.open_stream(0, 0, out.total_bytes)
    with pytest.raises(TransportError, match="out of order or lost"):
        inc.write(0, 64, b"\0" * 64)
    inc.abort()

    out, inc = _incoming(own, own)
    inc.open_stream(0, 0, out.total_bytes)
    for off, data in out.chunks(0, out.total_bytes, 64):
        inc.write(0, off, data)
    inc.close_stream(0, b"\0" * 32)
    with pytest.raises(TransportError, match="hash mismatch"):
        inc.finalize()

    bad = {"w": own["w"].clone(), "b": own["b"]}
    bad["w"][7] = float("inf")
    with pytest.raises(TransportError, match="'w' contains Inf"):
        decode_local(bad, Schema.from_state(own))


@pytest.mark.parametrize("algorithm", HASH_ALGORITHMS)
def test_every_hash_detects_one_flipped_bit(algorithm):
    own = {"w": torch.randn(1000), "b": torch.randn(10)}
    for flip in (False, True):
        out = OutgoingPayload(own, hash_algorithm=algorithm)
        inc = IncomingPayload(out.entries, out.total_bytes, algorithm, 1, Schema.from_state(own))
        inc.open_stream(0, 0, out.total_bytes)
        for off, data in out.chunks(0, out.total_bytes, 256):
            if flip and off == 1024:
                data = bytes([data[0] ^ 0x01]) + data[1:]
            inc.write(0, off, data)
        inc.close_stream(0, out.digest())
        if flip:
            with pytest.raises(TransportError, match="hash mismatch"):
                inc.finalize()
        else:
            got = inc.finalize()
            assert all(torch.equal(got[k], own[k]) for k in own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nan_is_found_wherever_it_lies_across_chunks_and_streams(dtype):
    # a 3-element float16 tensor first puts the next tensor at byte 6, so its elements straddle
    # chunk (64 B) and stream boundaries; a NaN in any element must be rejected
    own = {"a": torch.zeros(3, dtype=torch.float16), "w": torch.zeros(50, dtype=dtype)}
    assert decode_local(own, chunk_bytes=64, num_streams=3)["w"].dtype == dtype
    for k in range(50):
        bad = {"a": own["a"], "w": own["w"].clone()}
        bad["w"][k] = float("nan")
        with pytest.raises(TransportError, match="'w' contains NaN"):
            decode_local(bad, Schema.from_state(own), chunk_bytes=64, num_streams=3)


def test_lost_bytes_are_data_loss_and_bad_content_is_a_refusal():
    """The typed errors a server maps to DATA_LOSS and INVALID_ARGUMENT (the type decides, not the text)."""
    from dimat.transport.base import DataLossError
    from dimat.transport.checks import StateRejected

    own = {"w": torch.randn(100), "b": torch.randn(10)}
    out, inc = _incoming(own, own)
    inc.open_stream(0, 0, out.total_bytes)
    for off, data in list(out.chunks(0, out.total_bytes, 64))[:-1]:
        inc.write(0, off, data)
    with pytest.raises(DataLossError):
        inc.close_stream(0, out.digest())
    inc.abort()

    out, inc = _incoming(own, own)
    inc.open_stream(0, 0, out.total_bytes)
    for off, data in out.chunks(0, out.total_bytes, 64):
        inc.write(0, off, data)
    with pytest.raises(DataLossError, match="stream 0 ended without its trailer"):
        inc.close_stream(0, None)
    inc.abort()

    bad = {"w": own["w"].clone(), "b": own["b"]}
    bad["w"][3] = float("nan")
    with pytest.raises(StateRejected) as info:
        decode_local(bad, Schema.from_state(own))
    assert not isinstance(info.value, DataLossError) and info.value.reason == "tensor 'w' contains NaN"
    with pytest.raises(StateRejected) as info:
        _incoming({"w": torch.randn(3), "b": own["b"]}, own)
    assert info.value.reason == "tensor 'w' has shape [3], expected [100]"
