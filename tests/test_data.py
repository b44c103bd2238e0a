"""Tests for dimat.data: loaders on real (generated or written) files, partitions, loaders."""

from __future__ import annotations

import os
import pickle
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from dimat.data import (
    DatasetBundle,
    UnsafePickleError,
    available_datasets,
    describe_partition,
    load_dataset,
    make_loader,
    partition,
    partition_stats,
    safe_load,
    tensor_subset,
    train_val_split,
)
from dimat.data.cifar import CIFAR10, CIFAR100


# --------------------------------------------------------------------------- registry

def test_registry_names_and_unknown_name() -> None:
    assert {"mnist1d", "digits", "cifar10", "cifar100", "synthetic"} <= set(available_datasets())
    with pytest.raises(ValueError, match="unknown data set 'imagenet'.*available: .*cifar10.*mnist1d"):
        load_dataset("imagenet")


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown option.*colour.*accepted: .*test_fraction"):
        load_dataset("digits", colour=True)


# --------------------------------------------------------------------------- mnist1d

@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any attempt to open a network connection fail loudly (and record it)."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args))
        raise OSError("network access attempted during a test that must be offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_mnist1d_generates_offline_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIMAT_CACHE", str(cache))
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()

    b = load_dataset("mnist1d")

    assert no_network == []
    # The package generator reseeds the global RNGs; the loader must restore them.
    assert np.array_equal(np.random.get_state()[1], before_np) and random.getstate() == before_py
    assert isinstance(b, DatasetBundle) and b.name == "mnist1d"
    assert b.input_shape == (1, 40) and b.num_classes == 10
    x, y = b.train.tensors
    assert x.shape == (4000, 1, 40) and y.shape == (4000,)
    assert b.test.tensors[0].shape == (1000, 1, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3
    files = list((cache / "mnist1d").glob("*.npz"))
    assert len(files) == 1
    assert not list((cache / "mnist1d").glob("*.tmp"))  # atomic write leaves no temporaries

    # Second load must read the cache: generating again would now fail.
    import mnist1d.data

    def no_generation(*a: object, **k: object) -> None:
        raise AssertionError("regenerated although the cache holds the data")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    b2 = load_dataset("mnist1d")
    assert torch.equal(b2.train.tensors[0], x) and torch.equal(b2.test.tensors[1], b.test.tensors[1])


def test_mnist1d_cache_keyed_by_args_and_corrupt_cache_regenerated(tmp_path: Path, no_network: list[str]) -> None:
    a = load_dataset("mnist1d", root=tmp_path, num_samples=200, seed=1)
    b = load_dataset("mnist1d", root=tmp_path, num_samples=200, seed=2)
    files = sorted((tmp_path / "mnist1d").glob("*.npz"))
    assert len(files) == 2
    assert len(a.train) == 160 and len(a.test) == 40
    assert not torch.equal(a.train.tensors[0], b.train.tensors[0])
    # Truncate one cache file: the loader must notice and regenerate the same data.
    for f in files:
        f.write_bytes(f.read_bytes()[:100])
    a2 = load_dataset("mnist1d", root=tmp_path, num_samples=200, seed=1)
    assert torch.equal(a2.train.tensors[0], a.train.tensors[0])
    assert no_network == []
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("mnist1d", root=tmp_path, num_samples=5)


# --------------------------------------------------------------------------- digits

def test_digits_shapes_labels_and_stratified_split() -> None:
    b = load_dataset("digits", test_fraction=0.2, seed=0)
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    assert x.shape[0] + xt.shape[0] == 1797 and xt.shape[0] == 360
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
    # Stratified: each class's share of the test set is within one sample of its overall share.
    all_y = torch.cat([y, yt]).numpy()
    expected = np.bincount(all_y) * 0.2
    assert np.all(np.abs(np.bincount(yt.numpy(), minlength=10) - expected) <= 1.0)
    again = load_dataset("digits", test_fraction=0.2, seed=0)
    other = load_dataset("digits", test_fraction=0.2, seed=1)
    assert torch.equal(again.test.tensors[0], xt)
    assert not torch.equal(other.test.tensors[0], xt)


# --------------------------------------------------------------------------- CIFAR

def _cifar_images(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: object) -> None:
    # The standard files are protocol-2 pickles of dicts with bytes keys.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(parent: Path, per_batch: int = 6, n_test: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        _dump(folder / name, {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": _cifar_images(n, rng),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        })
    return folder


def write_cifar100(parent: Path, n_train: int = 12, n_test: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        _dump(folder / name, {
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": b"training batch 1 of 1",
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            b"data": _cifar_images(n, rng),
        })
    return folder


def test_cifar10_reads_standard_files_from_parent_or_folder(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    # Plant known pixels: image 0 has red (0,0) = 255 and green (1,2) = 0.
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"data"][0, 0] = 255
    batch[b"data"][0, 1024 + 32 * 1 + 2] = 0
    _dump(folder / "data_batch_1", batch)

    from_parent = load_dataset("cifar10", root=tmp_path)
    from_folder = load_dataset("cifar10", root=folder)
    for b in (from_parent, from_folder):
        assert b.name == "cifar10" and b.num_classes == 10 and b.input_shape == (3, 32, 32)
        assert b.train.tensors[0].shape == (30, 3, 32, 32) and b.test.tensors[0].shape == (5, 3, 32, 32)
        assert b.train.tensors[0].dtype == torch.float32 and b.train.tensors[1].dtype == torch.int64
    assert torch.equal(from_parent.train.tensors[0], from_folder.train.tensors[0])
    x = from_parent.train.tensors[0]
    m, s = CIFAR10.mean, CIFAR10.std
    assert float(x[0, 0, 0, 0]) == pytest.approx((1.0 - m[0]) / s[0], rel=1e-5)
    assert float(x[0, 1, 1, 2]) == pytest.approx((0.0 - m[1]) / s[1], rel=1e-5)
    assert from_parent.train.tensors[1][:6].tolist() == batch[b"labels"]

    limited = load_dataset("cifar10", root=tmp_path, limit=8)
    assert len(limited.train) == 8 and len(limited.test) == 5
    assert torch.equal(limited.train.tensors[0], x[:8])


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    folder = write_cifar100(tmp_path)
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    for root in (tmp_path, folder):
        b = load_dataset("cifar100", root=root)
        assert b.num_classes == 100 and b.input_shape == (3, 32, 32)
        assert len(b.train) == 12 and len(b.test) == 4
        assert b.train.tensors[1].tolist() == raw[b"fine_labels"]
        expected = (raw[b"data"].reshape(-1, 3, 32, 32) / 255.0 - np.array(CIFAR100.mean)[:, None, None]) / np.array(CIFAR100.std)[:, None, None]
        assert np.allclose(b.train.tensors[0].numpy(), expected, atol=1e-5)


def test_cifar_missing_folder_and_files_are_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist.*data_batch_1.*test_batch"):
        load_dataset("cifar10", root=missing)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", root=tmp_path)
    # A CIFAR-10 folder is not a CIFAR-100 one.
    with pytest.raises(FileNotFoundError, match="cifar-100-python.*train.*test"):
        load_dataset("cifar100", root=tmp_path)


def test_cifar_wrong_content_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    _dump(folder / "test_batch", {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(ValueError, match="test_batch.*N x 3072"):
        load_dataset("cifar10", root=tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch.*not a readable CIFAR batch"):
        load_dataset("cifar10", root=tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_rejects_forbidden_globals(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    _dump(folder / "data_batch_3", {b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(UnsafePickleError, match=r"data_batch_3.*'(posix|os|nt)\.system'"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()

    import io

    with pytest.raises(UnsafePickleError, match=r"(__builtin__|builtins)\.eval"):
        safe_load(io.BytesIO(pickle.dumps(eval, protocol=2)))
    # _codecs.encode is only honoured for latin-1 (how protocol 2 spells bytes).
    rot13 = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UnsafePickleError, match="rot13"):
        safe_load(io.BytesIO(rot13))
    # Arrays and containers still round-trip.
    obj = {b"a": np.arange(6, dtype=np.float32).reshape(2, 3), b"b": [1, (2, 3)], b"c": b"\xff\x00"}
    back = safe_load(io.BytesIO(pickle.dumps(obj, protocol=2)))
    assert np.array_equal(back[b"a"], obj[b"a"]) and back[b"b"] == [1, (2, 3)] and back[b"c"] == b"\xff\x00"
    # The published CIFAR files predate numpy 2 and name numpy.core.multiarray; those load too.
    blob = pickle.dumps(obj, protocol=2)
    assert b"numpy._core.multiarray" in blob
    old = safe_load(io.BytesIO(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")))
    assert np.array_equal(old[b"a"], obj[b"a"])


# --------------------------------------------------------------------------- synthetic

def test_synthetic_is_seeded_and_learnable_but_not_trivial() -> None:
    b = load_dataset("synthetic", num_classes=5, input_shape=(2, 16), num_samples=1500, seed=3)
    assert b.input_shape == (2, 16) and b.num_classes == 5 and len(b.train) == 1200 and len(b.test) == 300
    same = load_dataset("synthetic", num_classes=5, input_shape=(2, 16), num_samples=1500, seed=3)
    other = load_dataset("synthetic", num_classes=5, input_shape=(2, 16), num_samples=1500, seed=4)
    assert torch.equal(b.train.tensors[0], same.train.tensors[0])
    assert not torch.equal(b.train.tensors[0], other.train.tensors[0])
    from sklearn.linear_model import LogisticRegression

    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    acc = LogisticRegression(max_iter=1000).fit(x.flatten(1).numpy(), y.numpy()).score(xt.flatten(1).numpy(), yt.numpy())
    assert 0.4 < acc < 0.97, acc  # far above chance (0.2), yet not solved by a linear model
    noisy = load_dataset("synthetic", num_classes=5, input_shape=(2, 16), num_samples=1500, seed=3, noise=3.0)
    (nx, ny), (nxt, nyt) = noisy.train.tensors, noisy.test.tensors
    noisy_acc = LogisticRegression(max_iter=1000).fit(nx.flatten(1).numpy(), ny.numpy()).score(nxt.flatten(1).numpy(), nyt.numpy())
    assert noisy_acc < acc


# --------------------------------------------------------------------------- partitions

def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    # Unequal class sizes, shuffled.
    rng = np.random.default_rng(seed)
    return rng.choice(classes, size=n, p=np.linspace(1, 2, classes) / np.linspace(1, 2, classes).sum())


@pytest.mark.parametrize("scheme", ["iid", "class_disjoint", "dirichlet"])
@pytest.mark.parametrize("n_peers", [1, 3, 5])
def test_partition_disjoint_covering_reproducible(scheme: str, n_peers: int) -> None:
    y = _labels()
    parts = partition(y, n_peers, scheme=scheme, alpha=0.5, seed=7)
    assert len(parts) == n_peers and all(p.size > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert allidx.size == y.size and np.array_equal(np.sort(allidx), np.arange(y.size))
    again = partition(y, n_peers, scheme=scheme, alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    hist = partition_stats(y, parts)
    assert hist.shape == (n_peers, 10) and np.array_equal(hist.sum(0), np.bincount(y, minlength=10))
    assert describe_partition(y, parts).count("\n") == n_peers - 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_depends_on_seed(scheme: str) -> None:
    y = _labels()
    a, b = partition(y, 4, scheme, seed=0), partition(y, 4, scheme, seed=1)
    assert not all(np.array_equal(p, q) for p, q in zip(a, b))


def test_class_disjoint_really_is() -> None:
    y = _labels()
    parts = partition(y, 4, "class_disjoint")
    for p, idx in enumerate(parts):
        assert set(np.unique(y[idx]).tolist()) == {c for c in range(10) if c % 4 == p}
    hist = partition_stats(y, parts)
    assert np.all((hist > 0).sum(0) == 1)  # every class lives on exactly one peer
    with pytest.raises(ValueError, match="n_peers <= number of classes.*n_peers=11"):
        partition(y, 11, "class_disjoint")


def test_iid_is_class_balanced() -> None:
    y = _labels(n=1003)
    parts = partition(y, 6, "iid", seed=2)
    hist = partition_stats(y, parts)
    assert np.all(hist.max(0) - hist.min(0) <= 1)
    sizes = np.array([p.size for p in parts])
    assert sizes.max() - sizes.min() <= 1


def _skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each peer's class mix and the global one."""
    hist = partition_stats(y, parts).astype(float)
    glob = np.bincount(y, minlength=hist.shape[1]) / y.size
    return float(np.mean(0.5 * np.abs(hist / hist.sum(1, keepdims=True) - glob).sum(1)))


def test_dirichlet_skew_grows_as_alpha_shrinks_and_min_size_holds() -> None:
    y = _labels(n=2000)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        per_seed = [_skew(y, partition(y, 5, "dirichlet", alpha=alpha, seed=s)) for s in range(5)]
        skews.append(np.mean(per_seed))
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.1 and skews[2] > 0.4
    parts = partition(y, 5, "dirichlet", alpha=0.05, seed=0, min_size=30)
    assert min(p.size for p in parts) >= 30
    with pytest.raises(ValueError, match="no draw in 20 tries"):
        partition(y, 10, "dirichlet", alpha=0.001, seed=0, min_size=150, max_tries=20)


def test_partition_bad_input() -> None:
    y = _labels(n=20)
    with pytest.raises(ValueError, match="unknown partition scheme 'random'.*iid"):
        partition(y, 2, "random")
    with pytest.raises(ValueError, match="n_peers"):
        partition(y, 0)
    with pytest.raises(ValueError, match="20 samples among 21 peers"):
        partition(y, 21)
    with pytest.raises(ValueError, match="alpha > 0"):
        partition(y, 2, "dirichlet", alpha=0)


def test_train_val_split() -> None:
    idx = np.arange(100, 200)
    tr, va = train_val_split(idx, 0.2, seed=0)
    assert tr.size == 80 and va.size == 20
    assert np.array_equal(np.sort(np.concatenate([tr, va])), idx)
    tr2, va2 = train_val_split(idx, 0.2, seed=0)
    assert np.array_equal(va, va2) and not np.array_equal(va, train_val_split(idx, 0.2, seed=1)[1])
    tr, va = train_val_split(np.array([5, 9]), 0.01, seed=0)
    assert tr.size == 1 and va.size == 1
    tr, va = train_val_split(idx, 0.0)
    assert va.size == 0 and np.array_equal(tr, idx)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(idx, 1.0)


# --------------------------------------------------------------------------- loaders

def test_make_loader_is_deterministic_and_leaves_global_rng_alone() -> None:
    x = torch.arange(50, dtype=torch.float32).reshape(50, 1)
    y = torch.arange(50) % 3
    torch.manual_seed(0)
    state = torch.get_rng_state()

    def epochs(seed: int) -> list[list[int]]:
        loader = make_loader((x, y), batch_size=8, shuffle=True, seed=seed)
        out = []
        for _ in range(2):
            order = []
            for xb, yb in loader:
                assert xb.shape[1:] == (1,) and xb.dtype == torch.float32 and torch.equal(yb, xb[:, 0].long() % 3)
                order += xb[:, 0].long().tolist()
            out.append(order)
        return out

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert a == b and a != c
    assert sorted(a[0]) == list(range(50)) and a[0] != a[1]  # each epoch a fresh permutation
    assert torch.equal(torch.get_rng_state(), state)

    plain = make_loader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    assert torch.equal(torch.cat([xb for xb, _ in plain]), x)
    sub = make_loader((x, y), batch_size=4, indices=np.array([3, 7, 11]))
    assert torch.cat([xb for xb, _ in sub])[:, 0].tolist() == [3.0, 7.0, 11.0]
    share = tensor_subset((x, y), [1, 2])
    assert share.tensors[0][:, 0].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader((x, y), batch_size=0)


def test_partition_to_loader_end_to_end() -> None:
    b = load_dataset("synthetic", num_samples=600, seed=0)
    parts = partition(b.train_labels, 3, "class_disjoint")
    for p, idx in enumerate(parts):
        tr, va = train_val_split(idx, 0.1, seed=p)
        seen = torch.cat([yb for _, yb in make_loader(b.train, 32, shuffle=True, seed=p, indices=tr)])
        assert len(seen) == tr.size and set(seen.tolist()) <= {c for c in range(10) if c % 3 == p}
