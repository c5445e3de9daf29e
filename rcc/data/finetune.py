"""Fine-tuning examples from QA records (docs/method.md section 2) and their micro-batches."""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rcc.config import windows_for
from rcc.errors import RCCError
from rcc.files import atomic_save_file
from rcc.prompts import ASSISTANT, CHATML
from rcc.windows import pad_to_windows, window_of
from rcc.data.records import BadRecord, DataReport, handle_bad_record, iter_records


@dataclass
class FinetuneExample:
    """One fine-tuning example: ``context [n]`` to compress, decoder
    ``input_ids [m]`` and ``labels [m]`` (-100 = not counted); ``answer_at``:
    the context token where the answer first occurs verbatim (-1: nowhere or
    unknown), the window that ``grad_windows`` always backpropagates through."""

    context: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    answer_at: int = -1


def answer_token(text: str, answer: str, offsets) -> int:
    """Index of the token of ``text`` (``offsets``: the tokenizer's character
    spans) where ``answer`` first occurs verbatim, or -1."""
    char = text.find(answer.strip()) if answer.strip() else -1
    if char < 0 or not offsets:
        return -1
    ends = [end for _, end in offsets]
    return min(bisect.bisect_right(ends, char), len(offsets) - 1)


def _hotpot_context(ctx, where: str) -> str:
    """HotpotQA's context: ``[[title, [sentences]], ...]`` (original JSON) or
    ``{"title": [...], "sentences": [[...], ...]}`` (Hugging Face)."""
    if isinstance(ctx, dict) and isinstance(ctx.get("title"), list) and isinstance(ctx.get("sentences"), list):
        pairs = list(zip(ctx["title"], ctx["sentences"]))
    elif isinstance(ctx, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in ctx):
        pairs = [tuple(p) for p in ctx]
    else:
        raise BadRecord(f"{where}: 'context' must be HotpotQA's [[title, [sentences]], ...] or "
                        "{title: [...], sentences: [[...]]}")
    paragraphs = []
    for title, sentences in pairs:
        if not isinstance(title, str) or not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise BadRecord(f"{where}: a HotpotQA paragraph must be a title and a list of sentences")
        paragraphs.append(f"{title}\n{''.join(sentences).strip()}")
    return "\n\n".join(paragraphs)


def qa_fields(record: dict, where: str) -> tuple[str, str, str] | tuple[list, list, list | None]:
    """``(context, question, answer)`` of a PwC (``input``, ``prompt``,
    ``answer``) or HotpotQA (``context``, ``question``, ``answer``) record, or
    the ids of a pre-tokenized one (``context_ids``, ``input_ids`` [, ``labels``]).

    Raises:
        BadRecord: naming the location and the missing or malformed field.
    """
    def need(fields: tuple[str, ...], kind: str, types) -> list:
        for f in fields:
            if f not in record:
                raise BadRecord(f"{where}: missing field {f!r} ({kind} records need {', '.join(fields)})")
            if not isinstance(record[f], types):
                want = "text" if types is str else "a list of token ids"
                raise BadRecord(f"{where}: field {f!r} must be {want}, got {type(record[f]).__name__}")
        return [record[f] for f in fields]

    if "context_ids" in record:
        ctx, ids = need(("context_ids", "input_ids"), "pre-tokenized", list)
        labels = record.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(ids)):
            raise BadRecord(f"{where}: 'labels' must be a list as long as 'input_ids' ({len(ids)})")
        for name, seq in (("context_ids", ctx), ("input_ids", ids), ("labels", labels or [])):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
                raise BadRecord(f"{where}: {name!r} must hold integer token ids")
        if not ctx or not ids:
            raise BadRecord(f"{where}: 'context_ids' and 'input_ids' must not be empty")
        return ctx, ids, labels
    if "input" in record or "prompt" in record:
        context, question, answer = need(("input", "prompt", "answer"), "PwC", str)
    elif "question" in record:
        question, answer = need(("question", "answer"), "HotpotQA", str)
        if "context" not in record:
            raise BadRecord(f"{where}: missing field 'context' (HotpotQA records need question, answer, context)")
        context = _hotpot_context(record["context"], where)
    else:
        raise BadRecord(f"{where}: unknown record shape (fields: {', '.join(sorted(record)) or 'none'}); expected "
                        "PwC (input, prompt, answer), HotpotQA (question, answer, context) or pre-tokenized "
                        "(context_ids, input_ids[, labels])")
    if not context.strip() or not question.strip() or not answer.strip():
        empty = [n for n, v in (("context", context), ("question", question), ("answer", answer)) if not v.strip()]
        raise BadRecord(f"{where}: empty {', '.join(empty)}")
    return context, question, answer


def qa_texts(context: str, question: str, answer: str, mode: str, answer_suffix: str) -> tuple[str, str, str]:
    """``(text to compress, decoder prompt, target)`` of one QA example (docs/method.md section 2).

    - reconstruct: compress context + question; prompt = header; target =
      question + assistant header + answer (the decoder writes the question back);
    - manual: compress the context; prompt = header + question + assistant
      header; target = answer.
    """
    to_compress, prompt = CHATML.build(context, question, mode)
    target = (question + ASSISTANT + answer if mode == "reconstruct" else answer) + answer_suffix
    return to_compress, prompt, target


