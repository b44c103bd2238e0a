"""Compression between the peer and every transport (issue 15): codecs, error feedback, delta
references, refusals of corrupt payloads, and the same metrics on inproc, gRPC and gloo.

Real parts throughout: a real model's state, the in-process transport, real gRPC peers on loopback
(``launch/grpc_local.py``) and real gloo processes under torchrun.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimat.config import ConfigError, ExchangeSettings, RunConfig
from dimat.exchange import CHANGE_ONLY, CODECS, Compressor, CodecSettings, get_codec, wire_schema
from dimat.exchange.payload import ACKS, META
from dimat.transport.inproc import InProcTransport
from dimat.transport.schema import Schema

ROOT = Path(__file__).resolve().parents[1]
TINY = ["merge=dimat", "data=digits", "model=mlp", "model.hidden=[16]", "rounds=2", "local_epochs=0.5", "num_peers=3",
        "progress=false", "threads=1", "topology=ring", "merge.every_steps=null", "merge.keep_momentum=false",
        "merge.bn_stats=own", "baseline=null"]


def settings(compress: str = "none", **kw) -> ExchangeSettings:
    base = dict(compress=compress, block=64, stochastic=False, ratio=0.25, error_feedback=False, delta=False, choco_step=None, raw_vectors=False)
    return ExchangeSettings(**(base | kw))


def model_state() -> dict[str, torch.Tensor]:
    """A real model's shared state (float32 weights, BatchNorm buffers with an int64 counter) plus the
    other dtypes a model may hold: float64, float16, bfloat16 and a bool mask."""
    from dimat.models import build_model

    torch.manual_seed(0)
    m = build_model("cnn1d", num_classes=10, input_shape=(1, 40))
    s = {k: v.detach().clone() for k, v in m.state_dict().items()}
    assert any(v.dtype == torch.int64 for v in s.values())  # num_batches_tracked
    g = torch.Generator().manual_seed(1)
    s["extra.f64"] = torch.randn(7, 5, generator=g, dtype=torch.float64)
    s["extra.f16"] = torch.randn(33, generator=g).half()
    s["extra.bf16"] = torch.randn(3, 11, generator=g).bfloat16()
    s["extra.mask"] = torch.rand(9, generator=g) > 0.5
    s["_dimat.basis"] = torch.tensor(3, dtype=torch.int64)
    return s


# ----------------------------------------------------------------------------- codecs


def _bound(codec: str, x: torch.Tensor, block: int, stochastic: bool) -> torch.Tensor:
    """Per-entry error bound of a dense lossy codec."""
    xf = x.double().reshape(-1)
    if codec in ("fp16", "bf16"):
        eps = 2.0 ** (-11 if codec == "fp16" else -8)
        return xf.abs() * eps + 1e-7
    levels = 127 if codec == "int8" else 7
    n = xf.numel()
    b = min(block, n)
    nb = -(-n // b)
    scale = torch.nn.functional.pad(xf.abs(), (0, nb * b - n)).view(nb, b).amax(1)
    step = (scale / levels).repeat_interleave(b)[:n]
    return step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-6 * xf.abs().max()


@pytest.mark.parametrize("codec, stochastic", [(c, False) for c in CODECS] + [("int8", True), ("int4", True)])
def test_every_codec_round_trips_every_dtype_of_a_model(codec: str, stochastic: bool) -> None:
    state = model_state()
    c = Compressor(settings(codec, stochastic=stochastic, delta=codec in CHANGE_ONLY), n_peers=2, seed=0)
    payload = c.encode(1, {0: state}, {0: [1]})[0]
    model = Schema.from_state(state)
    assert Schema.from_state(payload) == c.wire_schema(model)  # the layout is the one derived from the schema
    res = c.decode(1, InProcTransport().exchange(1, {0: payload, 1: payload}, {1: [0]}, {0: [1]}), {0: state, 1: state})
    if codec in CHANGE_ONLY:
        assert res.received[1] == {} and res.missing[1] == [0]  # a chunked full state is still arriving (chunk 1 of 4)
        return
    got = res.received[1][0]
    assert list(got) == list(state)
    for k, x in state.items():
        y = got[k]
        assert y.dtype == x.dtype and y.shape == x.shape, k
        if not x.dtype.is_floating_point or codec == "none":
            assert torch.equal(y, x), k  # lossless: integers, bools, the basis tag, and codec none
        else:
            err = (y.double() - x.double()).abs().reshape(-1)
            tol = _bound(codec, x, 64, stochastic)
            if x.dtype in (torch.float16, torch.bfloat16):
                tol = tol + x.double().abs().reshape(-1) * 2.0 ** -7  # the decoded value is rounded to the model dtype
            assert bool((err <= tol).all()), (k, float((err - tol).max()))


@pytest.mark.parametrize("codec", ["topk", "randk"])
def test_sparse_codecs_send_k_exact_entries(codec: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    c = get_codec(CodecSettings(codec, ratio=0.05))
    parts = c.encode(x, x.dtype, torch.Generator().manual_seed(1))
    idx = parts["i"].long()
    assert idx.numel() == 50 and idx.unique().numel() == 50
    y = c.decode("w", parts, (1000,), torch.float32)
    assert torch.equal(y[idx], x[idx]) and int((y != 0).sum()) == 50  # the kept entries exactly, zeros elsewhere
    if codec == "topk":
        assert set(idx.tolist()) == set(x.abs().topk(50).indices.tolist())


def test_quantised_bytes_on_the_wire() -> None:
    model = Schema({"w": ((1024,), torch.float32), "n": ((), torch.int64)})
    for codec, block, want in [("none", None, 4096), ("fp16", None, 2048), ("int8", None, 1028), ("int8", 256, 1040),
                               ("int4", 256, 528), ("topk", None, 103 * 8)]:
        c = get_codec(CodecSettings(codec, block=block, ratio=0.1))
        s = wire_schema(model, c, n_peers=None)
        nbytes = sum(math.prod(e.shape) * torch.empty((), dtype=e.dtype).element_size() for e in s)
        assert nbytes == want + 8, (codec, nbytes)


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((20000,), 0.3)
    x[0] = 1.0  # the scale: 0.3 sits between two int4 levels (2/7, 3/7)
    c = get_codec(CodecSettings("int4", block=None, stochastic=True))
    y = c.decode("w", c.encode(x, x.dtype, torch.Generator().manual_seed(0)), (20000,), torch.float32)
    assert abs(float(y[1:].mean()) - 0.3) < 2e-3 and len(set(y[1:].tolist())) == 2


# ----------------------------------------------------------------------------- error feedback, delta


@pytest.mark.parametrize("codec", ["int4", "int8", "bf16"])
def test_error_feedback_sent_plus_residual_is_what_was_meant(codec: str) -> None:
    c = Compressor(settings(codec, block=32, error_feedback=True), n_peers=2, seed=0)
    g = torch.Generator().manual_seed(0)
    carried = torch.zeros(300)
    for e in range(1, 6):
        x = torch.randn(300, generator=g)
        meant = x + carried
        payload = c.encode(e, {0: {"w": x}}, {0: [1]})[0]
        sent = c.codec.decode("w", {k.split("#")[-1] if "#" in k else "": v for k, v in payload.items()}, (300,), torch.float32)
        residual = c.residuals[0].values["w"]
        assert torch.allclose(sent + residual, meant, atol=1e-6), e
        assert residual.abs().max() > 0
        carried = residual


def _ring_step(cs: dict[int, Compressor], t: InProcTransport, e: int, xs: dict[int, dict], drop: set[tuple[int, int]] = set()):
    """One exchange of three single-peer "processes" on a ring 0->1->2->0 (and back), ``drop``: lost messages."""
    n = len(cs)
    outs = {p: [(p + 1) % n, (p - 1) % n] for p in range(n)}
    payloads = {p: cs[p].encode(e, {p: xs[p]}, {p: outs[p]})[p] for p in range(n)}
    ins = {q: [p for p in range(n) if q in outs[p]] for q in range(n)}
    res = t.exchange(e, payloads, ins, outs)
    return {q: cs[q].decode(e, _only(res, q, drop), {q: xs[q]}) for q in range(n)}


def _only(res, q, drop):
    """Receiver ``q``'s part of ``res``; a dropped message is missing, as after a gRPC deadline."""
    from dimat.transport.base import ExchangeResult

    got = {p: st for p, st in res.received[q].items() if (p, q) not in drop}
    missing = sorted(set(res.missing[q]) | {p for p in res.received[q] if (p, q) in drop})
    return ExchangeResult({q: got}, {q: missing}, {q: res.refused[q]}, {q: res.bytes_sent.get(q, 0)})


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_delta_recovers_after_a_missed_round_and_after_a_restart(codec: str) -> None:
    g = torch.Generator().manual_seed(0)
    n = 3
    s = settings(codec, delta=True, ratio=0.5)
    cs = {p: Compressor(s, n_peers=n, seed=p) for p in range(n)}
    t = InProcTransport()
    x = {p: {"w": torch.randn(40, generator=g), "b": torch.randn(8, generator=g), "n": torch.tensor(p)} for p in range(n)}

    def step(e, drop=set()):
        for p in x:  # the models move a little every exchange, as training does
            x[p] = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in x[p].items()}
        return _ring_step(cs, t, e, x, drop)

    def in_sync(q, p):  # what q reconstructs of p is p's own reference, bit for bit
        return all(torch.equal(cs[q].incoming[(q, p)].ref[k], cs[p].outgoing[p].ref[k]) for k in ("w", "b"))

    chunks = 2 if codec == "topk" else 1
    e = 0
    for _ in range(chunks + 1):
        e += 1
        out = step(e)
    assert all(set(out[q].received[q]) == {(q + 1) % n, (q - 1) % n} for q in range(n)) and in_sync(1, 0)
    assert cs[0].outgoing[0].seq == e and int(cs[1].acks(1)[0]) == e  # 1 acks exchange e in its next payload
    # the message 0 -> 1 is lost: 1 cannot apply 0's next delta, its acks say so, 0 falls back to a full state
    e += 1
    out = step(e, drop={(0, 1)})
    assert 0 in out[1].missing[1] and out[1].refused[1] == {}
    e += 1
    out = step(e)
    assert 0 not in out[1].received[1] and (1, 0) not in cs[1].incoming  # the delta was against the lost message
    assert cs[0].outgoing[0].need_full  # 0 read 1's acks
    recovered = None
    for _ in range(chunks + 1):
        e += 1
        out = step(e)
        if 0 in out[1].received[1]:
            recovered = e
            break
    assert recovered is not None and in_sync(1, 0)
    got = out[1].received[1][0]
    assert torch.equal(got["n"], x[0]["n"]) and (got["w"] - x[0]["w"]).abs().max() < 0.5
    # peer 1 restarts (its references are gone) and so does peer 2 (sender side): both start over
    cs[1] = Compressor(s, n_peers=n, seed=1)
    cs[2] = Compressor(s, n_peers=n, seed=2)
    heard = []
    for _ in range(chunks + 3):
        e += 1
        out = step(e)
        heard.append(sorted(out[1].received[1]))
    assert heard[-1] == [0, 2] and in_sync(1, 0) and in_sync(1, 2) and in_sync(0, 1)


