"""Secure-aggregation benchmark: our ``masking`` vs ``plaintext``, the ChaCha20 floor and Flower.

One run measures two cases (see ``README.md`` in this folder):

* **A**: n=10 clients x 2^20 float32 parameters, complete graph (SecAgg), threshold 6,
  2 clients drop after sending their masked input (drop stage ``unmask``);
* **B**: n=50 clients, random k-regular graph (SecAgg+; default degree and share threshold),
  d=2^20 by default, 2 clients drop after sending their masked input.

Rows per case: ``masking`` (ours), ``plaintext`` (ours, same vectors), ``keystream floor``
(mask bytes generated / ChaCha20 throughput measured in this run with ``MaskPRG``) and
``flower`` (``SecAggPlusWorkflow`` + ``secaggplus_mod`` of flwr, in process, see
``flower_baseline.py``); case A also has a ``ckks`` row (TenSEAL CKKS with a key authority,
all n clients contributing). A separate CKKS section times the CKKS operations on one
d-parameter vector: bytes per float32 parameter, encrypt / add / decrypt seconds per million
parameters (one core: TenSEAL with one thread).

Every measurement is repeated ``--reps`` times (default 5) after one untimed warm-up run;
each reported number is the **median** over the repetitions, taken per column (the best of
the repetitions and every repetition are kept in the JSON).

Usage::

    .venv/bin/python benchmarks/secagg/run.py            # full table, writes results.json
    .venv/bin/python benchmarks/secagg/run.py --quick    # small smoke run (writes nothing)
    .venv/bin/python benchmarks/secagg/run.py --profile-only  # cProfile breakdown only
    .venv/bin/python benchmarks/secagg/run.py --ckks-only     # CKKS section + case A rows
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import json
import os
import platform
import pstats
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # flower_baseline.py lives next to this file
sys.path.insert(0, str(HERE.parent))  # bench_env.py: shared by the benchmarks

from bench_env import cpu_model, package_version  # noqa: E402
from fedcollm_secure import secure_sum  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms  # noqa: E402

from fedcollm_secure.crypto.prg import MaskPRG  # noqa: E402
from fedcollm_secure.secagg.ckks import PRESETS as CKKS_PRESETS  # noqa: E402
from fedcollm_secure.secagg.ckks import he as ckks_he  # noqa: E402
from fedcollm_secure.secagg import get_aggregator  # noqa: E402
from fedcollm_secure.secagg.tensors import TensorSpec  # noqa: E402
from fedcollm_secure.transport import FaultPlan, InProcessChannel, drive  # noqa: E402

try:  # the Flower baseline is optional (pip install -e '.[flower]')
    from flower_baseline import FLWR_VERSION, run_flower_secaggplus
except ImportError as _exc:  # pragma: no cover - depends on the environment
    run_flower_secaggplus = None
    FLWR_VERSION = None
    _FLOWER_IMPORT_ERROR = repr(_exc)
else:
    _FLOWER_IMPORT_ERROR = None

DROP_STAGE = "unmask"  # dropped after sending the masked input: its input stays in the sum
PARAM = "w"  # every client's update is a single tensor {PARAM: float32[d]}
RING_BYTES = 4  # ring_bits <= 32 -> uint32 words


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))






def _max_err(result_sum: np.ndarray, exact: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(result_sum, dtype=np.float64) - exact)))


def measure_chacha_throughput(length: int = 1 << 24, repeats: int = 7) -> dict[str, float]:
    """ChaCha20 keystream throughput (bytes/s) of ``MaskPRG`` on a large buffer.

    ``keystream``: the bare keystream fill that every mask expansion does (the floor).
    ``add_into``: keystream + the modular add into an accumulator (what masking really runs).
    Median over ``repeats`` fresh seeds of ``length`` 32-bit words (64 MiB by default).
    """
    prg = MaskPRG(length, 32)
    nbytes = length * RING_BYTES
    zeros, out = bytes(nbytes), bytearray(nbytes + 64)
    acc = np.zeros(length, dtype=np.uint32)
    ks, add = [], []
    for _ in range(repeats):
        seed = os.urandom(32)
        t0 = time.perf_counter()  # the bare ChaCha20 keystream into a preallocated buffer
        Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update_into(zeros, out)
        ks.append(time.perf_counter() - t0)
        seed = os.urandom(32)
        t0 = time.perf_counter()
        prg.add_into(acc, seed)
        add.append(time.perf_counter() - t0)
    return {"buffer_bytes": nbytes, "repeats": repeats,
            "keystream_bytes_per_s": nbytes / _median(ks),
            "keystream_bytes_per_s_best": nbytes / min(ks),
            "add_into_bytes_per_s": nbytes / _median(add)}


def make_vectors(n: int, d: int, seed: int) -> list[np.ndarray]:
    rs = np.random.default_rng(seed)
    return [rs.uniform(-1.0, 1.0, d).astype(np.float32) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# our protocols
# --------------------------------------------------------------------------------------------
def _ours_metrics(res: Any, wall: float, dropped: list[str], exact: np.ndarray) -> dict[str, Any]:
    st = res.stats
    full = [c for c in st["client_seconds"] if c not in dropped]
    return {
        "client_seconds": _median_free_mean([sum(st["client_seconds"][c].values()) for c in full]),
        "client_seconds_by_stage": {
            s: _median_free_mean([st["client_seconds"][c].get(s, 0.0) for c in full])
            for s in next(iter(st["client_seconds"].values()))},
        "server_seconds": float(sum(st["server_seconds"].values())),
        "server_seconds_by_stage": dict(st["server_seconds"]),
        "stage_seconds": dict(st.get("stage_seconds", {})),
        "total_seconds": wall,
        "bytes_per_client": _median_free_mean([sum(st["bytes_sent"][c].values()) for c in full]),
        "max_abs_error": _max_err(res.sum[PARAM], exact),
        "survivors": len(res.survivors),
    }


def _median_free_mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else 0.0


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_masking(updates: dict, threshold: int, drop: dict[str, str], options: dict,
                exact: np.ndarray) -> dict[str, Any]:
    f0, t0 = _minor_faults(), time.perf_counter()
    res = secure_sum(updates, protocol="masking", threshold=threshold, drop=drop, **options)
    wall = time.perf_counter() - t0
    m = _ours_metrics(res, wall, list(drop), exact)
    m["page_faults"] = _minor_faults() - f0
    m["server_mask_bytes"] = int(res.stats["server_mask_bytes"])
    m["params"] = dict(res.stats["params"])
    if len(res.survivors) != len(updates):
        raise RuntimeError(f"unexpected survivors {res.survivors}")
    return m


def run_plaintext(updates: dict, exact: np.ndarray) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InsecureAggregationWarning: expected here
        f0, t0 = _minor_faults(), time.perf_counter()
        res = secure_sum(updates, protocol="plaintext")
        wall = time.perf_counter() - t0
    m = _ours_metrics(res, wall, [], exact)
    m["page_faults"] = _minor_faults() - f0
    return m


def run_ckks(updates: dict, threshold: int, exact: np.ndarray) -> dict[str, Any]:
    """One ``ckks`` round (default preset, one TenSEAL thread per party), every client in."""
    t0 = time.perf_counter()
    res = secure_sum(updates, protocol="ckks", threshold=threshold)
    wall = time.perf_counter() - t0
    m = _ours_metrics(res, wall, [], exact)
    m["authority_seconds"] = float(sum(res.stats["authority_seconds"].values()))
    m["authority_seconds_by_stage"] = dict(res.stats["authority_seconds"])
    m["error_bound"] = float(res.stats["params"]["error_bound"])
    if len(res.survivors) != len(updates):
        raise RuntimeError(f"unexpected survivors {res.survivors}")
    return m


def measure_ckks_ops(d: int, reps: int, seed: int, log, preset: str = "n8192") -> dict[str, Any]:
    """CKKS operations on one vector of ``d`` float32 parameters (+ weight and count slots),
    with ``preset``, TenSEAL with one thread (= one core), timed in process CPU time (robust
    to other processes on a shared machine). Median over ``reps``.

    encrypt: ``he.encrypt`` (list conversion, encoding and public-key encryption straight at
    the lowest level, SEAL serialization) = what a client does per update. For comparison,
    ``tenseal_top_level``: TenSEAL's ``ckks_vector`` (encrypts at the top data level), the
    exact rescale down to the last prime and ``serialize`` (the same wire bytes per value).
    add: deserialize + check one client's ciphertext, and the homomorphic addition.
    decrypt: deserialize the aggregate under the secret context, decrypt and decode.
    """
    import tenseal as ts

    params = CKKS_PRESETS[preset]
    clock = time.process_time
    has_middle = len(params.coeff_mod_bit_sizes) > 2
    secret = ckks_he.new_secret_context(params, 1)
    public = ckks_he.load_public_context(ckks_he.public_context_bytes(secret), params, 1)
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, d).astype(np.float32)
    values = np.r_[x.astype(np.float64), 1.0, 1.0]
    primes = ckks_he._chain(params)[0]
    timings: dict[str, list[float]] = {k: [] for k in (
        "encrypt", "tenseal_top_level", "tolist", "load", "add", "decrypt")}
    ct = b""
    for _ in range(reps + 1):  # the first repetition is a warm-up
        t0 = clock()
        ct = ckks_he.encrypt(public, params, values)
        t_enc = clock() - t0
        t0 = clock()
        as_list = values.tolist()
        t_list = clock() - t0
        t0 = clock()
        vec = ts.ckks_vector(public, as_list)
        if has_middle:
            vec.mul_(primes[1] / params.scale)
        vec.serialize()
        t_top = clock() - t0
        t0 = clock()
        a = ckks_he.load_vector(public, params, ct, values.size)
        t_load = clock() - t0
        b = ckks_he.load_vector(public, params, ct, values.size)
        t0 = clock()
        total = ckks_he.add(a, b)
        t_add = clock() - t0
        agg = ckks_he.serialize(total)
        t0 = clock()
        out = ckks_he.decrypt(secret, ckks_he.load_vector(secret, params, agg, values.size))
        t_dec = clock() - t0
        for k, v in (("encrypt", t_enc), ("tenseal_top_level", t_top), ("tolist", t_list),
                     ("load", t_load),
                     ("add", t_add), ("decrypt", t_dec)):
            timings[k].append(v)
    med = {k: _median(v[1:]) for k, v in timings.items()}
    per_m = {k: v * 1e6 / d for k, v in med.items()}
    bpp = len(ct) / d
    err = float(np.max(np.abs(out[:d] - 2 * values[:d])))
    res = {
        "d": d, "reps": reps, "preset": params.describe(), "tenseal_threads": 1,
        "ciphertext_bytes": len(ct), "chunks": ckks_he.chunks_for(values.size, params),
        "bytes_per_param": bpp, "x_float32": bpp / 4.0,
        "fresh_bytes_per_param_without_drop": None,
        "seconds_per_million_params": per_m,
        "encrypt_params_per_second_per_core": d / med["encrypt"],
        "max_abs_error_sum_of_two": err,
        "error_bound_sum_of_two": params.error_bound(2),
        "all_reps": timings,
    }
    res["fresh_bytes_per_param_without_drop"] = len(
        ts.ckks_vector(public, values.tolist()).serialize()) / d
    res["targets"] = {"bytes_at_most_14x_float32": res["x_float32"] <= 14.0,
                      "encrypt_at_least_1.5M_params_per_s_per_core":
                          res["encrypt_params_per_second_per_core"] >= 1.5e6}
    log(f"== CKKS operations: d={d} float32 parameters, preset {preset} "
        f"(N={params.poly_modulus_degree}, {list(params.coeff_mod_bit_sizes)}, "
        f"2^{params.scale_bits}), 1 TenSEAL thread, CPU time, median of {reps}")
    log(f"   wire: {bpp:.2f} B/parameter = {res['x_float32']:.2f}x float32 "
        f"(without the level drop: {res['fresh_bytes_per_param_without_drop']:.2f} B)")
    log("   seconds per 1M parameters: " + ", ".join(f"{k} {v:.3f}" for k, v in per_m.items()))
    log(f"   encrypt throughput {res['encrypt_params_per_second_per_core'] / 1e6:.2f} M "
        f"params/s/core; max abs error of a 2-term sum {err:.1e} (bound "
        f"{res['error_bound_sum_of_two']:.1e})")
    return res


def client_mask_bytes_check(updates: dict, threshold: int, drop: dict[str, str],
                            options: dict) -> dict[str, int]:
    """One untimed masking round built from the aggregator's parts (as ``secure_sum`` does),
    keeping the client objects so their ``mask_bytes_generated`` can be read. Doubles as the
    warm-up run."""
    agg = get_aggregator("masking", **options)
    ids = list(updates)
    spec = TensorSpec.of(updates[ids[0]])
    session = os.urandom(16)
    clients = {c: agg.client(c, updates[c], session=session, round_=0) for c in ids}
    server = agg.server(ids, spec, threshold=threshold, session=session, round_=0)
    drive(server, InProcessChannel(clients, FaultPlan(drop=dict(drop))))
    return {c: int(getattr(cl, "mask_bytes_generated", -1)) for c, cl in clients.items()}


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------
def run_case(name: str, *, n: int, d: int, threshold: int, graph: str, degree: int | None,
             drops: int, reps: int, seed: int, flower: bool, log,
             ckks: bool = False) -> dict[str, Any]:
    log(f"== case {name}: n={n} d={d} graph={graph} threshold={threshold} drops={drops} "
        f"(after masked input), {reps} reps")
    vectors = make_vectors(n, d, seed)
    ids = [f"client{i:03d}" for i in range(n)]
    updates = {c: {PARAM: v} for c, v in zip(ids, vectors, strict=True)}
    # Late dropouts keep their input in the sum: the exact answer is the sum of all n inputs.
    exact = np.sum(np.stack([v.astype(np.float64) for v in vectors]), axis=0)
    drop = {c: DROP_STAGE for c in ids[1:1 + drops]}
    options: dict[str, Any] = {"graph": graph}
    if degree is not None:
        options["degree"] = degree

    # untimed warm-up + check of the per-client mask byte count
    t0 = time.perf_counter()
    mask_bytes_obs = client_mask_bytes_check(updates, threshold, drop, options)
    log(f"   warm-up masking round {time.perf_counter() - t0:.2f}s")

    # ChaCha20 throughput is measured three times per case (before, between and after the
    # timed runs); the floor uses the fastest of the three medians, so that a moment of
    # contention from other processes cannot inflate the floor and flatter the ratios.
    tp_runs: list[dict[str, float]] = []

    def measure_tp(when: str) -> None:
        t = measure_chacha_throughput()
        t["when"] = when
        tp_runs.append(t)
        log(f"   ChaCha20 (MaskPRG, 64 MiB, {when}): keystream "
            f"{t['keystream_bytes_per_s'] / 1e9:.2f} GB/s, keystream+add "
            f"{t['add_into_bytes_per_s'] / 1e9:.2f} GB/s (median of {t['repeats']})")

    measure_tp("before")

    raw: dict[str, list[dict[str, Any]]] = {"masking": [], "plaintext": [], "flower": [],
                                            "ckks": []}
    run_plaintext(updates, exact)  # warm-up
    flower_cfg = None
    for r in range(reps):
        m = run_masking(updates, threshold, drop, options, exact)
        raw["masking"].append(m)
        p = run_plaintext(updates, exact)
        raw["plaintext"].append(p)
        log(f"   rep {r + 1}: masking {m['total_seconds']:.3f}s "
            f"(client {m['client_seconds']:.4f}s, server {m['server_seconds']:.4f}s, "
            f"{m['page_faults']} page faults), plaintext {p['total_seconds']:.3f}s")
        if ckks:
            c = run_ckks(updates, threshold, exact)
            raw["ckks"].append(c)
            log(f"   rep {r + 1}: ckks {c['total_seconds']:.3f}s (client "
                f"{c['client_seconds']:.3f}s, server {c['server_seconds']:.3f}s, key authority "
                f"{c['authority_seconds']:.3f}s)")
    params = raw["masking"][0]["params"]
    measure_tp("after ours")

    # ---- Flower ----
    flower_error = None
    if flower and run_flower_secaggplus is None:
        flower_error = f"flwr not importable: {_FLOWER_IMPORT_ERROR}"
    elif flower:
        # Same neighbourhoods: our node shares with `degree` neighbours + itself, Flower's
        # num_shares counts the node itself. Our degree is always even, so num_shares is odd
        # and Flower 1.42's even-num_shares bug (see FLOWER_NOTES.md) cannot trigger.
        num_shares = n if params["graph"] == "complete" else params["degree"] + 1
        rec_t = params["share_threshold"]
        flower_cfg = {"num_shares": num_shares, "reconstruction_threshold": rec_t,
                      "clipping_range": 8.0, "quantization_range": 2**22,
                      "modulus_range": 2**32, "drop_after_masked_input": drops}
        fkw = dict(flower_cfg)
        run_flower_secaggplus(vectors, seed=seed, **fkw)  # warm-up
        for r in range(reps):
            t0 = time.perf_counter()
            res = run_flower_secaggplus(vectors, seed=seed + 1 + r, **fkw)
            wall = time.perf_counter() - t0
            contrib_exact = np.sum(np.stack(
                [vectors[i].astype(np.float64) for i in res["contributor_index"]]), axis=0)
            raw["flower"].append({
                "client_seconds": res["client_seconds"],
                "client_seconds_by_stage": res["client_seconds_by_stage"],
                "server_seconds": res["server_seconds"],
                "server_seconds_by_segment": res["server_seconds_by_segment"],
                "transport_seconds": res["transport_seconds"],
                "workflow_seconds": res["total_seconds"],
                "total_seconds": wall,
                "bytes_per_client": res["bytes_per_client"],
                "max_abs_error": _max_err(res["sum"], contrib_exact),
                "survivors": res["n_contributors"],
            })
            log(f"   rep {r + 1}: flower {wall:.3f}s (client {res['client_seconds']:.4f}s, "
                f"server {res['server_seconds']:.4f}s, serde {res['transport_seconds']:.3f}s)")

    measure_tp("after Flower" if flower else "end")
    tp = dict(max(tp_runs, key=lambda t: t["keystream_bytes_per_s"]))
    tp["measurements"] = tp_runs
    tp_d = measure_chacha_throughput(d + 1)  # at the real vector length, for reference
    tp["keystream_bytes_per_s_at_vector_length"] = tp_d["keystream_bytes_per_s"]
    tp["vector_length_bytes"] = tp_d["buffer_bytes"]

    # ---- keystream floor, from the byte counts of this round ----
    peers = params["degree"]  # no dropout before share_keys: every neighbour is a peer
    client_mask_bytes = (1 + peers) * (d + 1) * RING_BYTES
    observed = sorted(set(mask_bytes_obs.values()))
    if observed != [client_mask_bytes]:
        raise RuntimeError(f"client mask bytes {observed} != formula {client_mask_bytes}")
    server_mask_bytes = raw["masking"][0]["server_mask_bytes"]
    total_mask_bytes = n * client_mask_bytes + server_mask_bytes  # every client masks its input
    thr = tp["keystream_bytes_per_s"]
    floor = {"client_seconds": client_mask_bytes / thr, "server_seconds": server_mask_bytes / thr,
             "total_seconds": total_mask_bytes / thr, "client_mask_bytes": client_mask_bytes,
             "server_mask_bytes": server_mask_bytes, "total_mask_bytes": total_mask_bytes,
             "throughput_bytes_per_s": thr}

    # ---- medians and ratios ----
    cols = ("client_seconds", "server_seconds", "total_seconds", "bytes_per_client",
            "max_abs_error")
    rows: dict[str, dict[str, Any]] = {}
    for key in ("masking", "plaintext", "flower", "ckks"):
        if raw[key]:
            rows[key] = {c: _median([x[c] for x in raw[key]]) for c in cols}
    if raw["ckks"]:
        rows["ckks"]["authority_seconds"] = _median([x["authority_seconds"] for x in raw["ckks"]])
        rows["ckks"]["error_bound"] = raw["ckks"][0]["error_bound"]
    best = {key: {c: min(x[c] for x in raw[key]) for c in cols} for key in raw if raw[key]}
    rows["keystream_floor"] = {"client_seconds": floor["client_seconds"],
                               "server_seconds": floor["server_seconds"],
                               "total_seconds": floor["total_seconds"],
                               "bytes_per_client": None, "max_abs_error": None}
    for row in rows.values():
        row["x_floor"] = {c: row[c] / floor[c] if row[c] is not None else None
                          for c in ("client_seconds", "server_seconds", "total_seconds")}
        if "flower" in rows:
            row["x_flower"] = {c: (row[c] / rows["flower"][c]
                                   if row[c] is not None and rows["flower"][c] else None)
                               for c in ("client_seconds", "server_seconds", "total_seconds")}
    m = rows["masking"]
    targets: dict[str, Any] = {
        "masking_client_within_2x_floor": m["x_floor"]["client_seconds"] <= 2.0,
        "masking_server_within_2x_floor": m["x_floor"]["server_seconds"] <= 2.0,
        "masking_total_within_2x_floor": m["x_floor"]["total_seconds"] <= 2.0,
    }
    if "flower" in rows:
        targets.update({
            "masking_total_at_most_half_flower": m["x_flower"]["total_seconds"] <= 0.5,
            "masking_client_at_most_half_flower": m["x_flower"]["client_seconds"] <= 0.5,
            "masking_server_at_most_half_flower": m["x_flower"]["server_seconds"] <= 0.5,
        })
    stage_medians = {
        "masking_client_seconds_by_stage": {
            s: _median([x["client_seconds_by_stage"][s] for x in raw["masking"]])
            for s in raw["masking"][0]["client_seconds_by_stage"]},
        "masking_server_seconds_by_stage": {
            s: _median([x["server_seconds_by_stage"][s] for x in raw["masking"]])
            for s in raw["masking"][0]["server_seconds_by_stage"]},
        "masking_stage_wall_seconds": {
            s: _median([x["stage_seconds"][s] for x in raw["masking"]])
            for s in raw["masking"][0]["stage_seconds"]},
    }
    return {
        "params": {"n": n, "d": d, "threshold": threshold, "graph": params["graph"],
                   "degree": params["degree"], "share_threshold": params["share_threshold"],
                   "ring_bits": params["ring_bits"], "levels": params["levels"],
                   "clip": options.get("clip", 4.0), "drop_after_masked_input": drops,
                   "dropped_clients": sorted(drop), "seed": seed,
                   "flower": flower_cfg, "flower_error": flower_error},
        "chacha20": tp, "floor": floor, "rows": rows, "targets": targets,
        "stage_breakdown": stage_medians, "best_of_reps": best, "reps": raw,
    }


# --------------------------------------------------------------------------------------------
# profiling (--profile): where does masking spend its time, client side vs server side
# --------------------------------------------------------------------------------------------
_CATEGORIES = [  # (substring of "file:function", category); first match wins
    ("update_into", "ChaCha20 keystream (cryptography)"),
    ("prg.py:add_into", "mask add into accumulator (numpy)"),
    ("prg.py:uniform01", "quantisation: keystream words -> float64"),
    ("openssl_sha256", "SHA-256 pre-hash of signed envelopes"),
    ("ed25519", "Ed25519 sign/verify"),
    ("Ed25519", "Ed25519 sign/verify"),
    ("x25519", "X25519 + HKDF"),
    ("X25519", "X25519 + HKDF"),
    ("kdf.py", "X25519 + HKDF"),
    ("hkdf", "X25519 + HKDF"),
    ("HKDF", "X25519 + HKDF"),
    ("shamir.py", "Shamir split/reconstruct"),
    ("aead.py", "AEAD seal/open of shares"),
    ("quantization.py", "quantisation/dequantisation (numpy)"),
    ("_clip", "quantisation/dequantisation (numpy)"),
    ("wire.py:decode", "envelope decode (incl. body copies)"),
    ("wire.py:encode", "envelope encode (incl. body copies)"),
    ("tensors.py", "flatten + finiteness check of the update"),
    ("astype", "numpy dtype conversions / copies"),
    ("tobytes", "numpy dtype conversions / copies"),
    ("numpy.array", "numpy dtype conversions / copies"),
    ("concatenate", "numpy dtype conversions / copies"),
    ("_methods.py", "numpy reductions (isfinite/any/all/max)"),
    ("isfinite", "numpy reductions (isfinite/any/all/max)"),
    ("ufunc", "numpy ufuncs"),
]


def _categorise(stats: pstats.Stats) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    cats: dict[str, float] = {}
    funcs = []
    total = 0.0
    for (fname, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        total += tt
        key = f"{Path(fname).name}:{func}"
        funcs.append((key, tt))
        for sub, cat in _CATEGORIES:
            if sub in key:
                cats[cat] = cats.get(cat, 0.0) + tt
                break
        else:
            cats["other (Python, json, small numpy ops)"] = (
                cats.get("other (Python, json, small numpy ops)", 0.0) + tt)
    funcs.sort(key=lambda kv: -kv[1])
    return total, dict(sorted(cats.items(), key=lambda kv: -kv[1])), funcs[:15]


def profile_masking(case: str, *, n: int, d: int, threshold: int, graph: str,
                    degree: int | None, drops: int, seed: int, log) -> dict[str, Any]:
    """cProfile one masking round, with separate profiles for client and server code.

    The round is built as ``secure_sum`` builds it; the instances' ``handle`` (clients) and
    ``next_requests``/``receive`` (server) are wrapped to switch the matching profiler on.
    The library itself is not modified.
    """
    vectors = make_vectors(n, d, seed)
    ids = [f"client{i:03d}" for i in range(n)]
    updates = {c: {PARAM: v} for c, v in zip(ids, vectors, strict=True)}
    drop = {c: DROP_STAGE for c in ids[1:1 + drops]}
    options: dict[str, Any] = {"graph": graph}
    if degree is not None:
        options["degree"] = degree
    client_mask_bytes_check(updates, threshold, drop, options)  # warm-up
    agg = get_aggregator("masking", **options)
    spec = TensorSpec.of(updates[ids[0]])
    session = os.urandom(16)
    clients = {c: agg.client(c, updates[c], session=session, round_=0) for c in ids}
    server = agg.server(ids, spec, threshold=threshold, session=session, round_=0)
    cprof, sprof = cProfile.Profile(), cProfile.Profile()

    def wrap(fn, prof):
        def inner(*a, **k):
            prof.enable()
            try:
                return fn(*a, **k)
            finally:
                prof.disable()
        return inner

    for cl in clients.values():
        cl.handle = wrap(cl.handle, cprof)
    server.next_requests = wrap(server.next_requests, sprof)
    server.receive = wrap(server.receive, sprof)
    drive(server, InProcessChannel(clients, FaultPlan(drop=dict(drop))))
    out: dict[str, Any] = {}
    for side, prof, per in (("client", cprof, n), ("server", sprof, 1)):
        total, cats, top = _categorise(pstats.Stats(prof))
        out[side] = {"seconds_total": total, "per": per,
                     "categories": cats, "top_functions": top}
        who = f"all {n} clients" if per > 1 else "server"
        each = f", {total / n * 1e3:.1f} ms/client" if per > 1 else ""
        log(f"-- profile {case} {side} side ({who}, cProfile total {total:.3f}s{each})")
        for cat, tt in cats.items():
            log(f"   {tt / per * 1e3:8.2f} ms{'/client' if per > 1 else '       '}  "
                f"{100 * tt / total:5.1f}%  {cat}")
        log("   top functions (tottime): " + ", ".join(
            f"{k} {v / per * 1e3:.2f}ms" for k, v in top[:8]))
    return out


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 0.1:
        return f"{x:.3f}"
    return f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} µs"


def _fmt_bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _fmt_ratio(r: dict[str, float | None] | None) -> str:
    if not r:
        return "-"
    return " / ".join("-" if r[c] is None else f"{r[c]:.2f}x"
                      for c in ("client_seconds", "server_seconds", "total_seconds"))


ROW_LABEL = {"masking": "fedcollm `masking`", "plaintext": "fedcollm `plaintext` (insecure)",
             "keystream_floor": "keystream floor (ChaCha20)",
             "flower": "Flower SecAgg+ (`SecAggPlusWorkflow`)",
             "ckks": "fedcollm `ckks` (no dropouts; + key authority)"}


def markdown_table(case: dict[str, Any]) -> str:
    hdr = ("| row | client s (mean/client) | server s | total wall s | bytes sent/client "
           "| max abs err | vs floor (client / server / total) "
           "| vs Flower (client / server / total) |")
    lines = [hdr, "|" + "---|" * 8]
    for key in ("masking", "plaintext", "ckks", "keystream_floor", "flower"):
        row = case["rows"].get(key)
        if row is None:
            continue
        err = "-" if row["max_abs_error"] is None else f"{row['max_abs_error']:.1e}"
        lines.append(
            f"| {ROW_LABEL[key]} | {_fmt_s(row['client_seconds'])} | "
            f"{_fmt_s(row['server_seconds'])} | {_fmt_s(row['total_seconds'])} | "
            f"{_fmt_bytes(row['bytes_per_client'])} | {err} | "
            f"{_fmt_ratio(row['x_floor']) if key != 'keystream_floor' else '1x'} | "
            f"{_fmt_ratio(row.get('x_flower')) if key != 'flower' else '1x'} |")
    return "\n".join(lines)


def ckks_markdown(ops: dict[str, Any]) -> str:
    per_m = ops["seconds_per_million_params"]
    pre = ops["preset"]
    lines = [f"### CKKS operations (d={ops['d']} float32 parameters, preset {pre['preset']} "
             f"(N={pre['poly_modulus_degree']}, {pre['coeff_mod_bit_sizes']}, "
             f"2^{pre['scale_bits']}), one core, CPU time)",
             "", "| quantity | value | target |", "|---|---|---|",
             f"| bytes on the wire per float32 parameter | {ops['bytes_per_param']:.2f} B = "
             f"{ops['x_float32']:.2f}x float32 | <= 14x |",
             f"| encrypt (client: encode and encrypt at the lowest level, serialize), s per 1M "
             f"params | {per_m['encrypt']:.3f} "
             f"({ops['encrypt_params_per_second_per_core'] / 1e6:.2f} M params/s) | "
             f">= 1.5 M params/s/core |",
             f"| add (aggregator: deserialize + check, s per 1M) | {per_m['load']:.3f} | - |",
             f"| add (aggregator: homomorphic addition, s per 1M) | {per_m['add']:.3f} | - |",
             f"| decrypt (key authority: deserialize, decrypt, decode, s per 1M) | "
             f"{per_m['decrypt']:.3f} | - |",
             f"| of which list conversion, s per 1M | {per_m['tolist']:.3f} | - |",
             f"| for comparison: TenSEAL `ckks_vector` at the top level + rescale to the last "
             f"prime + serialize, s per 1M | {per_m['tenseal_top_level']:.3f} "
             f"({1e6 / per_m['tenseal_top_level'] / 1e6:.2f} M params/s) | - |",
             f"| max abs error, sum of two encryptions | {ops['max_abs_error_sum_of_two']:.1e} "
             f"(bound {ops['error_bound_sum_of_two']:.1e}) | - |"]
    lines.append("")
    lines.append("Targets: " + ", ".join(f"{k}={'MET' if v else 'MISSED'}"
                                         for k, v in ops["targets"].items()))
    return "\n".join(lines)


def case_title(name: str, case: dict[str, Any]) -> str:
    p = case["params"]
    g = (f"complete graph, threshold {p['threshold']}" if p["graph"] == "complete" else
         f"k-regular degree {p['degree']}, share threshold {p['share_threshold']}, "
         f"threshold {p['threshold']}")
    f = p.get("flower") or {}
    fl = (f"; Flower num_shares={f['num_shares']}, reconstruction_threshold="
          f"{f['reconstruction_threshold']}" if f else "")
    return (f"Case {name}: n={p['n']}, d=2^{int(np.log2(p['d']))} float32, {g}, "
            f"{p['drop_after_masked_input']} dropouts after masked input{fl}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run; writes no JSON "
                    "unless --out is given")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; quick 2)")
    ap.add_argument("--d-a", type=int, default=None, help="case A vector length (default 2^20)")
    ap.add_argument("--d-b", type=int, default=None, help="case B vector length (default 2^20)")
    ap.add_argument("--degree-b", type=int, default=None,
                    help="case B graph degree (even; default: the library default)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-flower", action="store_true", help="skip the Flower baseline")
    ap.add_argument("--cases", default="A,B", help="comma-separated subset of A,B")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one masking round per case (client vs server)")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the cProfile breakdown (no timed table, no JSON unless --out)")
    ap.add_argument("--no-ckks", action="store_true", help="skip the CKKS rows and section")
    ap.add_argument("--ckks-only", action="store_true",
                    help="only the CKKS section and case A (masking, plaintext, ckks rows; no "
                    "Flower); writes no JSON unless --out")
    ap.add_argument("--ckks-d", type=int, default=None,
                    help="vector length of the CKKS section (default 2^20; quick 2^16)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default benchmarks/secagg/results.json for a full run)")
    args = ap.parse_args(argv)

    if args.quick:
        cfg = {"A": dict(n=5, d=args.d_a or 2**14, threshold=3, graph="complete", degree=None,
                         drops=1),
               "B": dict(n=12, d=args.d_b or 2**12, threshold=7, graph="k_regular",
                         degree=args.degree_b, drops=1)}
        reps = args.reps or 2
    else:
        cfg = {"A": dict(n=10, d=args.d_a or 2**20, threshold=6, graph="complete", degree=None,
                         drops=2),
               "B": dict(n=50, d=args.d_b or 2**20, threshold=26, graph="k_regular",
                         degree=args.degree_b, drops=2)}
        reps = args.reps or 5
    if args.ckks_only:
        args.cases, args.no_flower = "A", True
    wanted = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
    if not wanted or set(wanted) - set(cfg):
        ap.error(f"--cases must name cases among {sorted(cfg)}")
    cfg = {k: v for k, v in cfg.items() if k in wanted}
    partial = (set(cfg) != {"A", "B"} or args.no_flower or args.profile_only
               or args.ckks_only or args.no_ckks)
    out = args.out if args.out is not None else (
        None if args.quick or partial else HERE / "results.json")

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/secagg/run.py" + (" " + " ".join(sys.argv[1:])
                                                        if len(sys.argv) > 1 else ""),
        "quick": args.quick, "reps": reps, "cases": list(cfg),
        "statistic": "median over reps, per column",
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(), "numpy": np.__version__,
        "cryptography": package_version("cryptography"), "flwr": FLWR_VERSION,
        "tenseal": package_version("tenseal"),
        "fedcollm_secure": package_version("fedcollm_secure") or package_version("fedcollm-secure"),
    }
    log(f"machine: {meta['cpu_model']}, {meta['cpu_count']} CPUs (load average "
        f"{meta['loadavg_at_start'][0]:.2f}); python {meta['python']}, "
        f"numpy {meta['numpy']}, cryptography {meta['cryptography']}, flwr {meta['flwr']}")
    cases: dict[str, Any] = {}
    for i, (name, c) in enumerate(cfg.items()):
        if args.profile_only:
            break
        cases[name] = run_case(name, reps=reps, seed=args.seed + 100 * i,
                               flower=not args.no_flower, log=log,
                               ckks=name == "A" and not args.no_ckks, **c)
    ckks_ops = ckks_sum_ops = None
    if not args.no_ckks and not args.profile_only:
        ckks_d = args.ckks_d or (2**16 if args.quick else 2**20)
        ckks_ops = measure_ckks_ops(ckks_d, reps, args.seed, log)
        ckks_sum_ops = measure_ckks_ops(ckks_d, reps, args.seed, log, preset="n8192-sum")
    profiles = {}
    if args.profile or args.profile_only:
        for i, (name, c) in enumerate(cfg.items()):
            profiles[name] = profile_masking(name, seed=args.seed + 100 * i, log=log, **c)
    meta["elapsed_seconds"] = time.perf_counter() - t_start
    meta["loadavg_at_end"] = list(os.getloadavg())

    print()
    for name, case in cases.items():
        print(f"### {case_title(name, case)}\n")
        print(markdown_table(case))
        tp = case["chacha20"]["keystream_bytes_per_s"]
        fl = case["floor"]
        tpd = case["chacha20"]["keystream_bytes_per_s_at_vector_length"]
        print(f"\nChaCha20 keystream {tp / 1e9:.2f} GB/s on 64 MiB (floor), {tpd / 1e9:.2f} GB/s "
              f"at the vector length; mask bytes: "
              f"{_fmt_bytes(fl['client_mask_bytes'])}/client, "
              f"{_fmt_bytes(fl['server_mask_bytes'])} server, "
              f"{_fmt_bytes(fl['total_mask_bytes'])} total.")
        b = case["best_of_reps"]["masking"]
        print(f"Best of {reps} for masking: client {_fmt_s(b['client_seconds'])}, server "
              f"{_fmt_s(b['server_seconds'])}, total {_fmt_s(b['total_seconds'])}"
              + (f"; Flower total {_fmt_s(case['best_of_reps']['flower']['total_seconds'])}"
                 if "flower" in case["best_of_reps"] else "") + ".")
        print("Targets: " + ", ".join(f"{k}={'MET' if v else 'MISSED'}"
                                      for k, v in case["targets"].items()) + "\n")
    if ckks_ops is not None:
        print(ckks_markdown(ckks_ops) + "\n")
    if ckks_sum_ops is not None:
        print(ckks_markdown(ckks_sum_ops) + "\n")
    if cases:
        print(f"median of {reps} reps per column; run took {meta['elapsed_seconds']:.0f}s; "
              f"1-min load average {meta['loadavg_at_start'][0]:.2f} at start, "
              f"{meta['loadavg_at_end'][0]:.2f} at end (2 cores: >1 means other work shared "
              "the machine)")
    if out is not None:
        payload = {"meta": meta, "cases": cases}
        if ckks_ops is not None:
            payload["ckks"] = ckks_ops
        if ckks_sum_ops is not None:
            payload["ckks_sum_preset"] = ckks_sum_ops
        if profiles:
            payload["profiles"] = profiles
        out.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
