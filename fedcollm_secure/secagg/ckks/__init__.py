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
from ...identity import KEY_AUTHORITY_NAME, AllowList, Identities, Identity
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
    supports_identities: ClassVar[bool] = True

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

    def adopt_identities(self, identities: Identities) -> None:
        """The key authority signs with the identities' ``key-authority`` key, if any."""
        if identities.key_authority is not None:
            self.authority = KeyAuthority(self.config, signing_key=identities.key_authority.key)

    def _listed_authority_key(self, allow_list: AllowList | None) -> VerifyKey:
        """The key authority's key: the allow-listed one when identities list the authority
        (and then the authority must hold it), else the in-process authority's own."""
        if allow_list is None or KEY_AUTHORITY_NAME not in allow_list.parties:
            return self.authority.verify_key
        allow_list.require(KEY_AUTHORITY_NAME, self.authority.verify_key.raw)
        return allow_list.verify_key(KEY_AUTHORITY_NAME)

    def client(self, client_id: str, update: Update, *, weight: float = 1.0,
               rng: RandomSource | None = None, session: bytes | None = None,
               round_: int | None = None, identity: Identity | None = None,
               allow_list: AllowList | None = None) -> CKKSClient:
        """With a long-term ``identity`` (and the ``allow_list``), the client signs with it
        and only an allow-listed key authority is trusted."""
        authority_key = self._listed_authority_key(allow_list)
        if identity is not None:
            if allow_list is not None:
                allow_list.require(client_id, identity.public_key)
            self.enroll(client_id, identity.key.verify_key)
            self.identities[client_id] = identity.key
        signer = None
        if self.config.sign:
            signer = self.identities.get(client_id)
            if signer is None:
                signer = generate_signing_key(rng or default_random())
                self.enroll(client_id, signer.verify_key)
                self.identities[client_id] = signer
        return CKKSClient(client_id, update, weight=weight, config=self.config,
                          authority_key=authority_key, identity=signer,
                          session=session, round_=round_)

    def server(self, client_ids: Sequence[str], spec: TensorSpec, *, threshold: int | None = None,
               weighted: bool = False, rng: RandomSource | None = None,
               session: bytes | None = None, round_: int = 0,
               allow_list: AllowList | None = None) -> CKKSServer:
        return CKKSServer(client_ids, spec, authority=self.authority.handle,
                          authority_key=self._listed_authority_key(allow_list),
                          config=self.config,
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
