"""TLS / mutual-TLS credentials from certificate files and shared-token authentication for gRPC peers."""
from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from dimat.files import BadFileError, describe

log = logging.getLogger("dimat.transport.grpc")

TOKEN_HEADER = "authorization"
#: methods reachable without the token (load balancers and launchers probe health unauthenticated)
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TLS {what} file not found: {p}")
    return p.read_bytes()


def check_pem_files(cert: str | Path, key: str | Path, ca: str | Path | None) -> None:
    """Parse the certificate, its key and the CA bundle (stdlib ``ssl``) before gRPC sees them.

    gRPC reports a bad file only as "Failed to bind"; this names it: a
    :class:`~dimat.files.BadFileError` ``<file>: <problem>`` (a missing file: FileNotFoundError).
    """
    for path, what in ((cert, "cert"), (key, "key"), (ca, "ca")):
        if path is not None:
            _read(path, what)
    for path in (cert, ca):
        if path is None:
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise BadFileError(path, f"not a PEM certificate ({describe(exc)})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise BadFileError(key, f"not a PEM private key, or not the key of {cert} ({describe(exc)})") from None


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files for one peer. ``mutual=True`` makes servers demand and verify client certs.

    ``cert``/``key``: this peer's certificate chain and private key (PEM), used as server identity and,
    with mutual TLS, as client identity. ``ca``: the CA bundle that signs peers' certificates.
    """

    cert: str | Path
    key: str | Path
    ca: str | Path
    mutual: bool = False
    server_name_override: str | None = None  # when dialling an address the certificate does not name

    def check(self) -> None:
        """Every file exists and parses (:func:`check_pem_files`)."""
        check_pem_files(self.cert, self.key, self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        self.check()
        return grpc.ssl_server_credentials(
            [(_read(self.key, "key"), _read(self.cert, "cert"))],
            root_certificates=_read(self.ca, "ca") if self.mutual else None,
            require_client_auth=self.mutual,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "ca"),
            private_key=_read(self.key, "key") if self.mutual else None,
            certificate_chain=_read(self.cert, "cert") if self.mutual else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name_override)] if self.server_name_override else []


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address's host part, brackets allowed) names this machine only."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, *, token: str | None, tls: "TlsConfig | None") -> bool:
    """Warn loudly when serving beyond loopback with neither token nor TLS; returns whether it warned.

    Anyone who reaches the port can then push weights as any peer, send heartbeats and Leaves in
    its name and hold streams open (docs/grpc.md, "Threat model").
    """
    if is_loopback(host) or token or tls is not None:
        return False
    log.warning(
        "!!! dimat peer is listening on %s with NO authentication (no token, no TLS): anyone who "
        "reaches this port can push weights and speak for any peer. Make certificates with "
        "`launch/make_certs.sh certs/ <num_peers>` and set transport.tls.dir=certs transport.tls.mutual=true "
        "transport.require_cert_identity=true, or at least export a shared token in $DIMAT_TOKEN "
        "(transport.token_env). !!!", host)
    return True


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_HEADER, f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose ``authorization`` metadata is not ``Bearer <token>`` (constant-time compare)."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("token must be a non-empty string")
        self._expected = f"Bearer {token}".encode()

    def _ok(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == TOKEN_HEADER:
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)
        return False

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS) or self._ok(handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        msg = f"missing or wrong authentication token for {handler_call_details.method}"

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)
