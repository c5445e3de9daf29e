"""The shared evaluation loop: examples x methods -> records -> summary, a JSON
result file (written atomically) and a text table.

``run_eval(model, cfg)`` is the Python API behind ``rcc eval TASK``.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from rcc.adapters import has_lora
from rcc.errors import RCCError
from rcc.files import write_json
from rcc.report import render_table, versions
from rcc.prompts import MODES
from rcc.eval import baselines, needle, niah, passkey, qa, reconstruct
from rcc.eval.metrics import wilson_interval
from rcc.eval.config import EvalConfig
from rcc.eval.kvpress import KVPressBaselines, parse_spec
from rcc.eval.llamacpp import LlamaCppMethod
from rcc.eval.task import Example, Prediction

log = logging.getLogger(__name__)

TASKS = {m.NAME: m for m in (passkey, needle, niah, reconstruct, qa)}
#: the metrics that score each sample right (1) or wrong (0): their means are rates, with intervals
RATES = ("accuracy", "exact_match")


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


@dataclass
class Run:
    """One method with one prompt: ``prompt`` is an instruction mode (RCC's chat
    prompts), ``"chat"``, ``"continuation"``, or None on continuation tasks
    (whose samples are continuations already)."""

    method: object
    prompt: str | None

    @property
    def name(self) -> str:
        return self.method.name if self.prompt is None else f"{self.method.name}/{self.prompt}"


def build_runs(model, cfg: EvalConfig, question_task: bool, continuation: bool,
               extra_methods: list | None = None,
               skipped: dict[str, str] | None = None) -> tuple[list[Run], KVPressBaselines | None]:
    """The runs of an evaluation: RCC in each instruction mode (its chat prompts)
    and each baseline with the chat prompt, each also with the continuation
    prompt when the samples have one (``continuation``) and ``cfg.prompts`` asks
    for it; the kvpress baselines, which run apart, as a :class:`KVPressBaselines`.
    A baseline that cannot start (``llamacpp`` without its environment) is left
    out, its one-line reason put in ``skipped``."""
    tok = model.tokenizer
    rcc = baselines.RCCMethod(model, cfg.window_batch_size)
    methods = []
    for name in cfg.baselines:
        if name == "full":
            methods.append(baselines.FullContext(model.decoder, tok))
        elif name == "recent":
            methods.append(baselines.RecentTokens(model.decoder, tok, budget=model.config.slots_for))
        elif name == "llamacpp":
            method, why = LlamaCppMethod.start(model, python=cfg.llamacpp_python)
            if method is not None:
                methods.append(method)
            elif skipped is not None:
                skipped[name] = why
    extra = list(extra_methods or [])
    if not question_task:
        return [Run(m, None) for m in [rcc, *methods, *extra]], _kvpress(model, cfg)
    cont = continuation and "continuation" in cfg.prompts
    chat = "chat" in cfg.prompts
    runs = [Run(rcc, mode) for mode in (cfg.modes if chat else [])] + ([Run(rcc, "continuation")] if cont else [])
    for m in methods:
        runs += ([Run(m, "chat")] if chat else []) + ([Run(m, "continuation")] if cont else [])
    runs += [Run(m, p) for m in extra for p in getattr(m, "prompts", ("chat",)) if p == "chat" or cont]
    return runs, _kvpress(model, cfg)


def _kvpress(model, cfg: EvalConfig) -> KVPressBaselines | None:
    specs = [parse_spec(b) for b in cfg.baselines if b.startswith("kvpress")]
    if not specs:
        return None
    return KVPressBaselines(model.decoder, model.tokenizer, specs, model.config.ratio, python=cfg.kvpress_python)


def predict(run: Run, example: Example, max_new_tokens: int) -> Prediction:
    method, tok = run.method, getattr(run.method, "tokenizer", None)
    if not example.is_question:
        return method.continue_ids(example.context_ids, example.prompt_ids, len(example.target_ids))
    if run.prompt == "continuation":
        tok = tok or method.model.tokenizer
        ctx, prompt = baselines.continuation_prompt(tok, example.context, example.continuation)
        pred = method.continue_ids(ctx, prompt, max_new_tokens)
        pred.text = baselines.continuation_answer(pred.text, tok.eos_token)
        return pred
    if run.prompt in MODES:
        return method.answer(example.context, example.question, max_new_tokens, mode=run.prompt)
    return method.answer(example.context, example.question, max_new_tokens)


def summarize(records: list[dict], group_by: tuple[str, ...], metrics: tuple[str, ...]) -> dict:
    """Mean scores per method: ``overall``, per full group (``groups``) and, with
    two group keys, per first key (``by_<key>``); beside each mean of 0/1 scores, its
    95% Wilson interval (``<metric>_ci95``: ``[low, high]``)."""

    def means(rows: list[dict]) -> dict:
        out = {"n": len(rows), **{m: fmean(r["scores"][m] for r in rows) for m in metrics}}
        for m in metrics:  # a rate of right and wrong answers gets its 95% Wilson interval
            scores = [r["scores"][m] for r in rows]
            if m in RATES and all(x in (0.0, 1.0) for x in scores):
                out[f"{m}_ci95"] = [round(x, 4) for x in wilson_interval(int(sum(scores)), len(scores))]
        return out

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
    if has_lora(model.decoder) and any(r["family"] != "rcc" for r in records):
        notes.append("baselines run the decoder's backbone with its LoRA adapters bypassed (the uncompressed base model)")
    if any(r["family"] == "recent" for r in records):
        notes.append("recent: keeps as many of the most recent context tokens as RCC has slots (n/r, padded to whole windows)")
    if any(r["family"].startswith("kvpress:") for r in records):
        notes.append("kvpress:PRESS@R: the press pre-fills what `full` reads (cut in the middle past the decoder's "
                     "positions) and keeps ceil(n/R) KV positions of an n-token context (records: info.kv_positions, "
                     "measured in every layer); the question or cue is decoded after them, uncompressed")
    if any(r["family"] == "llamacpp" for r in records):
        notes.append("llamacpp: llama.cpp (llama-cpp-python) on the decoder backbone's GGUF, its weights as stored "
                     "(the embedded SmolLM2's are Q4_1; `full` runs them dequantised), fed the token ids `full` "
                     "reads (the same prompts and cut); greedy")
    if any(r["prompt"] == "continuation" for r in records):
        notes.append("prompts: chat = the question in the chat template (RCC: its instruction modes); continuation = "
                     "the context, a blank line and a cue to continue ('What is the pass key? The pass key is'), no "
                     "chat markers, the answer read up to the first line break. `best` takes each method's better "
                     "prompt by its overall score on these same samples")
    for name, why in skipped.items():
        notes.append(f"{name}: skipped: {why}")
    return notes


def best_prompts(records: list[dict], summary: dict, metric: str) -> list[dict]:
    """Each method's better prompt: the run with the highest overall ``metric``
    (ties: the first run, chat before continuation)."""
    out = []
    for family in dict.fromkeys(r["family"] for r in records):
        runs = list(dict.fromkeys(r["method"] for r in records if r["family"] == family))
        best = max(runs, key=lambda run: (summary[run]["overall"][metric], -runs.index(run)))
        prompt = next(r["prompt"] for r in records if r["method"] == best)
        out.append({"method": family, "prompt": prompt, "run": best, metric: summary[best]["overall"][metric],
                    "runs": {run: summary[run]["overall"][metric] for run in runs}})
    return out


def _record(task, ex: Example, run_name: str, family: str, prompt: str | None, pred: Prediction, secs: float) -> dict:
    rec = {"id": ex.id, "method": run_name, "family": family, "prompt": prompt, **ex.meta, "prediction": pred.text,
           "token_ids": [int(t) for t in pred.token_ids], "scores": task.score(ex, pred), "seconds": round(secs, 4),
           "info": pred.info}
    if ex.is_question:
        rec["question"], rec["answers"] = ex.question, ex.answers
    else:
        rec["reference"] = ex.answers[0]
    return rec


def run_eval(model, cfg: EvalConfig, output: str | Path | None = None, model_spec: str | None = None,
             extra_methods: list | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Run one evaluation task and return (and write) its result.

    Args:
        model: an :class:`~rcc.RCCModel` with a tokenizer.
        cfg: the :class:`EvalConfig`.
        output: JSON file to write (atomically); None writes nothing.
        model_spec: how the model was named (recorded).
        extra_methods: more methods to compare (objects with ``name``,
            ``answer`` and ``continue_ids``, see :mod:`rcc.eval.baselines`;
            on question samples they get the chat prompt, and the continuation
            too when they list it in a ``prompts`` attribute).
        progress: called with a one-line message after every prediction.
    Returns:
        ``{"task", "created", "seed", "config", "model", "versions", "methods",
        "skipped", "kvpress", "llamacpp", "notes", "summary", "best", "records"}``
        (``kvpress``/``llamacpp``: those baselines' environments and checks, or None); ``methods`` and the
        keys of ``summary`` are runs, ``method/prompt`` on question tasks
        (``rcc/manual``, ``full/continuation``, ``kvpress:snapkv@16/chat``);
        ``best`` gives each method's better prompt.
    Raises:
        RCCError: without a tokenizer, or on bad task inputs.
    """
    if model.tokenizer is None:
        raise RCCError("evaluation needs the model's tokenizer; load the model with one (e.g. --base-model)")
    task = TASKS[cfg.task]
    examples = task.examples(cfg, model.tokenizer)
    question_task = examples[0].is_question if examples else True
    continuation = question_task and all(ex.continuation for ex in examples)
    skipped: dict[str, str] = {}
    runs, kv = build_runs(model, cfg, question_task, continuation, extra_methods, skipped)
    try:
        return _run(task, cfg, model, examples, question_task, continuation, runs, kv, skipped, output,
                    model_spec, progress)
    finally:
        for method in dict.fromkeys(r.method for r in runs):
            if isinstance(method, LlamaCppMethod):  # its child process
                method.close()


