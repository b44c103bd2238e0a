"""``build_transport(settings, ...)``: the transport a :class:`TransportSettings` describes, every value passed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from dimat.transport.base import Transport
from dimat.transport.inproc import InProcTransport
from dimat.transport.security import TlsConfig
from dimat.transport.settings import TlsSettings, TransportSettings


def tls_config(tls: TlsSettings | None, peer_id: int) -> TlsConfig | None:
    """The :class:`~dimat.transport.security.TlsConfig` for ``peer_id`` (``{id}`` filled), or None when TLS is off.

    Args:
        tls: ``transport.tls``.
        peer_id: the id that replaces ``{id}`` in a path.
    """
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
    # grpc and torchdist are imported when chosen, not at the top: the grpc package generates its
    # protobuf code at import (dimat.transport.protogen) and torchdist pulls in torch.distributed, so
    # a run on one transport loads neither of the others
    if settings.name == "inproc":
        return InProcTransport(share_states=share_states)
    if settings.name == "grpc":
        from dimat.transport.grpc import GrpcTransport

        if peer_id is None or peers is None:
            raise ValueError("the grpc transport needs peer_id and peers")
        token = (os.environ.get(settings.token_env) or None) if settings.token_env else None
        return GrpcTransport(peer_id, peers, settings, bind=bind, token=token, tls=tls_config(settings.tls, peer_id),
                             report_path=report_path)
    if settings.name == "torchdist":
        from dimat.transport.torchdist import TorchDistTransport

        if n_peers is None:
            raise ValueError("the torchdist transport needs n_peers")
        assert settings.pg_timeout is not None
        return TorchDistTransport(n_peers, backend=settings.backend, pg_timeout=settings.pg_timeout, device=device)
    raise ValueError(f"transport.name {settings.name!r} is not a transport")
