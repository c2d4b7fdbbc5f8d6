"""The FedCoLLM ``ServerApp``: FedCoLLM rounds over a Flower grid.

Round ``t`` (DESIGN.md section 1), as in :meth:`FedCoLLM.run_round`:

1. ``train`` to every connected node with ``theta_t`` (safetensors bytes); a node that does
   not answer within ``flower.train_timeout`` (or refuses) sits the round out;
2. the aggregator's :class:`~fedcollm_secure.secagg.base.ServerWorkflow` over the nodes
   that trained, driven by :func:`~fedcollm_secure.transport.base.drive` through a
   :class:`.channel.FlowerChannel`: one exchange per protocol stage, each with its own
   deadline, so a node that disappears mid-round is a dropout the protocol handles;
3. ``theta = theta_t + sum / weight_total``, then the engine's mutual distillation
   (:class:`.parts.ServerParts`); ``theta_{t+1}`` is the distilled adapter; evaluation.

``ckks``: one SuperNode with node config ``fedcollm-role="key-authority"`` is the key
authority. It answers ``train`` with its role and public key; the workflow reaches it only
through relayed ``query.key_authority`` messages (:meth:`.channel.FlowerChannel.link`), with
the client identity keys reported in ``train`` for it to enrol. The ServerApp holds the
public context only (:class:`~fedcollm_secure.secagg.ckks.CKKSServer` refuses any other).

With ``flower.output_dir`` set, the server writes ``progress.jsonl`` (one line per stage),
``rounds.json`` (one record per round, as the engine's history) and, per round,
``round-<t>/theta.safetensors`` (the broadcast adapter) and ``round-<t>/sum.safetensors``
(the aggregate the server learned); for ``ckks`` also ``round-<t>/ckks_context.msg``, the
authority's signed public-context message exactly as the aggregator received it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ...crypto.randomness import default_random
from ...crypto.signatures import VerifyKey
from ...errors import ConfigError, PrivacyBudgetError, TransportTimeout
from ...secagg import SecureSumResult, TensorSpec, get_aggregator
from ...secagg.base import ServerWorkflow
from ...secagg.ckks import CKKSConfig, CKKSServer
from ..base import drive
from .channel import (
    AUTHORITY_STAGE,
    F_AUTHORITY_KEY,
    F_CLIENT_ID,
    F_CLIENT_KEYS,
    F_CLIPPED,
    F_DDP,
    F_DP,
    F_ERROR,
    F_IDENTITY_KEY,
    F_LOSS,
    F_MAX_WEIGHT,
    F_N_EXAMPLES,
    F_PROTOCOL_ROUND,
    F_ROLE,
    F_ROUND,
    F_SESSION,
    F_STEPS,
    F_THETA,
    F_WEIGHT,
    RECORD,
    TRAIN,
    FlowerChannel,
    collect,
    record_of,
    stage_message_type,
)
from .config import ROLE_KEY_AUTHORITY, FlowerSettings, fedcollm_config, flower_settings
from .key_authority import parse_key
from .replay import update_to_bytes

app = ServerApp()


def wait_for_nodes(grid: Grid, n: int, timeout: float, poll: float = 0.5) -> list[int]:
    """The connected node ids once at least ``n`` are there; :class:`TransportTimeout` if not
    within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() >= deadline:
            raise TransportTimeout(f"{len(nodes)} of {n} nodes connected after {timeout:g} s")
        time.sleep(poll)


