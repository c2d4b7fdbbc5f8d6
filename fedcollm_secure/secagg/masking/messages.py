"""Message schemas, byte encodings and key-derivation contexts of ``masking/v1``.

Field names are constants; every parser checks exact keys, types and sizes, and raises
:class:`WireFormatError` (or a more specific protocol error) on anything else.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from ...crypto.aead import associated_data
from ...crypto.kdf import KdfContext, derive_key, encode_fields
from ...crypto.shamir import SHARE_SIZE
from ...errors import WireFormatError
from ...wire import Envelope, Fields, b64, bytes_map
from .config import PROTOCOL, VERSION

# stages, in order
ADVERTISE_KEYS = "advertise_keys"
SHARE_KEYS = "share_keys"
MASKED_INPUT = "masked_input"
UNMASK = "unmask"
CONSISTENCY_CHECK = "consistency_check"
STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASK)
# with the consistency check (on when identities are configured)
CHECKED_STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, CONSISTENCY_CHECK, UNMASK)


def stages_of(consistency_check: bool) -> tuple[str, ...]:
    return CHECKED_STAGES if consistency_check else STAGES
ERROR = "error"

# field names
F_N_NODES = "n_nodes"
F_THRESHOLD = "threshold"
F_SHARE_THRESHOLD = "share_threshold"
F_GRAPH = "graph"
F_NEIGHBOURS = "neighbours"
F_RING_BITS = "ring_bits"
F_LEVELS = "levels"
F_CLIP = "clip"
F_MAX_WEIGHT = "max_weight"
F_SPEC = "tensor_spec"
F_SERVER_PK = "server_pk"
F_CONSISTENCY = "consistency_check"
F_ROSTER = "roster"
F_SIGNATURE = "signature"
F_SIGNATURES = "signatures"
F_CIPHER_PK = "cipher_pk"
F_MASK_PK = "mask_pk"
F_SIG_PK = "sig_pk"
F_BUNDLE_SIG = "bundle_sig"
F_PARAMS_HASH = "params_hash"
F_BUNDLES = "bundles"
F_SHARES = "shares"
F_B_COMMIT = "b_commit"
F_LENGTH = "length"
F_SURVIVORS = "survivors"
F_DROPPED = "dropped"
F_B_SHARES = "b_shares"
F_S_SHARES = "s_shares"
F_CODE = "code"
F_MESSAGE = "message"

KEY_SIZE = 32
BUNDLE_SIZE = 3 * KEY_SIZE + 64
SEALED_SHARE_SIZE = 12 + (4 + 8) * 2 + (4 + SHARE_SIZE) * 2 + 16  # nonce + fields + tag
MAX_NODES = 1 << 20

# KDF purposes and AEAD labels
PURPOSE_SHARE_KEY = "share-encryption"
PURPOSE_PAIR_MASK = "pairwise-mask"
PURPOSE_CLIENT_MAC = "client-message-mac"
AD_SHARE = "masking/v1/share"
BUNDLE_LABEL = b"masking/v1/key-bundle"
COMMIT_LABEL = b"masking/v1/self-mask-commitment"
CONSISTENCY_LABEL = b"masking/v1/consistency"


def kdf_context(session: bytes, round_: int) -> KdfContext:
    return KdfContext(protocol=PROTOCOL, version=VERSION, session=session, round=round_)


def ordered(u: int, v: int) -> tuple[int, int]:
    return (u, v) if u < v else (v, u)


def mask_sign(u: int, v: int) -> int:
    """Node ``u`` adds PRG(s_uv) if u < v and subtracts it if u > v."""
    return 1 if u < v else -1


@dataclass(frozen=True)
class KeyBundle:
    """What a client advertises: two X25519 public keys and an Ed25519 key for this round."""

    node: int
    cipher_pk: bytes
    mask_pk: bytes
    sig_pk: bytes
    signature: bytes

    @staticmethod
    def signed_bytes(session: bytes, round_: int, node: int, cipher_pk: bytes, mask_pk: bytes,
                     sig_pk: bytes, params_digest: bytes) -> bytes:
        """What the bundle signature covers: the keys, bound to the round's parameters."""
        return encode_fields(BUNDLE_LABEL, session, struct.pack(">QQ", round_, node),
                             cipher_pk, mask_pk, sig_pk, params_digest)

    def to_bytes(self) -> bytes:
        return self.cipher_pk + self.mask_pk + self.sig_pk + self.signature

    @classmethod
    def from_bytes(cls, node: int, raw: bytes) -> KeyBundle:
        if len(raw) != BUNDLE_SIZE:
            raise WireFormatError(f"key bundle must be {BUNDLE_SIZE} bytes")
        k = KEY_SIZE
        return cls(node, raw[:k], raw[k:2 * k], raw[2 * k:3 * k], raw[3 * k:])


