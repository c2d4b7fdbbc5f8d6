"""Long-term party identities: Ed25519 key files and the allow-list of who may take part.

A party (a client, the server, the CKKS key authority) holds an :class:`Identity`, a named
long-term Ed25519 key. The :class:`AllowList` maps party names to public keys; a message
signed by a key that is not on it is refused with :class:`SignatureError` ("unknown signer").

Key files: a private key is written as PKCS#8 PEM with mode 0600 and refused on load if group
or others can read it (as OpenSSH does); an allow-list is JSON
``{"version": 1, "parties": {name: public key hex}}``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .crypto.randomness import RandomSource, default_random
from .crypto.signatures import SigningKey, VerifyKey
from .errors import ConfigError, KeyFormatError, SignatureError

SERVER_NAME = "server"
KEY_AUTHORITY_NAME = "key-authority"
ALLOW_LIST_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"party name {name!r} must be 1-128 characters of [A-Za-z0-9._:@-], "
                          "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Identity:
    """A named long-term signing key."""

    name: str
    key: SigningKey

    def __post_init__(self) -> None:
        check_name(self.name)

    @property
    def public_key(self) -> bytes:
        return self.key.verify_key.raw

    @classmethod
    def generate(cls, name: str, rng: RandomSource | None = None) -> Identity:
        return cls(name, SigningKey((rng or default_random()).bytes(32)))

    def save(self, path: str | Path) -> None:
        """Write the private key as PKCS#8 PEM, readable by the owner only (mode 0600).
        An existing file is never overwritten."""
        pem = Ed25519PrivateKey.from_private_bytes(self.key.private_bytes()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        header = f"# fedcollm-secure identity: {self.name}\n".encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigError(f"{path} exists; a key file is never overwritten") from None
        with os.fdopen(fd, "wb") as f:
            f.write(header + pem)

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read a key file written by :meth:`save`; refuse one that group or others can read."""
        p = Path(path)
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFormatError(f"{p}: private key file is accessible by group or others "
                                 f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        raw = p.read_bytes()
        first, _, pem = raw.partition(b"\n")
        prefix = b"# fedcollm-secure identity: "
        if not first.startswith(prefix):
            raise KeyFormatError(f"{p}: not a fedcollm-secure identity file")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError(f"{p}: unreadable private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFormatError(f"{p}: not an Ed25519 key")
        return cls(first[len(prefix):].decode("utf-8", "replace").strip(),
                   SigningKey(key.private_bytes_raw()))


@dataclass(frozen=True)
class AllowList:
    """Who may take part: party name -> Ed25519 public key (32 bytes)."""

    parties: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[bytes, str] = {}
        for name, key in self.parties.items():
            check_name(name)
            VerifyKey(key)  # KeyFormatError on a malformed key
            if key in seen:
                raise ConfigError(f"parties {seen[key]!r} and {name!r} share a public key")
            seen[key] = name

    @classmethod
    def of(cls, identities: Iterable[Identity]) -> AllowList:
        out: dict[str, bytes] = {}
        for ident in identities:
            if ident.name in out:
                raise ConfigError(f"duplicate party name {ident.name!r}")
            out[ident.name] = ident.public_key
        return cls(out)

    def verify_key(self, name: str) -> VerifyKey:
        """The key of ``name``; :class:`SignatureError` if it is not on the list."""
        try:
            return VerifyKey(self.parties[name])
        except KeyError:
            raise SignatureError(f"unknown signer {name!r}: not on the allow-list") from None

    def require(self, name: str, public_key: bytes) -> None:
        """Raise :class:`SignatureError` unless ``name`` is listed with ``public_key``."""
        if self.verify_key(name).raw != bytes(public_key):
            raise SignatureError(f"{name!r} signed with a key that is not its listed key")

    def to_json(self) -> str:
        return json.dumps({"version": ALLOW_LIST_VERSION,
                           "parties": {n: k.hex() for n, k in sorted(self.parties.items())}},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AllowList:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"allow-list is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or set(data) != {"version", "parties"}:
            raise ConfigError("allow-list must be an object with keys 'version' and 'parties'")
        if data["version"] != ALLOW_LIST_VERSION:
            raise ConfigError(f"unsupported allow-list version {data['version']!r}")
        parties = data["parties"]
        if not isinstance(parties, dict):
            raise ConfigError("allow-list 'parties' must map names to public keys")
        out: dict[str, bytes] = {}
        for name, hexkey in parties.items():
            if not isinstance(hexkey, str) or not re.fullmatch(r"[0-9a-f]{64}", hexkey):
                raise ConfigError(f"allow-list key of {name!r} must be 64 lowercase hex digits")
            out[name] = bytes.fromhex(hexkey)
        return cls(out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> AllowList:
        return cls.from_json(Path(path).read_text())


@dataclass(frozen=True)
class Identities:
    """Every party's identity of one simulated federation, and the allow-list they share.

    In a deployment each party holds only its own :class:`Identity` and the allow-list; this
    bundle is for in-process runs and tests."""

    clients: Mapping[str, Identity]
    server: Identity
    allow_list: AllowList
    key_authority: Identity | None = None  # the CKKS key authority's, when it takes part

    @classmethod
    def generate(cls, client_ids: Iterable[str], rng: RandomSource | None = None, *,
                 key_authority: bool = False) -> Identities:
        clients = {cid: Identity.generate(cid, rng) for cid in client_ids}
        server = Identity.generate(SERVER_NAME, rng)
        authority = Identity.generate(KEY_AUTHORITY_NAME, rng) if key_authority else None
        parties = [*clients.values(), server, *([authority] if authority else [])]
        return cls(clients, server, AllowList.of(parties), authority)

    def __post_init__(self) -> None:
        for cid, ident in self.clients.items():
            if ident.name != cid:
                raise ConfigError(f"identity of client {cid!r} is named {ident.name!r}")
            self.allow_list.require(cid, ident.public_key)
        self.allow_list.require(self.server.name, self.server.public_key)
        if self.key_authority is not None:
            self.allow_list.require(self.key_authority.name, self.key_authority.public_key)
