"""The CKKS key authority as a Flower SuperNode (node config ``fedcollm-role="key-authority"``).

The authority is the in-process :class:`~fedcollm_secure.secagg.ckks.KeyAuthority`, with the
same refusals: it answers only the aggregator's ``open_round`` and ``decrypt`` requests
(relayed by the ServerApp as ``query.key_authority`` messages), decrypts only an aggregate
of at least ``t`` contributors, once per round, and logs every decryption. On the deployment
engine each message runs in a fresh ``flwr-clientapp`` process, so the authority is rebuilt
for every message from its state in the node's ``Context.state``
(:meth:`KeyAuthority.to_state`: JSON and TenSEAL's own serialization, no pickle). That state
holds the signing key and each open round's CKKS secret key. It lives on the SuperNode's
machine and is never sent to the SuperLink; protect that machine (and the SuperNode process)
like a key file.

Node config of the authority (all optional but the role):

* ``identity-file``: its long-term Ed25519 key (:meth:`Identity.load`, mode 0600); client
  operators pin the matching public key. Without it, a fresh key per run (trust on first
  use at the clients, see :mod:`.trust`).
* ``allow-list``: an :class:`~fedcollm_secure.identity.AllowList`; client identity keys
  relayed by the aggregator must be the listed ones (a PKI). Without it the authority
  enrols the keys the aggregator relays (first use per run; a changed key is refused).
* ``ckks-decryption-log``: a JSONL file on the authority's machine, one line per
  decryption; a decryption that cannot be logged is not released.
* ``ckks-min-threshold``: the authority's own floor on contributors (at least the run's).

This module does not import ``flwr``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...crypto.signatures import VerifyKey, generate_signing_key
from ...errors import ConfigError, FedCoLLMSecureError, PartyError, WireFormatError
from ...identity import KEY_AUTHORITY_NAME, SERVER_NAME, AllowList, Identity
from ...secagg.ckks import CKKSConfig, KeyAuthority
from ...secagg.ckks.messages import AUTHORITY, ERROR, envelope, error_fields
from ...wire import SERVER
from .config import (
    NODE_ALLOW_LIST,
    NODE_DECRYPTION_LOG,
    NODE_IDENTITY_FILE,
    NODE_MIN_THRESHOLD,
    node_string,
)

STATE_RECORD = "fedcollm.key_authority"  # Context.state config record of the authority node
MAX_CLIENT_KEYS = 10_000


def parse_key(hexkey: object, what: str) -> VerifyKey:
    """An Ed25519 public key given as 64 hex digits."""
    if not isinstance(hexkey, str) or len(hexkey) != 64:
        raise ConfigError(f"{what} must be 64 hex digits")
    try:
        raw = bytes.fromhex(hexkey)
    except ValueError:
        raise ConfigError(f"{what} must be 64 hex digits") from None
    return VerifyKey(raw)


def client_keys_from_json(text: object) -> dict[str, VerifyKey]:
    """The relayed ``{client id: public key hex}`` mapping."""
    if not isinstance(text, str):
        raise WireFormatError("client keys must be a JSON string")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"client keys are not valid JSON: {exc}") from None
    if not isinstance(data, dict) or len(data) > MAX_CLIENT_KEYS:
        raise WireFormatError("client keys must map at most "
                              f"{MAX_CLIENT_KEYS} client ids to public keys")
    return {str(cid): parse_key(k, f"the key of client {cid!r}") for cid, k in data.items()}


class AuthorityNode:
    """A :class:`KeyAuthority` rebuilt from a node's saved state and node config."""

    def __init__(self, authority: KeyAuthority, *, allow_list: AllowList | None = None,
                 log_path: str | None = None) -> None:
        self.authority = authority
        self.allow_list = allow_list
        self.log_path = log_path

    @classmethod
    def load(cls, saved: Mapping[str, Any] | None, node_config: Mapping[str, Any],
             options: Mapping[str, Any]) -> AuthorityNode:
        """The authority of this run: from ``saved`` (its :meth:`KeyAuthority.to_state`) or,
        on the run's first message, new (its key from ``identity-file`` or fresh)."""
        config = CKKSConfig.from_dict(dict(options))
        floor = node_config.get(NODE_MIN_THRESHOLD)
        if floor is not None:
            if isinstance(floor, bool) or not isinstance(floor, int) or floor < 2:
                raise ConfigError(f"node config {NODE_MIN_THRESHOLD!r} must be an integer >= 2")
            config = config.replace(min_threshold=max(config.min_threshold, floor))
        path = node_string(node_config, NODE_IDENTITY_FILE)
        identity = Identity.load(path) if path is not None else None
        if saved:
            authority = KeyAuthority.from_state(saved, config)
            if identity is not None and identity.public_key != authority.verify_key.raw:
                raise ConfigError("the authority's identity file changed within the run")
        else:
            authority = KeyAuthority(config, signing_key=identity.key if identity else
                                     generate_signing_key())
        allow = node_string(node_config, NODE_ALLOW_LIST)
        allow_list = AllowList.load(allow) if allow is not None else None
        if allow_list is not None and KEY_AUTHORITY_NAME in allow_list.parties:
            allow_list.require(KEY_AUTHORITY_NAME, authority.verify_key.raw)
        return cls(authority, allow_list=allow_list,
                   log_path=node_string(node_config, NODE_DECRYPTION_LOG))

    @property
    def public_key_hex(self) -> str:
        return self.authority.verify_key.raw.hex()

    def enroll(self, keys: Mapping[str, VerifyKey]) -> None:
        """Enrol relayed client keys: the listed ones if an allow-list is configured; first
        use otherwise (a key that changes within the run is refused)."""
        for cid, key in sorted(keys.items()):
            if cid in (SERVER_NAME, KEY_AUTHORITY_NAME):
                raise PartyError(f"{cid!r} is not a client id")
            if self.allow_list is not None:
                self.allow_list.require(cid, key.raw)
            self.authority.enroll(cid, key)

    def answer(self, request: bytes, client_keys: object = None) -> bytes:
        """The authority's reply to one relayed request (a refusal is a signed ``error``)."""
        before = len(self.authority.decryptions)
        try:
            if client_keys is not None:
                self.enroll(client_keys_from_json(client_keys))
        except FedCoLLMSecureError as exc:
            return envelope(ERROR, b"", 0, AUTHORITY, SERVER, error_fields(exc)).encode(
                self.authority.signer)
        reply = self.authority.handle(request)
        new = self.authority.decryptions[before:]
        if new and self.log_path is not None:
            try:
                self._log(new)
            except OSError as exc:  # the round is spent (state saved) but nothing is released
                return envelope(ERROR, b"", 0, AUTHORITY, SERVER, error_fields(ConfigError(
                    f"the decryption could not be logged ({exc}); not released"))).encode(
                    self.authority.signer)
        return reply

    def _log(self, records: list[Any]) -> None:
        path = Path(str(self.log_path))
        with open(path, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps({**rec.to_json(),
                                     "authority_key": self.public_key_hex}, sort_keys=True)
                         + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def state(self) -> dict[str, str | bytes]:
        """What the node keeps in ``Context.state`` until its next message."""
        return self.authority.to_state()