def test_choco_gossip_moves_by_gamma_toward_the_public_copies() -> None:
    s = settings("none", delta=True, choco_step=0.5)
    cs = {p: Compressor(s, n_peers=3, seed=p) for p in range(3)}
    g = torch.Generator().manual_seed(0)
    x = {p: {"w": torch.randn(6, generator=g), "n": torch.tensor(p)} for p in range(3)}
    out = _ring_step(cs, InProcTransport(), 1, x)
    for q in range(3):
        for p, st in out[q].received[q].items():
            # lossless public copies equal the models: x_q + gamma (x_p - x_q)
            assert torch.allclose(st["w"], x[q]["w"] + 0.5 * (x[p]["w"] - x[q]["w"]), atol=1e-6)
            assert int(st["n"]) == p


# ----------------------------------------------------------------------------- refusals


def _federation(*extra: str):
    from dimat.entry import compose
    from dimat.federation.build import build_federation

    run = RunConfig.from_config(compose([*TINY, "num_peers=2", "topology=fully_connected", *extra]))
    return build_federation(run)


class _Tamper(InProcTransport):
    """The in-process transport with a hostile network in front of it: ``tamper`` edits payloads in flight."""

    def __init__(self, tamper) -> None:
        super().__init__()
        self.tamper = tamper

    def exchange(self, round_idx, states, in_neighbours, out_neighbours, timeout=None):
        states = {p: dict(s) for p, s in states.items()}
        self.tamper(states)
        return super().exchange(round_idx, states, in_neighbours, out_neighbours, timeout)