def _run(task, cfg: EvalConfig, model, examples: list[Example], question_task: bool, continuation: bool,
         runs: list[Run], kv: KVPressBaselines | None, skipped: dict[str, str], output, model_spec,
         progress) -> dict:
    max_new = cfg.max_new_tokens or getattr(task, "MAX_NEW_TOKENS", 32)
    kv_prompts = [p for p in ("chat", "continuation") if p in cfg.prompts and (p == "chat" or continuation)]
    kv_runs = [] if kv is None else [f"{n}/{p}" if question_task else n for n in kv.names for p in
                                     (kv_prompts if question_task else [None])]
    records = []
    total = len(examples) * (len(runs) + len(kv_runs))
    order = {name: i for i, name in enumerate([r.name for r in runs] + kv_runs)}
    for ex in examples:
        for run in runs:
            t = time.perf_counter()
            pred = predict(run, ex, max_new)
            rec = _record(task, ex, run.name, run.method.name, run.prompt, pred, time.perf_counter() - t)
            records.append(rec)
            if progress is not None:
                shown = ", ".join(f"{k} {v:.3g}" for k, v in rec["scores"].items())
                progress(f"[{len(records)}/{total}] {ex.id} {run.name}: {shown} ({rec['seconds']:.1f} s)")
    if kv is not None:
        items, layout = kv.items(examples, kv_prompts, max_new)
        outputs, kv_skipped = kv.run(items, progress)
        skipped.update(kv_skipped)
        for name, got in outputs.items():
            for key, out in got.items():
                i, prompt, info = layout[key]
                pred = kv.prediction(prompt, out, info)
                run_name = name if prompt is None else f"{name}/{prompt}"
                records.append(_record(task, examples[i], run_name, name, prompt, pred, out["seconds"]))
        index = {ex.id: i for i, ex in enumerate(examples)}
        records.sort(key=lambda r: (index[r["id"]], order[r["method"]]))
    for name, why in skipped.items():
        log.warning("%s skipped: %s", name, why)
    summary = summarize(records, task.GROUP_BY, task.METRICS)
    result = {
        "task": cfg.task,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "model": model_identity(model, model_spec),
        "versions": versions(),
        "methods": list(dict.fromkeys(r["method"] for r in records)),
        "group_by": list(task.GROUP_BY),
        "metrics": list(task.METRICS),
        "max_new_tokens": max_new,
        "skipped": skipped,
        "kvpress": None if kv is None else kv.details,
        "llamacpp": next((r.method.details for r in runs if isinstance(r.method, LlamaCppMethod)), None),
        "notes": _notes(model, records, skipped),
        "summary": summary,
        "best": best_prompts(records, summary, task.METRICS[0]),
        "records": records,
    }
    if output is not None:
        write_json(output, result)
    return result


