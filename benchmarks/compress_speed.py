"""Compression against a plain forward pass of the backbone, in one process.

    HF_HUB_OFFLINE=1 python benchmarks/compress_speed.py [MODEL] [TOKENS] [REPS]

(defaults: rcc-smollm2-135m, 1024 tokens, 3 repetitions). One thread; CPU
seconds (``time.process_time``), so other jobs on a shared machine inflate the
numbers less than wall time; the kinds run interleaved and the best of the
repetitions counts:

- plain: the backbone without adapters (``rcc.adapters.disabled``) over the
  windows, one at a time, no cache, no LM head;
- compress: ``model.compress(ids, window_batch_size=1)`` (encoder, projections,
  the decoder's pre-fill of the slots);
- encode_windows_fast_lora: the encoder's part of it alone.
"""

import sys
import time

import torch

from rcc import RCCModel, adapters, hooks
from rcc.bench.memory import context_ids


def main() -> None:
    torch.set_num_threads(1)
    name = sys.argv[1] if len(sys.argv) > 1 else "rcc-smollm2-135m"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    model = RCCModel.from_pretrained(name)
    W = model.config.window
    ids = context_ids(model.tokenizer, n, model.decoder.config.vocab_size)
    windows = ids.reshape(-1, W)

    def plain():
        with torch.no_grad(), adapters.disabled(model.encoder):
            for w in windows:
                hooks.backbone_body(model.encoder)(input_ids=w[None], use_cache=False)

    def compress():
        model.compress(ids, window_batch_size=1)

    def encode():
        with torch.no_grad(), adapters.fast_inference(model.encoder):
            for w in windows:
                model.encode_windows(w[None])

    kinds = [("plain", plain), ("compress", compress), ("encode_windows_fast_lora", encode)]
    cpu = {k: [] for k, _ in kinds}
    plain()  # warm-up
    for _ in range(reps):
        for k, f in kinds:
            c0 = time.process_time()
            f()
            cpu[k].append(time.process_time() - c0)
    base = min(cpu["plain"])
    for k, times in cpu.items():
        print(f"{k:26s} cpu {min(times):.2f} s ({n / min(times):.0f} tok/s, {min(times) / base:.3f}x plain) "
              f"all {[round(x, 2) for x in times]}")


if __name__ == "__main__":
    main()