def _scale_nan(s):  # caught by the transport's own checks on the payload, under the wire name
    s[0]["fc.0.weight#s"] = torch.full_like(s[0]["fc.0.weight#s"], float("nan"))


def _huge(s):  # finite on the wire; the second such delta decodes to Inf (3.4e38 + 3.4e38)
    s[0]["fc.0.weight#s"] = torch.full_like(s[0]["fc.0.weight#s"], 3.4e38)
    s[0]["fc.0.weight#q"] = torch.full_like(s[0]["fc.0.weight#q"], 127)


def _index(s):
    s[0]["fc.0.weight#i"] = s[0]["fc.0.weight#i"] + 1_000_000


def _meta(s):
    s[0][META] = torch.tensor([1, 7, 9, 0])


@pytest.mark.parametrize("extra, tamper, exchanges, reason", [
    (["exchange.compress=int8"], _scale_nan, 1, "tensor 'fc.0.weight#s' contains NaN"),
    (["exchange.compress=int8", "exchange.delta=true", "exchange.block=null"], _huge, 2, "tensor 'fc.0.weight' contains Inf"),
    (["exchange.compress=topk", "exchange.delta=true"], _index, 1, "tensor 'fc.0.weight': sparse index out of range [0, "),
    (["exchange.compress=int8", "exchange.delta=true"], _meta, 1, "malformed exchange metadata [1, 7, 9, 0]"),
])
def test_a_corrupt_compressed_payload_is_refused_and_the_model_left_untouched(extra, tamper, exchanges, reason) -> None:
    from dimat.federation.rounds import RoundOutput, exchange_and_merge

    fed = _federation(*extra)
    assert "fc.0.weight" in fed.peers[1].state()
    transport = _Tamper(tamper)
    for e in range(1, exchanges + 1):
        before = {k: v.clone() for k, v in fed.peers[1].state().items()}
        out = RoundOutput.empty(fed.peers)
        exchange_and_merge(fed, transport, fed.topology_at(1), e, out)
    assert out.refused[1][0].startswith(f"state from peer 0 for round {exchanges}: {reason}"), out.refused
    assert out.heard[1] == [] and out.missing[1] == [0]
    assert all(torch.equal(v, before[k]) for k, v in fed.peers[1].state().items())  # nobody to merge with: untouched
    assert not out.refused.get(0)  # the other direction was fine


