"""Properties of every topology, mixing rule, schedule and membership change."""
from __future__ import annotations

import math

import numpy as np
import pytest

import dimat.topology as T

RULES = ("uniform", "metropolis")

# (name, n, kwargs) covering every constructor; all connected.
CONNECTED = [
    ("fully_connected", 6, {}),
    ("ring", 7, {}),
    ("torus", 12, {}),
    ("exponential", 8, {}),
    ("exponential", 6, {}),
    ("star", 5, {}),
    ("bipartite", 7, {}),
    ("erdos_renyi", 9, {"p": 0.4, "seed": 3}),
    ("edges", 4, {"edges": [(0, 1), (1, 2), (2, 3)]}),
]
UNDIRECTED = [c for c in CONNECTED if c[0] != "exponential"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name,n,kw", CONNECTED, ids=[f"{c[0]}{c[1]}" for c in CONNECTED])
def test_every_topology_is_connected_and_row_stochastic(name, n, kw, rule):
    topo = T.build_topology(name, n, rule=rule, **kw)
    assert topo.n == n and topo.peers == tuple(range(n)) and topo.rule == rule
    assert T.is_connected(topo) and T.is_connected(topo.W)
    assert T.is_row_stochastic(topo.W)
    assert (topo.W.diagonal() > 0).all()  # both rules keep a positive self weight
    assert 0.0 < T.spectral_gap(topo.W) <= 1.0 + 1e-12
    for i in range(n):
        w = topo.weights_for(i)
        assert math.isclose(sum(w.values()), 1.0, abs_tol=1e-12)
        assert set(w) == {i, *topo.in_neighbours(i)}
        for j in topo.out_neighbours(i):
            assert i in topo.in_neighbours(j)


@pytest.mark.parametrize("name,n,kw", UNDIRECTED, ids=[f"{c[0]}{c[1]}" for c in UNDIRECTED])
def test_metropolis_is_symmetric_and_doubly_stochastic_on_undirected_graphs(name, n, kw):
    W = T.build_topology(name, n, rule="metropolis", **kw).W
    assert T.is_doubly_stochastic(W)
    np.testing.assert_allclose(W, W.T, atol=1e-15)


def test_uniform_is_doubly_stochastic_exactly_on_regular_graphs():
    for topo in (T.ring(6), T.torus(9), T.exponential(8), T.exponential(5), T.fully_connected(4)):
        assert T.is_doubly_stochastic(topo.W), topo
    for topo in (T.star(5), T.bipartite(5)):  # irregular: columns do not sum to 1
        assert T.is_row_stochastic(topo.W) and not T.is_doubly_stochastic(topo.W), topo


def test_ring_uniform_weights_are_one_third():
    topo = T.ring(5)
    assert topo.weights_for(0) == pytest.approx({0: 1 / 3, 1: 1 / 3, 4: 1 / 3})
    assert sorted(topo.in_neighbours(2)) == [1, 3] and sorted(topo.out_neighbours(2)) == [1, 3]
    assert not topo.directed


def test_spectral_gap_fully_connected_uniform_is_one():
    for n in (2, 3, 5, 8):
        assert T.spectral_gap(T.fully_connected(n).W) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 8, 11, 16, 32])
def test_spectral_gap_ring_uniform_matches_closed_form(n):
    expected = 1.0 - (1.0 + 2.0 * math.cos(2.0 * math.pi / n)) / 3.0
    assert T.spectral_gap(T.ring(n)) == pytest.approx(expected, abs=1e-10)


def test_spectral_gap_zero_when_disconnected_and_shrinks_with_ring_size():
    assert T.spectral_gap(T.disconnected(4).W) == pytest.approx(0.0, abs=1e-12)
    assert T.spectral_gap(T.from_edges(4, [(0, 1), (2, 3)])) == pytest.approx(0.0, abs=1e-12)
    gaps = [T.spectral_gap(T.ring(n)) for n in (5, 10, 20)]
    assert gaps[0] > gaps[1] > gaps[2] > 0


