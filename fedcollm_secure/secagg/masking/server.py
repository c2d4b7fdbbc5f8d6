"""Server side of ``masking/v1``: a sans-IO workflow driven stage by stage.

Sets of nodes follow Bonawitz et al.: U1 advertised keys, U2 shared keys, U3 sent masked
input (their inputs are in the sum), U4 answered the unmask request. After every stage the
workflow checks that the round can still complete; if not it raises :class:`ThresholdError`
*before* sending the next request, so an aborted round reveals nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...buffers import ROUND_BUFFERS
from ...crypto.kdf import derive_key
from ...crypto.mac import MacStream
from ...crypto.key_agreement import (
    agree,
    generate_keypair,
    load_private_key,
    public_of,
)
from ...crypto.prg import MaskPRG, ring_mask
from ...crypto.randomness import RandomSource, default_random
from ...crypto.shamir import SHARE_SIZE, Share, reconstruct_secret
from ...crypto.signatures import VerifyKey
from ...errors import (
    FedCoLLMSecureError,
    MacError,
    PartyError,
    ProtocolError,
    SecretSharingError,
    ThresholdError,
    WireFormatError,
)
from ...identity import AllowList
from ...wire import SERVER, Envelope, Fields, Limits, Message, b64, bytes_map, decode
from ..base import SecureSumResult, ServerWorkflow, StageRequests
from ..tensors import TensorSpec
from .config import PROTOCOL, PROTOCOL_NAME, MaskingConfig, RoundParams
from .graph import complete_graph, harary_graph
from .messages import (
    ADVERTISE_KEYS,
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
    SEALED_SHARE_SIZE,
    SHARE_KEYS,
    UNMASK,
    KeyBundle,
    b_commitment,
    client_mac_keys,
    consistency_message,
    envelope,
    kdf_context,
    mask_sign,
    ordered,
    params_digest,
    parse_error,
    stages_of,
)

HEADER_LIMIT = 4 << 20
_SUM_CHUNK = 1 << 16  # ring elements per piece when MACing and summing a masked vector


@dataclass
class _PendingVector:
    """A masked input whose form was checked, waiting to be MACed and summed."""

    node: int
    vec: np.ndarray  # a view into the reply
    mac: MacStream  # already fed the envelope's bytes before the body
    tag: bytes


def _matches_public_key(public: bytes) -> Callable[[bytes], bool]:
    return lambda private: public_of(private) == public


class MaskingServer(ServerWorkflow):
    def __init__(self, client_ids: Sequence[str], spec: TensorSpec, *,
                 config: MaskingConfig | None = None, threshold: int | None = None,
                 rng: RandomSource | None = None, session: bytes | None = None,
                 round_: int = 0, allow_list: AllowList | None = None) -> None:
        """With ``allow_list`` the round announces a roster (node -> client name), each
        client's key bundle must be signed by its listed long-term key, and the consistency
        check runs."""
        ids = list(client_ids)
        if len(set(ids)) != len(ids):
            raise PartyError("duplicate client ids")
        self.config = config or MaskingConfig()
        self.params = RoundParams.resolve(self.config, len(ids), threshold)
        self.rng = rng or default_random()
        self.session = session if session is not None else self.rng.bytes(16)
        self.round = round_
        self.spec = spec
        self.length = spec.size + 1  # the weight travels as the last element
        self.ids = {i + 1: cid for i, cid in enumerate(sorted(ids))}
        self.node_of = {cid: u for u, cid in self.ids.items()}
        nodes = sorted(self.ids)
        if self.params.graph == "complete":
            self.graph = complete_graph(nodes)
        else:
            self.graph = harary_graph(nodes, self.params.degree, self.rng)
        self.allow_list = allow_list
        if allow_list is not None:
            for cid in ids:
                allow_list.verify_key(cid)  # SignatureError: a client not on the allow-list
        self.checked = self.config.consistency_check or allow_list is not None
        self.stages = stages_of(self.checked)
        self.consistency_sigs: dict[int, bytes] = {}
        self.round_keys = generate_keypair(self.rng)  # authenticates masked inputs (MAC keys)
        self.announced = self._announced_params()
        self.params_digest = params_digest(self.announced)
        self.stage_index = 0
        self.active: set[int] = set(nodes)
        self.dropped: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        self.bundles: dict[int, KeyBundle] = {}
        self.mac_keys: dict[int, dict[str, bytes]] = {}  # node -> its replies' MAC keys
        self.sent_bundles: dict[int, frozenset[int]] = {}
        # the sealed shares each node addressed to each peer, kept as the base64 text they
        # arrived in (checked when they arrived) and forwarded as is
        self.sealed: dict[int, dict[int, str]] = {}
        self.bundle_text: dict[int, str] = {}  # base64 of each accepted bundle, forwarded
        self.commits: dict[int, bytes] = {}
        self.peers: dict[int, frozenset[int]] = {}
        self.masked_sum: np.ndarray | None = None  # running sum of the masked inputs (U3)
        self._result_buffer = np.empty(0)  # float64 result; masked_sum lives at its end
        self.unmask_lists: dict[int, tuple[list[int], list[int]]] = {}
        self.revealed_b: dict[int, dict[int, Share]] = {}
        self.revealed_s: dict[int, dict[int, Share]] = {}
        self.contributors: list[int] = []
        self.late_dropouts: list[str] = []
        self.seconds: dict[str, float] = {}
        self._result: SecureSumResult | None = None
        self.aborted: FedCoLLMSecureError | None = None
        self._pending: list[_PendingVector] = []  # masked inputs checked but not yet summed

    # --- driving -------------------------------------------------------------------------
    def next_requests(self) -> StageRequests | None:
        if self.stage_index >= len(self.stages) or self.aborted is not None:
            return None
        stage = self.stages[self.stage_index]
        start = time.perf_counter()
        build = getattr(self, f"_requests_{stage}")
        messages = {self.ids[u]: envelope(stage, self.session, self.round, SERVER, u,
                                          build(u)).encode() for u in sorted(self.active)}
        self._tick(stage, start)
        return StageRequests(stage, messages)

    def receive(self, stage: str, replies: Mapping[str, Message]) -> None:
        if self.aborted is not None:
            raise self.aborted
        if self.stage_index >= len(self.stages) or stage != self.stages[self.stage_index]:
            raise ProtocolError(f"replies for {stage!r} arrived out of order")
        start = time.perf_counter()
        answered: set[int] = set()
        handler = getattr(self, f"_on_{stage}")
        for u in sorted(self.active):
            cid = self.ids[u]
            data = replies.get(cid)
            if data is None:
                continue
            try:
                env = self._open(stage, u, data)
                handler(u, env)
                answered.add(u)
            except FedCoLLMSecureError as exc:
                self.rejected[cid] = f"{stage}: {type(exc).__name__}: {exc}"
        if stage == MASKED_INPUT:
            for u, mac_error in self._sum_masked_inputs():
                answered.discard(u)
                self.rejected[self.ids[u]] = f"{stage}: MacError: {mac_error}"
        gone = self.active - answered
        if stage in (CONSISTENCY_CHECK, UNMASK):  # their inputs are in the sum already
            self.late_dropouts = sorted({*self.late_dropouts, *(self.ids[u] for u in gone)})
        else:
            for u in gone:
                self.dropped[self.ids[u]] = stage
        self.active = answered
        try:
            getattr(self, f"_after_{stage}")()
        except FedCoLLMSecureError as exc:
            self.aborted = exc  # the round is over: no further requests, result() re-raises
            raise
        self.stage_index += 1
        self._tick(stage, start)

    def result(self) -> SecureSumResult:
        if self.aborted is not None:
            raise self.aborted
        if self._result is None:
            raise ProtocolError("the round has not completed")
        return self._result

    def _tick(self, stage: str, start: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _open(self, stage: str, u: int, data: Message) -> Envelope:
        itemsize = np.dtype(self.params.values.dtype).itemsize
        max_body = self.length * itemsize if stage == MASKED_INPUT else 0
        env = decode(data, Limits(max_header=HEADER_LIMIT, max_body=max_body))
        if env.stage == ERROR and env.protocol == PROTOCOL:
            if u in self.bundles:  # its signing key is known: the refusal must be signed
                env.verify(VerifyKey(self.bundles[u].sig_pk))
            raise ProtocolError(f"client refused: {parse_error(env)}")
        env.expect(protocol=PROTOCOL, stage=stage, session=self.session, round_=self.round,
                   src=u, dst=SERVER)
        # the advertise_keys MAC key comes from the cipher key the reply carries
        # (_on_advertise_keys); the masked vector's MAC is checked while it is summed
        # (_on_masked_input); every other reply here
        if stage not in (ADVERTISE_KEYS, MASKED_INPUT):
            env.verify_mac(self.mac_keys[u][stage])
        return env

    def _require(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise ThresholdError(f"{what}: {count} clients remain, below the threshold "
                                 f"{self.params.threshold}; round aborted")

    def _prune_isolated(self, stage: str) -> None:
        """Drop nodes with too few live neighbours to ever recover their secrets."""
        changed = True
        while changed:
            changed = False
            for u in sorted(self.active):
                if len(self.graph[u] & self.active) + 1 < self.params.share_threshold:
                    self.active.discard(u)
                    self.dropped[self.ids[u]] = stage
                    self.rejected[self.ids[u]] = f"{stage}: too few live neighbours"
                    changed = True

    # --- stage 0 -------------------------------------------------------------------------
    def _announced_params(self) -> dict[str, object]:
        """The advertise_keys fields that are the same for every client."""
        p = self.params
        return {F_N_NODES: p.n_nodes, F_THRESHOLD: p.threshold,
                F_SHARE_THRESHOLD: p.share_threshold, F_GRAPH: p.graph,
                F_RING_BITS: p.values.ring_bits, F_LEVELS: p.values.levels,
                F_CLIP: p.values.clip, F_MAX_WEIGHT: p.weight.clip, F_SPEC: self.spec.to_json(),
                F_SERVER_PK: b64(self.round_keys.public_bytes), F_CONSISTENCY: self.checked,
                **({F_ROSTER: {str(v): cid for v, cid in self.ids.items()}}
                   if self.allow_list is not None else {})}

    def _requests_advertise_keys(self, u: int) -> dict[str, object]:
        return {**self.announced, F_NEIGHBOURS: sorted(self.graph[u])}

    def _on_advertise_keys(self, u: int, env: Envelope) -> None:
        """The reply is MACed under a key from the cipher key it carries, so a changed key,
        signature or parameter digest fails the MAC. The bundle signature is for the peers,
        which check it against their own parameter digest (SPEC section 7.1); the server
        compares the digest in clear, saving an Ed25519 verification per client."""
        f = Fields(env, {F_CIPHER_PK, F_MASK_PK, F_SIG_PK, F_BUNDLE_SIG, F_PARAMS_HASH})
        bundle = KeyBundle(u, f.raw(F_CIPHER_PK, 32), f.raw(F_MASK_PK, 32), f.raw(F_SIG_PK, 32),
                           f.raw(F_BUNDLE_SIG, 64))
        digest = f.raw(F_PARAMS_HASH, 32)
        mac_keys = client_mac_keys(agree(self.round_keys.private, bundle.cipher_pk),
                                   kdf_context(self.session, self.round), u)
        env.verify_mac(mac_keys[ADVERTISE_KEYS])
        if digest != self.params_digest:
            raise PartyError("the client was announced other round parameters")
        if self.allow_list is not None:
            self.allow_list.require(self.ids[u], bundle.sig_pk)
        self.bundles[u] = bundle
        self.bundle_text[u] = b64(bundle.to_bytes())
        self.mac_keys[u] = mac_keys

    def _after_advertise_keys(self) -> None:
        self._prune_isolated(SHARE_KEYS)
        self._require(len(self.active), "after advertise_keys")

    # --- stage 1 -------------------------------------------------------------------------
    def _requests_share_keys(self, u: int) -> dict[str, object]:
        members = (self.graph[u] & self.active) | {u}
        self.sent_bundles[u] = members - {u}
        return {F_BUNDLES: {str(v): self.bundle_text[v] for v in sorted(members)}}

    def _on_share_keys(self, u: int, env: Envelope) -> None:
        f = Fields(env, {F_SHARES, F_B_COMMIT})
        sealed = f.bytes_map(F_SHARES, MAX_NODES, size=SEALED_SHARE_SIZE)  # checks each
        if set(sealed) != self.sent_bundles[u]:
            raise PartyError("shares are not addressed to exactly the forwarded peers")
        commit = f.raw(F_B_COMMIT, 32)
        text = env.fields[F_SHARES]
        self.sealed[u] = {v: text[str(v)] for v in sealed}
        self.commits[u] = commit

    def _after_share_keys(self) -> None:
        self._prune_isolated(MASKED_INPUT)
        self._require(len(self.active), "after share_keys")

    # --- stage 2 -------------------------------------------------------------------------
    def _requests_masked_input(self, u: int) -> dict[str, object]:
        peers = self.graph[u] & self.active
        self.peers[u] = frozenset(peers)
        return {F_SHARES: {str(v): self.sealed[v][u] for v in sorted(peers)}}

    def _on_masked_input(self, u: int, env: Envelope) -> None:
        """Check the reply's form; its MAC is checked while it is summed
        (:meth:`_sum_masked_inputs`, once every reply of the stage is in)."""
        f = Fields(env, {F_LENGTH})
        dtype = np.dtype(self.params.values.dtype).newbyteorder("<")
        if f.uint(F_LENGTH) != self.length or len(env.body) != self.length * dtype.itemsize:
            raise WireFormatError(f"masked vector must have {self.length} elements")
        vec = np.frombuffer(env.body, dtype=dtype)  # a view into the message, no copy
        bits = self.params.values.ring_bits
        if bits not in (32, 64) and int(vec.max(initial=0)) > ring_mask(bits):
            raise WireFormatError("masked vector has elements outside the ring")
        if env.mac is None:
            raise MacError(f"masked input from node {u} carries no MAC")
        mac = MacStream(self.mac_keys[u][MASKED_INPUT])
        signed = memoryview(env.signed_bytes).cast("B")
        body_at = signed.nbytes - vec.nbytes
        mac.update(signed[:body_at])
        self._pending.append(_PendingVector(u, vec, mac, env.mac))

    def _sum_masked_inputs(self) -> list[tuple[int, MacError]]:
        """MAC and add every pending masked vector in one pass, piece by piece: each piece of
        the running sum stays in cache while the same piece of every vector is MACed and added
        to it. A vector whose tag then fails is subtracted again (exact in the ring) and
        returned with its error. The server keeps only the running sum, never one client's
        vector."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        first = self.masked_sum is None
        acc = self.masked_sum
        if acc is None:
            acc = self._accumulator(pending[0].vec.dtype.newbyteorder("="))
        step = _SUM_CHUNK
        for start in range(0, self.length, step):
            part = acc[start:start + step]
            for i, p in enumerate(pending):
                p.mac.update(p.vec[start:start + step].data)
                if first and i == 0:  # the first vector initialises the sum: no zeroing
                    part[:] = p.vec[start:start + step]
                else:
                    np.add(part, p.vec[start:start + step], out=part)
        failed: list[tuple[int, MacError]] = []
        for p in pending:
            try:
                p.mac.verify(p.tag)
            except MacError as exc:
                np.subtract(acc, p.vec, out=acc)
                failed.append((p.node, exc))
        self.masked_sum = acc
        return failed

    def _accumulator(self, dtype: np.dtype[Any]) -> np.ndarray:
        """The running sum of masked vectors, placed at the end of the buffer that will hold
        the float64 result, so the round touches one fresh buffer instead of two (fresh pages
        are costly). Decoding piece by piece from the front never overwrites a ring element
        before it is read: the float64 values of elements [0, k) end at byte 8k, and ring
        element k starts at byte offset + w*k >= (8 - w)*L + w*k >= 8k for k <= L."""
        w, n = dtype.itemsize, self.length
        offset = -(-(8 - w) * n // 64) * 64  # 64-byte aligned
        self._result_buffer = ROUND_BUFFERS.take(-(-(offset + w * n) // 8) * 8).view(np.float64)
        return self._result_buffer.view(np.uint8)[offset:offset + w * n].view(dtype)

    def _holders(self, u: int) -> frozenset[int]:
        """Nodes holding shares of u's secrets (u itself included)."""
        return self.peers.get(u, frozenset()) | {u}

    def _check_recoverable(self, responders: set[int], when: str) -> None:
        t = self.params.share_threshold
        u3 = set(self.contributors)
        for u in u3:
            if len(self._holders(u) & responders) < t:
                raise ThresholdError(f"{when}: too few holders of node {u}'s self-mask shares")
        for d in set(self.peers) - u3:
            if self.peers[d] & u3 and len(self.peers[d] & responders) < t:
                raise ThresholdError(f"{when}: too few holders of dropped node {d}'s mask key")

    def _after_masked_input(self) -> None:
        self.contributors = sorted(self.active)
        self._require(len(self.active), "after masked_input")
        self._check_recoverable(set(self.active), "before unmask")

    # --- consistency check (optional) ---------------------------------------------------
    def _requests_consistency_check(self, u: int) -> dict[str, object]:
        return {F_SURVIVORS: list(self.contributors)}

    def _on_consistency_check(self, u: int, env: Envelope) -> None:
        sig = Fields(env, {F_SIGNATURE}).raw(F_SIGNATURE, 64)
        VerifyKey(self.bundles[u].sig_pk).verify(
            sig, consistency_message(self.session, self.round, u, self.contributors))
        self.consistency_sigs[u] = sig

    def _after_consistency_check(self) -> None:
        self._require(len(self.active), "after consistency_check")
        self._check_recoverable(set(self.active), "before unmask")

    # --- stage 3 -------------------------------------------------------------------------
    def _requests_unmask(self, u: int) -> dict[str, object]:
        known = self.peers[u] | {u}
        survivors = sorted(known & set(self.contributors))
        dropped = sorted(known - set(self.contributors))
        self.unmask_lists[u] = (survivors, dropped)
        fields: dict[str, object] = {F_SURVIVORS: survivors, F_DROPPED: dropped}
        if self.checked:
            fields[F_SIGNATURES] = bytes_map({v: self.consistency_sigs[v] for v in known
                                              if v in self.consistency_sigs and v in self.active})
        return fields

    def _on_unmask(self, u: int, env: Envelope) -> None:
        f = Fields(env, {F_B_SHARES, F_S_SHARES})
        b = f.bytes_map(F_B_SHARES, MAX_NODES, size=SHARE_SIZE)
        s = f.bytes_map(F_S_SHARES, MAX_NODES, size=SHARE_SIZE)
        survivors, dropped = self.unmask_lists[u]
        if sorted(b) != survivors or sorted(s) != dropped:
            raise PartyError("revealed shares do not match the unmask request")
        try:
            b_sh = {v: Share.from_bytes(raw) for v, raw in b.items()}
            s_sh = {v: Share.from_bytes(raw) for v, raw in s.items()}
        except SecretSharingError as exc:
            raise WireFormatError(str(exc)) from None
        if any(sh.x != u for sh in (*b_sh.values(), *s_sh.values())):
            raise PartyError("a revealed share does not carry its holder's index")
        for v, sh in b_sh.items():
            self.revealed_b.setdefault(v, {})[u] = sh
        for v, sh in s_sh.items():
            self.revealed_s.setdefault(v, {})[u] = sh

    def _after_unmask(self) -> None:
        self._require(len(self.active), "after unmask")
        self._check_recoverable(set(self.active), "after unmask")
        self._result = self._aggregate()

    def _commitment_check(self, u: int, commit: bytes) -> Callable[[bytes], bool]:
        return lambda seed: b_commitment(self.session, self.round, u, seed) == commit

    def _aggregate(self) -> SecureSumResult:
        p, t = self.params, self.params.share_threshold
        ctx = kdf_context(self.session, self.round)
        masks: list[tuple[bytes, int]] = []  # seeds to remove, with the sign to apply
        for u in self.contributors:
            masks.append((reconstruct_secret(self.revealed_b[u].values(), t,
                                             check=self._commitment_check(u, self.commits[u])),
                          -1))
        u3 = set(self.contributors)
        for d in sorted(set(self.peers) - u3):
            live = sorted(self.peers[d] & u3)
            if not live:
                continue
            raw = reconstruct_secret(self.revealed_s[d].values(), t,
                                     check=_matches_public_key(self.bundles[d].mask_pk))
            private = load_private_key(raw)
            for u in live:  # u added mask_sign(u, d) * PRG(s_ud); take it out
                masks.append((derive_key(agree(private, self.bundles[u].mask_pk), ctx,
                                         purpose=PURPOSE_PAIR_MASK, pair=ordered(u, d)),
                              -mask_sign(u, d)))
        prg = MaskPRG(self.length, p.values.ring_bits)
        acc = self.masked_sum
        if acc is None:
            raise ProtocolError("no masked input was received")
        values = self._result_buffer[:self.length - 1]  # acc lies behind it (_accumulator)

        def decode(start: int, part: np.ndarray) -> None:  # each unmasked piece, in cache
            m = min(part.size, values.size - start)
            p.values.dequantize(part[:m], out=values[start:start + m])

        prg.add_many(acc, masks, then=decode)
        weight_total = float(p.weight.dequantize(acc[-1:])[0])
        return SecureSumResult(
            sum=self.spec.unflatten(values),
            survivors=[self.ids[u] for u in self.contributors],
            dropped=dict(self.dropped), weight_total=weight_total, protocol=PROTOCOL_NAME,
            stats={"server_seconds": self.seconds, "rejected": dict(self.rejected),
                   "late_dropouts": list(self.late_dropouts),
                   "server_mask_bytes": prg.bytes_generated,
                   "params": {"threshold": p.threshold, "share_threshold": t,
                              "graph": p.graph, "degree": p.degree,
                              "ring_bits": p.values.ring_bits, "levels": p.values.levels,
                              "error_bound": p.values.error_bound(len(self.contributors))}})