def test_payload_bytes_are_what_the_transport_counts() -> None:
    fed = _federation("exchange.compress=int8", "exchange.block=null", "exchange.raw_vectors=false")
    from dimat.transport.inproc import state_nbytes as state_bytes
    from dimat.federation.rounds import RoundOutput, exchange_and_merge

    full = state_bytes(fed.peers[0].shared_state())
    out = RoundOutput.empty(fed.peers)
    exchange_and_merge(fed, InProcTransport(), fed.topology_at(1), 1, out)
    assert 0.25 * full < out.bytes_sent[0] < 0.27 * full  # int8 codes + a scale per tensor + raw int64 entries


@pytest.mark.parametrize("change, message", [
    (["exchange.compress=topk", "exchange.delta=false"], "exchange.compress=topk needs exchange.delta=true or auto"),
    (["exchange.compress=sign", "exchange.delta=false"], "exchange.compress=sign needs exchange.delta=true or auto"),
    (["exchange.compress=sign", "exchange.error_feedback=true"], "exchange.compress=sign needs exchange.delta=true or auto"),
    (["exchange.compress=int8", "exchange.delta=sometimes"], "exchange.delta must be true, false or auto"),
    (["exchange.compress=int4", "exchange.error_feedback=true", "exchange.delta=true"], "exchange.error_feedback=true with exchange.delta=true"),
    (["exchange.choco_step=0.5"], "exchange.choco_step is the CHOCO consensus step: it needs exchange.delta=true"),
    (["exchange.compress=int2"], "exchange.compress must be one of none, fp16, bf16, int8, int4, sign, topk, randk (got 'int2')"),
    (["exchange.ratio=0"], "exchange.ratio must be positive (got 0.0)"),
    (["+exchange.level=3"], "unknown exchange option(s): level"),
])
def test_exchange_config_errors_are_one_line(change, message) -> None:
    from dimat.entry import compose

    with pytest.raises(ConfigError) as info:
        RunConfig.from_config(compose([*TINY, *change]))
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- three transports, one answer

