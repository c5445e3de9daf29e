"""RCC's decode speed with 1 and 2 torch threads, interleaved in one process (same model,
same memory, same minute of a shared machine), with the load average beside each run.

    python benchmarks/decode_threads.py [--model embedded:smollm2] [--length 2048] [--repeats 4]

Compresses a pass-key context once, then decodes ``--new-tokens`` greedy tokens from that
memory ``--repeats`` times with each thread count in turn, and prints tokens/s (after the
first token) per run and the median and range per thread count. Used in docs/benchmarks.md to
show why decoding looked slow on this project's shared 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args(argv)

    import torch

    from rcc.bench.memory import context_ids, prompt_ids
    from rcc.bench.decode import Clock, tok_s
    from rcc.loading import load_model

    model = load_model(args.model, dtype=torch.float32, device="cpu")
    vocab = model.decoder.config.vocab_size
    memory = model.compress(context_ids(model.tokenizer, args.length, vocab), window_batch_size=1)
    prompt = prompt_ids(model.tokenizer, vocab)
    runs: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for threads in runs:
            torch.set_num_threads(threads)
            clock = Clock()
            model.generate(memory, prompt, max_new_tokens=args.new_tokens, eos_token_id=None, streamer=clock)
            runs[threads].append(tok_s(clock.times))
            print(f"run {rep + 1}, {threads} thread(s): {runs[threads][-1]:.2f} tok/s, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
    for threads, r in runs.items():
        print(f"{threads} thread(s): median {statistics.median(r):.2f} tok/s (min {min(r):.2f}, max {max(r):.2f}, "
              f"{len(r)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
