"""``rcc eval`` and ``rcc lm-eval``: our evaluations and lm-evaluation-harness."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rcc.cli.common import add_model_arguments, load_from_args
from rcc.errors import RCCError
from rcc.eval.config import PROMPTS, EvalConfig


def cmd_lm_eval(args) -> int:
    """lm-evaluation-harness's command line with ``--model rcc`` registered (rcc/eval/harness.py)."""
    try:
        from rcc.eval.harness import main
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        raise RCCError("rcc lm-eval needs lm-evaluation-harness: pip install 'rcc-llm[eval]'") from None
    return main(args.args)


def lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS",
                   help="lm-eval's own options, passed through: --model rcc --model_args model=rcc-smollm2-135m,"
                        "split=Question: --tasks TASK [--include_path DIR] ... (see rcc/eval/harness.py)")


def _task_args(p, lengths: str | None, modes: bool = True) -> None:
    add_model_arguments(p)
    if lengths:
        p.add_argument("--lengths", default=lengths, help=f"context lengths in tokens, k/m suffixes (default {lengths})")
        p.add_argument("--samples", type=int, default=1, help="samples per length (and depth) (default 1)")
    if modes:
        p.add_argument("--modes", default="reconstruct,manual", help="RCC instruction modes (default both)")
        p.add_argument("--max-new-tokens", type=int, help="the answer's token budget (default: the task's)")
        p.add_argument("--prompts", default=",".join(PROMPTS),
                       help="prompts every method answers with: chat and/or continuation (default both; "
                            "the table reports each method at its better one)")
    p.add_argument("--baseline", action="store_true",
                   help="also run the baselines full, recent, kvpress:snapkv and kvpress:expected_attention "
                        "(at the model's ratio) on the same samples")
    p.add_argument("--baselines", help="baselines to run: full, recent, llamacpp, kvpress:PRESS@RATIO (e.g. "
                                       "full,recent,kvpress:snapkv@16,kvpress:expected_attention@32)")
    p.add_argument("--kvpress-python", help="python of the kvpress environment (default: ${RCC_KVPRESS_PYTHON}, "
                                            "else .venv-kvpress made by scripts/kvpress_env.sh)")
    p.add_argument("--llamacpp-python", help="python of the llama-cpp-python environment of the llamacpp baseline "
                                             "(default: ${RCC_LLAMACPP_PYTHON}, else .venv-llamacpp made by "
                                             "scripts/llamacpp_env.sh)")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, offsets and spans (default 0)")
    p.add_argument("-o", "--output", help="JSON result file (default runs/eval-TASK.json)")
    p.add_argument("--plot", help="PNG file (default: beside the JSON)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")


def eval_args(p) -> None:
    """``rcc eval TASK``'s options: the fields of :class:`~rcc.eval.config.EvalConfig` (see
    :func:`eval_config`) and the model's (:func:`rcc.cli.common.add_model_arguments`)."""
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    depths = ("--depths", "0,0.25,0.5,0.75,1")
    t = sub.add_parser("passkey", help="pass-key retrieval at context lengths x depths")
    _task_args(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t = sub.add_parser("needle", help="a needle sentence hidden in your own haystack text")
    _task_args(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t.add_argument("--haystack", required=True, help="UTF-8 text file to hide the needle in")
    t.add_argument("--needle", required=True, help="the sentence to hide, e.g. 'The secret number is 42.'")
    t.add_argument("--question", required=True, help="the question about it")
    t.add_argument("--answer", required=True, help="the expected answer")
    t.add_argument("--cue", help="the continuation prompt's cue after the question (default: the needle up to "
                                 "the answer, e.g. 'The secret number is')")
    t = sub.add_parser("niah", help="values of any shape (7-digit numbers, UUIDs, names ...) among distractor keys, "
                                    "the long-context suite's needle task")
    _task_args(t, "4k")
    t.add_argument(depths[0], default=depths[1], help=f"needle depths in [0, 1] (default {depths[1]})")
    t.add_argument("--shapes", default="number7", help="value shapes, comma-separated: number7, number, uuid, hex, "
                                                       "word, phrase, name, date (default number7)")
    t.add_argument("--keys", type=int, default=1, help="labelled needles per sample: the asked one and KEYS-1 "
                                                       "distractors (default 1)")
    t.add_argument("--haystack", help="UTF-8 text whose sentences make the haystack (default: repeated filler)")
    t = sub.add_parser("reconstruct", help="reproduce compressed held-out text: BLEU-4 and exact prefix")
    _task_args(t, "1k,4k", modes=False)
    t.add_argument("--text", required=True, help="UTF-8 held-out text file")
    t.add_argument("--cue-tokens", type=int, default=16, help="tokens of the span given as the cue (default 16)")
    t.add_argument("--target-tokens", type=int, default=64, help="tokens to reproduce after the cue (default 64)")
    t = sub.add_parser("qa", help="questions from a JSONL file (PwC fields input, prompt, answer)")
    _task_args(t, None)
    t.add_argument("--data", required=True, help="JSONL file with input, prompt, answer")
    t.add_argument("--limit", type=int, help="only the first N samples")


def eval_config(args) -> EvalConfig:
    """The config of parsed ``rcc eval TASK`` options (:func:`eval_args`).

    Raises:
        RCCError: on bad values.
    """
    from rcc.eval.kvpress import DEFAULT_PRESSES

    task_defaults = {"max_new_tokens": None, "haystack": None, "needle": None, "question": None, "answer": None,
                     "cue": None, "text": None, "cue_tokens": 16, "target_tokens": 64, "data": None, "limit": None,
                     "shapes": "number7", "keys": 1}
    opts = {k: getattr(args, k, v) for k, v in task_defaults.items()}
    baselines = args.baselines or ""
    if args.baseline:
        baselines = ",".join(["full", "recent", *(f"kvpress:{p}" for p in DEFAULT_PRESSES), baselines])
    return EvalConfig(task=args.task, lengths=getattr(args, "lengths", "4k"), depths=getattr(args, "depths", "0"),
               modes=getattr(args, "modes", "reconstruct,manual"), samples=getattr(args, "samples", 1),
               seed=args.seed, baselines=baselines, prompts=getattr(args, "prompts", ",".join(PROMPTS)),
               kvpress_python=args.kvpress_python, llamacpp_python=getattr(args, "llamacpp_python", None),
               window_batch_size=args.window_batch_size, **opts)


def cmd_eval(args) -> int:
    """``rcc eval TASK``: run a task on RCC (and, with --baseline, the baselines); write JSON (+ PNG),
    print a table."""
    from rcc.eval.plot import plot_result
    from rcc.eval.runner import format_table, run_eval

    cfg = eval_config(args)  # validate before the (slow) model load
    model, _device_name = load_from_args(args)
    output = Path(args.output or f"runs/eval-{args.task}.json")
    say = None if args.quiet else (lambda line: print(f"rcc: {line}", file=sys.stderr))
    result = run_eval(model, cfg, output=output, model_spec=args.model, progress=say)
    print(format_table(result))
    print(f"rcc: wrote {output}", file=sys.stderr)
    if not args.no_plot:
        png = plot_result(result, args.plot or output.with_suffix(".png"))
        if png is not None:
            print(f"rcc: wrote {png}", file=sys.stderr)
    return 0
