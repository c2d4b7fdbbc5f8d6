"""What a client node trusts in a ``ckks`` run on Flower: its identity, the authority's key.

In process, :class:`~fedcollm_secure.secagg.ckks.CKKSAggregator` hands every client the key
authority's verify key and enrols each client's identity key with the aggregator and the
authority. On Flower these keys travel as follows:

* the client's identity (Ed25519; it signs its ciphertext and its contribution receipt):
  node config ``identity-file`` (:meth:`Identity.load`, named like the client id), or a
  fresh key per run kept in the node's ``Context.state``. Its public key goes to the
  aggregator in the ``train`` reply; the aggregator relays it to the key authority, which
  checks it against its ``allow-list`` if it has one.
* the key authority's verify key, which the client checks on the signed public context, so
  that an aggregator cannot substitute a context whose secret key it knows: pinned with
  node config ``ckks-authority-key = "<64 hex digits>"`` or the ``key-authority`` entry of
  node config ``allow-list``. Without a pin the client trusts on first use: it accepts the
  key the aggregator announces with the run's first ``ckks`` stage and refuses any other
  for the rest of the run. That protects nothing against an aggregator that lies from the
  start; pin the key in a real deployment.

This module does not import ``flwr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...crypto.signatures import SigningKey, VerifyKey, generate_signing_key
from ...errors import ConfigError, PartyError
from ...identity import KEY_AUTHORITY_NAME, AllowList, Identity
from .config import NODE_ALLOW_LIST, NODE_AUTHORITY_KEY, NODE_IDENTITY_FILE, node_string
from .key_authority import parse_key

TRUST_RECORD = "fedcollm.trust"  # Context.state config record: per-run keys of a client node
F_SIGNING_KEY = "signing_key"
F_AUTHORITY_KEY = "authority_key"


def client_identity(saved: Mapping[str, Any] | None, node_config: Mapping[str, Any],
                    client_id: str) -> SigningKey:
    """This client's identity key: its ``identity-file``, else the run's saved or a new one."""
    path = node_string(node_config, NODE_IDENTITY_FILE)
    if path is not None:
        identity = Identity.load(path)
        if identity.name != client_id:
            raise ConfigError(f"identity file {path} is for {identity.name!r}, this node is "
                              f"client {client_id!r}")
        return identity.key
    raw = saved.get(F_SIGNING_KEY) if saved else None
    if isinstance(raw, bytes):
        return SigningKey(raw)
    return generate_signing_key()


def pinned_authority_key(node_config: Mapping[str, Any]) -> VerifyKey | None:
    """The key authority's key as the node's operator configured it, if at all."""
    hexkey = node_string(node_config, NODE_AUTHORITY_KEY)
    allow = node_string(node_config, NODE_ALLOW_LIST)
    listed = None
    if allow is not None:
        allow_list = AllowList.load(allow)
        if KEY_AUTHORITY_NAME in allow_list.parties:
            listed = allow_list.verify_key(KEY_AUTHORITY_NAME)
    pinned = parse_key(hexkey, f"node config {NODE_AUTHORITY_KEY!r}") if hexkey else None
    if pinned is not None and listed is not None and pinned.raw != listed.raw:
        raise ConfigError(f"node config {NODE_AUTHORITY_KEY!r} and the allow-list name "
                          "different key authorities")
    return pinned or listed


def authority_key(node_config: Mapping[str, Any], announced: object,
                  saved: Mapping[str, Any] | None) -> VerifyKey:
    """The authority key this client checks the public context with: the pinned one (the
    aggregator must announce the same), else the one first announced in this run."""
    got = None if announced is None else parse_key(announced, "the announced authority key")
    pinned = pinned_authority_key(node_config)
    if pinned is not None:
        if got is not None and got.raw != pinned.raw:
            raise PartyError(f"the aggregator announces key authority {got.raw.hex()[:16]}..., "
                             f"this node trusts {pinned.raw.hex()[:16]}... only")
        return pinned
    first = saved.get(F_AUTHORITY_KEY) if saved else None
    if isinstance(first, str):
        if got is not None and got.raw.hex() != first:
            raise PartyError("the key authority's key changed within the run (trusted on "
                             "first use)")
        return parse_key(first, "the saved authority key")
    if got is None:
        raise PartyError("no key authority key is configured on this node "
                         f"({NODE_AUTHORITY_KEY!r}) nor announced by the aggregator")
    return got
