"""Client side of ``masking/v1``: a stage-checked state machine.

Routing errors (another session, an earlier round, a duplicated or out-of-order stage) are
refused without touching the state, so an injected message cannot derail an honest round.
A message of the right stage that breaks a protocol rule (bad signature, undecryptable
share, inconsistent unmask request) aborts this client for the round: it reveals nothing more.
"""

from __future__ import annotations

import numpy as np

from ...crypto.aead import open_sealed, seal
from ...crypto.kdf import derive_key
from ...crypto.key_agreement import agree, generate_keypair, load_public_key
from ...crypto.prg import MaskPRG, ring_mask
from ...crypto.quantization import QuantizationSpec
from ...crypto.randomness import RandomSource, default_random
from ...crypto.shamir import split_secret
from ...crypto.signatures import VerifyKey, generate_signing_key
from ...errors import (
    FedCoLLMSecureError,
    PartyError,
    StageError,
    UnmaskRequestError,
    UpdateValidationError,
)
from ...identity import AllowList, Identity
from ...wire import (
    DEFAULT_LIMITS,
    SERVER,
    Envelope,
    Fields,
    Limits,
    Message,
    b64,
    bytes_map,
    decode,
)
from ..base import ClientEndpoint
from ..tensors import TensorSpec, Update
from .config import PROTOCOL, MaskingConfig
from .messages import (
    ADVERTISE_KEYS,
    BUNDLE_SIZE,
    ERROR,
    F_B_COMMIT,
    F_B_SHARES,
    F_BUNDLE_SIG,
    F_BUNDLES,
    F_CIPHER_PK,
    F_CLIP,
    F_DROPPED,
    F_GRAPH,
    F_LENGTH,
    F_LEVELS,
    F_MASK_PK,
    F_MAX_WEIGHT,
    F_N_NODES,
    F_NEIGHBOURS,
    F_PARAMS_HASH,
    F_RING_BITS,
    F_S_SHARES,
    F_SHARE_THRESHOLD,
    F_CONSISTENCY,
    F_ROSTER,
    F_SERVER_PK,
    F_SIGNATURE,
    F_SIGNATURES,
    F_SHARES,
    F_SIG_PK,
    F_SPEC,
    F_SURVIVORS,
    F_THRESHOLD,
    CONSISTENCY_CHECK,
    MASKED_INPUT,
    MAX_NODES,
    PURPOSE_PAIR_MASK,
    PURPOSE_SHARE_KEY,
    SEALED_SHARE_SIZE,
    SHARE_KEYS,
    UNMASK,
    KeyBundle,
    b_commitment,
    client_mac_keys,
    consistency_message,
    envelope,
    error_fields,
    kdf_context,
    mask_sign,
    ordered,
    params_digest,
    parse_share_plaintext,
    share_ad,
    share_plaintext,
    stages_of,
)

ABORTED = "aborted"
DONE = "done"


