"""The shared evaluation loop: examples x methods -> records -> summary, a JSON
result file (written atomically) and a text table.

``run_eval(model, cfg)`` is the Python API behind ``rcc eval TASK``.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import fmean

from ..adapters import has_lora
from ..errors import RCCError
from ..io import render_table, versions, write_json
from . import baselines, needle, passkey, qa, reconstruct
from .config import EvalConfig
from .task import Example, Prediction

log = logging.getLogger(__name__)

TASKS = {m.NAME: m for m in (passkey, needle, reconstruct, qa)}


def model_identity(model, spec: str | None = None) -> dict:
    """What identifies the model in a result file."""
    cfg, tok = model.config, model.tokenizer
    return {
        "spec": spec,
        "fingerprint": model.fingerprint(),
        "trained": bool(cfg.trained),
        "window": cfg.window,
        "ratio": cfg.ratio,
        "pooling": cfg.pooling,
        "encoder": type(model.encoder).__name__,
        "decoder": type(model.decoder).__name__,
        "encoder_source": cfg.encoder_source,
        "decoder_source": cfg.decoder_source,
        "decoder_max_positions": baselines.max_positions(model.decoder),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "tokenizer": None if tok is None else f"{type(tok).__name__}({getattr(tok, 'name_or_path', '') or ''})",
    }


def build_methods(model, cfg: EvalConfig, question_task: bool) -> tuple[list, dict[str, str]]:
    """The RCC method(s) and the requested baselines; ``skipped`` maps a baseline
    that cannot run to the reason."""
    methods: list = []
    if question_task:
        methods += [baselines.RCCMethod(model, m, cfg.window_batch_size) for m in cfg.modes]
    else:
        methods.append(baselines.RCCMethod(model, None, cfg.window_batch_size))
    skipped: dict[str, str] = {}
    tok = model.tokenizer
    for name in cfg.baselines:
        if name == "full":
            methods.append(baselines.FullContext(model.decoder, tok))
        elif name == "recent":
            methods.append(baselines.RecentTokens(model.decoder, tok, budget=model.config.slots_for))
        elif name == "kvpress":
            press, why = baselines.make_kvpress(cfg.kvpress_press, 1.0 - 1.0 / model.config.ratio)
            if press is None:
                skipped["kvpress"] = why
                log.warning("kvpress baseline skipped: %s", why)
            else:
                methods.append(baselines.KVPressMethod(model.decoder, tok, press))
    return methods, skipped


def predict(method, example: Example, max_new_tokens: int) -> Prediction:
    if example.is_question:
        return method.answer(example.context, example.question, max_new_tokens)
    return method.continue_ids(example.context_ids, example.prompt_ids, len(example.target_ids))


def summarize(records: list[dict], group_by: tuple[str, ...], metrics: tuple[str, ...]) -> dict:
    """Mean scores per method: ``overall``, per full group (``groups``) and, with
    two group keys, per first key (``by_<key>``)."""

    def means(rows: list[dict]) -> dict:
        return {"n": len(rows), **{m: fmean(r["scores"][m] for r in rows) for m in metrics}}

    def grouped(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
        order: dict[tuple, list[dict]] = {}
        for r in rows:
            order.setdefault(tuple(r[k] for k in keys), []).append(r)
        return [{**dict(zip(keys, key)), **means(sub)} for key, sub in order.items()]

    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == name]
        entry = {"overall": means(rows)}
        if group_by:
            entry["groups"] = grouped(rows, group_by)
        if len(group_by) > 1:
            entry[f"by_{group_by[0]}"] = grouped(rows, group_by[:1])
        out[name] = entry
    return out


def _notes(model, records: list[dict], skipped: dict[str, str]) -> list[str]:
    notes = []
    if not model.config.trained:
        notes.append("UNTRAINED RCC model (fresh G and A_i): its scores measure nothing and are not claims")
    limit = baselines.max_positions(model.decoder)
    for name in dict.fromkeys(r["method"] for r in records):
        cut = [r for r in records if r["method"] == name and r["info"].get("truncated")]
        if cut:
            kept = sorted({r["info"]["kept_tokens"] for r in cut})
            notes.append(f"{name}: {len(cut)} of {sum(r['method'] == name for r in records)} samples were longer than "
                         f"the decoder's {limit} positions and were cut in the middle to "
                         f"{', '.join(map(str, kept))} context tokens (records: info.truncated)")
    if has_lora(model.decoder) and any(r["method"] != "rcc" and not r["method"].startswith("rcc:") for r in records):
        notes.append("baselines run the decoder's backbone with its LoRA adapters bypassed (the uncompressed base model)")
    if any(r["method"] == "recent" for r in records):
        notes.append("recent: keeps as many of the most recent context tokens as RCC has slots (n/r, padded to whole windows)")
    for name, why in skipped.items():
        notes.append(f"{name}: skipped: {why}")
    return notes


def run_eval(model, cfg: EvalConfig, output: str | Path | None = None, model_spec: str | None = None,
             extra_methods: list | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run one evaluation task and return (and write) its result.

    Args:
        model: an :class:`~rcc.RCCModel` with a tokenizer.
        cfg: the :class:`EvalConfig`.
        output: JSON file to write (atomically); None writes nothing.
        model_spec: how the model was named (recorded).
        extra_methods: more methods to compare (objects with ``name``,
            ``answer`` and ``continue_ids``, see :mod:`rcc.eval.baselines`).
        progress: called with a one-line message after every prediction.
    Returns:
        ``{"task", "created", "seed", "config", "model", "versions", "methods",
        "skipped", "notes", "summary", "records"}``.
    Raises:
        RCCError: without a tokenizer, or on bad task inputs.
    """
    if model.tokenizer is None:
        raise RCCError("evaluation needs the model's tokenizer; load the model with one (e.g. --base-model)")
    task = TASKS[cfg.task]
    examples = task.examples(cfg, model.tokenizer)
    question_task = examples[0].is_question if examples else True
    methods, skipped = build_methods(model, cfg, question_task)
    methods += list(extra_methods or [])
    max_new = cfg.max_new_tokens or getattr(task, "MAX_NEW_TOKENS", 32)
    records = []
    total = len(examples) * len(methods)
    for ex in examples:
        for method in methods:
            t = time.perf_counter()
            pred = predict(method, ex, max_new)
            secs = time.perf_counter() - t
            scores = task.score(ex, pred)
            rec = {"id": ex.id, "method": method.name, **ex.meta, "prediction": pred.text, "scores": scores,
                   "seconds": round(secs, 4), "info": pred.info}
            if ex.is_question:
                rec["question"], rec["answers"] = ex.question, ex.answers
            else:
                rec["reference"] = ex.answers[0]
            records.append(rec)
            if progress is not None:
                shown = ", ".join(f"{k} {v:.3g}" for k, v in scores.items())
                progress(f"[{len(records)}/{total}] {ex.id} {method.name}: {shown} ({secs:.1f} s)")
    result = {
        "task": cfg.task,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "model": model_identity(model, model_spec),
        "versions": versions(),
        "methods": [m.name for m in methods],
        "group_by": list(task.GROUP_BY),
        "metrics": list(task.METRICS),
        "max_new_tokens": max_new,
        "skipped": skipped,
        "notes": _notes(model, records, skipped),
        "summary": summarize(records, task.GROUP_BY, task.METRICS),
        "records": records,
    }
    if output is not None:
        write_json(output, result)
    return result


