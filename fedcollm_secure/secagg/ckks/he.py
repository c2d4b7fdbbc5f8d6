"""The TenSEAL layer of ``ckks``: contexts, encryption, loading, adding and decrypting.

Everything that crosses a boundary is TenSEAL's own serialization (protobuf around SEAL's
compressed format); nothing is pickled. Every TenSEAL/SEAL exception is turned into a typed
error: :class:`HEContextError` for contexts, :class:`CiphertextError` for ciphertexts.
"""

from __future__ import annotations

import os
import struct
import tempfile
from functools import lru_cache

import blake3
import numpy as np
import tenseal as ts
from tenseal import sealapi

from ...errors import CiphertextError, HEContextError
from .params import CKKSParams

CONTEXT_DIGEST_LABEL = b"ckks/v1/public-context\x00"
CIPHERTEXT_DIGEST_LABEL = b"ckks/v1/ciphertext\x00"


def digest(label: bytes, data: bytes | memoryview) -> bytes:
    h = blake3.blake3(label)
    h.update(memoryview(data).cast("B"))
    return h.digest()


def context_digest(public_context: bytes | memoryview) -> bytes:
    """BLAKE3-256 of the serialized public context (binds ciphertexts to it)."""
    return digest(CONTEXT_DIGEST_LABEL, public_context)


def ciphertext_digest(ciphertext: bytes | memoryview) -> bytes:
    return digest(CIPHERTEXT_DIGEST_LABEL, ciphertext)


@lru_cache(maxsize=16)
def _chain(params: CKKSParams) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """(primes, key-level parms_id, lowest-level parms_id) as SEAL derives them."""
    enc = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
    enc.set_poly_modulus_degree(params.poly_modulus_degree)
    moduli = sealapi.CoeffModulus.Create(params.poly_modulus_degree,
                                         list(params.coeff_mod_bit_sizes))
    enc.set_coeff_modulus(moduli)
    seal_ctx = sealapi.SEALContext(enc, True, sealapi.SEC_LEVEL_TYPE.TC128)
    if not seal_ctx.parameters_set():
        raise HEContextError(f"SEAL refuses the parameters: {seal_ctx.parameter_error_message()}")
    return ([m.value() for m in moduli], tuple(seal_ctx.key_parms_id()),
            tuple(seal_ctx.last_parms_id()))