def share_plaintext(src: int, dst: int, b_share: bytes, s_share: bytes) -> bytes:
    return encode_fields(struct.pack(">Q", src), struct.pack(">Q", dst), b_share, s_share)


def parse_share_plaintext(raw: bytes) -> tuple[int, int, bytes, bytes]:
    parts, offset = [], 0
    for _ in range(4):
        if offset + 4 > len(raw):
            raise WireFormatError("share plaintext truncated")
        (length,) = struct.unpack_from(">I", raw, offset)
        offset += 4
        parts.append(raw[offset:offset + length])
        offset += length
    if offset != len(raw) or [len(p) for p in parts] != [8, 8, SHARE_SIZE, SHARE_SIZE]:
        raise WireFormatError("share plaintext has the wrong layout")
    return (struct.unpack(">Q", parts[0])[0], struct.unpack(">Q", parts[1])[0], parts[2], parts[3])


SHARED_PARAMS = (F_N_NODES, F_THRESHOLD, F_SHARE_THRESHOLD, F_GRAPH, F_RING_BITS, F_LEVELS,
                 F_CLIP, F_MAX_WEIGHT, F_SPEC, F_SERVER_PK, F_CONSISTENCY)
OPTIONAL_PARAMS = (F_ROSTER,)  # announced only when identities are configured
PARAMS_LABEL = b"masking/v1/round-parameters"


def params_digest(fields: dict[str, object]) -> bytes:
    """SHA-256 of the round parameters every client is announced (all advertise_keys fields
    but the per-client neighbour list), as canonical JSON. Signed into each key bundle, so a
    parameter altered in transit, or announced differently to different clients, is caught."""
    shared = {k: fields[k] for k in SHARED_PARAMS}
    shared.update({k: fields[k] for k in OPTIONAL_PARAMS if k in fields})
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(encode_fields(PARAMS_LABEL, text.encode())).digest()


def client_mac_keys(shared_secret: bytes, ctx: KdfContext, node: int) -> dict[str, bytes]:
    """The one-time GMAC keys of all of ``node``'s replies in the round (stage -> key), from
    one HKDF call: its output is cut into 32-byte keys in the order of ``CHECKED_STAGES``.
    ``shared_secret`` is the X25519 secret of the node's cipher key and the server's round
    key. Client replies are MACed, not signed: GMAC is several times faster than BLAKE3 on a
    masked vector, and an Ed25519 check costs more than everything else the server does per
    reply."""
    okm = derive_key(shared_secret, ctx, purpose=PURPOSE_CLIENT_MAC, pair=(0, node),
                     length=KEY_SIZE * len(CHECKED_STAGES))
    return {stage: okm[KEY_SIZE * i:KEY_SIZE * (i + 1)] for i, stage in enumerate(CHECKED_STAGES)}


def consistency_message(session: bytes, round_: int, node: int, survivors: list[int]) -> bytes:
    """What node ``node`` signs in the consistency check: the set U3 it was shown."""
    return encode_fields(CONSISTENCY_LABEL, session, struct.pack(">QQ", round_, node),
                         json.dumps(sorted(survivors), separators=(",", ":")).encode())


def share_ad(session: bytes, round_: int, src: int, dst: int, src_bundle: bytes,
             dst_bundle: bytes, params_hash: bytes) -> bytes:
    """Associated data of the shares ``src`` seals for ``dst``: the route, and both key bundles
    and the round parameters as the party computing it sees them. A share opens only if
    sender and recipient agree on each other's keys and on the parameters, so a key bundle
    changed on its way to a peer is caught without checking its signature."""
    return associated_data(AD_SHARE, session, round_, src, dst) + encode_fields(
        src_bundle, dst_bundle, params_hash)


def b_commitment(session: bytes, round_: int, node: int, b_seed: bytes) -> bytes:
    """Binding commitment to the self-mask seed, checked after its reconstruction."""
    return hashlib.sha256(encode_fields(COMMIT_LABEL, session, struct.pack(">QQ", round_, node),
                                        b_seed)).digest()


def envelope(stage: str, session: bytes, round_: int, src: int, dst: int,
             fields: dict[str, object], body: bytes | memoryview = b"") -> Envelope:
    return Envelope(protocol=PROTOCOL, stage=stage, session=session, round=round_, src=src,
                    dst=dst, fields=dict(fields), body=body)


def error_fields(exc: BaseException) -> dict[str, object]:
    return {F_CODE: type(exc).__name__, F_MESSAGE: str(exc)[:500]}


def parse_error(env: Envelope) -> str:
    f = Fields(env, {F_CODE, F_MESSAGE})
    return f"{f.string(F_CODE, 64)}: {f.string(F_MESSAGE, 500)}"


__all__ = [
    "ADVERTISE_KEYS",
    "ERROR",
    "MASKED_INPUT",
    "SHARE_KEYS",
    "STAGES",
    "UNMASK",
    "Fields",
    "KeyBundle",
    "b64",
    "bytes_map",
]
