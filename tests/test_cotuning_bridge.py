"""Vocabulary bridge: token bytes, vocabulary maps, offset alignment, bridged KL, caching,
and cross-tokenizer FedCoLLM rounds on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedcollm_secure.cotuning import bridge, server
from fedcollm_secure.cotuning.data import generated_mc_dataset, tokenize_examples
from fedcollm_secure.cotuning.distill import DistillSettings, sparse_kl, teacher_topk
from fedcollm_secure.cotuning.engine import FedCoLLM, FedCoLLMConfig
from fedcollm_secure.cotuning.lora import adapter_state, load_adapter_state
from fedcollm_secure.cotuning.models import (
    save_tiny_model,
    tiny_sentencepiece_tokenizer,
    tiny_tokenizer,
)
from fedcollm_secure.cotuning.server import prepare_public
from fedcollm_secure.cotuning.trainer import TrainSettings
from fedcollm_secure.errors import BridgeError, ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def byte_level() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def metaspace() -> Any:
    return tiny_sentencepiece_tokenizer()


# --------------------------------------------------------------------------------------------
# tokens as bytes and vocabulary maps
# --------------------------------------------------------------------------------------------
def test_word_boundary_markers_and_byte_fallback_become_the_same_bytes(
        byte_level: Any, metaspace: Any) -> None:
    sp, bl = bridge.token_bytes(metaspace), bridge.token_bytes(byte_level)
    assert sp[metaspace.convert_tokens_to_ids("\u2581dolphin")] == b" dolphin"
    assert bl[byte_level.convert_tokens_to_ids("\u0120dolphin")] == b" dolphin"
    assert sp[metaspace.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert bl[byte_level.convert_tokens_to_ids("\u010a")] == b"\n"
    assert sp[metaspace.bos_token_id] is None and bl[byte_level.eos_token_id] is None
    vmap = bridge.build_vocab_map(metaspace, byte_level)
    for teacher_token, student_token in (("\u2581dolphin", "\u0120dolphin"),
                                         ("<0x0A>", "\u010a"), ("<eos>", "</s>"),
                                         ("<pad>", "<pad>")):
        got = int(vmap.ids[metaspace.convert_tokens_to_ids(teacher_token)])
        assert got == byte_level.convert_tokens_to_ids(student_token), teacher_token
    assert vmap.counts["exact"] > 0 and sum(vmap.counts.values()) == len(metaspace)


def test_the_fallback_takes_the_students_first_token_of_the_text(
        byte_level: Any, metaspace: Any) -> None:
    vmap = bridge.build_vocab_map(metaspace, byte_level)
    sp_bytes, bl_bytes = bridge.token_bytes(metaspace), bridge.token_bytes(byte_level)
    exact = {b for b in bl_bytes if b is not None}
    fallbacks = [t for t, b in enumerate(sp_bytes) if b is not None and b not in exact]
    assert fallbacks, "the two tiny tokenizers should disagree on some tokens"
    for t in fallbacks:
        s = int(vmap.ids[t])
        raw, got = sp_bytes[t], bl_bytes[s]
        assert raw is not None and got is not None and raw.startswith(got)
        first = byte_level(raw.decode("utf-8", "ignore"), add_special_tokens=False)["input_ids"]
        if first and raw.startswith(bl_bytes[first[0]] or b"\xff"):
            assert s == first[0]


def test_identical_tokenizers_map_to_the_identity(byte_level: Any) -> None:
    vmap = bridge.build_vocab_map(byte_level, tiny_tokenizer())
    assert torch.equal(vmap.ids, torch.arange(len(byte_level)))
    assert vmap.counts["unmapped"] == 0 and vmap.counts["fallback"] == 0


@pytest.mark.parametrize(("k", "temperature"), [(32, 1.0), (0, 2.0), (5, 0.5)])
def test_bridged_kl_equals_the_same_tokenizer_kl(byte_level: Any, k: int,
                                                 temperature: float) -> None:
    vmap = bridge.vocab_map(byte_level, tiny_tokenizer(), cache_dir=False)
    gen = torch.Generator().manual_seed(k)
    student = (torch.randn(24, len(byte_level), generator=gen) * 3).requires_grad_(True)
    teacher = torch.randn(24, len(byte_level), generator=gen) * 3
    reference = sparse_kl(student, teacher_topk(teacher, k, temperature), temperature)
    bridged = bridge.bridged_kl(student, teacher, vmap, k, temperature)
    torch.testing.assert_close(bridged.loss, reference, rtol=1e-6, atol=1e-7)
    assert bridged.positions == 24 and bridged.dropped_positions == 0
    assert bridged.mapped_mass == pytest.approx(1.0, abs=1e-6)
    bridged.loss.backward()  # type: ignore[no-untyped-call]
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def _toy_map(ids: list[int], student_vocab: int) -> bridge.VocabMap:
    return bridge.VocabMap("t", "s", torch.tensor(ids, dtype=torch.int64), student_vocab,
                           {"exact": 0, "fallback": 0, "special": 0, "unmapped": 0})


def test_mass_landing_on_one_student_token_is_summed_and_unmapped_mass_is_reported() -> None:
    # teacher tokens 0 and 1 -> student 2; teacher 2 -> student 0; teacher 3 unmapped
    vmap = _toy_map([2, 2, 0, -1], 3)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.0, 1.0]]))  # log 0 = -inf
    top, mass = bridge.bridge_topk(logits, vmap, k=0)
    torch.testing.assert_close(mass, torch.tensor([0.9, 0.0]), atol=1e-6, rtol=0)
    row = {int(i): float(p) for i, p in zip(top.indices[0], top.probs[0], strict=True) if p > 0}
    assert row == pytest.approx({2: 0.7 / 0.9, 0: 0.2 / 0.9})
    assert float(top.probs[1].sum()) == 0.0
    student = torch.zeros(2, 3, requires_grad=True)
    result = bridge.bridged_kl(student, logits, vmap, k=0)
    assert result.positions == 1 and result.dropped_positions == 1  # row 2 is left out
    assert result.mapped_mass == pytest.approx(0.45, abs=1e-6)


def test_the_bridge_never_silently_drops_all_mass() -> None:
    vmap = _toy_map([-1, -1, -1, -1], 3)
    student = torch.zeros(3, 3, requires_grad=True)
    with pytest.raises(BridgeError, match="maps onto"):
        bridge.bridged_kl(student, torch.randn(3, 4), vmap, k=2)
    with pytest.raises(BridgeError):
        _toy_map([0, 5], 3)  # ids outside the student vocabulary


def test_maps_are_cached_in_memory_and_on_disk(byte_level: Any, metaspace: Any,
                                               tmp_path: Path) -> None:
    bridge._MEMORY.clear()
    first = bridge.vocab_map(metaspace, byte_level, cache_dir=tmp_path)
    files = list((tmp_path / "bridge").glob("*.safetensors"))
    assert len(files) == 1 and bridge.vocab_map(metaspace, byte_level) is first
    bridge._MEMORY.clear()
    again = bridge.vocab_map(metaspace, byte_level, cache_dir=tmp_path)
    assert again is not first and torch.equal(again.ids, first.ids)
    assert dict(again.counts) == dict(first.counts)
    files[0].write_bytes(b"not a safetensors file")  # a damaged cache is rebuilt
    bridge._MEMORY.clear()
    rebuilt = bridge.vocab_map(metaspace, byte_level, cache_dir=tmp_path)
    assert torch.equal(rebuilt.ids, first.ids)
    bridge._MEMORY.clear()
    assert torch.equal(bridge.vocab_map(metaspace, byte_level, cache_dir=tmp_path).ids,
                       first.ids)


def test_a_slow_tokenizer_is_refused() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast"):
        bridge.token_bytes(Slow())


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------
def test_identical_tokenizers_align_every_answer_position_with_itself(byte_level: Any) -> None:
    examples = generated_mc_dataset(20, seed=1)
    pairs = bridge.pair_features(examples, byte_level, tiny_tokenizer(), max_length=64)
    for pf in pairs:
        assert list(pf.slm_from_llm) == list(pf.slm["answer_positions"])
        assert list(pf.llm_from_slm) == list(pf.llm["answer_positions"])
    cov = bridge.coverage(pairs)
    assert cov["slm"]["coverage"] == 1.0 and cov["llm"]["coverage"] == 1.0


def test_different_tokenizers_align_only_at_the_same_consumed_text(
        byte_level: Any, metaspace: Any) -> None:
    examples = generated_mc_dataset(40, seed=2)
    pairs = bridge.pair_features(examples, metaspace, byte_level)
    cov = bridge.coverage(pairs)
    assert 0 < cov["slm"]["matched"] and 0 < cov["llm"]["matched"]
    for ex, pf in zip(examples, pairs, strict=True):
        s_off = bridge._feature_offsets(ex, byte_level, pf.slm["input_ids"], bridge.DEFAULT_PROMPT)
        l_off = bridge._feature_offsets(ex, metaspace, pf.llm["input_ids"], bridge.DEFAULT_PROMPT)
        s_consumed, s_boundary = bridge.consumed_offsets(s_off)
        l_consumed, l_boundary = bridge.consumed_offsets(l_off)
        for p, q in zip(pf.slm["answer_positions"], pf.slm_from_llm, strict=True):
            if q >= 0:  # same text prefix, both at a boundary
                assert s_consumed[p] == l_consumed[q] and s_boundary[p] and l_boundary[q]
            else:  # nothing on the teacher's side consumed exactly that text at a boundary
                assert not s_boundary[p] or all(
                    l_consumed[j] != s_consumed[p] or not l_boundary[j]
                    for j in range(len(l_off)))


def test_split_characters_are_not_boundaries() -> None:
    # a 3-byte character split over three byte-level tokens: only its last piece ends it
    consumed, boundary = bridge.consumed_offsets([(0, 0), (0, 2), (2, 3), (2, 3), (2, 3),
                                                  (3, 5)])
    assert consumed == [0, 2, 3, 3, 3, 5]
    assert boundary == [True, True, False, False, True, True]
    teacher = [(0, 0), (0, 2), (2, 3), (3, 5)]
    assert bridge.align_positions([(0, 0), (0, 2), (2, 3), (2, 3), (2, 3), (3, 5)],
                                  [1, 2, 3, 4], teacher) == [1, -1, -1, 2]


def test_paired_collator_rows_follow_the_answer_mask(byte_level: Any, metaspace: Any) -> None:
    pairs = bridge.pair_features(generated_mc_dataset(6, seed=3), metaspace, byte_level)
    batch = bridge.PairedCollator(metaspace, byte_level)(pairs)
    assert batch.slm["answer_mask"].sum() == sum(len(p.slm_from_llm) for p in pairs)
    assert len(batch.slm_rows) == len(batch.llm_pairs) == sum(
        q >= 0 for p in pairs for q in p.slm_from_llm)
    rows, cols = batch.slm["answer_mask"].nonzero(as_tuple=True)
    flat = [(b, q) for b, p in enumerate(pairs) for q in p.slm_from_llm]
    for r, (b, q) in zip(batch.slm_rows.tolist(), batch.llm_pairs.tolist(), strict=True):
        assert int(rows[r]) == b and flat[r] == (b, q)
        assert batch.llm["attention_mask"][b, q] == 1


def test_prepare_public_refuses_when_nothing_aligns(byte_level: Any, metaspace: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    examples = generated_mc_dataset(4, seed=4)
    monkeypatch.setattr(bridge, "align_positions", lambda s, p, t: [-1] * len(p))
    with pytest.raises(BridgeError, match="aligns"):
        prepare_public(examples, metaspace, byte_level, DistillSettings())


# --------------------------------------------------------------------------------------------
# FedCoLLM across tokenizers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cross_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bridge")
    llm = save_tiny_model(root / "llm", "gemma3", seed=3, hidden=48, layers=2,
                          tokenizer=tiny_sentencepiece_tokenizer())
    slm = save_tiny_model(root / "slm", "llama", seed=4, hidden=32, layers=1,
                          tokenizer=tiny_tokenizer())
    return llm, slm


def _cross_config(dirs: tuple[Path, Path], **changes: Any) -> FedCoLLMConfig:
    data: dict[str, Any] = {
        "llm": {"source": str(dirs[0])}, "slm": {"source": str(dirs[1])}, "lora": LORA,
        "train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "distill_train": {"batch_size": 8, "learning_rate": 1e-2, "schedule": "constant"},
        "distill": {"top_k": 16},
        "data": {"limit": 48, "eval_limit": 8, "max_length": 64},
        "partition": {"scheme": "iid"}, "n_clients": 2, "rounds": 1}
    data.update(changes)
    return FedCoLLMConfig.from_dict(data)


def test_fedcollm_runs_across_tokenizers_through_the_bridge(cross_dirs: tuple[Path, Path],
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    monkeypatch.setenv("FEDCOLLM_SECURE_CACHE", str(tmp_path))
    run = FedCoLLM(_cross_config(cross_dirs))
    assert run.llm_tokenizer is not run.tokenizer
    assert len(run.llm_tokenizer) != len(run.tokenizer)
    assert run.public_set is not None and run.public_set.bridge is not None
    llm_before, slm_before = adapter_state(run.llm), adapter_state(run.slm)
    history = run.run()
    distill = history[0]["distill"]
    assert distill["steps"] > 0 and distill["mode"] == "token"
    for side in ("slm", "llm"):
        stats = distill["bridge"][side]
        assert stats["kl_positions"] > 0 and 0 < stats["mapped_mass"] <= 1 + 1e-6
        assert 0 < stats["coverage"] <= 1
    assert any(float((adapter_state(run.llm)[n] - llm_before[n]).abs().max()) > 0
               for n in llm_before)
    assert any(float((run.slm_state()[n] - slm_before[n]).abs().max()) > 0 for n in slm_before)
    for which in ("llm", "slm"):  # each model is scored with its own tokenizer
        assert history[0]["eval"][which]["n"] == 8
    assert list((tmp_path / "bridge").glob("*.safetensors"))


def test_the_kl_term_moves_the_student_toward_the_teacher_across_tokenizers(
        cross_dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the same start, distilling with lambda = 1 brings the SLM's bridged KL against
    the (fixed, sequential order) LLM lower than lambda = 0 (CE only) does."""
    monkeypatch.setenv("FEDCOLLM_SECURE_CACHE", str(tmp_path))
    run = FedCoLLM(_cross_config(cross_dirs))
    public = run.public_set
    assert public is not None and public.bridge is not None and public.pairs is not None
    vmap = public.bridge.llm_to_slm
    batch = bridge.PairedCollator(run.llm_tokenizer, run.tokenizer)(public.pairs)
    start = {"llm": adapter_state(run.llm), "slm": adapter_state(run.slm)}

    def kl_now() -> float:
        with torch.no_grad():
            student = server._answer_logits(run.slm, batch.slm)[batch.slm_rows]
            teacher = server._teacher_logits(run.llm, batch.llm, batch.llm_pairs)
            return float(bridge.bridged_kl(student, teacher, vmap, 16).loss)

    def distilled_kl(lambda_kl: float) -> float:
        load_adapter_state(run.llm, start["llm"])
        load_adapter_state(run.slm, start["slm"])
        train = TrainSettings(epochs=3, batch_size=8, learning_rate=2e-2, schedule="constant")
        server.mutual_distill(run.llm, run.slm, run.tokenizer, public,
                              DistillSettings(top_k=16, lambda_kl=lambda_kl), train, seed=0,
                              order="sequential")
        load_adapter_state(run.llm, start["llm"])  # the teacher the SLM was trained against
        return kl_now()

    before = kl_now()
    with_kl, without_kl = distilled_kl(1.0), distilled_kl(0.0)
    assert with_kl < before and with_kl < without_kl