class MaskingClient(ClientEndpoint):
    def __init__(self, client_id: str, update: Update, *, weight: float = 1.0,
                 config: MaskingConfig | None = None, rng: RandomSource | None = None,
                 session: bytes | None = None, round_: int | None = None,
                 limits: Limits = DEFAULT_LIMITS, identity: Identity | None = None,
                 allow_list: AllowList | None = None) -> None:
        """With ``identity`` and ``allow_list`` the client signs its key bundle with its
        long-term key and accepts a peer's bundle only if it is signed by the key the
        allow-list gives for the peer's name in the announced roster."""
        if (identity is None) != (allow_list is None):
            raise PartyError("identity and allow_list go together")
        if identity is not None and identity.name != client_id:
            raise PartyError(f"identity {identity.name!r} does not belong to {client_id!r}")
        self.client_id = client_id
        self.allow_list = allow_list
        self.config = config or MaskingConfig()
        if not (np.isfinite(weight) and 0 <= weight <= self.config.max_weight):
            raise UpdateValidationError(
                f"weight {weight} must be finite and in [0, max_weight={self.config.max_weight}]")
        self.update = update
        self.weight = float(weight)
        self.rng = rng or default_random()
        self.session = session
        self.round = round_
        self.limits = limits
        self.stages = stages_of(self.config.consistency_check or identity is not None)
        self.stage_index = 0  # index into self.stages of the next expected request
        self.state = self.stages[0]
        self.error: FedCoLLMSecureError | None = None
        self.node = 0
        self.signer = identity.key if identity is not None else generate_signing_key(self.rng)
        self.revealed: dict[str, list[int]] = {}

    # --- entry points --------------------------------------------------------------------
    def handle(self, request: bytes) -> Message:
        """Process one request; a refusal is answered with an ``error`` message."""
        try:
            return self.process(request)
        except FedCoLLMSecureError as exc:
            return envelope(ERROR, self.session or b"", self.round or 0, self.node, SERVER,
                            error_fields(exc)).encode(self.signer)

    def process(self, request: bytes) -> Message:
        """Process one request; raise the typed error of a refusal."""
        if self.state in (ABORTED, DONE):
            raise StageError(f"client {self.client_id} has finished this round ({self.state})")
        env = decode(request, Limits(max_header=self.limits.max_header, max_body=0))
        expected = self.stages[self.stage_index]
        if env.stage in self.stages and env.stage != expected:
            kind = ("duplicated" if self.stages.index(env.stage) < self.stage_index
                    else "out-of-order")
            self._check_route(env, env.stage)  # a wrong session/round is reported as such
            raise StageError(f"{kind} {env.stage!r} request; expecting {expected!r}")
        self._check_route(env, expected)
        try:
            reply: Message = getattr(self, f"_on_{expected}")(env)
        except FedCoLLMSecureError as exc:
            self.state, self.error = ABORTED, exc
            raise
        self.stage_index += 1
        self.state = (self.stages[self.stage_index] if self.stage_index < len(self.stages)
                      else DONE)
        return reply

    def _check_route(self, env: Envelope, stage: str) -> None:
        # A client not told its session learns it from the first advertise_keys request, but
        # only once that request has passed every routing check.
        session = self.session
        if session is None and stage == ADVERTISE_KEYS and self.stage_index == 0:
            session = env.session
        round_ = self.round if self.round is not None else env.round
        env.expect(protocol=PROTOCOL, stage=stage, session=session or b"", round_=round_,
                   src=SERVER, dst=self.node or None)
        if env.dst < 1:
            raise PartyError("requests must be addressed to a client index >= 1")
        self.session, self.round = session, round_

    def _reply(self, stage: str, fields: dict[str, object],
               body: bytes | memoryview = b"") -> bytes:
        """Every reply carries a one-time GMAC tag under a key only this client and the server
        can derive (from this client's cipher key and the server's round key)."""
        env = envelope(stage, self.session or b"", self.round or 0, self.node, SERVER, fields,
                       body)
        return env.encode(mac_key=self.mac_keys[stage])

    # --- stage 0: advertise keys ---------------------------------------------------------
    def _on_advertise_keys(self, env: Envelope) -> bytes:
        f = Fields(env, {F_N_NODES, F_THRESHOLD, F_SHARE_THRESHOLD, F_GRAPH, F_NEIGHBOURS,
                         F_RING_BITS, F_LEVELS, F_CLIP, F_MAX_WEIGHT, F_SPEC, F_SERVER_PK,
                         F_CONSISTENCY}, frozenset({F_ROSTER}))
        n = f.uint(F_N_NODES, MAX_NODES)
        self.node = env.dst
        t, share_t = f.uint(F_THRESHOLD, MAX_NODES), f.uint(F_SHARE_THRESHOLD, MAX_NODES)
        neighbours = f.uint_list(F_NEIGHBOURS, MAX_NODES)
        graph = f.string(F_GRAPH, 16)
        if not 2 <= n <= self.config.max_clients or not 1 <= self.node <= n:
            raise PartyError(f"node {self.node} of {n} is out of range")
        if len(set(neighbours)) != len(neighbours) or self.node in neighbours or any(
                not 1 <= v <= n for v in neighbours):
            raise PartyError("neighbour list has duplicates, unknown nodes or this node")
        if graph not in ("complete", "k_regular") or (
                graph == "complete" and len(neighbours) != n - 1):
            raise PartyError(f"graph {graph!r} does not match {len(neighbours)} neighbours")
        if not self.config.min_threshold <= t <= n:
            raise PartyError(f"threshold {t} is below this client's minimum "
                             f"{self.config.min_threshold} or above {n}")
        if not 2 <= share_t <= min(t, len(neighbours) + 1):
            raise PartyError(f"share threshold {share_t} is out of range")
        self.n_nodes, self.threshold, self.share_threshold = n, t, share_t
        self.neighbours = frozenset(neighbours)
        max_weight = f.number(F_MAX_WEIGHT)
        if not (np.isfinite(max_weight) and max_weight > 0):
            raise PartyError(f"announced max_weight {max_weight} must be finite and positive")
        if self.weight > max_weight:
            raise UpdateValidationError(f"weight {self.weight} exceeds max_weight {max_weight}")
        self.clip = f.number(F_CLIP) / max_weight
        ring_bits = f.uint(F_RING_BITS, 64)
        if ring_bits < 8:
            raise PartyError(f"announced ring of {ring_bits} bits is below the minimum of 8")
        levels = f.uint(F_LEVELS, 1 << 62)
        self.values_q = QuantizationSpec(f.number(F_CLIP), ring_bits, levels, n)
        self.weight_q = QuantizationSpec(max_weight, ring_bits, levels, n)
        self.spec = TensorSpec.from_json(f.list_of(F_SPEC, 100_000))
        self.parts = self.spec.flat_parts(self.update, who=f"client {self.client_id}",
                                          keep_float32=True)
        self._accept_checking(f.boolean(F_CONSISTENCY))
        self.roster = self._accept_roster(f, n) if self.allow_list is not None else {}
        server_pk = f.raw(F_SERVER_PK, 32)
        load_public_key(server_pk)
        self.params_digest = params_digest(env.fields)
        self.cipher_keys = generate_keypair(self.rng)
        self.mask_keys = generate_keypair(self.rng)
        # the reply MAC keys, from this client's cipher key and the server's round key
        self.mac_keys = client_mac_keys(agree(self.cipher_keys.private, server_pk),
                                        kdf_context(env.session, env.round), self.node)
        sig_pk = self.signer.verify_key.raw
        bundle_sig = self.signer.sign(KeyBundle.signed_bytes(
            env.session, env.round, self.node, self.cipher_keys.public_bytes,
            self.mask_keys.public_bytes, sig_pk, self.params_digest))
        self.bundle = KeyBundle(self.node, self.cipher_keys.public_bytes,
                                self.mask_keys.public_bytes, sig_pk, bundle_sig)
        return self._reply(ADVERTISE_KEYS, {
            F_CIPHER_PK: b64(self.bundle.cipher_pk), F_MASK_PK: b64(self.bundle.mask_pk),
            F_SIG_PK: b64(sig_pk), F_BUNDLE_SIG: b64(bundle_sig),
            F_PARAMS_HASH: b64(self.params_digest)})

    def _accept_checking(self, announced: bool) -> None:
        """The consistency stage runs iff announced; a client that requires it refuses a
        round without it."""
        if not announced and len(self.stages) != len(stages_of(False)):
            raise PartyError("this client requires the consistency check; the round has none")
        self.stages = stages_of(announced)

    def _accept_roster(self, f: Fields, n: int) -> dict[int, str]:
        if self.allow_list is None:
            raise PartyError("a roster is only checked with an allow-list")
        if not f.has(F_ROSTER):
            raise PartyError("identities are configured but the round announces no roster")
        roster = f.string_map(F_ROSTER, MAX_NODES)
        if sorted(roster) != list(range(1, n + 1)) or len(set(roster.values())) != n:
            raise PartyError("the roster must name n distinct clients for nodes 1..n")
        if roster[self.node] != self.client_id:
            raise PartyError(f"the roster names node {self.node} {roster[self.node]!r}, "
                             f"not this client {self.client_id!r}")
        for name in roster.values():
            self.allow_list.verify_key(name)  # SignatureError for a client not on the list
        return roster

    # --- stage 1: share keys -------------------------------------------------------------
    def _on_share_keys(self, env: Envelope) -> bytes:
        f = Fields(env, {F_BUNDLES})
        raw = f.bytes_map(F_BUNDLES, MAX_NODES, size=BUNDLE_SIZE)
        if raw.get(self.node) != self.bundle.to_bytes():
            raise PartyError("the server did not forward this client's own keys unchanged")
        unknown = set(raw) - self.neighbours - {self.node}
        if unknown:
            raise PartyError(f"keys for nodes that are not neighbours: {sorted(unknown)}")
        if len(raw) < self.share_threshold:
            raise PartyError(f"{len(raw)} key bundles, fewer than the share threshold "
                             f"{self.share_threshold}")
        bundles = {v: KeyBundle.from_bytes(v, b) for v, b in raw.items() if v != self.node}
        seen = {self.bundle.cipher_pk, self.bundle.mask_pk}
        for v, b in bundles.items():
            if self.allow_list is not None:  # signed by the listed key of v's roster name
                self.allow_list.require(self.roster[v], b.sig_pk)
            if b.cipher_pk in seen or b.mask_pk in seen or b.cipher_pk == b.mask_pk:
                raise PartyError(f"node {v} reuses a public key of another node")
            seen |= {b.cipher_pk, b.mask_pk}
            if self.allow_list is not None or CONSISTENCY_CHECK in self.stages:
                # the signing key matters (identities, consistency signatures); in other
                # rounds it is self-asserted and the shares' associated data binds the keys
                VerifyKey(b.sig_pk).verify(b.signature, KeyBundle.signed_bytes(
                    env.session, env.round, v, b.cipher_pk, b.mask_pk, b.sig_pk,
                    self.params_digest))
            load_public_key(b.cipher_pk), load_public_key(b.mask_pk)
        self.bundles = bundles
        self.b_seed = self.rng.bytes(32)
        holders = sorted(raw)
        b_shares = split_secret(self.b_seed, self.share_threshold, holders, self.rng)
        s_shares = split_secret(self.mask_keys.private_bytes(), self.share_threshold, holders,
                                self.rng)
        self.held_b = {self.node: b_shares[self.node].to_bytes()}
        self.held_s = {self.node: s_shares[self.node].to_bytes()}
        ctx = kdf_context(env.session, env.round)
        sealed = {}
        self.share_keys = {}  # the pairwise AEAD keys, reused to open the peers' shares
        for v, b in bundles.items():
            key = derive_key(agree(self.cipher_keys.private, b.cipher_pk), ctx,
                             purpose=PURPOSE_SHARE_KEY, pair=ordered(self.node, v))
            self.share_keys[v] = key
            sealed[v] = seal(key, share_plaintext(self.node, v, b_shares[v].to_bytes(),
                                                  s_shares[v].to_bytes()),
                             share_ad(env.session, env.round, self.node, v,
                                      self.bundle.to_bytes(), b.to_bytes(), self.params_digest),
                             self.rng)
        commit = b_commitment(env.session, env.round, self.node, self.b_seed)
        return self._reply(SHARE_KEYS, {F_SHARES: bytes_map(sealed), F_B_COMMIT: b64(commit)})

    # --- stage 2: masked input -----------------------------------------------------------
    def _on_masked_input(self, env: Envelope) -> Message:
        f = Fields(env, {F_SHARES})
        sealed = f.bytes_map(F_SHARES, MAX_NODES, size=SEALED_SHARE_SIZE)
        unknown = set(sealed) - set(self.bundles)
        if unknown:
            raise PartyError(f"shares from nodes whose keys were not accepted: {sorted(unknown)}")
        if len(sealed) + 1 < self.share_threshold:
            raise PartyError(f"only {len(sealed)} peers shared keys; the share threshold is "
                             f"{self.share_threshold}")
        for v, ct in sealed.items():
            ad = share_ad(env.session, env.round, v, self.node, self.bundles[v].to_bytes(),
                          self.bundle.to_bytes(), self.params_digest)
            plain = open_sealed(self.share_keys[v], ct, ad)
            src, dst, b_share, s_share = parse_share_plaintext(plain)
            if (src, dst) != (v, self.node):
                raise PartyError(f"share claims route {src}->{dst}, expected {v}->{self.node}")
            self.held_b[v], self.held_s[v] = b_share, s_share
        self.peers = frozenset(sealed)
        length = self.spec.size + 1
        dtype = np.dtype(self.values_q.dtype).newbyteorder("<")
        env = envelope(MASKED_INPUT, self.session or b"", self.round or 0, self.node, SERVER,
                       {F_LENGTH: length})

        def fill(body: memoryview) -> None:
            """The masked vector is built straight in the reply buffer (little-endian hosts:
            the body is never copied)."""
            wire = np.frombuffer(body, dtype=dtype)
            if dtype.isnative:
                self._mask(wire)
            else:
                y = np.empty(length, dtype=self.values_q.dtype)
                self._mask(y)
                wire[:] = y

        return env.encode_in_place(length * dtype.itemsize, fill,
                                   mac_key=self.mac_keys[MASKED_INPUT])

    def _mask(self, y: np.ndarray) -> None:
        """Write the masked, quantised update (weight last) into ``y``."""
        # clip to [-clip, clip], then weight; the parts were checked finite by flat_parts()
        self.values_q.quantize(self.parts, self.rng, multiplier=self.weight,
                               pre_clip=self.clip, check_finite=False, out=y[:-1])
        y[-1:] = self.weight_q.quantize(np.array([self.weight]), self.rng)
        prg = MaskPRG(y.size, self.values_q.ring_bits)
        kctx = kdf_context(self.session or b"", self.round or 0)
        masks = [(self.b_seed, 1)] + [
            (derive_key(agree(self.mask_keys.private, self.bundles[v].mask_pk), kctx,
                        purpose=PURPOSE_PAIR_MASK, pair=ordered(self.node, v)),
             mask_sign(self.node, v)) for v in sorted(self.peers)]
        prg.add_many(y, masks)
        if self.values_q.ring_bits not in (32, 64):
            y &= y.dtype.type(ring_mask(self.values_q.ring_bits))
        self.mask_bytes_generated = prg.bytes_generated

    # --- consistency check (optional) ---------------------------------------------------
    def _on_consistency_check(self, env: Envelope) -> bytes:
        f = Fields(env, {F_SURVIVORS})
        u3 = f.uint_list(F_SURVIVORS, MAX_NODES)
        if u3 != sorted(set(u3)) or any(not 1 <= v <= self.n_nodes for v in u3):
            raise UnmaskRequestError("survivor set must be sorted, unique nodes of the round")
        if self.node not in u3:
            raise UnmaskRequestError("survivor set omits this client")
        if len(u3) < self.threshold:
            raise UnmaskRequestError(f"{len(u3)} survivors, below the threshold {self.threshold}")
        self.u3 = frozenset(u3)
        sig = self.signer.sign(consistency_message(env.session, env.round, self.node, u3))
        return self._reply(CONSISTENCY_CHECK, {F_SIGNATURE: b64(sig)})

    def _check_consistency(self, env: Envelope, f: Fields, survivors: set[int],
                           dropped: set[int]) -> None:
        """Before revealing anything: enough holders signed the same survivor set this client
        signed, and the request classifies every peer by that set."""
        sigs = f.bytes_map(F_SIGNATURES, MAX_NODES, size=64)
        known = self.peers | {self.node}
        if set(sigs) - known:
            raise UnmaskRequestError("signatures from nodes this client holds no keys of")
        msg_u3 = sorted(self.u3)
        valid = {self.node}
        for v, sig in sigs.items():
            if v != self.node:
                VerifyKey(self.bundles[v].sig_pk).verify(
                    sig, consistency_message(env.session, env.round, v, msg_u3))
                valid.add(v)
        if len(valid) < self.share_threshold:
            raise UnmaskRequestError(f"only {len(valid)} holders confirmed the survivor set; "
                                     f"{self.share_threshold} needed")
        if survivors != known & self.u3 or dropped != known - self.u3:
            raise UnmaskRequestError("unmask lists differ from the survivor set signed in "
                                     "the consistency check")

    # --- stage 3: unmask -----------------------------------------------------------------
    def _on_unmask(self, env: Envelope) -> bytes:
        checked = CONSISTENCY_CHECK in self.stages
        f = Fields(env, {F_SURVIVORS, F_DROPPED, *([F_SIGNATURES] if checked else [])})
        survivors = f.uint_list(F_SURVIVORS, MAX_NODES)
        dropped = f.uint_list(F_DROPPED, MAX_NODES)
        s_set, d_set = set(survivors), set(dropped)
        if len(s_set) != len(survivors) or len(d_set) != len(dropped):
            raise UnmaskRequestError("unmask request lists a node twice")
        if s_set & d_set:
            raise UnmaskRequestError(
                f"nodes listed as both surviving and dropped: {sorted(s_set & d_set)}")
        if self.node in d_set:
            raise UnmaskRequestError("unmask request lists this client as dropped")
        if self.node not in s_set:
            raise UnmaskRequestError("unmask request omits this client from the survivors")
        known = self.peers | {self.node}
        if (s_set | d_set) - known:
            raise UnmaskRequestError(
                f"unmask request names unknown nodes {sorted((s_set | d_set) - known)}")
        if len(s_set | d_set) != len(known):
            raise UnmaskRequestError(
                f"unmask request classifies {len(s_set | d_set)} nodes; this client holds "
                f"shares of {len(known)}")
        if len(s_set) < self.share_threshold:
            raise UnmaskRequestError(f"{len(s_set)} survivors, below the share threshold "
                                     f"{self.share_threshold}")
        if checked:
            self._check_consistency(env, f, s_set, d_set)
        self.revealed = {"b": sorted(s_set), "s": sorted(d_set)}
        return self._reply(UNMASK, {
            F_B_SHARES: bytes_map({v: self.held_b[v] for v in s_set}),
            F_S_SHARES: bytes_map({v: self.held_s[v] for v in d_set})})
