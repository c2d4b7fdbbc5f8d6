"""``ckks``: CKKS homomorphic-encryption aggregation (TenSEAL) with a separate key authority.

Clients encrypt pre-weighted updates under the round's public key; the aggregator adds
ciphertexts holding a public context only; the key authority decrypts only an aggregate of
at least ``t`` contributors. Spec: ``protocols/ckks/v1/SPEC.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ...crypto.randomness import RandomSource, default_random
from ...crypto.signatures import SigningKey, VerifyKey, generate_signing_key
from ..base import Aggregator, register_aggregator
from ..tensors import TensorSpec, Update
from .authority import DecryptionRecord, KeyAuthority
from .client import CKKSClient
from .messages import STAGES
from .params import HE_STANDARD_MAX_BITS_128, PRESETS, PROTOCOL, CKKSConfig, CKKSParams
from .server import CKKSServer


@register_aggregator
class CKKSAggregator(Aggregator):
    """The three roles of ``ckks`` for an in-process run.

    The key authority is its own object (:attr:`authority`, bytes in and bytes out); the
    aggregator's workflow reaches it only through :meth:`KeyAuthority.handle`. With
    ``sign`` (the default) each client gets an Ed25519 identity key on first use, enrolled
    with the aggregator and the key authority (as a PKI would in a deployment);
    :meth:`enroll` registers a key made elsewhere.
    """

    name: ClassVar[str] = "ckks"
    secure: ClassVar[bool] = True
    stages: ClassVar[tuple[str, ...]] = STAGES

    def __init__(self, *, authority: KeyAuthority | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.config = CKKSConfig.from_dict(options)
        self.authority = authority or KeyAuthority(self.config)
        self.identities: dict[str, SigningKey] = {}
        self.client_keys: dict[str, VerifyKey] = {}

    def default_threshold(self, n_clients: int) -> int:
        return max(self.config.min_threshold, n_clients // 2 + 1)

    def enroll(self, client_id: str, key: VerifyKey) -> None:
        """Register a client's identity key with the aggregator and the key authority."""
        self.authority.enroll(client_id, key)
        self.client_keys[client_id] = key

    def client(self, client_id: str, update: Update, *, weight: float = 1.0,
               rng: RandomSource | None = None, session: bytes | None = None,
               round_: int | None = None) -> CKKSClient:
        identity = None
        if self.config.sign:
            identity = self.identities.get(client_id)
            if identity is None:
                identity = generate_signing_key(rng or default_random())
                self.enroll(client_id, identity.verify_key)
                self.identities[client_id] = identity
        return CKKSClient(client_id, update, weight=weight, config=self.config,
                          authority_key=self.authority.verify_key, identity=identity,
                          session=session, round_=round_)

    def server(self, client_ids: Sequence[str], spec: TensorSpec, *, threshold: int | None = None,
               weighted: bool = False, rng: RandomSource | None = None,
               session: bytes | None = None, round_: int = 0) -> CKKSServer:
        return CKKSServer(client_ids, spec, authority=self.authority.handle,
                          authority_key=self.authority.verify_key, config=self.config,
                          threshold=threshold, client_keys=self.client_keys,
                          session=session if session is not None else
                          (rng or default_random()).bytes(16), round_=round_)


__all__ = [
    "HE_STANDARD_MAX_BITS_128",
    "PRESETS",
    "PROTOCOL",
    "STAGES",
    "CKKSAggregator",
    "CKKSClient",
    "CKKSConfig",
    "CKKSParams",
    "CKKSServer",
    "DecryptionRecord",
    "KeyAuthority",
]
