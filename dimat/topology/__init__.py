"""Who merges whom: weighted communication graphs, mixing rules, schedules and membership changes.

``W[i, j]`` is the weight peer ``i`` gives to peer ``j``'s model (rows sum to 1). See `core` for the
`Topology` value and checks, `graphs` for the constructors, `schedules` for time-varying graphs and
`membership` for peers leaving/joining and late neighbours.
"""
from dimat.topology.core import (
    RULES,
    Topology,
    is_connected,
    is_doubly_stochastic,
    is_row_stochastic,
    mixing_matrix,
    spectral_gap,
    validate,
)
from dimat.topology.graphs import (
    available_topologies,
    bipartite,
    build_topology,
    disconnected,
    erdos_renyi,
    exponential,
    exponential_offsets,
    from_edges,
    from_matrix,
    fully_connected,
    load_matrix,
    ring,
    star,
    torus,
)
from dimat.topology.membership import renormalise, with_peer, without_peers
from dimat.topology.schedules import (
    OnePeerExponential,
    RandomMatching,
    Schedule,
    StaticSchedule,
    build_schedule,
)

__all__ = [
    "RULES", "Topology", "is_connected", "is_doubly_stochastic", "is_row_stochastic", "mixing_matrix",
    "spectral_gap", "validate", "available_topologies", "bipartite", "build_topology", "disconnected",
    "erdos_renyi", "exponential", "exponential_offsets", "from_edges", "from_matrix", "fully_connected",
    "load_matrix", "ring", "star", "torus", "renormalise", "with_peer", "without_peers",
    "OnePeerExponential", "RandomMatching", "Schedule", "StaticSchedule", "build_schedule",
]
