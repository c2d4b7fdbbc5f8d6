"""FedCoLLM rounds in one process: clients, secure aggregation, mutual distillation.

Round t (DESIGN.md section 1):

1. every client loads the global SLM adapter ``theta_t`` and trains it locally
   (:func:`trainer.client_update`), giving ``delta_k = theta_k - theta_t``;
2. the server aggregates the deltas through the configured aggregator
   (:func:`server.aggregate_deltas`; ``masking`` by default, so it learns only the weighted
   sum) and sets ``theta = theta_t + mean delta``;
3. it loads ``theta`` into its SLM copy and runs :func:`server.mutual_distill` with its
   LLM (whose own LoRA adapter never leaves the server) on the public data;
4. ``theta_{t+1}`` is the *distilled* SLM adapter, which the next round broadcasts.

Clients run one after another on one SLM model object (each loads ``theta_t`` first), so a
process holds one LLM and one SLM.

Masking clips every element of a delta to ``[-clip, clip]`` before quantising it. LoRA
deltas of a round are small (typically well below 0.1 per element), so the engine uses
``clip = 1.0`` (:data:`DEFAULT_MASKING_CLIP`) unless ``aggregator_options`` sets one. Each
element of the mean is then within ``n * clip * max_weight / (levels * weight_total)`` of
the exact mean (``levels = (2^31 - 1) // n`` with the default 32-bit ring: below 5e-9 for
3 clients). Each round's history records, per client, the fraction of delta elements the
clip cut (computed on the client's side; a non-zero value means: raise the clip).

``mode = "fedavg"`` runs the same rounds without step 3 (the FedAvg baseline:
``theta_{t+1} = theta_t + mean delta``); :mod:`.baselines` builds the other baselines on
this class.

Evaluation after each round (``history[t]["eval"]``): ``["llm"]`` and ``["slm"]`` hold the
accuracy on the shared evaluation set (``data.eval_limit`` questions) and, under
``"per_client"``, each client's own test split (:func:`data.client_test_splits`: the task
mix of the client's training shard, at most ``data.client_eval_limit`` questions) with
``acc``, ``acc_norm``, perplexity of the correct answer (``ppl``, ``nll``) and the split's
task counts; ``"per_client_mean"`` is the unweighted mean over clients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..audit.cotuning import record_engine_round, record_run
from ..audit.log import AuditLog
from ..config import ConfigBase, require
from ..errors import ConfigError, DatasetError, PrivacyBudgetError
from ..privacy.config import PrivacySettings
from ..privacy.federation import PrivacyController
from .adapter_validation import adapter_spec, screen_updates
from .data import (
    GENERATED_TASKS,
    MCExample,
    client_test_splits,
    PartitionConfig,
    federated_split,
    generated_mc_dataset,
    load_bigbench_mc,
    load_mc_dataset,
    task_counts,
    tokenize_examples,
)
from .distill import DistillSettings
from .evaluation import ChoiceScores, EvalConfig, accuracy, perplexity, score_choices
from .lora import (
    LoraSettings,
    adapter_state,
    apply_delta,
    attach_lora,
    load_adapter_state,
)
from .models import ModelSpec, derive_slm_by_pruning, load_model, same_tokenizer
from .server import DistillResult, PublicSet, aggregate_deltas, mutual_distill, prepare_public
from .trainer import TrainSettings, client_update

__all__ = ["DEFAULT_MASKING_CLIP", "DataSettings", "FedCoLLM", "FedCoLLMConfig", "seeded_torch"]

DEFAULT_MASKING_CLIP = 1.0
"""Elementwise clip of the LoRA deltas under ``masking`` unless the options name one."""

Progress = Callable[[int, str], None]  # round (1-based), phase


@dataclasses.dataclass(frozen=True)
class DataSettings(ConfigBase):
    """Where the run's data comes from when the caller passes none.

    ``source``: ``generated`` (the built-in test dataset), ``bigbench`` (the bundled
    BIG-bench subsets, ``tasks`` selects) or a local file/directory
    (:func:`data.load_mc_dataset`). ``limit`` caps the training examples (per task for
    bigbench), ``eval_limit`` the questions of the shared evaluation set (0: no evaluation
    at all), ``client_eval_limit`` those of each client's own test split (0: none). The
    public split takes
    ``public_fraction`` of the training examples; the rest is partitioned over the clients.
    """

    section: ClassVar[str] = "data"
    source: str = "generated"
    tasks: tuple[str, ...] | None = None
    limit: int | None = 256
    eval_split: str = "validation"
    eval_limit: int | None = 64
    client_eval_limit: int | None = 16
    public_fraction: float = 0.2
    max_length: int = 256

    def validate(self) -> None:
        require(bool(self.source.strip()), "data.source must not be empty")
        require(self.limit is None or self.limit >= 1, "data.limit must be >= 1")
        require(self.eval_limit is None or self.eval_limit >= 0, "data.eval_limit must be >= 0")
        require(self.client_eval_limit is None or self.client_eval_limit >= 0,
                "data.client_eval_limit must be >= 0")
        require(0 < self.public_fraction < 1, "data.public_fraction must be in (0, 1)")
        require(self.max_length >= 2, "data.max_length must be >= 2")


@dataclasses.dataclass(frozen=True)
class FedCoLLMConfig(ConfigBase):
    """One FedCoLLM run.

    The SLM is ``slm`` (any causal LM; when its tokenizer differs from the LLM's, the mutual
    distillation runs through the vocabulary bridge, :mod:`.bridge`) or, when that is
    ``None``, the LLM pruned to ``slm_prune_layers`` decoder layers (an unhealed pruned SLM
    is near chance on real tasks; DESIGN.md section 4). ``train`` is the clients' local
    training, ``distill_train`` the server's mutual-distillation schedule (its ``epochs`` is
    R), ``distill`` the loss. ``aggregator`` is any registered aggregator; its options go in
    ``aggregator_options`` (``masking`` gets ``clip = 1.0`` unless given). ``weighting``
    ``examples`` weighs each client's delta by its number of training examples (FedAvg).
    ``seed`` fixes data splits, example orders, LoRA initialisation and dropout masks
    (experiments; aggregation and DP randomness always come from the OS CSPRNG). ``mode``
    ``fedavg`` switches the mutual distillation off (the FedAvg baseline through the same
    rounds). ``max_update_norm`` bounds the L2 norm of a client's delta: a delta over it, or
    with wrong names, shapes, dtypes or non-finite values, is refused
    (:func:`.adapter_validation.validate_adapter`) and the round goes on without it.
    """

    section: ClassVar[str] = "fedcollm"
    llm: ModelSpec
    slm: ModelSpec | None = None
    slm_prune_layers: int | None = None
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    distill: DistillSettings = dataclasses.field(default_factory=DistillSettings)
    distill_train: TrainSettings = dataclasses.field(default_factory=TrainSettings)
    rounds: int = 2
    n_clients: int = 3
    partition: PartitionConfig = dataclasses.field(default_factory=PartitionConfig)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    aggregator: str = "masking"
    aggregator_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    threshold: int | None = None
    weighting: Literal["examples", "uniform"] = "examples"
    mode: Literal["fedcollm", "fedavg"] = "fedcollm"
    seed: int = 0
    privacy: PrivacySettings = dataclasses.field(default_factory=PrivacySettings)
    max_update_norm: float | None = None

    def validate(self) -> None:
        require(self.max_update_norm is None or (math.isfinite(self.max_update_norm)
                                                 and self.max_update_norm > 0),
                "fedcollm.max_update_norm must be a finite positive number")
        require((self.slm is None) != (self.slm_prune_layers is None),
                "give exactly one of fedcollm.slm and fedcollm.slm_prune_layers")
        require(self.slm_prune_layers is None or self.slm_prune_layers >= 1,
                "fedcollm.slm_prune_layers must be >= 1")
        require(self.rounds >= 1, "fedcollm.rounds must be >= 1")
        require(self.n_clients >= 1, "fedcollm.n_clients must be >= 1")
        require(bool(self.aggregator.strip()), "fedcollm.aggregator must not be empty")
        require(isinstance(self.aggregator_options, dict)
                and all(isinstance(k, str) for k in self.aggregator_options),
                "fedcollm.aggregator_options must map option names to values")
        require(self.threshold is None or 1 <= self.threshold <= self.n_clients,
                "fedcollm.threshold must be in [1, n_clients]")
        require(self.mode in ("fedcollm", "fedavg"), "fedcollm.mode must be fedcollm or fedavg")
        require(not self.privacy.ddp_on or self.aggregator == "masking",
                "privacy.ddp runs on top of the masking aggregator")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["aggregator_options"] = dict(self.aggregator_options)
        return out

    def resolved_aggregator_options(self) -> dict[str, Any]:
        """The options passed to the aggregator (with the masking clip default filled in)."""
        options = dict(self.aggregator_options)
        if self.aggregator == "masking":
            options.setdefault("clip", DEFAULT_MASKING_CLIP)
        return options


def _seed(*parts: int) -> int:
    """An experiment seed for one (run seed, round, party): example order, not key material."""
    entropy = [p % (1 << 32) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded from ``seed`` (LoRA
    initialisation, dropout masks), restoring the caller's generator state afterwards, so a
    run is reproducible for its ``config.seed`` and leaves no trace on the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


class FedCoLLM:
    """A FedCoLLM run; models and data are loaded from ``config`` unless passed in.

    ``llm``/``slm`` may be plain causal LMs (a LoRA adapter is attached with
    ``config.lora``) or peft models; passing a model requires ``tokenizer`` (the SLM's, and
    the LLM's too unless ``llm_tokenizer`` gives the LLM's own). ``self.tokenizer`` is the
    SLM's (clients), ``self.llm_tokenizer`` the LLM's (the same object when they match).
    ``client_data`` is one list of examples per client (``config.n_clients`` lists),
    ``public_data`` the server's public examples, ``eval_data`` the questions both models are
    scored on after each round (empty: no evaluation), ``client_eval_data`` one test split per
    client (default: drawn from the evaluation pool with each client's task mix).
    """

    def __init__(self, config: FedCoLLMConfig, *, llm: Any = None, slm: Any = None,
                 tokenizer: Any = None, llm_tokenizer: Any = None,
                 client_data: Sequence[Sequence[MCExample]] | None = None,
                 public_data: Sequence[MCExample] | None = None,
                 eval_data: Sequence[MCExample] | None = None,
                 client_eval_data: Sequence[Sequence[MCExample]] | None = None) -> None:
        self.config = config
        self.llm, self.slm, self.tokenizer, self.llm_tokenizer = self._models(
            llm, slm, tokenizer, llm_tokenizer)
        self.client_data, self.public_data, self.eval_data = self._data(
            client_data, public_data, eval_data)
        self.client_ids = [f"client-{i}" for i in range(len(self.client_data))]
        self.client_eval_data = self._client_eval(client_eval_data)
        max_length, prompt = config.data.max_length, config.eval.prompt  # train as scored
        self.client_features = [tokenize_examples(d, self.tokenizer, max_length, prompt=prompt)
                                for d in self.client_data]
        self.public_features, self.public_set = self._public_inputs()
        self.global_state = adapter_state(self.slm)
        self.history: list[dict[str, Any]] = []
        p = config.privacy  # privacy: one accountant per client across rounds (privacy/)
        self.privacy = PrivacyController(
            p, n_examples={c: len(f) for c, f in zip(self.client_ids, self.client_features,
                                                     strict=True)},
            batch_size=config.train.batch_size, epochs=config.train.epochs,
            max_steps=config.train.max_steps, rounds=config.rounds, threshold=config.threshold,
            dim=sum(v.numel() for v in self.global_state.values()),
        ) if p.dpsgd_on or p.ddp_on else None
        self.stopped: str | None = None
        self._audit: AuditLog | None = None

    # ---------------------------------------------------------------------------------------
    def _public_inputs(self) -> tuple[list[dict[str, list[int]]], PublicSet | None]:
        """The server's public data tokenized for the SLM and, when the models' tokenizers
        differ or in the choice mode, prepared for both models (the bridge's input)."""
        cfg = self.config
        max_length, prompt = cfg.data.max_length, cfg.eval.prompt  # train as scored
        features = tokenize_examples(self.public_data, self.tokenizer, max_length,
                                     prompt=prompt)
        public_set = None
        if cfg.mode == "fedcollm" and (self.llm_tokenizer is not self.tokenizer
                                       or cfg.distill.mode == "choice"):
            public_set = prepare_public(self.public_data, self.llm_tokenizer, self.tokenizer,
                                        cfg.distill, max_length=max_length, prompt=prompt)
        return features, public_set

    def _models(self, llm: Any, slm: Any, tokenizer: Any, llm_tokenizer: Any,
                ) -> tuple[Any, Any, Any, Any]:
        cfg = self.config
        if (llm is not None or slm is not None) and tokenizer is None:
            raise ConfigError("pass tokenizer= with llm= or slm= (the SLM's tokenizer; also "
                              "the LLM's unless llm_tokenizer= is given)")
        if llm_tokenizer is not None and llm is None:
            raise ConfigError("llm_tokenizer= goes with llm=")
        if llm is None:
            llm, llm_tok = load_model(cfg.llm)
        else:
            llm_tok = tokenizer if llm_tokenizer is None else llm_tokenizer
        if slm is not None:
            slm_tok = tokenizer
        else:
            slm_tok = llm_tok
            if cfg.slm is not None:
                slm, slm_tok = load_model(cfg.slm)
            else:
                if _is_peft(llm):
                    raise ConfigError("pruning needs a plain LLM; pass slm= with a peft llm=")
                if cfg.slm_prune_layers is None:  # validate() rules this out
                    raise ConfigError("give fedcollm.slm or fedcollm.slm_prune_layers")
                slm = derive_slm_by_pruning(llm, cfg.slm_prune_layers)
        if slm is llm:
            raise ConfigError("the LLM and the SLM must be different model objects")
        with seeded_torch(_seed(cfg.seed, 0, -4)):  # LoRA A matrices: seeded by the run
            if not _is_peft(llm):
                llm = attach_lora(llm, cfg.lora)
            if not _is_peft(slm):
                slm = attach_lora(slm, cfg.lora)
        llm.eval()
        slm.eval()
        if same_tokenizer(llm_tok, slm_tok):  # one object: the exact same-tokenizer path
            llm_tok = slm_tok
        return llm, slm, slm_tok, llm_tok

    def _data(self, client_data: Sequence[Sequence[MCExample]] | None,
              public_data: Sequence[MCExample] | None,
              eval_data: Sequence[MCExample] | None,
              ) -> tuple[list[list[MCExample]], list[MCExample], list[MCExample]]:
        cfg = self.config
        if (client_data is None) != (public_data is None):
            raise ConfigError("pass both client_data= and public_data=, or neither")
        if client_data is None or public_data is None:
            clients, public = federated_split(self._load("train"), cfg.n_clients,
                                              public_fraction=cfg.data.public_fraction,
                                              config=cfg.partition)
        else:
            clients, public = [list(c) for c in client_data], list(public_data)
        if len(clients) != cfg.n_clients:
            raise ConfigError(f"client_data has {len(clients)} clients, config.n_clients is "
                              f"{cfg.n_clients}")
        if any(not c for c in clients):
            raise DatasetError("every client needs at least one training example")
        if not public:
            raise DatasetError("the server needs public data for mutual distillation")
        if eval_data is None:
            evals = self._load(cfg.data.eval_split) if cfg.data.eval_limit != 0 else []
            if cfg.data.eval_limit is not None and len(evals) > cfg.data.eval_limit:
                # a seeded sample in file order, so every task of the split is represented
                keep = np.random.default_rng(cfg.seed).permutation(len(evals))
                chosen = sorted(int(i) for i in keep[:cfg.data.eval_limit])
                evals = [evals[i] for i in chosen]
        else:
            evals = list(eval_data)
        return clients, public, evals

    def _client_eval(self, given: Sequence[Sequence[MCExample]] | None,
                     ) -> list[list[MCExample]]:
        """Each client's test split, drawn from the shared evaluation set (so one scoring
        pass of a model serves both): the task mix of the client's training shard (tasks the
        set lacks are left out; a client none of whose tasks is in it gets none)."""
        cfg = self.config
        if given is not None:
            out = [list(c) for c in given]
            if len(out) != len(self.client_data):
                raise ConfigError(f"client_eval_data has {len(out)} clients, config.n_clients "
                                  f"is {len(self.client_data)}")
            return out
        limit = cfg.data.client_eval_limit
        if limit == 0 or not self.eval_data:
            return [[] for _ in self.client_data]
        tasks = {e.task for e in self.eval_data}
        out = []
        for k, shard in enumerate(self.client_data):
            known = [e for e in shard if e.task in tasks]
            out.append(client_test_splits(self.eval_data, [known], n_per_client=limit,
                                          seed=_seed(cfg.seed, k, -3))[0] if known else [])
        return out

    def _load(self, split: str) -> list[MCExample]:
        d = self.config.data
        seed = self.config.seed
        if d.source == "generated":
            tasks = d.tasks or GENERATED_TASKS
            if split == "train":
                return generated_mc_dataset(d.limit or 256, seed=seed, tasks=tasks)
            return generated_mc_dataset(d.eval_limit or 64, seed=seed + 1_000_003, tasks=tasks)
        if d.source == "bigbench":
            limit = d.limit if split == "train" else None
            return load_bigbench_mc(d.tasks, split, limit=limit)
        path = Path(d.source).expanduser()
        if split == "train":
            return load_mc_dataset(path, split, limit=d.limit)
        if path.is_file():
            raise ConfigError(f"data.source {d.source!r} is a single file and has no "
                              f"{split!r} split; pass eval_data=, use a directory holding "
                              f"{split}.jsonl, or set data.eval_limit = 0")
        return load_mc_dataset(path, split)

    # ---------------------------------------------------------------------------------------
    def _weights(self) -> dict[str, float] | None:
        if self.config.weighting == "uniform":
            return None
        return {cid: float(len(d)) for cid, d in zip(self.client_ids, self.client_data,
                                                     strict=True)}

    def _eval_kwargs(self) -> dict[str, Any]:
        e = self.config.eval
        return {"prompt": e.prompt, "max_length": e.max_length}

    def _tokenizer_of(self, model: Any) -> Any:
        return self.llm_tokenizer if model is self.llm else self.tokenizer

    def _score(self, model: Any, examples: Sequence[MCExample]) -> list[ChoiceScores]:
        e = self.config.eval
        return score_choices(model, self._tokenizer_of(model), examples,
                             batch_size=e.batch_size,
                             prefix_sharing=e.prefix_sharing, **self._eval_kwargs())

    def _evaluate_split(self, model: Any, examples: Sequence[MCExample],
                        scores: Sequence[ChoiceScores] | None = None) -> dict[str, Any]:
        """Accuracy (``acc``, ``acc_norm``) and answer perplexity of ``model`` on one split
        (``scores``: its multiple-choice scores when already computed)."""
        e = self.config.eval
        start = time.perf_counter()
        mc = accuracy(self._score(model, examples) if scores is None else scores)
        ppl = perplexity(model, self._tokenizer_of(model), examples, e.batch_size,
                         on=e.perplexity_on,
                         **self._eval_kwargs())
        return {"acc": mc["acc"], "acc_norm": mc["acc_norm"], "n": mc["n"], "ppl": ppl["ppl"],
                "nll": ppl["nll"], "tasks": task_counts(examples),
                "seconds": time.perf_counter() - start}

    @staticmethod
    def _mean(per_client: dict[str, dict[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {"n_clients": float(len(per_client))}
        for key in ("acc", "acc_norm", "ppl"):
            values = [float(r[key]) for r in per_client.values()]
            out[key] = sum(values) / len(values) if values else math.nan
        return out

    def evaluate(self, slm_states: dict[str, dict[str, torch.Tensor]] | None = None,
                 *, models: Sequence[str] = ("llm", "slm")) -> dict[str, Any]:
        """Evaluate the LLM and the SLM; nothing is trained (inference mode).

        The SLM is the global adapter (``self.global_state``) unless ``slm_states`` maps
        each client id to its own adapter (standalone training): then client ``k``'s SLM is
        scored on client ``k``'s split only and the shared set is skipped for the SLM. The
        global adapter is loaded back afterwards.
        """
        out: dict[str, Any] = {}
        has_splits = any(self.client_eval_data)
        for which in models:
            if which not in ("llm", "slm"):
                raise ConfigError(f"evaluate: unknown model {which!r} (llm or slm)")
            model = self.llm if which == "llm" else self.slm
            if which == "slm":
                load_adapter_state(self.slm, self.global_state)
            entry: dict[str, Any] = {}
            by_id: dict[int, ChoiceScores] = {}
            if self.eval_data and not (which == "slm" and slm_states is not None):
                start = time.perf_counter()
                scores = self._score(model, self.eval_data)
                seconds = time.perf_counter() - start
                entry.update(accuracy(scores), seconds=seconds,
                             seconds_per_question=seconds / len(self.eval_data))
                by_id = {id(ex): sc for ex, sc in zip(self.eval_data, scores, strict=True)}
            if has_splits:
                per_client: dict[str, dict[str, Any]] = {}
                for cid, split in zip(self.client_ids, self.client_eval_data, strict=True):
                    if not split:
                        continue
                    if which == "slm" and slm_states is not None:
                        load_adapter_state(self.slm, slm_states[cid])
                    known = [by_id.get(id(ex)) for ex in split]
                    reuse = None if any(sc is None for sc in known) else [
                        sc for sc in known if sc is not None]
                    per_client[cid] = self._evaluate_split(model, split, reuse)
                entry["per_client"] = per_client
                entry["per_client_mean"] = self._mean(per_client)
            if which == "slm":
                load_adapter_state(self.slm, self.global_state)
            if entry:
                out[which] = entry
        return out

    def run_round(self, t: int, progress: Progress | None = None) -> dict[str, Any]:
        """Round ``t`` (1-based): broadcast, local training, aggregation, distillation."""
        cfg = self.config
        seconds: dict[str, float] = {}
        theta_t = {n: v.clone() for n, v in self.global_state.items()}

        def phase(name: str) -> None:
            if progress is not None:
                progress(t, name)

        admitted = self.client_ids if self.privacy is None else \
            self.privacy.admit(t, self.client_ids)  # budget check before any training
        phase("clients")
        start = time.perf_counter()
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        client_loss: dict[str, float] = {}
        client_steps: dict[str, int] = {}
        clipped: dict[str, float] = {}
        options = cfg.resolved_aggregator_options()
        clip = options.get("clip") if cfg.aggregator == "masking" else None
        for k, (cid, features) in enumerate(zip(self.client_ids, self.client_features,
                                                strict=True)):
            if cid not in admitted:
                continue
            dp = None if self.privacy is None else self.privacy.dpsgd_args(cid)
            with (contextlib.nullcontext() if dp is not None  # DP noise: its own CSPRNG
                  else seeded_torch(_seed(cfg.seed, t, k, -5))):  # dropout masks
                delta, result = client_update(self.slm, self.tokenizer, theta_t, features,
                                              cfg.train, seed=_seed(cfg.seed, t, k), dp=dp)
            if self.privacy is not None:
                self.privacy.record_training(t, cid, result.steps,
                                             getattr(result, "sample_rate", None),
                                             getattr(result, "noise_multiplier", None))
            deltas[cid], client_loss[cid], client_steps[cid] = delta, result.mean_loss, \
                result.steps
            if isinstance(clip, (int, float)):
                over = sum(int((v.abs() > clip).sum()) for v in delta.values())
                clipped[cid] = over / max(1, sum(v.numel() for v in delta.values()))
        if any(clipped.values()):
            warnings.warn(f"round {t}: the masking clip {clip} cut some delta elements "
                          f"({clipped}); raise aggregator_options.clip", stacklevel=2)
        deltas, refused = screen_updates(deltas, adapter_spec(theta_t),
                                         max_norm=cfg.max_update_norm)
        if refused:
            warnings.warn(f"round {t}: updates refused: {refused}", stacklevel=2)
        seconds["clients"] = time.perf_counter() - start

        phase("aggregate")
        start = time.perf_counter()
        weights = self._weights()
        if weights is not None:
            weights = {cid: weights[cid] for cid in deltas}
        if self.privacy is not None and self.privacy.ddp is not None:
            mean, secure = self.privacy.aggregate(deltas, t=t)  # user-level distributed DP
        else:
            audit: dict[str, Any] = {} if self._audit is None else {"audit_log": self._audit}
            mean, secure = aggregate_deltas(deltas, weights, protocol=cfg.aggregator,
                                            threshold=cfg.threshold, round_=t, **audit,
                                            **options)
        del deltas
        aggregated = apply_delta(theta_t, mean)
        seconds["aggregate"] = time.perf_counter() - start

        start = time.perf_counter()
        load_adapter_state(self.slm, aggregated)
        if cfg.mode == "fedcollm":
            phase("distill")
            public = self.public_set if self.public_set is not None else self.public_features
            with seeded_torch(_seed(cfg.seed, t, -1, -5)):
                distilled = mutual_distill(self.llm, self.slm, self.tokenizer, public,
                                           cfg.distill, cfg.distill_train,
                                           seed=_seed(cfg.seed, t, -1))
        else:  # fedavg: theta_{t+1} = theta_t + mean delta
            distilled = DistillResult()
        self.global_state = adapter_state(self.slm)  # theta_{t+1}: the distilled adapter
        seconds["distill"] = time.perf_counter() - start

        phase("evaluate")
        start = time.perf_counter()
        evaluation = self.evaluate()
        seconds["evaluate"] = time.perf_counter() - start

        sent = secure.stats.get("bytes_sent", {})
        received = secure.stats.get("bytes_received", {})
        wire = {cid: {"sent": int(sum(sent.get(cid, {}).values())),
                      "received": int(sum(received.get(cid, {}).values()))}
                for cid in self.client_ids}
        finite = [v for v in client_loss.values() if math.isfinite(v)]
        return {
            "round": t,
            "mode": cfg.mode,
            "aggregator": secure.protocol or cfg.aggregator,
            "aggregator_options": options,
            "clipped_fraction": clipped,
            "survivors": list(secure.survivors),
            "dropped": dict(secure.dropped),
            "bytes": wire,
            "seconds": seconds,
            "client_loss": client_loss,
            "client_steps": client_steps,
            "mean_client_loss": sum(finite) / len(finite) if finite else math.nan,
            "distill": {"steps": distilled.steps,
                        "order": cfg.distill.order if cfg.mode == "fedcollm" else None,
                        "slm_losses": distilled.slm_losses, "llm_losses": distilled.llm_losses,
                        "mean_slm_loss": distilled.mean_slm_loss,
                        "mean_llm_loss": distilled.mean_llm_loss,
                        "mode": cfg.distill.mode, "bridge": distilled.bridge},
            "eval": evaluation,
            **({"refused_updates": refused} if refused else {}),
            **({"privacy": self.privacy.round_record(t, secure)} if self.privacy else {}),
        }

    def run(self, progress: Progress | None = None, *,
            audit: AuditLog | None = None) -> list[dict[str, Any]]:
        """All ``config.rounds`` rounds; returns (and keeps in ``self.history``) one dict per
        round. With ``audit`` (an open :class:`~fedcollm_secure.audit.AuditLog`; the caller
        closes it) the run's configuration, every aggregation round (reply digests,
        participants, dropouts, parameters), refused updates, the global adapter's digest
        and the privacy spent are recorded."""
        if audit is not None:
            record_run(audit, self.config, client_ids=self.client_ids,
                       examples={c: len(d) for c, d in zip(self.client_ids, self.client_data,
                                                           strict=True)},
                       global_state=self.global_state)
        self._audit = audit
        try:
            for t in range(len(self.history) + 1, self.config.rounds + 1):
                try:
                    self.history.append(self.run_round(t, progress))
                except PrivacyBudgetError as exc:  # refused before any training of round t
                    if self.privacy is None:
                        raise
                    self.stopped = f"round {t}: {exc}"
                    warnings.warn(f"privacy budget: run stopped before {self.stopped}",
                                  stacklevel=2)
                    if audit is not None:
                        audit.note(round=t, event="stopped", reason=self.stopped)
                    break
                if audit is not None:
                    entry = self.history[-1]
                    record_engine_round(audit, t, entry, self.global_state,
                                        refused=entry.get("refused_updates"))
        finally:
            self._audit = None
        return self.history

    def llm_state(self) -> dict[str, torch.Tensor]:
        """The LLM's LoRA adapter (never leaves the server)."""
        return adapter_state(self.llm)

    def slm_state(self) -> dict[str, torch.Tensor]:
        """The current global SLM adapter (what the next round broadcasts)."""
        return {n: v.clone() for n, v in self.global_state.items()}
