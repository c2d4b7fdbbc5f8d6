"""Coverage-guided fuzzing of the decoders with atheris (optional; not run by pytest).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/fuzz_decoders.py -atheris_runs=200000        # all targets
    .venv/bin/python tests/fuzz/fuzz_decoders.py -max_total_time=600 corpus/  # keep a corpus

The first input byte picks the target; the rest is its input. A target may return or raise
a :class:`FedCoLLMSecureError`; any other exception (or a crash or hang, which libFuzzer
reports itself) is a finding.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import json

    from fedcollm_secure.audit import parse_record, verify_log
    from fedcollm_secure.crypto.shamir import Share
    from fedcollm_secure.errors import FedCoLLMSecureError
    from fedcollm_secure.secagg import TensorSpec
    from fedcollm_secure.secagg.masking.config import MaskingConfig
    from fedcollm_secure.secagg.masking.messages import (
        KeyBundle,
        parse_error,
        parse_share_plaintext,
    )
    from fedcollm_secure.wire import Fields, Limits, decode

_TMP = Path(tempfile.mkdtemp(prefix="fcs-fuzz-"))


def _envelope(data: bytes) -> None:
    env = decode(data, Limits(max_header=1 << 16, max_body=1 << 16))
    f = Fields(env, set(env.fields))
    for name in env.fields:
        for call in (lambda n: f.uint(n), lambda n: f.number(n), lambda n: f.raw(n),
                     lambda n: f.list_of(n, 8), lambda n: f.bytes_map(n, 8)):
            try:
                call(name)
            except FedCoLLMSecureError:
                pass
    try:
        parse_error(env)
    except FedCoLLMSecureError:
        pass


def _json_targets(data: bytes) -> None:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    for target in (TensorSpec.from_json, MaskingConfig.from_dict):
        try:
            target(value)
        except FedCoLLMSecureError:
            pass


def _audit_file(data: bytes) -> None:
    path = _TMP / "log.jsonl"
    path.write_bytes(data)
    verify_log(path, allow_open=True)


TARGETS = [
    _envelope,
    lambda d: KeyBundle.from_bytes(1, d),
    parse_share_plaintext,
    Share.from_bytes,
    _json_targets,
    lambda d: parse_record(d, 1),
    _audit_file,
]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    try:
        target(data[1:])
    except FedCoLLMSecureError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