COMPRESSED = [*TINY, "exchange.compress=int8", "exchange.delta=true", "checkpoint.enabled=false"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _records(paths: list[Path]) -> dict:
    return {(r["round"], r["peer"]): r for p in paths for r in map(json.loads, p.read_text().splitlines()) if r}


@pytest.mark.integration
def test_three_transports_give_the_same_metrics_for_a_compressed_config(tmp_path: Path) -> None:
    from dimat.entry import compose
    from dimat.federation import simulate

    sim = tmp_path / "sim"
    simulate(compose([*COMPRESSED, f"run_dir={sim}"]), sim, progress=False)
    grpc = tmp_path / "grpc"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "grpc_local.py"), "-n", "3", "--run-dir", str(grpc),
                           "--timeout", "200", *COMPRESSED], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gloo = tmp_path / "gloo"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m",
                           "dimat.launch", *COMPRESSED, f"run_dir={gloo}"], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = _records([sim / "metrics.jsonl"])
    model_bytes = json.loads((sim / "summary.json").read_text())["model_bytes"]
    for name, recs in (("grpc", _records(sorted(grpc.glob("peer_*/metrics.jsonl")))), ("gloo", _records([gloo / "metrics.jsonl"]))):
        assert sorted(recs) == sorted(ref), name
        for k, a in ref.items():
            b = recs[k]
            assert b["bytes_sent"] == a["bytes_sent"] and b["neighbours"] == a["neighbours"], (name, k)
            assert b["missing"] == a["missing"] == [], (name, k)
            for f in ("test_acc", "test_loss", "train_loss"):
                assert math.isclose(a[f], b[f], rel_tol=1e-4, abs_tol=1e-5), (name, k, f, a[f], b[f])
    for (r, p), a in ref.items():  # int8: about a quarter of float32, to both ring neighbours
        assert 0.24 * 2 * model_bytes < a["bytes_sent"] < 0.3 * 2 * model_bytes, a["bytes_sent"]


def test_a_fetched_payload_decodes_without_a_reference_unless_it_is_a_delta() -> None:
    # a rejoining gRPC peer loads what its neighbour last sent (dimat.grpc_peer.rejoin)
    state = model_state()
    plain = Compressor(settings("int8"), n_peers=2, seed=0)
    got = plain.standalone(plain.encode(1, {0: state}, {0: [1]})[0], state)
    assert got is not None and list(got) == list(state) and torch.equal(got["_dimat.basis"], state["_dimat.basis"])
    delta = Compressor(settings("int8", delta=True), n_peers=2, seed=0)
    first = delta.encode(1, {0: state}, {0: [1]})[0]
    assert delta.standalone(first, state) is not None  # a full state
    assert delta.standalone(delta.encode(2, {0: state}, {0: [1]})[0], state) is None  # a delta needs the reference
