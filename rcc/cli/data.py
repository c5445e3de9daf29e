"""``rcc prepare-data`` and ``rcc synth``: token folders for pretraining, synthetic records for fine-tuning."""

from __future__ import annotations

import sys

from rcc.errors import RCCError


def prepare_data_args(p) -> None:
    """``rcc prepare-data``'s options: the parameters of :func:`rcc.data.prepare_data` and :func:`rcc.data.load_tokenizer`."""
    p.add_argument("inputs", nargs="+",
                   help=".txt files (one document each), .jsonl/.json files, folders of them, a saved dataset "
                        "folder, or hf:NAME[:CONFIG][@SPLIT]")
    p.add_argument("-o", "--output", required=True, help="folder to write (train.bin/.idx, eval.bin/.idx, meta.json)")
    p.add_argument("--tokenizer", required=True, help="hub id, folder or embedded:smollm2 (the model's tokenizer)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSON records (default text)")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    p.add_argument("--min-tokens", type=int, default=2048,
                   help="skip documents with fewer tokens, e.g. one window (default 2048)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="malformed records: stop with file:line (default) or skip and count them")
    p.add_argument("--on-short", choices=("skip", "fail"), default="skip",
                   help="documents under --min-tokens: skip and count them (default) or stop with file:line")
    p.add_argument("--no-eos", action="store_true", help="do not append the EOS token to each document")
    p.add_argument("--max-tokens", type=int, help="stop after about this many tokens (a slice of a large corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_prepare_data(args) -> int:
    """Tokenize text / JSONL / a Hugging Face dataset into a memory-mapped token folder."""
    from rcc.data.tokens import load_tokenizer, prepare_data

    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare_data(args.inputs, args.output, tokenizer, text_field=args.text_field,
                        eval_fraction=args.eval_fraction, min_tokens=args.min_tokens, on_error=args.on_error,
                        on_short=args.on_short, append_eos=not args.no_eos, seed=args.seed,
                        overwrite=args.overwrite, progress=not args.quiet, max_tokens=args.max_tokens)
    splits = ", ".join(f"{k} {v['docs']} documents / {v['tokens']} tokens" for k, v in meta["splits"].items())
    print(f"rcc: wrote {args.output} ({meta['dtype']}): {splits}", file=sys.stderr)
    report = meta["report"]
    for reason, n in report["skipped"].items():
        shown = "; ".join(report["skipped_examples"][reason][:3])
        print(f"rcc: skipped {n} {reason}: {shown}{' ...' if n > 3 else ''}", file=sys.stderr)
    return 0


def synth_args(p) -> None:
    """``rcc synth``'s options: the parameters of :func:`rcc.data.synth.read_prose`, :func:`~rcc.data.synth.make_records` and :func:`~rcc.data.synth.write_records`."""
    p.add_argument("inputs", nargs="+", help="UTF-8 prose: *.txt files or folders of them")
    p.add_argument("-o", "--output", required=True, help="JSONL file to write (PwC fields: input, prompt, answer)")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer (lengths count its tokens)")
    p.add_argument("--count", type=int, default=1000, help="records to write (default 1000)")
    p.add_argument("--kinds", default="passkey=0.4,needle=0.35,extract=0.25",
                   help="share of each kind (default passkey=0.4,needle=0.35,extract=0.25)")
    p.add_argument("--min-tokens", default="256", help="shortest context, k suffix allowed (default 256)")
    p.add_argument("--max-tokens", default="8k", help="longest context (default 8k)")
    p.add_argument("--seed", type=int, default=0)


def cmd_synth(args) -> int:
    """Write synthetic pass-key / needle / extract records built from prose."""
    from rcc.data.synth import make_records, parse_weights, read_prose, write_records
    from rcc.data.tokens import load_tokenizer
    from rcc.report import parse_length

    weights = parse_weights(args.kinds)
    low, high = parse_length(args.min_tokens), parse_length(args.max_tokens)
    if not 0 < low <= high:
        raise RCCError(f"--min-tokens ({low}) must be positive and at most --max-tokens ({high})")
    if args.count <= 0:
        raise RCCError(f"--count must be positive; got {args.count}")
    sentences = read_prose(args.inputs)
    tokenizer = load_tokenizer(args.tokenizer)
    n = write_records(args.output, make_records(sentences, tokenizer, count=args.count, weights=weights,
                                                min_tokens=low, max_tokens=high, seed=args.seed))
    print(f"rcc: wrote {n} records to {args.output}", file=sys.stderr)
    return 0
