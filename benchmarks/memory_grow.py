"""Memories that grow and combine, measured on the bundled model in one run (issue 25).

    HF_HUB_OFFLINE=1 python benchmarks/memory_grow.py [--model rcc-smollm2-135m] [--tokens 32768]
        [--parts 4] [--append 0.1] [--samples 4] [-o benchmarks/results/memory-grow.json]

Each sample is a pass-key haystack of ``--tokens`` tokens (the pass-key prompt's filler, a
5-digit key at a depth that moves through the samples, so the key lies in each part in turn),
cut in token ids: the first ``tokens`` ids are whole windows, ``--append`` more ids follow
(rounded up to whole windows: a partial window is padded at the front of its own text, so
only whole windows make the appended memory equal the recompressed one).

- **Append**: ``compress(A)`` once, then ``compress(B, prefix=memory(A))`` (B is ``--append``
  of A's length, only its windows are encoded) against ``compress(A + B)`` from scratch. The
  answer over each is asked and compared (equal when A is whole windows: docs/method.md 4).
- **Combine**: A cut into ``--parts`` memories of whole windows, compressed one by one
  (as a collection of documents would be), then ``model.ask([m1, ..., mk], q)`` (one decoder
  pre-fill over their slots, :meth:`rcc.RCCModel.combine`) against ``model.ask(memory(A), q)``.
  Times: ``combine_s`` (the pre-fill alone), ask over the combined memory, ask over A's.

Wall seconds (``time.perf_counter``) with the process's threads (``--threads``, default torch's);
the dtype is the model's ``auto`` choice for this CPU, written in the JSON. Answers are greedy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(f, *args, **kwargs):
    """``(f(*args, **kwargs), wall seconds)``."""
    t = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t


def haystack_ids(tok, n: int, depth: float, key: str):
    """``[1, n]`` ids: the pass-key instruction, filler, the needle at ``depth`` of ``n`` tokens."""
    import torch

    from rcc.data.haystack import PASSKEY_FILLER, PASSKEY_INSTRUCTION, PASSKEY_NEEDLE

    unit = tok("".join(PASSKEY_FILLER), add_special_tokens=False).input_ids
    head = tok(PASSKEY_INSTRUCTION, add_special_tokens=False).input_ids
    needle = tok(" " + PASSKEY_NEEDLE.format(key=key), add_special_tokens=False).input_ids
    body = (unit * (n // len(unit) + 2))[: n - len(head) - len(needle)]
    at = int(len(body) * depth) // len(unit) * len(unit)  # at a sentence boundary of the filler
    return torch.tensor([head + body[:at] + needle + body[at:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="rcc-smollm2-135m")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--append", type=float, default=0.1)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "results" / "memory-grow.json"))
    args = ap.parse_args()

    import torch

    from rcc import RCCModel
    from rcc.data.haystack import PASSKEY_QUESTION
    from rcc.files import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    model, load_s = timed(RCCModel.from_pretrained, args.model)
    tok, W = model.tokenizer, model.config.window
    if args.tokens % (W * args.parts):
        sys.exit(f"--tokens {args.tokens} must be {args.parts} parts of whole {W}-token windows")
    extra = -(-int(args.tokens * args.append) // W) * W  # whole windows, so the append equals the recompression
    part = args.tokens // args.parts

    def ask(memory):
        return model.ask(memory, PASSKEY_QUESTION, mode="manual", max_new_tokens=8).answer.strip()

    samples = []
    g = torch.Generator().manual_seed(25)
    for i in range(args.samples):
        key = str(int(torch.randint(10_000, 100_000, (1,), generator=g)))
        depth = (i + 0.5) / args.samples
        ids = haystack_ids(tok, args.tokens + extra, depth * args.tokens / (args.tokens + extra), key)
        a, b = ids[:, : args.tokens], ids[:, args.tokens :]
        mem_a, compress_a_s = timed(model.compress, a)
        appended, append_s = timed(model.compress, b, prefix=mem_a)
        whole, recompress_s = timed(model.compress, ids)
        parts, parts_s = timed(lambda x: [model.compress(x[:, j * part : (j + 1) * part]) for j in range(args.parts)], a)
        combined, combine_s = timed(model.combine, parts)
        ans_combined, ask_combined_s = timed(ask, combined)
        ans_a, ask_a_s = timed(ask, mem_a)
        _, ask_list_s = timed(ask, parts)  # model.ask([m1..mk], q): combine + answer
        row = {
            "key": key, "depth": round(depth, 3), "needle_part": int(depth * args.parts) + 1,
            "answers": {"one_memory": ans_a, "combined_parts": ans_combined,
                        "appended": ask(appended), "recompressed": ask(whole)},
            "seconds": {"compress_a": compress_a_s, "append": append_s, "recompress_all": recompress_s,
                        "compress_parts": parts_s, "combine": combine_s, "ask_combined": ask_combined_s,
                        "ask_one_memory": ask_a_s, "ask_list_of_parts": ask_list_s},
        }
        row["answers_equal"] = {"append_vs_recompress": row["answers"]["appended"] == row["answers"]["recompressed"],
                                "combined_vs_one": ans_combined == ans_a}
        samples.append(row)
        s = row["seconds"]
        print(f"sample {i + 1}/{args.samples} key {key} in part {row['needle_part']}: answers {row['answers']}; "
              f"append {s['append']:.2f} s vs recompress {s['recompress_all']:.2f} s; combine {s['combine']:.2f} s, "
              f"ask combined {s['ask_combined']:.2f} s vs one memory {s['ask_one_memory']:.2f} s", flush=True)

    def median(k):
        return round(statistics.median(r["seconds"][k] for r in samples), 3)

    result = {
        "command": " ".join(["HF_HUB_OFFLINE=1 python benchmarks/memory_grow.py", *sys.argv[1:]]),
        "model": args.model, "dtype": str(model.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        if os.path.exists("/proc/cpuinfo") else "?",
        "window": W, "ratio": model.config.ratio, "tokens": args.tokens, "append_tokens": extra,
        "parts": args.parts, "part_tokens": part, "load_s": round(load_s, 2),
        "median_seconds": {k: median(k) for k in samples[0]["seconds"]},
        "append_speedup": round(median("recompress_all") / median("append"), 2),
        "correct": {k: sum(r["answers"][k].startswith(r["key"]) for r in samples) for k in samples[0]["answers"]},
        "answers_equal": {k: sum(r["answers_equal"][k] for r in samples) for k in samples[0]["answers_equal"]},
        "samples": samples,
    }
    write_json(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
