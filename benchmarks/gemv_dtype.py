"""One row times a decoder-sized weight (a decode step's matrix-vector product) in float32 and bf16.

    python benchmarks/gemv_dtype.py

Prints microseconds per ``F.linear`` of a ``[1, 576]`` row by a ``[1536, 576]`` weight (SmolLM2's MLP
shape) on 1 and 2 threads, the mean of 2,000 calls after 50 warm-up calls. On the 2-core AMD EPYC of
docs/benchmarks.md: float32 80.0 us, bf16 96.8 us on one thread; 99.9 and 97.2 on two.
"""

import time

import torch


def main() -> None:
    torch.manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            w, x = torch.randn(1536, 576, dtype=dtype), torch.randn(1, 576, dtype=dtype)
            for _ in range(50):
                torch.nn.functional.linear(x, w)
            t = time.perf_counter()
            for _ in range(2000):
                torch.nn.functional.linear(x, w)
            print(f"{threads} thread(s) {str(dtype).removeprefix('torch.'):9s} "
                  f"{(time.perf_counter() - t) / 2000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
