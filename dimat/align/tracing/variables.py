"""The tracer's axis variables: a union-find over tensor axes, with a reason where an axis is fixed."""
from __future__ import annotations

class TraceError(ValueError):
    """The tracer met something it cannot see through (the message names the node)."""


# ----------------------------------------------------------------------------- union-find
class _Vars:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}

    def new(self, size: int, fixed: str | None = None) -> int:
        v = len(self.parent)
        self.parent.append(v)
        self.size.append(int(size))
        if fixed is None and int(size) <= 1:
            fixed = "a single unit"
        if fixed is not None:
            self.fixed[v] = fixed
        return v

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] != self.size[rb]:
            raise TraceError(f"{where}: joins axes of sizes {self.size[ra]} and {self.size[rb]}")
        self.parent[rb] = ra
        if rb in self.fixed and ra not in self.fixed:
            self.fixed[ra] = self.fixed[rb]
        return True

    def fix(self, v: int, reason: str) -> bool:
        r = self.find(v)
        if r in self.fixed:
            return False
        self.fixed[r] = reason
        return True

    def is_fixed(self, v: int) -> bool:
        return self.find(v) in self.fixed