EXAMPLES_FORMAT = "rcc-examples/1"
EXAMPLES_SUFFIX = ".safetensors"


def save_examples(path, examples: list[FinetuneExample]) -> Path:
    """Write tokenized fine-tuning examples as one safetensors file (format
    ``rcc-examples/1``) that :func:`load_examples` reads back in a second, with
    no tokenizer: ``context`` (all contexts, concatenated; uint16 when every id
    fits), ``input_ids`` and ``labels`` (all decoder sequences), their
    ``*_offsets [n + 1]``, and ``answer_at [n]``. The instruction mode each
    example was tokenized in is part of its ids.

    Raises:
        RCCError: when ``examples`` is empty.
    """
    if not examples:
        raise RCCError(f"{path}: no examples to write")
    ctx = np.concatenate([e.context for e in examples])
    ids = np.concatenate([e.input_ids for e in examples])
    wide = max(int(ctx.max()), int(ids.max())) >= 2**16
    tensors = {
        "context": ctx.astype(np.int32 if wide else np.uint16),
        "context_offsets": np.cumsum([0] + [len(e.context) for e in examples]),
        "input_ids": ids.astype(np.int32 if wide else np.uint16),
        "labels": np.concatenate([e.labels for e in examples]).astype(np.int32),
        "input_offsets": np.cumsum([0] + [len(e.input_ids) for e in examples]),
        "answer_at": np.array([e.answer_at for e in examples]),
    }
    path = Path(path)
    atomic_save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, path,
                     {"format": EXAMPLES_FORMAT, "examples": str(len(examples))})
    return path