def test_same_tokenizer_runs_keep_the_exact_path(tmp_path: Path) -> None:
    llm = save_tiny_model(tmp_path / "llm", "llama", seed=3, hidden=48, layers=1)
    slm = save_tiny_model(tmp_path / "slm", "llama", seed=4, hidden=32, layers=1)
    run = FedCoLLM(_cross_config((llm, slm)))
    assert run.llm_tokenizer is run.tokenizer and run.public_set is None
    choice = FedCoLLM(_cross_config((llm, slm), distill={"mode": "choice"}))
    assert choice.public_set is not None and choice.public_set.pairs is None
    features = tokenize_examples(run.public_data, run.tokenizer, 64)
    assert features == run.public_features


def test_fedcollm_choice_mode_runs_across_tokenizers(cross_dirs: tuple[Path, Path]) -> None:
    run = FedCoLLM(_cross_config(cross_dirs, distill={"mode": "choice"},
                                 data={"limit": 32, "eval_limit": 4, "max_length": 64}))
    assert run.public_set is not None and run.public_set.pairs is None
    slm_before = adapter_state(run.slm)
    history = run.run()
    distill = history[0]["distill"]
    assert distill["mode"] == "choice" and distill["steps"] > 0 and distill["bridge"] == {}
    assert any(float((run.slm_state()[n] - slm_before[n]).abs().max()) > 0 for n in slm_before)
