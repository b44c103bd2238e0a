"""Compression between the peer and every transport (``exchange:`` in the config).

``codecs`` (one tensor <-> its wire parts, fixed layouts), ``payload`` (a whole state's wire form
and its schema), ``feedback`` (error-feedback residuals), ``reference`` (delta references and the
full-state fallback), ``compressor`` (the step the round loop calls: encode, decode + checks).
"""
from dimat.exchange.codecs import CHANGE_ONLY, CODECS, SPARSE, CodecError, CodecSettings, get_codec
from dimat.exchange.compressor import Compressor
from dimat.exchange.payload import wire_schema

__all__ = ["CHANGE_ONLY", "CODECS", "SPARSE", "CodecError", "CodecSettings", "Compressor", "get_codec", "wire_schema"]