def test_disconnected_and_isolated_checks():
    d = T.disconnected(3)
    np.testing.assert_array_equal(d.W, np.eye(3))
    assert not T.is_connected(d) and d.in_neighbours(0) == []
    assert T.is_connected(T.disconnected(1))
    assert not T.is_connected(T.from_edges(4, [(0, 1), (2, 3)]))
    # a one-way chain is weakly but not strongly connected: gossip cannot reach consensus
    assert not T.is_connected(T.from_edges(3, [(0, 1), (1, 2)], directed=True))
    assert T.is_connected(T.from_edges(3, [(0, 1), (1, 2), (2, 0)], directed=True))


def test_torus_degrees_and_shape():
    assert all(T.torus(16).degree(i) == 4 for i in range(16))  # 4 x 4
    t = T.torus(12, rows=3)  # 3 x 4
    assert all(t.degree(i) == 4 for i in range(12))
    assert sorted(t.in_neighbours(0)) == sorted([1, 3, 4, 8])
    assert all(T.torus(8).degree(i) == 3 for i in range(8))  # 2 x 4: up and down coincide
    assert all(w == pytest.approx(1 / 5) for w in T.torus(9).weights_for(4).values())


def test_exponential_degrees_and_direction():
    for n, d in ((2, 1), (5, 3), (8, 3), (9, 4), (16, 4)):
        topo = T.exponential(n)
        assert all(topo.degree(i) == d for i in range(n)), n
        assert all(len(topo.out_neighbours(i)) == d for i in range(n)), n
    topo = T.exponential(8)
    assert sorted(topo.out_neighbours(0)) == [1, 2, 4]
    assert sorted(topo.in_neighbours(0)) == [4, 6, 7]
    assert topo.directed
    assert T.exponential_offsets(8) == [1, 2, 4] and T.exponential_offsets(9) == [1, 2, 4, 8]


def test_star_and_bipartite_structure():
    s = T.star(5)
    assert sorted(s.in_neighbours(0)) == [1, 2, 3, 4] and s.in_neighbours(3) == [0]
    assert s.weights_for(3) == pytest.approx({3: 0.5, 0: 0.5})
    b = T.bipartite(5)
    assert sorted(b.in_neighbours(0)) == [2, 3, 4] and sorted(b.in_neighbours(4)) == [0, 1]


def test_erdos_renyi_reproducible_connected_and_seed_dependent():
    a = T.erdos_renyi(12, 0.25, seed=7)
    b = T.erdos_renyi(12, 0.25, seed=7)
    np.testing.assert_array_equal(a.W, b.W)
    assert T.is_connected(a)
    others = [T.erdos_renyi(12, 0.25, seed=s).adjacency for s in range(8, 12)]
    assert any(not np.array_equal(a.adjacency, o) for o in others)
    # p so small a connected draw is essentially impossible: bounded retries, then a clear error
    with pytest.raises(ValueError, match="no connected graph"):
        T.erdos_renyi(30, 0.01, seed=0, max_tries=5)
    with pytest.raises(ValueError, match="probability"):
        T.erdos_renyi(5, 1.5)


def test_mixing_matrix_rules_by_hand():
    # path 0 - 1 - 2: degrees 1, 2, 1
    adj = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
    np.testing.assert_allclose(
        T.mixing_matrix(adj, "uniform"), [[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 2, 1 / 2]]
    )
    np.testing.assert_allclose(
        T.mixing_matrix(adj, "metropolis"), [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]]
    )
    with pytest.raises(ValueError, match="unknown mixing rule 'max'"):
        T.mixing_matrix(adj, "max")


