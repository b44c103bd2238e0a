"""Generate the Python gRPC code for ``protos/dimat/v1/peer.proto`` (never edited by hand, never stale).

The generated modules live in the git-ignored package ``dimat/_generated``. :func:`load` regenerates
them whenever they are missing or a stamp (hash of the proto text and the grpcio-tools/protobuf
versions) differs, so a changed proto or an upgraded protobuf runtime can never run stale code.
Generation holds an exclusive file lock and moves finished files into place with atomic renames, the
stamp last, so concurrent processes (a launcher starting N peers at once) neither race nor import a
half-written module. ``python -m dimat.transport.protogen`` does the same explicitly (e.g. before
building a wheel, so the generated package ships inside it).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import google.protobuf
import grpc_tools
from grpc_tools import protoc

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../dimat
PROTO_ROOT = PACKAGE_DIR.parent / "protos"
PROTO_FILE = "dimat/v1/peer.proto"
OUT_DIR = PACKAGE_DIR / "_generated"
STAMP = "STAMP"
_MODULES = ("peer_pb2.py", "peer_pb2.pyi", "peer_pb2_grpc.py")


def _stamp_text(proto_text: bytes) -> str:
    versions = f"grpcio-tools={getattr(grpc_tools, '__version__', '?')};protobuf={google.protobuf.__version__}"
    try:  # grpc_tools keeps its version in a submodule
        from grpc_tools import grpc_version

        versions += f";gt={grpc_version.VERSION}"
    except ImportError:
        pass
    return hashlib.sha256(proto_text + b"\0" + versions.encode()).hexdigest()


def _current_stamp() -> str | None:
    try:
        return (OUT_DIR / STAMP).read_text().strip()
    except FileNotFoundError:
        return None


def _proto_text() -> bytes:
    path = PROTO_ROOT / PROTO_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: dimat's generated gRPC code needs the proto sources "
            "(run from a source checkout or an editable install, or build the wheel after "
            "`python -m dimat.transport.protogen`)"
        )
    return path.read_bytes()


@contextlib.contextmanager
def _locked():
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _protoc(out: Path) -> None:
    include = Path(protoc.__file__).resolve().parent / "_proto"  # well-known types
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO_ROOT / PROTO_FILE}")


def generate(force: bool = False) -> bool:
    """(Re)generate ``dimat/_generated`` if missing or stale; return True if files were written."""
    proto = _proto_text()
    want = _stamp_text(proto)
    if not force and _current_stamp() == want:
        return False
    with _locked():
        if not force and _current_stamp() == want:  # another process did it while we waited
            return False
        with tempfile.TemporaryDirectory(dir=OUT_DIR, prefix=".gen-") as tmp:
            tmp_path = Path(tmp)
            _protoc(tmp_path)
            src = tmp_path / Path(PROTO_FILE).parent
            # protoc names modules after the proto path (dimat.v1.peer_pb2), which would collide with
            # the real dimat package; the generated stub imports its messages relatively instead.
            grpc_py = src / "peer_pb2_grpc.py"
            text = grpc_py.read_text()
            text, n = re.subn(r"^from dimat\.v1 import peer_pb2", "from . import peer_pb2", text, flags=re.M)
            if n != 1:
                raise RuntimeError("unexpected grpc_tools output: cannot find the peer_pb2 import to relocate")
            grpc_py.write_text(text)
            (src / "__init__.py").write_text('"""Generated from protos/dimat/v1/peer.proto by dimat.transport.protogen."""\n')
            (src / STAMP).write_text(want + "\n")
            # rename each file into place (atomic per file), stamp last: a reader that sees the new
            # stamp also sees the new modules.
            for name in ("__init__.py", *_MODULES, STAMP):
                os.replace(src / name, OUT_DIR / name)
    return True


def load() -> tuple[ModuleType, ModuleType]:
    """Return ``(peer_pb2, peer_pb2_grpc)``, generating them first when needed."""
    if _current_stamp() is None or (PROTO_ROOT / PROTO_FILE).is_file():
        generate()
    pb2 = importlib.import_module("dimat._generated.peer_pb2")
    pb2_grpc = importlib.import_module("dimat._generated.peer_pb2_grpc")
    return pb2, pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    force = "--force" in args
    wrote = generate(force=force)
    print(f"{'generated' if wrote else 'up to date'}: {OUT_DIR} from {PROTO_ROOT / PROTO_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