def new_secret_context(params: CKKSParams, n_threads: int = 1) -> ts.Context:
    """A fresh context with a secret key (key authority only). No Galois keys."""
    _chain(params)  # SEAL's own check of the parameters (128-bit security level)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), n_threads=n_threads)
    ctx.global_scale = params.scale
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The public key and parameters only: no secret, Galois or relinearisation keys."""
    return bytes(ctx.serialize(save_public_key=True, save_secret_key=False,
                               save_galois_keys=False, save_relin_keys=False))


def check_context(ctx: ts.Context, params: CKKSParams, *, public: bool) -> None:
    """Parameters equal ``params``; with ``public`` no key beyond the public key."""
    _, key_parms, _ = _chain(params)
    if tuple(ctx.seal_context().data.key_parms_id()) != key_parms:
        raise HEContextError("the context's parameters differ from the configured "
                             f"{params.to_json()}")
    try:
        scale = ctx.global_scale
    except ValueError:
        raise HEContextError("the context has no global scale") from None
    if scale != params.scale:
        raise HEContextError(f"the context's scale {scale} is not 2^{params.scale_bits}")
    if not ctx.has_public_key():
        raise HEContextError("the context has no public key")
    if public:
        if ctx.has_secret_key() or ctx.is_private():
            raise HEContextError("refused: the context carries a secret key")
        if ctx.has_galois_keys():
            raise HEContextError("refused: the context carries Galois keys (not needed for sums)")
        if ctx.has_relin_keys():
            raise HEContextError("refused: the context carries relinearisation keys "
                                 "(not needed for sums)")


def load_public_context(data: bytes | memoryview, params: CKKSParams,
                        n_threads: int = 1) -> ts.Context:
    """Load a serialized context and refuse it unless it is public and has ``params``."""
    try:
        ctx = ts.context_from(bytes(data), n_threads=n_threads)
    except Exception as exc:  # TenSEAL raises ValueError/RuntimeError from protobuf or SEAL
        raise HEContextError(f"not a valid TenSEAL context: {type(exc).__name__}") from None
    check_context(ctx, params, public=True)
    ctx.auto_relin, ctx.auto_rescale, ctx.auto_mod_switch = False, True, True
    return ctx


def encrypt(ctx: ts.Context, params: CKKSParams, values: np.ndarray) -> bytes:
    """Encrypt ``values`` in chunks of ``params.slots`` at the lowest level; serialize them.

    Each chunk is encoded at the lowest level (modulo ``q0`` only), so SEAL encrypts it there
    directly: it draws the encryption of zero one level up and divides it exactly by the
    dropped prime. Every chunk on the wire holds two polynomials modulo ``q0``, and no work
    is spent on the middle primes (encrypting at the top and rescaling down costs about 1.7x
    more). The result is TenSEAL's own ``CKKSVector`` message, byte for byte what
    ``CKKSVector.serialize`` writes for these ciphertexts (see :func:`_vector_message`).
    """
    if values.ndim != 1 or values.size == 0:
        raise CiphertextError("can only encrypt a non-empty vector")
    seal_ctx = ctx.seal_context().data
    low = seal_ctx.last_parms_id()
    if tuple(low) != _chain(params)[2]:
        raise HEContextError("the context's parameters differ from the configured ones")
    values = values.astype(np.float64, copy=False)
    slots, scale = params.slots, params.scale
    try:
        encoder = sealapi.CKKSEncoder(seal_ctx)
        encryptor = sealapi.Encryptor(seal_ctx, ctx.public_key().data)
        plain, cipher = sealapi.Plaintext(), sealapi.Ciphertext(seal_ctx)  # reused per chunk
        sizes, blobs = [], []
        with _SealScratch() as scratch:
            for start in range(0, values.size, slots):
                chunk = values[start:start + slots]
                encoder.encode(chunk.tolist(), low, scale, plain)
                encryptor.encrypt(plain, cipher)
                sizes.append(chunk.size)
                blobs.append(scratch.dump(cipher))
    except (RuntimeError, ValueError, OSError) as exc:  # SEAL/pybind refusals, scratch file
        raise CiphertextError(f"encryption failed: {type(exc).__name__}: {exc}") from None
    return _vector_message(sizes, blobs, scale)


class _SealScratch:
    """A private file for SEAL's ``save(path)`` (TenSEAL's SEAL bindings only save to a path):
    an anonymous in-memory file where the OS has one, else a file in a fresh 0700 directory."""

    def __enter__(self) -> _SealScratch:
        self._fd: int | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        proc_fd = "/proc/self/fd"
        if hasattr(os, "memfd_create") and os.path.isdir(proc_fd):
            self._fd = os.memfd_create("fedcollm-ckks")
            self.path = f"{proc_fd}/{self._fd}"
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="fedcollm-ckks-")
            self.path = os.path.join(self._dir.name, "ciphertext")
        return self

    def dump(self, obj: sealapi.Ciphertext) -> bytes:
        obj.save(self.path)
        if self._fd is not None:
            return os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        with open(self.path, "rb") as fh:
            return fh.read()

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
        if self._dir is not None:
            self._dir.cleanup()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _vector_message(sizes: list[int], blobs: list[bytes], scale: float) -> bytes:
    """TenSEAL's ``CKKSVectorProto``: 1 = packed chunk sizes, 2 = SEAL ciphertexts (one per
    chunk, SEAL's own serialization), 3 = scale (double)."""
    packed = b"".join(_varint(size) for size in sizes)
    parts = [b"\x0a", _varint(len(packed)), packed]
    for blob in blobs:
        parts += [b"\x12", _varint(len(blob)), blob]
    parts += [b"\x19", struct.pack("<d", scale)]
    return b"".join(parts)


def chunks_for(length: int, params: CKKSParams) -> int:
    return -(-length // params.slots)


def load_vector(ctx: ts.Context, params: CKKSParams, data: bytes | memoryview,
                length: int) -> ts.CKKSVector:
    """Load a serialized ciphertext vector of ``length`` values; check every chunk's level,
    size, scale and form so that adding it cannot fail half-way."""
    try:
        vec = ts.ckks_vector_from(ctx, bytes(data))
        size = vec.size()
        cts = vec.ciphertext()
    except Exception as exc:  # protobuf/SEAL refuse cut or corrupted data
        raise CiphertextError(f"not a valid ciphertext for this context: "
                              f"{type(exc).__name__}") from None
    if size != length or len(cts) != chunks_for(length, params):
        raise CiphertextError(f"ciphertext holds {size} values in {len(cts)} chunks, expected "
                              f"{length} in {chunks_for(length, params)}")
    _, _, low = _chain(params)
    for ct in cts:
        if (tuple(ct.parms_id()) != low or ct.size() != 2 or not ct.is_ntt_form()
                or ct.scale != params.scale):
            raise CiphertextError("a ciphertext chunk has the wrong level, size, form or scale")
    return vec


def add(total: ts.CKKSVector | None, vec: ts.CKKSVector) -> ts.CKKSVector:
    """``total + vec`` as a new vector (the running total is never modified in place)."""
    if total is None:
        return vec
    try:
        return total + vec
    except Exception as exc:
        raise CiphertextError(f"ciphertexts cannot be added: {type(exc).__name__}") from None


def serialize(vec: ts.CKKSVector) -> bytes:
    return bytes(vec.serialize())


def decrypt(ctx: ts.Context, vec: ts.CKKSVector) -> np.ndarray:
    try:
        return np.asarray(vec.decrypt(), dtype=np.float64)
    except Exception as exc:
        raise CiphertextError(f"decryption failed: {type(exc).__name__}") from None