def test_validate_names_each_problem():
    with pytest.raises(ValueError, match="square"):
        T.validate(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="square"):
        T.validate(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        T.validate([[1.0, np.nan], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"negative entries \(first W\[0, 1\]"):
        T.validate([[1.5, -0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="not row-stochastic: row 1 sums to 0.9"):
        T.validate([[0.5, 0.5], [0.5, 0.4]])
    np.testing.assert_array_equal(T.validate([[0.5, 0.5], [0, 1]]), [[0.5, 0.5], [0, 1]])


def test_from_matrix_files_and_arrays(tmp_path):
    W = np.array([[0.5, 0.5, 0.0], [0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])
    np.save(tmp_path / "w.npy", W)
    np.savetxt(tmp_path / "w.csv", W, delimiter=",")
    np.savetxt(tmp_path / "w.txt", W)
    for f in ("w.npy", "w.csv", "w.txt"):
        topo = T.from_matrix(tmp_path / f)
        np.testing.assert_allclose(topo.W, W)
        assert topo.rule is None and topo.name == "matrix"
    # rounded text (1/3 written as 0.3333) is accepted and rows rescaled to sum to 1
    (tmp_path / "r.csv").write_text("0.3333,0.3333,0.3334\n0.5,0.5,0\n0,0.5,0.5\n")
    assert T.is_row_stochastic(T.from_matrix(tmp_path / "r.csv").W, atol=1e-12)
    # a rule keeps only the support
    np.testing.assert_allclose(T.from_matrix(W, rule="uniform").W[1], [1 / 3, 1 / 3, 1 / 3])
    topo = T.build_topology("matrix", 3, path=str(tmp_path / "w.csv"))
    np.testing.assert_allclose(topo.W, W)
    with pytest.raises(ValueError, match="3x3 but the run has 4 peers"):
        T.build_topology("matrix", 4, path=str(tmp_path / "w.csv"))
    (tmp_path / "bad.csv").write_text("0.5,0.6\n0.5,0.5\n")
    with pytest.raises(ValueError, match="row 0 sums to 1.1"):
        T.from_matrix(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        T.from_matrix(tmp_path / "nope.npy")
    (tmp_path / "w.json").write_text("[[1]]")
    with pytest.raises(ValueError, match=r"\.npy, \.csv or \.txt"):
        T.from_matrix(tmp_path / "w.json")
    (tmp_path / "junk.txt").write_text("a b\nc d\n")
    with pytest.raises(ValueError, match="cannot read"):
        T.from_matrix(tmp_path / "junk.txt")


def test_from_edges_validation():
    topo = T.from_edges(4, [(0, 1), (1, 2), (2, 2)])
    assert sorted(topo.in_neighbours(1)) == [0, 2] and topo.in_neighbours(3) == []
    d = T.from_edges(3, [(0, 1)], directed=True)
    assert d.in_neighbours(1) == [0] and d.out_neighbours(0) == [1] and d.in_neighbours(0) == []
    with pytest.raises(ValueError, match="outside 0..3"):
        T.from_edges(4, [(0, 4)])
    with pytest.raises(ValueError, match="pair"):
        T.from_edges(4, [(0, 1, 2)])


def test_build_topology_errors_and_aliases():
    with pytest.raises(ValueError, match="unknown topology 'hypercube'.*ring"):
        T.build_topology("hypercube", 4)
    with pytest.raises(ValueError, match="ring topology needs at least 3 peers, got 2"):
        T.build_topology("ring", 2)
    with pytest.raises(ValueError, match="7 is prime"):
        T.build_topology("torus", 7)
    with pytest.raises(ValueError, match="torus topology needs at least 4 peers"):
        T.build_topology("torus", 3)
    with pytest.raises(ValueError, match="rows=5 must divide n=12"):
        T.build_topology("torus", 12, rows=5)
    with pytest.raises(ValueError, match="bad arguments for topology 'ring'"):
        T.build_topology("ring", 5, p=0.3)
    with pytest.raises(ValueError, match="integer"):
        T.build_topology("ring", 4.5)
    with pytest.raises(ValueError, match="unknown mixing rule"):
        T.build_topology("ring", 5, rule="max-degree")
    assert T.build_topology("FC", 3).name == "fully_connected"
    assert T.build_topology("erdos-renyi", 5, p=0.9).name == "erdos_renyi"
    assert "ring" in T.available_topologies() and "matrix" in T.available_topologies()


def test_topology_is_immutable_and_checks_ids():
    topo = T.ring(4)
    with pytest.raises(ValueError):
        topo.W[0, 0] = 1.0  # read-only array
    with pytest.raises(AttributeError):
        topo.name = "x"
    with pytest.raises(ValueError, match="not in topology"):
        topo.weights_for(9)
    with pytest.raises(ValueError, match="unique"):
        T.Topology(np.eye(2), peers=(3, 3))
    with pytest.raises(ValueError, match="3 peer ids given for a 2x2"):
        T.Topology(np.eye(2), peers=(1, 2, 3))
    r = topo.relabel([10, 11, 12, 13])
    assert sorted(r.in_neighbours(10)) == [11, 13] and r.index_of(12) == 2
    g = topo.to_networkx()
    assert g.number_of_edges() == 8 and g[1][0]["weight"] == pytest.approx(1 / 3)


# --- schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 5, 8, 12])
def test_one_peer_exponential_hits_every_offset_each_period(n):
    sched = T.build_schedule("one_peer_exponential", n)
    L = math.ceil(math.log2(n))
    assert sched.period == L
    seen = set()
    union = np.zeros((n, n), dtype=bool)
    for r in range(L):
        topo = sched.at(r)
        assert T.is_doubly_stochastic(topo.W)
        off = 1 << r
        for i in range(n):
            # exactly one peer to talk to each round, at offset 2^(r mod L)
            assert topo.out_neighbours(i) == [(i + off) % n]
            assert topo.weights_for(i) == pytest.approx({i: 0.5, (i - off) % n: 0.5})
            seen.add(off)
        union |= topo.adjacency
    assert seen == set(T.exponential_offsets(n))
    np.testing.assert_array_equal(union, T.exponential(n).adjacency)
    np.testing.assert_array_equal(sched.at(L).W, sched.at(0).W)  # periodic


@pytest.mark.parametrize("n", [6, 7])
def test_random_matching_is_a_matching_and_reproducible(n):
    sched = T.RandomMatching(n, seed=11)
    again = T.build_schedule("random_matching", n, seed=11)
    distinct = set()
    for r in (5, 0, 3, 1):  # order of queries must not matter
        topo = sched.at(r)
        np.testing.assert_array_equal(topo.W, again.at(r).W)
        assert T.is_doubly_stochastic(topo.W) and not topo.directed
        degrees = [topo.degree(i) for i in range(n)]
        assert all(d <= 1 for d in degrees)
        assert sum(degrees) == 2 * (n // 2)  # perfect (even n) or near-perfect (odd n)
        for i in range(n):
            if degrees[i]:
                j = topo.in_neighbours(i)[0]
                assert topo.in_neighbours(j) == [i]
                assert topo.weights_for(i) == pytest.approx({i: 0.5, j: 0.5})
            else:
                assert topo.weights_for(i) == {i: 1.0}
        distinct.add(tuple(sorted(tuple(sorted(p)) for p in sched.pairs(r))))
    assert len(distinct) > 1
    assert sched.pairs(2) != T.RandomMatching(n, seed=12).pairs(2) or sched.pairs(3) != T.RandomMatching(n, seed=12).pairs(3)


def test_static_schedule_and_build_schedule_errors():
    s = T.build_schedule("ring", 5, rule="metropolis")
    assert isinstance(s, T.StaticSchedule) and isinstance(s, T.Schedule)
    assert s.at(0) is s.at(9) and s.at(3).rule == "metropolis"
    assert T.build_schedule("static", 6, topology="torus").at(0).name == "torus"
    with pytest.raises(ValueError, match="unknown topology or schedule 'spiral'"):
        T.build_schedule("spiral", 4)
    with pytest.raises(ValueError, match="needs topology="):
        T.build_schedule("static", 4)
    with pytest.raises(ValueError, match="bad arguments for schedule 'random_matching'"):
        T.build_schedule("random_matching", 4, p=3)
    with pytest.raises(ValueError, match="at least 2 peers"):
        T.OnePeerExponential(1)
    with pytest.raises(ValueError, match="non-negative"):
        s.at(-1)


# --- membership ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_without_peers_keeps_ids_and_recomputes_weights(rule):
    topo = T.ring(6, rule=rule)
    smaller = T.without_peers(topo, [2, 4])
    assert smaller.peers == (0, 1, 3, 5) and smaller.rule == rule and smaller.name == "ring"
    assert T.is_row_stochastic(smaller.W)
    if rule == "metropolis":
        assert T.is_doubly_stochastic(smaller.W)
    # remaining links: 5-0-1 path and isolated 3
    assert sorted(smaller.in_neighbours(0)) == [1, 5]
    assert smaller.in_neighbours(3) == [] and smaller.weights_for(3) == {3: 1.0}
    assert smaller.weights_for(1) == pytest.approx({1: 0.5, 0: 0.5} if rule == "uniform" else {1: 2 / 3, 0: 1 / 3})
    assert not T.is_connected(smaller)
    with pytest.raises(ValueError, match=r"cannot remove peers \[9\]"):
        T.without_peers(topo, [9])
    with pytest.raises(ValueError, match="every peer"):
        T.without_peers(topo, range(6))


@pytest.mark.parametrize("rule", RULES)
def test_with_peer_adds_links_both_ways(rule):
    topo = T.without_peers(T.fully_connected(4, rule=rule), [1])  # peers 0, 2, 3
    bigger = T.with_peer(topo, 7, [0, 3])
    assert bigger.peers == (0, 2, 3, 7) and bigger.index_of(7) == 3
    assert T.is_row_stochastic(bigger.W) and T.is_connected(bigger)
    if rule == "metropolis":
        assert T.is_doubly_stochastic(bigger.W)
    assert sorted(bigger.in_neighbours(7)) == [0, 3] and sorted(bigger.out_neighbours(7)) == [0, 3]
    assert sorted(bigger.in_neighbours(2)) == [0, 3]
    back = T.without_peers(bigger, [7])
    np.testing.assert_allclose(back.W, topo.W)
    with pytest.raises(ValueError, match="already in topology"):
        T.with_peer(topo, 2, [0])
    with pytest.raises(ValueError, match="peer 1 is not in topology"):
        T.with_peer(topo, 8, [1])


def test_membership_on_explicit_weights():
    W = np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.0, 0.5, 0.5]])
    topo = T.from_matrix(W)
    smaller = T.without_peers(topo, [1])
    np.testing.assert_allclose(smaller.W, [[2 / 3, 1 / 3], [0.0, 1.0]])
    assert smaller.peers == (0, 2)
    with pytest.raises(ValueError, match="explicit weights; pass rule="):
        T.with_peer(topo, 3, [0])
    assert T.with_peer(topo, 3, [0], rule="uniform").weights_for(3) == pytest.approx({3: 0.5, 0: 0.5})


def test_renormalise_drops_missing_and_rescales():
    w = T.ring(5).weights_for(0)  # {0: 1/3, 1: 1/3, 4: 1/3}
    assert T.renormalise(w, {0, 1, 4}) == pytest.approx(w)
    assert T.renormalise(w, {0, 1}) == pytest.approx({0: 0.5, 1: 0.5})
    assert T.renormalise(w, set(), self_id=0) == pytest.approx({0: 1.0})
    uneven = {3: 0.5, 1: 0.3, 2: 0.2}
    out = T.renormalise(uneven, {3, 2})
    assert out == pytest.approx({3: 0.5 / 0.7, 2: 0.2 / 0.7})
    assert out[3] / out[2] == pytest.approx(0.5 / 0.2)  # ratios unchanged
    assert T.renormalise({0: 0.0, 1: 1.0}, set(), self_id=0) == {0: 1.0}
    with pytest.raises(ValueError, match="no positive weight"):
        T.renormalise({0: 0.0, 1: 1.0}, {0})
    with pytest.raises(ValueError, match="non-negative"):
        T.renormalise({0: -0.5, 1: 1.5}, {0, 1})
