"""``build_transport(settings, ...)``: the transport a :class:`TransportSettings` describes, every value passed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from dimat.transport.base import Transport
from dimat.transport.settings import TlsSettings, TransportSettings


def tls_config(tls: TlsSettings | None, peer_id: int):
    """The :class:`~dimat.transport.security.TlsConfig` for ``peer_id`` (``{id}`` filled), or None when TLS is off."""
    from dimat.transport.security import TlsConfig

    if tls is None or not tls.enabled:
        return None
    d = Path(tls.dir) if tls.dir else None

    def fill(s: str | None) -> str | None:
        return None if s is None else s.replace("{id}", str(peer_id))

    return TlsConfig(
        cert=fill(tls.cert) or d / f"peer-{peer_id}.pem",  # type: ignore[operator]
        key=fill(tls.key) or d / f"peer-{peer_id}.key",  # type: ignore[operator]
        ca=fill(tls.ca) or d / "ca.pem",  # type: ignore[operator]
        mutual=tls.mutual,
        server_name_override=tls.server_name_override,
    )


def build_transport(
    settings: TransportSettings,
    *,
    peer_id: int | None = None,
    peers: Mapping[int, str] | None = None,
    n_peers: int | None = None,
    report_path: str | None = None,
    device: torch.device | str | None = None,
    bind: str | None = None,
    share_states: bool = False,
) -> Transport:
    """inproc -> InProcTransport; grpc -> GrpcTransport(peer_id, peers); torchdist -> TorchDistTransport(n_peers).

    For grpc, TLS paths get ``{id}`` replaced by ``peer_id`` and the token is read from the
    environment variable named by ``token_env`` (unset or empty: no token); secrets never sit in configs.
    ``share_states`` (inproc only): receivers read the sent states themselves instead of copies.
    """
    if settings.name == "inproc":
        from dimat.transport.inproc import InProcTransport

        return InProcTransport(share_states=share_states)
    if settings.name == "grpc":
        from dimat.transport.grpc import GrpcTransport

        if peer_id is None or peers is None:
            raise ValueError("the grpc transport needs peer_id and peers")
        s = settings
        token = (os.environ.get(s.token_env) or None) if s.token_env else None
        assert s.timeout is not None and s.retries is not None and s.chunk_bytes is not None  # from_mapping's doing
        return GrpcTransport(
            peer_id, peers, bind=bind or s.bind, token=token, tls=tls_config(s.tls, peer_id),
            deadline=s.timeout, retries=s.retries, chunk_bytes=s.chunk_bytes, num_streams=s.num_streams,
            hash_algorithm=s.hash, max_rounds_ahead=s.max_rounds_ahead,
            require_cert_identity=s.require_cert_identity, heartbeat_interval=s.heartbeat_interval,
            max_missed_heartbeats=s.max_missed_heartbeats, report_path=report_path, delay=s.delay,
            max_concurrent_rpcs=s.max_concurrent_rpcs, max_concurrent_streams=s.max_concurrent_streams,
            max_streams_per_sender=s.max_streams_per_sender, stream_idle_timeout=s.stream_idle_timeout,
        )  # type: ignore[arg-type]
    if settings.name == "torchdist":
        from dimat.transport.torchdist import TorchDistTransport

        if n_peers is None:
            raise ValueError("the torchdist transport needs n_peers")
        assert settings.pg_timeout is not None
        return TorchDistTransport(n_peers, backend=settings.backend, pg_timeout=settings.pg_timeout, device=device)
    raise ValueError(f"transport.name {settings.name!r} is not a transport")
