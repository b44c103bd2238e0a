"""Compression that keeps accuracy (issue 27): a change by default, the sign codec, CHOCO's consensus
step sized by the measured contraction, error feedback over many steps, references after a resume,
and corrupt payloads refused with the model untouched on gRPC (two real servers on loopback).

Real parts throughout: real codecs and compressors, the in-process transport, real training on the
digits data, real gRPC transports on 127.0.0.1. tests/test_exchange.py holds the earlier layer
(round trips of every dtype, lost messages and restarts, the three transports' equal metrics).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from dimat.config import ExchangeSettings, RunConfig
from dimat.exchange import Compressor, CodecSettings, get_codec
from dimat.exchange.payload import META, Meta
from dimat.exchange.reference import DELTA, FULL
from dimat.transport.inproc import InProcTransport

TINY = ["merge=dimat", "data=digits", "model=mlp", "model.hidden=[16]", "rounds=2", "local_epochs=0.5", "num_peers=3",
        "progress=false", "threads=1", "topology=ring", "merge.every_steps=null", "merge.keep_momentum=false",
        "merge.bn_stats=own", "baseline=null"]


def settings(compress: str, **kw) -> ExchangeSettings:
    base = dict(compress=compress, block=64, stochastic=False, ratio=0.25, error_feedback=False, delta=True,
                choco_step=None, raw_vectors=False)
    return ExchangeSettings(**(base | kw))


def _only(res, q: int):
    """What receiver ``q`` got from an in-process exchange that hosted every peer (its compressor hosts ``q`` alone)."""
    from dimat.transport.base import ExchangeResult

    return ExchangeResult(received={q: res.received.get(q, {})}, missing={q: res.missing.get(q, [])},
                          refused={q: res.refused.get(q, {})}, bytes_sent={})


def _run(*extra: str) -> RunConfig:
    from dimat.entry import compose

    return RunConfig.from_config(compose([*TINY, *extra]))


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("extra, delta, step", [
    ([], False, None),  # lossless: nothing to track
    (["exchange.compress=int8"], True, None),  # plain int8 sends a change
    (["exchange.compress=fp16"], True, None),
    (["exchange.compress=int8", "exchange.choco_step=auto"], True, "auto"),
    (["exchange.choco_step=auto"], False, None),  # lossless: no public copies, no step
    (["exchange.compress=int8", "exchange.error_feedback=true"], False, None),  # full states with a residual
    (["exchange.compress=int8", "exchange.delta=false"], False, None),
    (["exchange.compress=sign", "exchange.choco_step=null"], True, None),
    (["exchange.compress=topk", "exchange.choco_step=0.3"], True, 0.3),
])
def test_a_lossy_codec_compresses_a_change_by_default(extra, delta, step) -> None:
    ex = _run(*extra).exchange
    assert ex.delta is delta and ex.choco_step == step


def test_plain_int8_sends_deltas_through_the_round_loop() -> None:
    """On the code before issue 27 plain int8 sent a full state every exchange (no metadata)."""
    from dimat.federation.build import build_federation
    from dimat.federation.rounds import RoundOutput, exchange_and_merge

    fed = build_federation(_run("exchange.compress=int8"))
    kinds = []

    class Watch(InProcTransport):  # the real in-process transport; records what went on the wire
        def exchange(self, round_idx, states, in_neighbours, out_neighbours, timeout=None):
            kinds.append(Meta.read(states[0][META]).kind)
            return super().exchange(round_idx, states, in_neighbours, out_neighbours, timeout)

    t = Watch()
    for e in (1, 2, 3):
        exchange_and_merge(fed, t, fed.topology_at(1), e, RoundOutput.empty(fed.peers))
    assert kinds == [FULL, DELTA, DELTA]
    assert fed.compressor is not None and fed.compressor.choco is None


# ----------------------------------------------------------------------------- the sign codec


def test_sign_codec_bounds_bytes_and_contraction() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * torch.linspace(0.01, 3, 1000)
    c = get_codec(CodecSettings("sign", block=256))
    parts = c.encode(x, x.dtype, None)
    assert parts["q"].dtype == torch.uint8 and parts["q"].numel() == 125 and parts["s"].numel() == 4  # 1 bit + a scale
    assert c.nbytes((1000,), torch.float32) == 125 + 16  # 28x fewer than 4,000
    y = c.decode("w", parts, (1000,), torch.float32)
    assert torch.equal(torch.signbit(y), torch.signbit(x))
    for blk_x, blk_y in zip(x.split(256), y.split(256)):
        assert torch.allclose(blk_y.abs(), blk_x.abs().mean().expand(blk_x.numel()), rtol=1e-6)
        # the block mean minimises the squared error; it is a contraction: ||x - C(x)||^2 = ||x||^2 - ||x||_1^2 / b
        err = float((blk_x - blk_y).pow(2).sum())
        assert err == pytest.approx(float(blk_x.pow(2).sum() - blk_x.abs().sum() ** 2 / blk_x.numel()), rel=1e-4)
        assert err < float(blk_x.pow(2).sum())
    # every bit pattern decodes (nothing to refuse), an all-zero block decodes to zeros
    z = c.decode("w", {"q": torch.full((125,), 255, dtype=torch.uint8), "s": torch.tensor([0.0, 1.0, 2.0, 3.0])},
                 (1000,), torch.float32)
    assert torch.equal(z[:256], torch.zeros(256)) and bool((z[256:] < 0).all())


@pytest.mark.parametrize("n", [1, 7, 256, 300_001])
def test_dense_codecs_are_exact_across_stretches(n: int) -> None:
    """Stretch-by-stretch encoding (cache-sized) gives what one pass over the tensor gives."""
    from dimat.exchange import codecs

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    for name in ("int8", "int4", "sign"):
        c = get_codec(CodecSettings(name, block=64))
        whole = c.encode(x, x.dtype, None)
        old, codecs.STRETCH = codecs.STRETCH, 128  # many stretches, one a partial block
        try:
            pieces = c.encode(x, x.dtype, None)
            back = c.decode("w", pieces, (n,), torch.float32)
        finally:
            codecs.STRETCH = old
        assert all(torch.equal(whole[k], pieces[k]) for k in whole), name
        assert torch.equal(back, c.decode("w", whole, (n,), torch.float32)), name


def test_topk_threshold_from_a_sample_is_the_exact_top_k() -> None:
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(400_000, generator=g), torch.randn(400_000, generator=g).pow(9),  # heavy tails
              torch.cat([torch.zeros(300_000), torch.ones(100_000)])):  # ties at the threshold
        c = get_codec(CodecSettings("topk", ratio=0.05))
        idx = c.encode(x, x.dtype, None)["i"].long()
        k = 20_000
        assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all())  # k distinct, ascending
        kth = x.abs().kthvalue(x.numel() - k + 1).values
        assert bool((x.abs()[idx] >= kth).all()) and int((x.abs() > kth).sum()) <= k


# ----------------------------------------------------------------------------- error feedback, many steps


@pytest.mark.parametrize("codec", ["sign", "int4", "topk"])
def test_the_reference_carries_what_was_not_sent_over_many_steps(codec: str) -> None:
    """Sender and receiver keep the same reference bit for bit; it stays within a few steps of the
    model (the error does not accumulate), and the sum of what was sent is the reference."""
    s = settings(codec)
    send, recv = Compressor(s, n_peers=2, seed=0), Compressor(s, n_peers=2, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=g)
    sent_sum = None
    gaps = []
    step = 0.05
    for e in range(1, 81):
        x = x + step * torch.randn(2000, generator=g)  # a model that keeps moving
        p = send.encode(e, {0: {"w": x}}, {0: [1]})[0]
        own = recv.encode(e, {1: {"w": x}}, {1: []})[1]  # the receiver hosts a peer of its own (it sends nowhere)
        res = recv.decode(e, _only(InProcTransport().exchange(e, {0: p, 1: own}, {0: [], 1: [0]}, {0: [1], 1: []}), 1),
                          {1: {"w": x}})
        ref_s, ref_r = send.outgoing[0].ref["w"], recv.incoming[(1, 0)].ref["w"]
        assert torch.equal(ref_s, ref_r), e
        if 0 in res.received[1]:
            assert torch.equal(res.received[1][0]["w"], ref_r)
        meta = Meta.read(p[META])
        sent_sum = ref_s.clone() if meta.kind != DELTA else sent_sum + (ref_s - prev)
        prev = ref_s.clone()
        gaps.append(float((x - ref_s).norm()))
    assert torch.allclose(sent_sum, prev, atol=1e-4)  # the reference is the sum of the messages
    move = step * 2000 ** 0.5  # one step's movement
    assert max(gaps[-20:]) < 4 * move  # bounded lag: what one message dropped went into the next ones
    assert gaps[-1] < 0.2 * float(x.norm())


# ----------------------------------------------------------------------------- the consensus step


def _three_peers(codec: str, step):
    s = settings(codec, choco_step=step)
    cs = {p: Compressor(s, n_peers=3, seed=p, consensus=True) for p in range(3)}
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, generator=g)
    xs = [{p: {"w": base + 0.5 * torch.randn(500, generator=g), "_dimat.basis": torch.tensor(0)} for p in range(3)}]
    for _ in range(4):  # every peer moves on between exchanges
        xs.append({p: {"w": xs[-1][p]["w"] + 0.3 * torch.randn(500, generator=g), "_dimat.basis": torch.tensor(0)}
                   for p in range(3)})
    return cs, xs


@pytest.mark.parametrize("codec", ["sign", "int4"])
def test_gamma_one_conserves_the_mean_model_where_mixing_public_copies_does_not(codec: str) -> None:
    full = {q: [p for p in range(3) if p != q] for q in range(3)}
    gaps = {}
    for step in (1.0, None):
        cs, xs = _three_peers(codec, step)
        for e, x in enumerate(xs, start=1):
            payloads = {p: cs[p].encode(e, {p: x[p]}, full)[p] for p in range(3)}
            res = InProcTransport().exchange(e, payloads, full, full)
            got = {q: cs[q].decode(e, _only(res, q), {q: x[q]}).received[q] for q in range(3)}
        merged = {q: (x[q]["w"] + sum(got[q][p]["w"] for p in full[q])) / 3 for q in range(3)}  # uniform mixing
        mean_before = sum(x[p]["w"] for p in range(3)) / 3
        mean_after = sum(merged.values()) / 3
        gaps[step] = float((mean_after - mean_before).norm())
    assert gaps[1.0] < 1e-4  # CHOCO with gamma 1: the mean model is exactly what it was
    assert gaps[None] > 100 * max(gaps[1.0], 1e-6)  # the receivers' lag is lost from the mean


def test_auto_step_is_the_contraction_each_sender_measures() -> None:
    steps = {}
    for codec in ("int8", "sign", "topk"):
        cs, xs = _three_peers(codec, "auto")
        assert cs[0].consensus_step(0) == 1.0  # nothing measured yet
        states = [*xs, xs[-1]]  # sign and topk (25 %): 4 chunks first
        for e, x in enumerate(states[:-1], start=1):
            cs[0].encode(e, {0: x[0]}, {0: [1, 2]})
        before = cs[0].outgoing[0].ref["w"].clone()
        cs[0].encode(len(states), {0: states[-1][0]}, {0: [1, 2]})
        d, sent = states[-1][0]["w"] - before, cs[0].outgoing[0].ref["w"] - before
        want = 1 - float((d - sent).pow(2).sum() / d.pow(2).sum())
        steps[codec] = cs[0].consensus_step(0)
        assert steps[codec] == pytest.approx(want, rel=1e-4), codec
    assert steps["int8"] > 0.999 and 0.3 < steps["sign"] < 0.8 and 0 < steps["topk"] < 1, steps


def test_sign_sends_a_full_state_in_four_int4_chunks_and_again_after_a_relabelling() -> None:
    s = settings("sign")
    send, recv = Compressor(s, n_peers=2, seed=0), Compressor(s, n_peers=2, seed=1)
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(1001, generator=g), "_dimat.basis": torch.tensor(3)}
    four = get_codec(CodecSettings("int4", block=64))
    heard = []
    for e in range(1, 11):
        if e == 6:  # a merge relabelled the sender's units into basis 0
            x = {"w": x["w"].flip(0).contiguous(), "_dimat.basis": torch.tensor(0)}
        p = send.encode(e, {0: x}, {0: [1]})[0]
        own = recv.encode(e, {1: x}, {1: []})[1]
        res = recv.decode(e, _only(InProcTransport().exchange(e, {0: p, 1: own}, {0: [], 1: [0]}, {0: [1], 1: []}), 1), {1: x})
        heard.append((Meta.read(p[META]).kind, 0 in res.received[1]))
        if e in (4, 9):  # complete: the reference is the int4 state of each quarter, on both sides
            quarters = [four.decode("w", four.encode(q, q.dtype, None), (q.numel(),), torch.float32)
                        for q in x["w"].split(251)]
            assert torch.equal(recv.incoming[(1, 0)].ref["w"], torch.cat(quarters)), e
            assert torch.equal(send.outgoing[0].ref["w"], recv.incoming[(1, 0)].ref["w"])
    CH = 2  # reference.CHUNK
    assert heard == [(CH, False)] * 3 + [(CH, True), (DELTA, True)] + [(CH, False)] * 3 + [(CH, True), (DELTA, True)]


def test_a_state_of_another_basis_is_not_stepped() -> None:
    s = settings("int8", choco_step="auto")
    c = Compressor(s, n_peers=2, seed=0, consensus=True)
    other = Compressor(s, n_peers=2, seed=1, consensus=True)
    x0 = {"w": torch.randn(300), "_dimat.basis": torch.tensor(0)}
    x1 = {"w": torch.randn(300), "_dimat.basis": torch.tensor(1)}
    p0 = c.encode(1, {0: x0}, {0: []})
    p1 = other.encode(1, {1: x1}, {1: [0]})
    res = c.decode(1, _only(InProcTransport().exchange(1, p0 | p1, {0: [1], 1: []}, {0: [], 1: [0]}), 0), {0: x0})
    assert torch.equal(res.received[0][1]["w"], other.outgoing[1].ref["w"])  # the public copy as sent


def test_basis_key_is_the_merge_layers() -> None:
    from dimat.exchange.compressor import BASIS_KEY
    from dimat.merge.basis import BASIS_KEY as MERGE_KEY

    assert BASIS_KEY == MERGE_KEY


# ----------------------------------------------------------------------------- real training


def test_plain_int8_keeps_the_accuracy_of_uncompressed_training(tmp_path: Path) -> None:
    from dimat.entry import compose
    from dimat.federation import simulate

    acc = {}
    for name, extra in (("none", []), ("int8", ["exchange.compress=int8"])):
        d = tmp_path / name
        simulate(compose([*TINY, "rounds=3", "merge=scaffold", "topology=fully_connected", *extra, f"run_dir={d}"]),
                 d, progress=False)
        acc[name] = json.loads((d / "summary.json").read_text())["final_mean_acc"]
    assert abs(acc["int8"] - acc["none"]) <= 0.01, acc


# ----------------------------------------------------------------------------- resume


def test_a_resumed_run_starts_over_from_full_states_and_references_agree(tmp_path: Path) -> None:
    """References live in memory: after a resume every sender's first message is a full state, and
    every receiver then holds exactly the reference its sender keeps."""
    from dimat.entry import compose
    from dimat.federation import simulate
    from dimat.federation.build import build_federation
    from dimat.federation.rounds import run_rounds

    d = tmp_path / "run"
    cfg = [*TINY, "exchange.compress=int8", f"run_dir={d}"]
    simulate(compose(cfg), d, progress=False)  # rounds 1-2, checkpointed
    fed = build_federation(RunConfig.from_config(compose([*cfg, "rounds=4"])))
    kinds: list[int] = []

    class Watch(InProcTransport):  # the real in-process transport; records what went on the wire
        def exchange(self, round_idx, states, in_neighbours, out_neighbours, timeout=None):
            kinds.extend(Meta.read(st[META]).kind for st in states.values())
            return super().exchange(round_idx, states, in_neighbours, out_neighbours, timeout)

    summary = run_rounds(fed, Watch(), d, resume=True, progress=False)
    assert summary["rounds_done"] == 4
    assert kinds == [FULL] * 3 + [DELTA] * 3  # rounds 3 and 4, one exchange each
    c = fed.compressor
    assert c is not None and len(c.incoming) == 6  # every edge of the 3-ring, both directions
    for (q, p), inc in c.incoming.items():
        assert all(torch.equal(inc.ref[k], c.outgoing[p].ref[k]) for k in inc.ref), (q, p)


# ----------------------------------------------------------------------------- corrupt payloads, every transport

WIRE_CASES = ["nan-scale", "sparse-index", "metadata", "sign-chunk"]


def _wire():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compression_wire

    return compression_wire


def _check_refused(results: dict, case: str) -> None:
    wire = _wire()
    got = results[1]
    assert got["refused"]["0"].startswith(f"state from peer 0 for round 1: {wire.CASES[case][2]}"), got
    assert "\n" not in got["refused"]["0"]
    assert got["heard"] == [] and got["missing"] == [0] and got["untouched"], got
    assert results[0]["refused"] == {}  # the other direction was fine (a chunk is heard once complete)


@pytest.mark.parametrize("case", WIRE_CASES)
def test_a_corrupt_payload_is_refused_in_process(case: str) -> None:
    wire = _wire()
    fed = wire.federation(case, 0)
    fed = __import__("dimat.federation.build", fromlist=["x"]).build_federation(fed.config)  # both peers here
    from dimat.federation.rounds import RoundOutput, exchange_and_merge

    before = {k: v.clone() for k, v in fed.peers[1].state().items()}
    out = RoundOutput.empty(fed.peers)
    exchange_and_merge(fed, wire.TamperWire(InProcTransport(), wire.CASES[case][1]), fed.topology_at(1), 1, out)
    results = {p: {"refused": {str(k): v for k, v in out.refused.get(p, {}).items()}, "heard": out.heard[p],
                   "missing": out.missing[p]} for p in (0, 1)}
    results[1]["untouched"] = all(torch.equal(v, before[k]) for k, v in fed.peers[1].state().items())
    _check_refused(results, case)


@pytest.mark.integration
@pytest.mark.parametrize("case", WIRE_CASES)
def test_a_corrupt_payload_is_refused_over_grpc(case: str) -> None:
    """Two real gRPC servers on loopback, each peer in its own federation and thread."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_grpc_transport import close_all, federation as grpc_pair

    wire = _wire()
    feds = [wire.federation(case, p) for p in (0, 1)]
    ts = grpc_pair(2, timeout=20.0)
    results, errors = {}, []
    try:
        for p, t in enumerate(ts):
            own = feds[p].method.payload(feds[p].peers[p])
            t.set_schema(feds[p].compressor.payload_schema(own))

        def one(p: int) -> None:
            try:
                results[p] = wire.one_exchange(feds[p], ts[p], case)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(p,)) for p in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        close_all(ts)
    assert not errors, errors
    _check_refused(results, case)


@pytest.mark.integration
@pytest.mark.parametrize("case", ["sign-chunk"])  # transport-level NaN refusals: tests/test_transport_contract.py
def test_a_corrupt_payload_is_refused_over_torchdist(tmp_path: Path, case: str) -> None:
    """Two real gloo processes; a refusal after decoding (the transport passed the payload)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    script = Path(__file__).resolve().parent / "compression_wire.py"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(port), str(tmp_path), case], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    _check_refused({r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}, case)
