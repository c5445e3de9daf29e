"""Benchmarks (``rcc bench``), one module per measurement:

- :mod:`rcc.bench.memory`: memory, compression time, TTFT and decode speed of RCC
  against its uncompressed backbone, one child process per point;
- :mod:`rcc.bench.decode`: timing decodes (when each token arrives);
- :mod:`rcc.bench.train`: training speed of a config (tokens/s, step split, MFU);
- :mod:`rcc.bench.plot`: the memory figure.

Speed and memory targets are checked here, never by timed unit tests.
"""
