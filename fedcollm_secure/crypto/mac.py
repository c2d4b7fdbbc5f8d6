"""One-time Poly1305 message authentication codes.

Poly1305 is a one-time MAC: each key must authenticate a single message. Callers derive a
fresh key per (session, round, sender, receiver, purpose) with :func:`derive_key` and use it
once. Verification raises; it never returns a bool.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ..errors import KeyFormatError, MacError

MAC_KEY_SIZE = 32
MAC_TAG_SIZE = 16


def _mac(key: bytes, parts: tuple[bytes | memoryview, ...]) -> Poly1305:
    if len(key) != MAC_KEY_SIZE:
        raise KeyFormatError(f"Poly1305 key must be {MAC_KEY_SIZE} bytes")
    mac = Poly1305(key)
    for part in parts:
        mac.update(memoryview(part).cast("B"))
    return mac


class MacStream:
    """Incremental one-time Poly1305, for callers that process a long message piece by piece
    (e.g. verify and sum a vector in one pass). :meth:`verify` raises :class:`MacError`."""

    def __init__(self, key: bytes) -> None:
        self._mac = _mac(key, ())

    def update(self, part: bytes | memoryview) -> None:
        self._mac.update(memoryview(part).cast("B"))

    def verify(self, tag: bytes) -> None:
        if len(tag) != MAC_TAG_SIZE:
            raise MacError("MAC tag has the wrong length")
        try:
            self._mac.verify(bytes(tag))
        except InvalidSignature:
            raise MacError("MAC does not verify") from None


def mac_tag(key: bytes, *parts: bytes | memoryview) -> bytes:
    """The 16-byte Poly1305 tag of the concatenation of ``parts`` under the one-time ``key``."""
    return _mac(key, parts).finalize()


def verify_mac(key: bytes, tag: bytes, *parts: bytes | memoryview) -> None:
    """Raise :class:`MacError` unless ``tag`` authenticates ``parts`` under ``key``."""
    if len(tag) != MAC_TAG_SIZE:
        raise MacError("MAC tag has the wrong length")
    try:
        _mac(key, parts).verify(bytes(tag))
    except InvalidSignature:
        raise MacError("MAC does not verify") from None
