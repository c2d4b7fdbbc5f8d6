"""One error hierarchy for the whole toolkit.

Every error the library raises on purpose derives from :class:`FedCoLLMSecureError`, so a
caller can catch the family with one ``except``. Branches follow the architecture:
configuration, cryptography, protocol (secure aggregation and wire format), transport and
privacy budget.
"""

from __future__ import annotations


class FedCoLLMSecureError(Exception):
    """Root of every error raised on purpose by fedcollm_secure."""


# --- configuration -------------------------------------------------------------------------
class ConfigError(FedCoLLMSecureError, ValueError):
    """A configuration is invalid (unknown key, bad type, unsafe combination)."""


# --- cryptography ----------------------------------------------------------------------------
class CryptoError(FedCoLLMSecureError):
    """A cryptographic operation failed or its input is unusable."""


class DecryptionError(CryptoError):
    """AEAD decryption failed: wrong key, wrong associated data, or tampered ciphertext."""


class AuthenticationError(CryptoError):
    """A message is not authentic: its signature or MAC did not verify."""


class SignatureError(AuthenticationError):
    """A signature did not verify, or a signer is unknown."""


class MacError(AuthenticationError):
    """A message authentication code did not verify, or is missing."""


class KeyFormatError(CryptoError):
    """A key has the wrong length or encoding."""


class SecretSharingError(CryptoError):
    """Shamir sharing/reconstruction failed (too few, duplicate or invalid shares)."""


class ShareVerificationError(SecretSharingError):
    """A reconstructed secret does not match its commitment or public key."""


class QuantizationError(CryptoError):
    """A value cannot be quantised (non-finite input, ring overflow)."""


# --- protocol ----------------------------------------------------------------------------------
class ProtocolError(FedCoLLMSecureError):
    """A protocol rule was violated."""


class WireFormatError(ProtocolError):
    """A message is malformed: bad magic/version, size limits, schema, types."""


class StageError(ProtocolError):
    """A message arrived out of stage order, or was a duplicate of a finished stage."""


class SessionMismatchError(ProtocolError):
    """A message belongs to another session."""


class ReplayError(SessionMismatchError):
    """A message belongs to another (usually earlier) round of this session."""


class PartyError(ProtocolError):
    """A message names an unknown, duplicate, or wrong party."""


class UnmaskRequestError(ProtocolError):
    """An unmask request is inconsistent (node both surviving and dropped, self dropped, ...)."""


class UpdateValidationError(ProtocolError):
    """An update has unexpected names, shapes, dtypes or non-finite values."""


class ThresholdError(ProtocolError):
    """Fewer parties than the threshold remain; the round was aborted revealing nothing."""


class AggregatorNotFoundError(ProtocolError, KeyError):
    """No aggregator is registered under that name."""


# --- transport ---------------------------------------------------------------------------------
class TransportError(FedCoLLMSecureError):
    """A transport failed to deliver a message."""


class TransportTimeout(TransportError):
    """A party did not answer within its deadline."""


# --- data ------------------------------------------------------------------------------------
class DatasetError(FedCoLLMSecureError, ValueError):
    """Data is missing, malformed, or cannot be split as asked."""


# --- privacy -----------------------------------------------------------------------------------
class PrivacyBudgetError(FedCoLLMSecureError):
    """A privacy budget would be exceeded."""


# --- co-tuning -------------------------------------------------------------------------------
class BridgeError(FedCoLLMSecureError, ValueError):
    """Two tokenizers cannot be bridged: no aligned positions or no mappable teacher mass."""


# --- homomorphic encryption (ckks) ----------------------------------------------------------
class HEContextError(CryptoError):
    """A homomorphic-encryption context is malformed, has other parameters than configured,
    or carries keys its holder must not have (e.g. a secret key at the aggregator)."""


class CiphertextError(ProtocolError):
    """A ciphertext is cut, corrupted, or made for another context, session or round."""


# --- audit log ---------------------------------------------------------------------------------
class AuditLogError(FedCoLLMSecureError):
    """An audit log cannot be written or read, or fails verification. ``line`` (1-based) and
    ``seq`` say where, when known."""

    def __init__(self, message: str, *, line: int | None = None,
                 seq: int | None = None) -> None:
        where = ", ".join(f"{k} {v}" for k, v in (("line", line), ("seq", seq)) if v is not None)
        super().__init__(f"{where}: {message}" if where else message)
        self.line, self.seq = line, seq


class AuditChainError(AuditLogError):
    """The hash chain or a signature of an audit log breaks: a record was edited, reordered,
    inserted, deleted or forged."""


class AuditIncompleteError(AuditLogError):
    """An audit log has no closing record: it was truncated, or its run is still going."""


__all__ = [name for name in dir() if name.endswith("Error") or name == "TransportTimeout"]