def format_table(result: dict) -> str:
    """Methods as rows; the headline metric per value of the first group key
    (e.g. per length), then every metric over all samples."""
    metrics, group_by = result["metrics"], result["group_by"]
    head = metrics[0]
    first = group_by[0] if group_by else None
    values = []
    if first:
        for entry in result["summary"].values():
            for g in entry.get(f"by_{first}", entry.get("groups", [])):
                if g[first] not in values:
                    values.append(g[first])
    header = ["method"] + [f"{head}@{first}={v}" for v in values] + [f"{m} (all)" for m in metrics] + ["n"]
    rows = []
    for name, entry in result["summary"].items():
        per = {g[first]: g[head] for g in entry.get(f"by_{first}", entry.get("groups", []))} if first else {}
        rows.append([name] + [per.get(v, "-") for v in values] + [entry["overall"][m] for m in metrics]
                    + [entry["overall"]["n"]])
    text = render_table(header, rows)
    if result.get("notes"):
        text += "\n" + "\n".join(f"note: {n}" for n in result["notes"])
    return text


def command(args, load: Callable) -> int:
    """``rcc eval TASK``: run a task on RCC (and, with --baseline, the baselines); write JSON (+ PNG),
    print a table. ``load(args) -> (model, device)`` loads the model the options name (the CLI's)."""
    from .plot import plot_result

    cfg = EvalConfig.from_args(args)  # validate before the (slow) model load
    model, _device_name = load(args)
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
