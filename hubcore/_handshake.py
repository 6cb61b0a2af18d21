"""The handshake (spec §2): always JSON text and RS, whatever the hub protocol.

Request: ``{"protocol":"json","version":1}``; unknown keys are ignored.
Response: exactly ``{}`` on success, ``{"error":"..."}`` on failure, and never a
``type`` key (the JS client would reject it).
"""

from __future__ import annotations

from typing import Final

from ._errors import RemoteProtocolError
from ._events import HandshakeRequest, HandshakeResponse
from ._json import _dumps, loads_json

__all__ = [
    "HANDSHAKE_CANCELED",
    "HANDSHAKE_FAILED",
    "parse_handshake_request",
    "parse_handshake_response",
    "write_handshake_request",
    "write_handshake_response",
]

RS: Final = b"\x1e"
#: ASP.NET Core's texts (HubConnectionContext.HandshakeAsync).
HANDSHAKE_CANCELED: Final = "Handshake was canceled."
HANDSHAKE_FAILED: Final = "An unexpected error occurred during connection handshake."
_OK: Final = b"{}" + RS


def unsupported_protocol(name: str) -> str:
    return f"The protocol '{name}' is not supported."


def unsupported_version(name: str, version: int) -> str:
    return f"The server does not support version {version} of the '{name}' protocol."


def _failed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"Invalid handshake request: {detail}", handshake_error=HANDSHAKE_FAILED
    )


def parse_handshake_request(payload: bytes) -> HandshakeRequest:
    """Parse the client's handshake record (without its RS).

    Raises:
        RemoteProtocolError: with ``handshake_error`` set to ASP.NET Core's
            "An unexpected error occurred during connection handshake." text.
    """
    try:
        obj = loads_json(payload)
    except RemoteProtocolError as exc:
        raise _failed(str(exc)) from exc
    if type(obj) is not dict:
        raise _failed("expected a JSON object")
    if "type" in obj:
        # A hub message where the handshake belongs (ASP.NET Core fails the same way).
        raise _failed("the first message must be the handshake")
    protocol = obj.get("protocol")
    version = obj.get("version")
    if type(protocol) is not str or not protocol:
        raise _failed("'protocol' must be a non-empty string")
    if type(version) is not int:
        raise _failed("'version' must be an integer")
    return HandshakeRequest(protocol=protocol, version=version)


def write_handshake_request(request: HandshakeRequest) -> bytes:
    """Encode a handshake request as the JS client does (``protocol`` then ``version``)."""
    return _dumps({"protocol": request.protocol, "version": request.version}).encode() + RS


def write_handshake_response(response: HandshakeResponse) -> bytes:
    """Encode ``{}`` + RS, or ``{"error":...}`` + RS."""
    if response.error is None:
        return _OK
    return _dumps({"error": response.error}).encode("ascii") + RS


def parse_handshake_response(payload: bytes) -> HandshakeResponse:
    """Parse the server's handshake response (client role).

    Raises:
        RemoteProtocolError: not a JSON object, or a hub message instead of the
            response ("Expected a handshake response from the server.").
    """
    obj = loads_json(payload)
    if type(obj) is not dict or "type" in obj:
        raise RemoteProtocolError("Expected a handshake response from the server.")
    error = obj.get("error")
    if error is not None and (type(error) is not str or not error):
        raise RemoteProtocolError("Expected the handshake 'error' to be a non-empty string.")
    return HandshakeResponse(error=error)
