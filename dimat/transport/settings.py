"""Typed transport settings, read once from the ``transport`` config node (``configs/transport/*.yaml``).

The configs hold every value; this module holds none of its own: a key the chosen transport
needs but the mapping lacks is an error, as is a key no transport knows or one that does not apply
to the chosen transport. Keys that do not apply are ``None`` in :class:`TransportSettings`. Every
error is one line naming the key, e.g. ``transport.chunk_bytes must be a positive integer (got 'x')``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from dimat.files import BadFileError, describe
from dimat.transport.wire import HASH_ALGORITHMS, MAX_STREAMS

TRANSPORTS = ("inproc", "grpc", "torchdist")
MAX_CHUNK_BYTES = 64 << 20  # gRPC message limits are sized from the chunk


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """``transport.tls``: TLS is on when ``dir`` or ``cert`` is set; ``{id}`` in a path becomes the peer id."""

    dir: str | None
    cert: str | None
    key: str | None
    ca: str | None
    mutual: bool
    server_name_override: str | None

    @property
    def enabled(self) -> bool:
        return bool(self.dir or self.cert)


@dataclass(frozen=True, kw_only=True)
class TransportSettings:
    """Every key of ``configs/transport/{inproc,grpc,torchdist}.yaml``; ``None`` where it does not apply."""

    name: str
    timeout: float | None  # per-neighbour deadline of one exchange (seconds); None: the transport's own bound
    # grpc
    startup_timeout: float | None
    retries: int | None
    chunk_bytes: int | None
    num_streams: int | None
    hash: str | None
    max_rounds_ahead: int | None
    heartbeat_interval: float | None
    max_missed_heartbeats: int | None
    delay: float | None
    token_env: str | None
    require_cert_identity: bool | None
    tls: TlsSettings | None
    # grpc: server bounds against stalled, slow or hostile clients (docs/grpc.md, "Threat model")
    max_concurrent_rpcs: int | None
    max_concurrent_streams: int | None
    max_streams_per_sender: int | None
    stream_idle_timeout: float | None
    # grpc: where this peer listens (issue 13)
    bind: str | None
    # torchdist
    backend: str | None
    pg_timeout: float | None

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "TransportSettings":
        """Validate the ``transport`` config node; raises ``ValueError`` (one line, naming the key)."""
        if not isinstance(m, Mapping):
            raise ValueError(f"transport must be a mapping (got {type(m).__name__})")
        name = m.get("name")
        if name not in TRANSPORTS:
            raise ValueError(f"transport.name must be one of {list(TRANSPORTS)} (got {name!r})")
        spec = _SPECS[name]
        known = {f.name for f in fields(cls)}
        for key in m:
            if key not in known:
                raise ValueError(f"transport.{key} is not a transport setting (known: {sorted(known)})")
            if key not in spec and key != "name":
                raise ValueError(f"transport.{key} does not apply to the {name} transport (it takes {sorted(spec)})")
        values: dict[str, Any] = {k: None for k in known}
        values["name"] = name
        for key, check in spec.items():
            if key not in m:
                raise ValueError(f"transport.{key} is missing (the {name} transport needs it)")
            values[key] = check(f"transport.{key}", m[key])
        out = cls(**values)
        if out.require_cert_identity and not (out.tls is not None and out.tls.mutual):
            raise ValueError("transport.require_cert_identity needs transport.tls.mutual: true")
        if out.max_concurrent_streams is not None and out.max_concurrent_streams >= (out.max_concurrent_rpcs or 0):
            raise ValueError(f"transport.max_concurrent_streams must be below transport.max_concurrent_rpcs "
                             f"({out.max_concurrent_rpcs}) so health checks and heartbeats keep workers "
                             f"(got {out.max_concurrent_streams})")
        if out.max_streams_per_sender is not None and (out.num_streams or 1) > out.max_streams_per_sender:
            raise ValueError(f"transport.num_streams ({out.num_streams}) must not exceed transport.max_streams_per_sender "
                             f"({out.max_streams_per_sender}): a receiver would refuse the extra streams")
        return out


    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "TransportSettings":
        """Read one transport config file (``configs/transport/<name>.yaml``), apply ``overrides``
        (config keys, e.g. ``timeout=3``) and validate: the defaults of a transport built outside a
        composed config (tests, benchmarks, library use) come from the same file as a run's.

        Args:
            path: the YAML file.
            overrides: keys replacing the file's values (``tls`` as a mapping of its keys to change).
        """
        try:
            m = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise BadFileError(path, f"not a readable transport config ({describe(exc)})") from None
        if not isinstance(m, Mapping):
            raise BadFileError(path, "not a transport config (expected a mapping)")
        m = dict(m)
        if isinstance(overrides.get("tls"), Mapping) and isinstance(m.get("tls"), Mapping):
            overrides["tls"] = {**m["tls"], **overrides["tls"]}
        return cls.from_mapping({**m, **overrides})


# ----------------------------------------------------------------------------- value checks


def _show(v: Any) -> str:
    return repr(v)


def _int(key: str, v: Any, lo: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key} must be a {what} integer (got {_show(v)})")
    return int(v)


def _pos_int(key: str, v: Any) -> int:
    return _int(key, v, 1, "positive")


def _nonneg_int(key: str, v: Any) -> int:
    return _int(key, v, 0, "non-negative")


def _number(key: str, v: Any, *, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{key} must be a {'positive' if positive else 'non-negative'} number (got {_show(v)})")
    return float(v)


def _pos(key: str, v: Any) -> float:
    return _number(key, v, positive=True)


def _pos_or_none(key: str, v: Any) -> float | None:
    return None if v is None else _number(key, v, positive=True)


def _nonneg(key: str, v: Any) -> float:
    return _number(key, v, positive=False)


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false (got {_show(v)})")
    return v


def _choice(options: tuple[str | None, ...]) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        if v not in options:
            raise ValueError(f"{key} must be one of {list(options)} (got {_show(v)})")
        return v

    return check


def _str_or_none(key: str, v: Any) -> str | None:
    if v is not None and (not isinstance(v, str) or not v):
        raise ValueError(f"{key} must be a non-empty string or null (got {_show(v)})")
    return v


def _chunk_bytes(key: str, v: Any) -> int:
    n = _pos_int(key, v)
    if n > MAX_CHUNK_BYTES:
        raise ValueError(f"{key} must be at most {MAX_CHUNK_BYTES} (64 MiB) (got {n})")
    return n


def _num_streams(key: str, v: Any) -> int:
    n = _pos_int(key, v)
    if n > MAX_STREAMS:
        raise ValueError(f"{key} must be at most {MAX_STREAMS} (got {n})")
    return n


def _bind(key: str, v: Any) -> str | None:
    """``host`` or ``host:port`` (null: listen on the advertised address from the peers file)."""
    if v is None:
        return None
    if not isinstance(v, str) or not v or v.endswith(":"):
        raise ValueError(f"{key} must be host or host:port, or null (got {_show(v)})")
    host, sep, port = ("", "", v) if v.endswith("]") else v.rpartition(":")  # "[::]": a host only
    if sep and not host.endswith("]") and ":" in host:
        raise ValueError(f"{key}: write an IPv6 address in brackets, e.g. [::]:50051 (got {_show(v)})")
    if sep and host and not (port.isdigit() and int(port) < 65536):
        raise ValueError(f"{key} must be host or host:port with a port in 0..65535 (got {_show(v)})")
    return v


_TLS_SPEC: dict[str, Callable[[str, Any], Any]] = {
    "dir": _str_or_none, "cert": _str_or_none, "key": _str_or_none, "ca": _str_or_none,
    "mutual": _bool, "server_name_override": _str_or_none,
}


def _tls(key: str, v: Any) -> TlsSettings:
    if not isinstance(v, Mapping):
        raise ValueError(f"{key} must be a mapping with keys {sorted(_TLS_SPEC)} (got {_show(v)})")
    for k in v:
        if k not in _TLS_SPEC:
            raise ValueError(f"{key}.{k} is not a TLS setting (known: {sorted(_TLS_SPEC)})")
    vals = {}
    for k, check in _TLS_SPEC.items():
        if k not in v:
            raise ValueError(f"{key}.{k} is missing")
        vals[k] = check(f"{key}.{k}", v[k])
    tls = TlsSettings(**vals)
    if tls.cert and not tls.dir and not (tls.key and tls.ca):
        raise ValueError(f"{key}.cert is set without {key}.dir: {key}.key and {key}.ca must be set too")
    return tls


_SPECS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "inproc": {"timeout": _pos_or_none},
    "grpc": {
        "timeout": _pos, "startup_timeout": _pos, "retries": _nonneg_int, "chunk_bytes": _chunk_bytes,
        "num_streams": _num_streams, "hash": _choice(HASH_ALGORITHMS),
        "max_rounds_ahead": _nonneg_int, "heartbeat_interval": _pos_or_none, "max_missed_heartbeats": _pos_int,
        "delay": _nonneg, "token_env": _str_or_none, "require_cert_identity": _bool, "tls": _tls,
        # server bounds (issue 12)
        "max_concurrent_rpcs": _pos_int, "max_concurrent_streams": _pos_int, "max_streams_per_sender": _pos_int,
        "stream_idle_timeout": _pos,
        "bind": _bind,
    },
    "torchdist": {"backend": _choice((None, "gloo", "nccl")), "timeout": _pos_or_none, "pg_timeout": _pos},
}