class FlowerFedCoLLM:
    """FedCoLLM rounds driven over ``grid``; the server side of the run lives here."""

    def __init__(self, run_config: dict[str, Any]) -> None:
        from .parts import ServerParts

        self.config = fedcollm_config(run_config)
        self.settings: FlowerSettings = flower_settings(run_config)
        if self.config.privacy.ddp_on and self.config.aggregator != "masking":
            raise ConfigError("distributed DP runs on top of the masking aggregator")
        self.stopped: str | None = None  # why a privacy budget ended the run early
        self.ddp_releases = 0  # distributed-DP sums released so far
        self.out = Path(self.settings.output_dir) if self.settings.output_dir else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self.parts = ServerParts(self.config)
        self.history: list[dict[str, Any]] = []
        self.authorities: dict[int, str] = {}  # node id -> key authority public key hex

    # --- output ------------------------------------------------------------------------------
    def _event(self, **fields: Any) -> None:
        if self.out is None:
            return
        with open(self.out / "progress.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), **fields}, sort_keys=True) + "\n")

    def _save_theta(self, t: int, theta: dict[str, np.ndarray]) -> None:
        if self.out is None:
            return
        d = self.out / f"round-{t}"
        d.mkdir(exist_ok=True)
        tmp = d / "theta.safetensors.tmp"
        tmp.write_bytes(update_to_bytes(theta))
        tmp.replace(d / "theta.safetensors")

    def _save_round(self, t: int, sums: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        if self.out is None:
            return
        d = self.out / f"round-{t}"
        (d / "sum.safetensors").write_bytes(update_to_bytes(sums))
        (self.out / "rounds.json").write_text(json.dumps([*self.history, record], indent=1,
                                                        default=str))

    # --- rounds ------------------------------------------------------------------------------
    def run(self, grid: Grid) -> list[dict[str, Any]]:
        nodes = wait_for_nodes(grid, self.settings.min_nodes, self.settings.node_wait_timeout)
        self._event(event="nodes", nodes=len(nodes))
        for t in range(1, self.config.rounds + 1):
            try:
                self.history.append(self.run_round(grid, t))
            except PrivacyBudgetError as exc:  # nodes refused round t for their budget
                self.stopped = f"round {t}: {exc}"
                self._event(event="stopped", round=t, reason=self.stopped)
                break
        self._event(event="done", rounds=len(self.history))
        return self.history

    def _train(self, grid: Grid, t: int, theta: dict[str, np.ndarray],
               ) -> tuple[dict[str, int], dict[str, dict[str, Any]], dict[int, str]]:
        """Local training on every connected node: (client id -> node id, reports, missing)."""
        payload = update_to_bytes(theta)
        nodes = sorted(grid.get_node_ids())
        messages = {node: Message(RecordDict({RECORD: ConfigRecord({F_ROUND: t,
                                                                     F_THETA: payload})}),
                                  dst_node_id=node, message_type=TRAIN, group_id=str(t),
                                  ttl=max(60.0, 2 * self.settings.train_timeout))
                    for node in nodes}
        got, missing = collect(grid, messages, self.settings.train_timeout,
                               self.settings.poll_interval)
        admitted: dict[str, int] = {}
        reports: dict[str, dict[str, Any]] = {}
        self.authorities = {}
        for node, msg in sorted(got.items()):
            rec = record_of(msg)
            if rec is None:
                missing[node] = "reply without a record"
                continue
            if rec.get(F_ROLE) == ROLE_KEY_AUTHORITY:
                self.authorities[node] = str(rec.get(F_AUTHORITY_KEY))
                continue
            cid, weight = rec.get(F_CLIENT_ID), rec.get(F_WEIGHT)
            if (not isinstance(cid, str) or not cid or not isinstance(weight, float)
                    or not math.isfinite(weight) or weight < 0 or cid in admitted):
                missing[node] = "refused: " + str(rec.get(
                    F_ERROR, "bad or duplicate client id / weight"))
                continue
            ddp = _ddp_report(rec.get(F_DDP)) if self.config.privacy.ddp_on else None
            if self.config.privacy.ddp_on and ddp is None:
                missing[node] = "refused: a distributed-DP run needs the node's report"
                continue
            dp = _dp_report(rec.get(F_DP)) if self.config.privacy.dpsgd_on else None
            if self.config.privacy.dpsgd_on and dp is None:
                missing[node] = "refused: a DP-SGD run needs the node's privacy report"
                continue
            admitted[cid] = node
            reports[cid] = {"node": node, "weight": weight, "n_examples": rec.get(F_N_EXAMPLES),
                            "loss": rec.get(F_LOSS), "steps": rec.get(F_STEPS),
                            "clipped": rec.get(F_CLIPPED),
                            "identity_key": rec.get(F_IDENTITY_KEY),
                            **({"dp": dp} if dp is not None else {}),
                            **({"ddp": ddp} if ddp is not None else {})}
        return admitted, reports, missing

    def run_round(self, grid: Grid, t: int) -> dict[str, Any]:
        import torch

        from ...cotuning.lora import apply_delta, load_adapter_state, validate_state

        cfg, settings = self.config, self.settings
        seconds: dict[str, float] = {}
        theta_t = {n: v.clone() for n, v in self.parts.global_state.items()}
        theta_np = {n: v.numpy() for n, v in sorted(theta_t.items())}

        self._save_theta(t, theta_np)
        ddp = self._ddp_params(theta_np)  # checked before any node trains
        start = time.perf_counter()
        self._event(event="stage", round=t, stage=TRAIN, phase="sent")
        admitted, reports, missing = self._train(grid, t, theta_np)
        seconds["clients"] = time.perf_counter() - start
        self._event(event="stage", round=t, stage=TRAIN, received=len(admitted),
                    missing={str(k): v for k, v in missing.items()})
        over_budget = {str(k): v for k, v in missing.items()
                       if v.startswith(f"refused: {PrivacyBudgetError.__name__}")}
        if over_budget and (cfg.privacy.on_budget_exceeded == "stop" or not admitted):
            raise PrivacyBudgetError(f"DP-SGD budget exhausted on nodes {over_budget}")
        if ddp is not None and not ddp.min_survivors <= len(admitted) <= ddp.max_clients:
            raise PrivacyBudgetError(
                f"{len(admitted)} clients trained; distributed DP was sized for "
                f"{ddp.min_survivors} to {ddp.max_clients}")

        start = time.perf_counter()
        options = cfg.resolved_aggregator_options()
        weighted = cfg.weighting == "examples"
        fields: dict[str, Any] = {F_PROTOCOL_ROUND: t}
        if ddp is not None:  # unweighted integer sums with the identity quantiser
            from ...privacy.federation import ddp_masking_options

            options.update(ddp_masking_options(ddp))
            weighted = False
        if weighted and cfg.aggregator == "masking" and "max_weight" not in options and reports:
            options["max_weight"] = max(max(r["weight"] for r in reports.values()), 1e-12)
            fields[F_MAX_WEIGHT] = float(options["max_weight"])
        session = default_random().bytes(16)
        fields[F_SESSION] = session
        spec = TensorSpec.of(theta_np)
        wire_spec = spec if ddp is None else TensorSpec.of(
            {"ddp": np.zeros(spec.size, dtype=np.int64)})
        channel = FlowerChannel(grid, admitted, round_=t, timeout=settings.timeout,
                                fields=fields, poll_interval=settings.poll_interval)
        ckks_view: dict[str, Any] = {}
        workflow: ServerWorkflow
        if cfg.aggregator == "ckks":
            workflow = self._ckks_workflow(channel, reports, options, spec, session, t,
                                           ckks_view)
        else:  # the in-process aggregator's workflow (for ckks it would hold the authority)
            aggregator = get_aggregator(cfg.aggregator, **options)
            workflow = aggregator.server(
                sorted(admitted), wire_spec,
                threshold=cfg.threshold if ddp is None else ddp.min_survivors,
                weighted=weighted, session=session, round_=t)

        def progress(stage: str, sent: int, received: int) -> None:
            self._event(event="stage", round=t, stage=stage, sent=sent, received=received)

        result = drive(workflow, channel, progress)
        if isinstance(workflow, CKKSServer):
            ckks_view.update(self._ckks_record(t, workflow, ckks_view.pop("context_message")))
        if not result.weight_total > 0:
            raise ConfigError("the surviving clients' weights sum to zero")
        shapes = {n: tuple(v.shape) for n, v in theta_t.items()}
        mean_np = result.mean() if ddp is None else self._ddp_mean(result, ddp, spec)
        mean = {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).reshape(shapes[n])
                for n, v in mean_np.items()}
        validate_state(mean, shapes, what="aggregated mean delta")
        seconds["aggregate"] = time.perf_counter() - start

        start = time.perf_counter()
        load_adapter_state(self.parts.slm, apply_delta(theta_t, mean))
        distilled = self.parts.distill(t)
        seconds["distill"] = time.perf_counter() - start
        start = time.perf_counter()
        evaluation = self.parts.evaluate()
        seconds["evaluate"] = time.perf_counter() - start

        losses = [float(r["loss"]) for r in reports.values()
                  if isinstance(r["loss"], float) and math.isfinite(r["loss"])]
        record = {
            "round": t, "transport": "flower", "mode": cfg.mode,
            "aggregator": result.protocol or cfg.aggregator, "aggregator_options": options,
            "nodes": {cid: r["node"] for cid, r in reports.items()},
            "not_trained": {str(k): v for k, v in missing.items()},
            "survivors": list(result.survivors), "dropped": dict(result.dropped),
            "late_dropouts": list(result.stats.get("late_dropouts", [])),
            "weight_total": result.weight_total,
            "error_bound": result.stats.get("params", {}).get("error_bound"),
            "missing": channel.missing, "seconds": seconds,
            "stage_seconds": result.stats.get("stage_seconds", {}),
            "bytes": {cid: {"sent": int(sum(channel.bytes_sent[cid].values())),
                            "received": int(sum(channel.bytes_received[cid].values()))}
                      for cid in admitted},
            "clients": reports,
            "mean_client_loss": sum(losses) / len(losses) if losses else math.nan,
            "distill": {"steps": distilled.steps, "mean_slm_loss": distilled.mean_slm_loss,
                        "mean_llm_loss": distilled.mean_llm_loss},
            "eval": evaluation,
        }
        if ckks_view:
            record["ckks"] = ckks_view
        if cfg.privacy.dpsgd_on:
            record["privacy"] = {"dpsgd": {cid: r["dp"] for cid, r in reports.items()},
                                 "refused": over_budget}
        if ddp is not None:
            clipped = [bool(r["ddp"]["clipped"]) for r in reports.values()
                       if isinstance(r.get("ddp"), dict)]
            record.setdefault("privacy", {})["ddp"] = {
                "privacy_unit": "client", "adjacency": "add/remove one client's whole update",
                "params": ddp.to_json(), "survivors": len(result.survivors),
                "clipped_fraction": sum(clipped) / len(clipped) if clipped else 0.0,
                "epsilon_round": ddp.epsilon(1),
                "epsilon_cumulative": ddp.epsilon(self.ddp_releases),
                "releases": self.ddp_releases, "delta": ddp.delta_total}
        self._save_round(t, result.sum if ddp is None else {  # the decoded (noisy) sum
            n: v * result.weight_total for n, v in mean_np.items()}, record)
        self._event(event="round", round=t, survivors=len(result.survivors),
                    dropped=dict(result.dropped), late_dropouts=record["late_dropouts"])
        return record


    # --- distributed DP ------------------------------------------------------------------------
    def _ddp_params(self, theta: dict[str, np.ndarray]) -> Any:
        """The run's distributed-DP parameters (None without it), resolved from the run config
        as every node resolves them; raises :class:`PrivacyBudgetError` when another release
        would exceed the target epsilon."""
        cfg = self.config
        if not cfg.privacy.ddp_on or cfg.privacy.ddp is None:
            return None
        from ...privacy.federation import ddp_params

        params = ddp_params(cfg.privacy.ddp, dim=TensorSpec.of(theta).size,
                            n_clients=cfg.n_clients, threshold=cfg.threshold,
                            rounds=cfg.rounds)
        target = cfg.privacy.ddp.target_epsilon
        if target is not None and params.epsilon(self.ddp_releases + 1) > target * (1 + 1e-9):
            raise PrivacyBudgetError(f"another distributed-DP release would exceed epsilon "
                                     f"{target}")
        return params

    def _ddp_mean(self, result: SecureSumResult, params: Any,
                  spec: TensorSpec) -> dict[str, np.ndarray]:
        """The survivors' mean delta from masking's exact integer sum."""
        from ...errors import QuantizationError
        from ...privacy.ddp import decode_sum

        total = np.asarray(result.sum["ddp"], dtype=np.float64)
        ints = np.rint(total)
        if not np.all(np.abs(total - ints) < 1e-3):
            raise QuantizationError("masking returned a non-integer sum; the integer path broke")
        n = len(result.survivors)
        self.ddp_releases += 1
        result.weight_total = float(n)
        return {name: v / n for name, v in decode_sum(ints.astype(np.int64), params,
                                                       spec).items()}

    # --- ckks: the key authority is another node --------------------------------------------
    def _ckks_workflow(self, channel: FlowerChannel, reports: dict[str, dict[str, Any]],
                       options: dict[str, Any], spec: TensorSpec, session: bytes, t: int,
                       view: dict[str, Any]) -> CKKSServer:
        """The aggregator's :class:`CKKSServer`, its authority a relayed link to the
        key-authority node; ``view`` receives the authority's first (public context) reply."""
        if len(self.authorities) != 1:
            raise ConfigError(f"ckks on Flower needs exactly one node with node config "
                              f"fedcollm-role={ROLE_KEY_AUTHORITY!r} answering 'train'; "
                              f"{len(self.authorities)} did")
        (node, key_hex), = self.authorities.items()
        authority_key = parse_key(key_hex, "the key authority's announced key")
        config = CKKSConfig.from_dict(options)
        client_keys: dict[str, VerifyKey] = {}
        if config.sign:
            client_keys = {cid: parse_key(r.get("identity_key"), f"identity key of {cid!r}")
                           for cid, r in reports.items()}
        channel.fields[F_AUTHORITY_KEY] = key_hex  # announced to the clients (trust.py)
        send = channel.link(node, stage_message_type(AUTHORITY_STAGE), AUTHORITY_STAGE, {
            F_CLIENT_KEYS: json.dumps({c: k.raw.hex() for c, k in sorted(client_keys.items())},
                                      sort_keys=True)})

        def relay(request: bytes) -> bytes:
            reply = send(request)
            view.setdefault("context_message", reply)  # the first reply: the public context
            return reply

        view.update({"authority_node": node, "authority_key": key_hex})
        return CKKSServer(sorted(reports), spec, authority=relay, authority_key=authority_key,
                          config=config, threshold=self.config.threshold,
                          client_keys=client_keys, session=session, round_=t)

    def _ckks_record(self, t: int, workflow: CKKSServer, context_message: bytes,
                     ) -> dict[str, Any]:
        """What the aggregator held: the public context only (and the authority's message)."""
        ctx = workflow.ctx
        if ctx is None or ctx.has_secret_key() or ctx.is_private():
            raise ConfigError("the aggregator holds a CKKS context with a secret key")
        if self.out is not None:
            d = self.out / f"round-{t}"
            d.mkdir(exist_ok=True)
            (d / "ckks_context.msg").write_bytes(context_message)
        return {"context_digest": workflow.context_digest.hex(),
                "aggregator_context": {"has_secret_key": bool(ctx.has_secret_key()),
                                       "is_private": bool(ctx.is_private()),
                                       "has_galois_keys": bool(ctx.has_galois_keys())},
                "authority_seconds": dict(workflow.authority_seconds)}


_DP_NUMBERS = ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon")


def _dp_report(raw: Any) -> dict[str, Any] | None:
    """A node's DP-SGD report (JSON), checked; None when absent or malformed."""
    if not isinstance(raw, str) or len(raw) > 4096:
        return None
    try:
        rep = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(rep, dict) or not all(
            isinstance(rep.get(k), (int, float)) and not isinstance(rep.get(k), bool)
            and math.isfinite(rep[k]) and rep[k] >= 0 for k in _DP_NUMBERS):
        return None
    steps, budget = rep.get("steps"), rep.get("budget")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return None
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        return None
    return {k: rep[k] for k in (*_DP_NUMBERS, "steps", "budget", "accountant")
            if k in rep}


def _ddp_report(raw: Any) -> dict[str, Any] | None:
    """A node's distributed-DP report (JSON), checked; None when absent or malformed."""
    if not isinstance(raw, str) or len(raw) > 4096:
        return None
    try:
        rep = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(rep, dict) or not isinstance(rep.get("clipped"), bool):
        return None
    out = rep.get("out_of_range")
    if not isinstance(out, int) or isinstance(out, bool) or out < 0:
        return None
    if not all(isinstance(rep.get(k), (int, float)) and not isinstance(rep.get(k), bool)
               and math.isfinite(rep[k]) and rep[k] >= 0
               for k in ("norm", "sigma", "noise_multiplier")):
        return None
    return {k: rep[k] for k in ("clipped", "norm", "out_of_range", "sigma", "noise_multiplier")}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: all rounds of the run config."""
    FlowerFedCoLLM(dict(context.run_config)).run(grid)
