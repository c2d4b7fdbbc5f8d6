"""Cryptographic primitives. No federated-learning knowledge lives here.

Everything but Shamir sharing and fixed-point quantisation comes from ``cryptography``.
"""

from .aead import AEAD_KEY_SIZE, associated_data, open_sealed, seal
from .kdf import KdfContext, derive_key
from .key_agreement import KeyPair, agree, generate_keypair, load_private_key, load_public_key
from .prg import MaskPRG, expand_seed, ring_dtype, uniform01
from .quantization import QuantizationSpec
from .randomness import CSPRNG, InsecureSeededRandomForTests, RandomSource, default_random
from .shamir import PRIME, Share, reconstruct_secret, split_secret
from .signatures import SigningKey, VerifyKey, generate_signing_key

__all__ = [
    "AEAD_KEY_SIZE",
    "CSPRNG",
    "PRIME",
    "InsecureSeededRandomForTests",
    "KdfContext",
    "KeyPair",
    "MaskPRG",
    "QuantizationSpec",
    "RandomSource",
    "Share",
    "SigningKey",
    "VerifyKey",
    "agree",
    "associated_data",
    "default_random",
    "derive_key",
    "expand_seed",
    "generate_keypair",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "open_sealed",
    "reconstruct_secret",
    "ring_dtype",
    "seal",
    "split_secret",
    "uniform01",
]
