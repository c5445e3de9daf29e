"""Time one training step of the bundled model (LoRA on both sides + G/A_i, as its
recipe trains it) on random contexts: fp32 against bf16 autocast, and the full
gradient against ``grad_windows``. The numbers behind docs/training.md's remarks
on CPU training speed.

    python benchmarks/train_step.py [--windows 4] [--batch 2] [--repeats 2] [-o runs/train-step.json]

Each setting runs ``--repeats`` steps after one warm-up step; the table gives the
median seconds a step and the peak resident memory of the process so far.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from rcc import RCCModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rcc-smollm2-135m")
    ap.add_argument("--windows", type=int, default=4, help="windows per context")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=48, help="decoder tokens per row")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("-o", "--output", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = RCCModel.from_pretrained(args.model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith(("G.", "A."))
    model.train()
    vocab = model.decoder.get_input_embeddings().num_embeddings
    ctx = torch.randint(100, vocab, (args.batch, args.windows * model.config.window))
    ids = torch.randint(100, vocab, (args.batch, args.prompt))
    settings = [("fp32", False, 0), ("bf16", True, 0), ("bf16", True, 2), ("bf16", True, 1)]
    rows = []
    print(f"{args.batch} x {args.windows} windows of {model.config.window} tokens, {args.prompt} decoder tokens")
    print("| precision | grad_windows | s/step | peak RSS GiB |\n| --- | --- | --- | --- |")
    for precision, amp, grad_windows in settings:
        times = []
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(ctx, ids, labels=ids, grad_windows=grad_windows or None).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        row = dict(precision=precision, grad_windows=grad_windows or "all", seconds=statistics.median(times),
                   peak_rss_gib=peak, windows=args.windows, batch=args.batch, threads=torch.get_num_threads())
        rows.append(row)
        print(f"| {precision} | {row['grad_windows']} | {row['seconds']:.1f} | {peak:.1f} |", flush=True)
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
