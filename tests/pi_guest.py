"""Greedy tokens and teacher-forced logits of a bundle, written to a file for comparison.

Run the same way on the x86 host and inside the emulated arm64 root (tests/test_pi_qemu.py), so
both sides go through identical code: nomoat.runtime only, as on a Raspberry Pi.

    python pi_guest.py BUNDLE PROMPTS.json TOKENS OUT.npz [--reference REF.npz] [--ort-options SPEC] [--lookup N]

For every prompt: the greedy continuation (stop tokens ignored, so every run yields TOKENS
ids), and the logits at each position of a continuation fed in whole (teacher forcing): the
other machine's (--reference) or else this run's own. Logits of both machines on one shared
token sequence show how far their numbers are apart even after their greedy paths have parted.
--ort-options: ONNX Runtime session config entries for the model (as `nomoat generate
--ort-options`), e.g. to switch a kernel family off. --lookup N: the first prompt's greedy
continuation once more with prompt-lookup decoding (up to N drafts a pass), and its counts of
drafted and accepted tokens.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from nomoat.runtime import GenerationStats, Model, SamplingParams
from nomoat.runtime.onnx_session import parse_ort_options


def main(bundle: str, prompts_file: str, tokens: int, out: str, reference: str | None = None,
         ort_options: str = "", lookup: int = 0) -> None:
    start = time.perf_counter()
    model = Model.load(bundle, ort_options=parse_ort_options(ort_options))
    loaded = time.perf_counter()
    prompts = json.loads(open(prompts_file, encoding="utf-8").read())
    ref = np.load(reference) if reference else None
    result: dict[str, np.ndarray] = {}
    for i, prompt in enumerate(prompts):
        ids = model.prompt_ids(prompt)
        result[f"prompt{i}"] = np.asarray(ids)
        result[f"greedy{i}"] = np.asarray(list(model.generate_tokens(ids, tokens, SamplingParams(), ignore_eos=True)))
        path = (ref if ref is not None else result)[f"greedy{i}"]
        result[f"logits{i}"] = model.logits([*ids, *path[:-1].tolist()])[len(ids) - 1:]
        if lookup and i == 0:
            stats = GenerationStats()
            result["lookup0"] = np.asarray(list(model.generate_tokens_lookahead(ids, tokens, lookup, ignore_eos=True,
                                                                                stats=stats)))
            result["lookup0_drafted_accepted"] = np.asarray([stats.drafted_tokens, stats.accepted_tokens])
    done = time.perf_counter()
    result["seconds"] = np.asarray([loaded - start, done - loaded])
    np.savez(out, **result)


if __name__ == "__main__":
    args = sys.argv[1:]
    ref_path = args[args.index("--reference") + 1] if "--reference" in args else None
    ort = args[args.index("--ort-options") + 1] if "--ort-options" in args else ""
    lookup_n = int(args[args.index("--lookup") + 1]) if "--lookup" in args else 0
    main(args[0], args[1], int(args[2]), args[3], ref_path, ort, lookup_n)