def _saved_examples(path: Path):
    """``(where, context, input_ids, labels, answer_at)`` of each example in a :func:`save_examples` file.

    Raises:
        RCCError: when the file is not one (or is damaged).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            if (fh.metadata() or {}).get("format") != EXAMPLES_FORMAT:
                raise RCCError(f"{path}: not a file of tokenized examples ({EXAMPLES_FORMAT}, written by "
                               "rcc.data.save_examples)")
            t = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise RCCError(f"{path}: unreadable ({err})") from None
    co, io = t["context_offsets"], t["input_offsets"]
    if not (len(co) == len(io) == len(t["answer_at"]) + 1 and co[-1] == len(t["context"])
            and io[-1] == len(t["input_ids"]) == len(t["labels"])):
        raise RCCError(f"{path}: the offsets do not fit the tensors; the file is damaged, write it again")
    for i in range(len(co) - 1):
        yield (f"{path}#{i}", t["context"][co[i]:co[i + 1]], t["input_ids"][io[i]:io[i + 1]],
               t["labels"][io[i]:io[i + 1]], int(t["answer_at"][i]))


def load_examples(sources, tokenizer, *, mode: str, window: int, max_windows: int, max_decoder_tokens: int,
                  answer_suffix: str, on_error: str = "fail", seed: int = 0,
                  progress: bool = True) -> tuple[list[FinetuneExample], DataReport]:
    """Read and tokenize QA records for instruction fine-tuning.

    A ``*.safetensors`` source is a file of examples tokenized before
    (:func:`save_examples`), read without a tokenizer.

    Records whose text to compress needs more than ``max_windows`` windows or
    whose prompt + target exceed ``max_decoder_tokens`` are skipped and
    counted; texts shorter than one window are kept and, as at inference, tiled
    to one window (docs/method.md section 1), and counted in the report's notes.

    Args:
        mode: ``"reconstruct"``, ``"manual"`` or ``"mixed"`` (a seeded coin per record).
    Raises:
        RCCError: on bad records (with ``on_error="fail"``), a text record
            without a tokenizer, or when no example is left.
    """
    from tqdm.auto import tqdm

    report = DataReport()
    rng = random.Random(seed)
    examples: list[FinetuneExample] = []
    pending: list[tuple[str, str, str, str, str]] = []
    fast = bool(getattr(tokenizer, "is_fast", False))

    def keep(where: str, ctx, ids, labels, answer_at: int = -1) -> None:
        if windows_for(len(ctx), window) > max_windows:
            report.skip(f"records longer than max_windows={max_windows} windows",
                        f"{where}: {len(ctx)} tokens to compress > {max_windows} x {window}")
        elif len(ids) > max_decoder_tokens:
            report.skip(f"records longer than max_decoder_tokens={max_decoder_tokens}",
                        f"{where}: {len(ids)} decoder tokens")
        else:
            if len(ctx) < window:
                report.notes[f"records shorter than one window ({window} tokens), tiled as at inference"] += 1
            examples.append(FinetuneExample(np.asarray(ctx, np.int64), np.asarray(ids, np.int64), np.asarray(labels, np.int64),
                                    answer_at))
            report.kept += 1

    def flush() -> None:
        if not pending:
            return
        texts = tokenizer([p[1] for p in pending], add_special_tokens=False, return_offsets_mapping=fast)
        enc = [tokenizer([p[i] for p in pending], add_special_tokens=False)["input_ids"] for i in (2, 3)]
        spans = texts["offset_mapping"] if fast else [None] * len(pending)
        for (where, text, _, _, answer), ctx, offsets, prompt, target in zip(pending, texts["input_ids"], spans, *enc):
            keep(where, ctx, prompt + target, [-100] * len(prompt) + target, answer_token(text, answer, offsets))
        pending.clear()

    sources = [sources] if isinstance(sources, str) else list(sources)
    for source in [s for s in sources if str(s).endswith(EXAMPLES_SUFFIX)]:
        for where, ctx, ids, labels, answer_at in _saved_examples(Path(source)):
            report.read += 1
            keep(where, ctx, ids, labels, answer_at)
    texts = [s for s in sources if not str(s).endswith(EXAMPLES_SUFFIX)]
    bar = tqdm(unit="rec", desc="reading QA records", disable=not progress or not texts, dynamic_ncols=True)
    try:  # the bar is closed before an error is printed
        for where, record in iter_records(texts, on_error, report):
            report.read += 1
            bar.update(1)
            try:
                fields = qa_fields(record, where)
            except BadRecord as err:
                handle_bad_record(err, on_error, report)
                continue
            if isinstance(fields[0], list):  # pre-tokenized
                ctx, ids, labels = fields
                keep(where, ctx, ids, labels if labels is not None else ids)
                continue
            if tokenizer is None:
                raise RCCError(f"{where}: text records need a tokenizer; set tokenizer: in the config")
            this_mode = mode if mode != "mixed" else rng.choice(("reconstruct", "manual"))
            pending.append((where, *qa_texts(*fields, mode=this_mode, answer_suffix=answer_suffix), fields[2]))
            if len(pending) >= 256:
                flush()
        flush()
    finally:
        bar.close()
    if not examples:
        raise RCCError(f"no usable fine-tuning example in {sources}: {report.summary()}")
    return examples, report


class FinetuneBatches(torch.utils.data.Dataset):
    """Fine-tuning micro-batches over epochs: each epoch shuffles the examples
    (seeded), groups them by number of windows (rows of a batch must compress
    to the same number of slots), cuts groups into batches and shuffles those.

    ``__getitem__(i)`` is batch ``i mod len(self)`` of epoch ``i // len(self)``:
    ``context_ids [b, c*W]`` (each row padded to whole windows as at
    inference), ``input_ids``/``labels [b, m]`` right-padded,
    ``attention_mask [b, m]`` when some row is padded, and ``focus_windows
    [b]`` (the window holding each row's answer, -1 none) when some row has one.
    """

    def __init__(self, examples: list[FinetuneExample], *, window: int, batch_size: int, seed: int = 0, pad_id: int = 0):
        self.examples, self.window, self.batch_size, self.seed, self.pad_id = examples, window, batch_size, seed, pad_id
        self.windows = np.array([windows_for(len(e.context), window) for e in examples])
        self._plan: tuple[int, list[list[int]]] | None = None
        self._len = sum(-(-int(n) // batch_size) for n in np.unique(self.windows, return_counts=True)[1])

    def __len__(self) -> int:
        return self._len

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches (lists of example indices) of one epoch."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            groups: dict[int, list[int]] = defaultdict(list)
            for idx in rng.permutation(len(self.examples)):
                groups[int(self.windows[idx])].append(int(idx))
            batches = [g[s : s + self.batch_size] for _, g in sorted(groups.items())
                       for s in range(0, len(g), self.batch_size)]
            self._plan = (epoch, [batches[j] for j in rng.permutation(len(batches))])
        return self._plan[1]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = [self.examples[j] for j in self.plan(int(i) // self._len)[int(i) % self._len]]
        context = torch.cat([pad_to_windows(torch.from_numpy(r.context)[None], self.window) for r in rows])
        m = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), m), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), m), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), m), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
            labels[k, : len(r.labels)] = torch.from_numpy(r.labels)
            mask[k, : len(r.input_ids)] = 1
        batch = {"context_ids": context, "input_ids": ids, "labels": labels}
        if not bool(mask.all()):
            batch["attention_mask"] = mask
        focus = [window_of(r.answer_at, len(r.context), self.window) if r.answer_at >= 0 else -1 for r in rows]
        if max(focus) >= 0:
            batch["focus_windows"] = torch.tensor(focus, dtype=torch.long)
        return batch


def split_examples(examples: list[FinetuneExample], fraction: float, seed: int) -> tuple[list[FinetuneExample], list[FinetuneExample]]:
    """A seeded ``(train, held-out)`` split of fine-tuning examples."""
    if fraction <= 0:
        return examples, []
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    n_eval = max(1, int(round(len(examples) * fraction)))
    if n_eval >= len(examples):
        raise RCCError(f"eval_fraction {fraction} leaves no training example out of {len(examples)}")
    held = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
