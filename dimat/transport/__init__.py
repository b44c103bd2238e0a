"""Transports: how peers' states move (in-process, gRPC, torch.distributed). See :mod:`.base` for the contract."""
from dimat.transport.base import DataLossError, ExchangeResult, StateDict, Transport, TransportError
from dimat.transport.factory import build_transport
from dimat.transport.settings import TlsSettings, TransportSettings

__all__ = [
    "DataLossError", "ExchangeResult", "StateDict", "Transport", "TransportError", "TlsSettings",
    "TransportSettings", "build_transport",
]
