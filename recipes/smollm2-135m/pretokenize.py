"""Tokenize a fine-tuning config's records once, here, as one ``rcc-examples/1``
file (``rcc.data.save_examples``) that ``rcc train`` reads in a second with no
tokenizer: what makes step 1 of a GPU call come within a minute of its start
(tokenizing 24,000 records at load time took minutes on one core).

    python recipes/smollm2-135m/pretokenize.py CONFIG RECORDS.jsonl... -o OUT.safetensors

The examples are tokenized as ``CONFIG`` would tokenize them (window,
``max_windows``, ``max_decoder_tokens``, ``answer_suffix``, instruction mode,
``run.seed`` for the mixed mode's coin); records the config would skip are
skipped here and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def pretokenize(config: str, records: list[str], output: Path, overrides: list[str] = ()) -> str:
    """Write ``output`` from ``records`` as ``config`` reads them; returns the data report's summary."""
    from rcc.data import load_examples, save_examples
    from rcc.train.config import TrainConfig
    from rcc.train.setup import build_model

    cfg = TrainConfig.load(config, [*overrides, f"data.train_data={records[0]}", "run.output_dir=unused"])
    if cfg.task != "finetune":
        raise SystemExit(f"{config}: a finetune config is needed (task: {cfg.task})")
    model = build_model(cfg)  # the tokenizer and window the run will use
    d = cfg.data
    examples, report = load_examples(records, model.tokenizer, mode=d.instruction_mode, window=model.config.window,
                                     max_windows=d.max_windows, max_decoder_tokens=d.max_decoder_tokens,
                                     answer_suffix=d.answer_suffix, on_error=d.on_error, seed=cfg.run.seed,
                                     progress=False)
    save_examples(output, examples)
    return report.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("records", nargs="+")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    summary = pretokenize(args.config, args.records, args.output)
    print(f"pretokenize: {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB): {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
