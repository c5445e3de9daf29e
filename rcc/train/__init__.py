"""Training (``rcc train``): compression pretraining and instruction fine-tuning
on accelerate, one module per concept:

- :mod:`rcc.train.config`: :class:`TrainConfig` (sections ``model``, ``data``,
  ``optim``, ``run``), read from YAML with ``KEY=VALUE`` overrides;
- :mod:`rcc.train.setup`: the model, precision, optimizer and sharding a config asks for;
- :mod:`rcc.train.state`: the resumable training state (safetensors and JSON, no pickle);
- :mod:`rcc.train.loop`: :func:`train` (setup, then :func:`~rcc.train.loop.fit`),
  evaluation, checkpoints, the time budget.
"""

from rcc.train.config import TrainConfig
from rcc.train.loop import TrainResult, print_config, train

__all__ = ["TrainConfig", "TrainResult", "print_config", "train"]