def format_table(result: dict) -> str:
    """Methods as rows; the headline metric per value of the first group key
    (e.g. per length), then every metric over all samples. With a choice of
    prompts, first each method at its better prompt, then every run."""
    metrics, group_by = result["metrics"], result["group_by"]
    head = metrics[0]
    first = group_by[0] if group_by else None
    values = []
    if first:
        for entry in result["summary"].values():
            for g in entry.get(f"by_{first}", entry.get("groups", [])):
                if g[first] not in values:
                    values.append(g[first])

    def cell(group: dict, metric: str):
        """The mean, with its 95% interval where the scores are right or wrong: ``0.7 [0.4-0.89]``."""
        ci = group.get(f"{metric}_ci95")
        return f"{group[metric]:.3g} [{ci[0]:.2g}-{ci[1]:.2g}]" if ci else group[metric]

    def row(name: str, entry: dict) -> list:
        per = {g[first]: cell(g, head) for g in entry.get(f"by_{first}", entry.get("groups", []))} if first else {}
        return ([per.get(v, "-") for v in values] + [cell(entry["overall"], m) for m in metrics]
                + [entry["overall"]["n"]])

    cols = [f"{head}@{first}={v}" for v in values] + [f"{m} (all)" for m in metrics] + ["n"]
    text = ""
    best = result.get("best") or []
    if any(b["prompt"] is not None for b in best) and len(result["summary"]) > len(best):
        rows = [[b["method"], b["prompt"]] + row(b["run"], result["summary"][b["run"]]) for b in best]
        text = "each method at its better prompt:\n" + render_table(["method", "prompt"] + cols, rows) + "\n\nall runs:\n"
    text += render_table(["method"] + cols, [[name] + row(name, entry) for name, entry in result["summary"].items()])
    if result.get("notes"):
        text += "\n" + "\n".join(f"note: {n}" for n in result["notes"])
    return text
