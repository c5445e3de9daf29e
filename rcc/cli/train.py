"""``rcc train``: train an RCC model from a YAML config (docs/training.md)."""

from __future__ import annotations

import argparse
import logging
import sys


def cmd_train(args) -> int:
    """Train an RCC model from a YAML config (+ KEY=VALUE overrides); see docs/training.md."""
    import os

    from tqdm.contrib.logging import logging_redirect_tqdm

    from rcc.train.loop import print_config, train

    if args.print_config:
        print(print_config(args.config, args.overrides))
        return 0
    loggers = [logging.getLogger(name) for name in ("rcc.train", "rcc.data")]
    levels = [lg.level for lg in loggers]
    if os.environ.get("RANK", "0") == "0":  # progress and evaluation lines from the main process only
        for lg in loggers:
            lg.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm():
            result = train(args.config, args.overrides)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    if result.is_main:
        print(f"rcc: trained {result.step} steps; model saved to {result.final_dir}", file=sys.stderr)
    return 0


def train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML training config (see configs/ and docs/training.md)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config options, e.g. optim.max_steps=100 optim.lr=3e-4 run.output_dir=runs/x "
                        "model.backbone.hidden_size=32")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
