"""The documented architecture, checked: import direction (docs/architecture.md) and module size."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: the layers of docs/architecture.md, lowest first: a module imports only its own package and lower layers
LAYERS = [
    {"atomic", "files", "typing", "seeds", "plugins", "runtime", "_generated"},
    {"transport", "topology", "align", "metrics", "data", "train"},
    {"models", "exchange", "merge"},
    {"config"},
    {"peer", "attacks"},
    {"methods"},
    {"federation"},
    {"entry"},
    {"cli", "grpc_peer", "launch", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every dimat import in ``path``, function-level ones included, TYPE_CHECKING not."""
    me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    tree = ast.parse(path.read_text() if source is None else source)
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                found.append((node.lineno, ".".join(package) + (f".{node.module}" if node.module else "")))
            else:
                found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m == "dimat" or m.startswith("dimat.")]


def test_every_package_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in (ROOT / "dimat").iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names <= set(RANK), sorted(names - set(RANK))


def test_imports_point_down() -> None:
    upward = []
    for path in sorted((ROOT / "dimat").rglob("*.py")):
        mine = _component(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, module in _imports(path):
            other = _component(module)
            if other != mine and RANK[other] > RANK[mine]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {module} ({other})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_an_upward_import() -> None:
    """The rule can fail: a function-level import of the round loop from the merge package is upward,
    a relative one resolves, and a TYPE_CHECKING one does not count."""
    assert RANK["federation"] > RANK["merge"]
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dimat.entry import compose\n"
              "def f():\n    from dimat.federation import rounds\n    from ..config import RunConfig\n")
    assert _imports(ROOT / "dimat" / "merge" / "probe.py", source) == [(5, "dimat.federation"), (6, "dimat.config")]


def test_no_module_is_over_600_lines() -> None:
    """Small modules that each own one concept: a module past 600 lines owns more than one."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "dimat").rglob("*.py")
            if "_generated" not in p.parts and (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
