"""Training data (spec section 3): reading records with exact error locations,
memory-mapped token files (``rcc prepare-data``), and the deterministic
micro-batches of the two training stages.

Every micro-batch is a dict ``{"context_ids": [b, c*W], "input_ids": [b, m],
"labels": [b, m]}`` (+ ``"attention_mask": [b, m]`` when rows are padded), the
arguments of :meth:`rcc.RCCModel.forward`. Batch ``i`` depends only on the
seed and ``i``, so the data position of a run is one integer and a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import windows_for
from .errors import RCCError
from .memory import atomic_write_text
from .prompts import ASSISTANT, build
from .windows import pad_to_windows, window_of

log = logging.getLogger(__name__)

TOKENS_FORMAT = "rcc-tokens/1"
META_NAME = "meta.json"
RECORD_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
_SHOWN = 5  # locations kept per skip reason


# ------------------------------------------------------------------ records
class BadRecord(RCCError):
    """A record that cannot be used; the message starts with ``file:line``."""


class DataReport:
    """What was read, kept and skipped (and where), for one data source set."""

    def __init__(self) -> None:
        self.read = 0
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.where: dict[str, list[str]] = defaultdict(list)
        self.notes: Counter[str] = Counter()

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.where[reason]) < _SHOWN:
            self.where[reason].append(message)
            log.info("skipped: %s", message)

    def summary(self) -> str:
        parts = [f"kept {self.kept} of {self.read} records"]
        for reason, n in self.skipped.items():
            parts.append(f"skipped {n} {reason} (first: {self.where[reason][0]})")
        for note, n in self.notes.items():
            parts.append(f"{n} {note}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "skipped_examples": dict(self.where), "notes": dict(self.notes)}


def _policy(err: BadRecord, on_error: str, report: DataReport, reason: str = "malformed records") -> None:
    if on_error == "fail":
        raise err
    report.skip(reason, str(err))


def _jsonl(path: Path, on_error: str, report: DataReport) -> Iterator[tuple[str, dict]]:
    seen = False
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            seen = True
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw.decode("utf-8").strip())
            except UnicodeDecodeError as err:
                _policy(BadRecord(f"{where}: not UTF-8 (bad byte at column {err.start + 1})"), on_error, report)
                continue
            except json.JSONDecodeError as err:
                _policy(BadRecord(f"{where}: invalid JSON ({err.msg}: column {err.colno})"), on_error, report)
                continue
            if not isinstance(record, dict):
                _policy(BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}"), on_error, report)
                continue
            yield where, record
    if not seen:
        raise RCCError(f"{path}: empty file, no records")


def _json_list(path: Path, on_error: str, report: DataReport) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RCCError(f"{path}: not UTF-8 (bad byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        if not path.read_bytes().strip():
            raise RCCError(f"{path}: empty file, no records") from None
        hint = "; for one record per line name the file .jsonl" if err.msg == "Extra data" else ""
        raise RCCError(f"{path}:{err.lineno}: invalid JSON ({err.msg}: column {err.colno}){hint}") from None
    if not isinstance(data, list):
        raise RCCError(f"{path}: expected a JSON list of records (e.g. HotpotQA's files); "
                       "for one record per line use a .jsonl file")
    if not data:
        raise RCCError(f"{path}: empty list, no records")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            _policy(BadRecord(f"{path}#{i}: expected a JSON object, got {type(record).__name__}"), on_error, report)
            continue
        yield f"{path}#{i}", record


def _hf(source: str) -> Iterator[tuple[str, dict]]:
    """``hf:NAME[:CONFIG][@SPLIT]`` or a saved dataset folder, streamed."""
    try:
        import datasets
    except ImportError:
        raise RCCError("reading Hugging Face datasets needs the datasets package: pip install 'rcc-llm[train]'") from None
    spec, _, split = source.partition("@")
    split = split or "train"
    path = Path(spec)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise RCCError(f"{spec}: no split {split!r} (splits: {', '.join(ds)}); add @SPLIT")
                ds = ds[split]
            name = spec
        else:
            name = spec[3:] if spec.startswith("hf:") else spec
            repo, _, config = name.partition(":")
            ds = datasets.load_dataset(repo, config or None, split=split, streaming=True)
    except RCCError:
        raise
    except Exception as err:  # datasets raises many types (offline, missing config, bad files)
        raise RCCError(f"{source}: cannot load as a Hugging Face dataset ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''})") from None
    empty = True
    for i, record in enumerate(ds):
        empty = False
        yield f"{name}[{split}]#{i}", record
    if empty:
        raise RCCError(f"{source}: the dataset split {split!r} is empty")


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def iter_records(sources: str | Iterable[str], on_error: str = "fail",
                 report: DataReport | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` from JSONL/JSON files, folders of them, saved
    datasets or ``hf:NAME[:CONFIG][@SPLIT]``; locations are ``file:line``,
    ``file#index`` or ``name[split]#row``.

    Args:
        on_error: ``"fail"`` raises on the first malformed line; ``"skip"``
            counts it in ``report`` (and logs the first few).
    Raises:
        RCCError: on a missing or empty file, or a malformed line with ``"fail"``.
    """
    report = report if report is not None else DataReport()
    for source in [sources] if isinstance(sources, str) else list(sources):
        path = Path(source)
        if not path.exists() and Path(source.partition("@")[0]).exists():
            path = Path(source.partition("@")[0])  # a saved dataset folder with @SPLIT
        if _is_saved_dataset(path) or (source.startswith("hf:") and not path.exists()):
            yield from _hf(source)
            continue
        if not path.exists():
            raise RCCError(f"{source}: no such file or folder (a Hugging Face hub dataset is written hf:NAME)")
        files = [path] if path.is_file() else _files(path, RECORD_SUFFIXES)
        if not files:
            raise RCCError(f"{path}: no .jsonl or .json files in this folder")
        for f in files:
            if f.suffix == ".json":
                yield from _json_list(f, on_error, report)
            else:
                yield from _jsonl(f, on_error, report)


# -------------------------------------------------------------- token files
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenWriter:
    """Appends documents to ``<folder>/<split>.bin`` (token ids) and
    ``<split>.idx`` (int64 start offsets, plus the end), through ``.part``
    files renamed by :meth:`close`, so a crash never leaves a half-written split."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = Path(folder), split, np.dtype(dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._bin = open(self.folder / f"{split}.bin.part", "wb")
        self._idx = open(self.folder / f"{split}.idx.part", "wb")
        self._idx.write(np.int64(0).tobytes())
        self.tokens = 0
        self.docs = 0

    def write_document(self, chunks: Iterable, min_tokens: int = 1) -> int | None:
        """Write one document given as chunks of ids; returns its length, or
        None (nothing written) when it has fewer than ``min_tokens`` tokens."""
        start = self._bin.tell()
        n = 0
        limit = np.iinfo(self.dtype).max
        try:
            for chunk in chunks:
                arr = np.asarray(chunk)
                if arr.size and (arr.min() < 0 or arr.max() > limit):
                    raise RCCError(f"token id {int(arr.max())} does not fit {self.dtype}; the tokenizer's "
                                   "vocabulary is larger than it reports")
                self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
                n += arr.size
        except BaseException:  # a document that fails half-way leaves nothing behind
            self._bin.seek(start)
            self._bin.truncate()
            raise
        if n < max(1, min_tokens):
            self._bin.seek(start)
            self._bin.truncate()
            return None
        self.tokens += n
        self.docs += 1
        self._idx.write(np.int64(self.tokens).tobytes())
        return n

    def close(self) -> None:
        for fh, name in ((self._bin, "bin"), (self._idx, "idx")):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(self.folder / f"{self.split}.{name}.part", self.folder / f"{self.split}.{name}")

    def abort(self) -> None:
        for fh, name in ((self._bin, "bin"), (self._idx, "idx")):
            fh.close()
            (self.folder / f"{self.split}.{name}.part").unlink(missing_ok=True)


class TokenFile:
    """A read-only, memory-mapped split of a prepared token folder.

    Attributes:
        tokens: ``[total_tokens]`` ids (numpy memmap, uint16 or uint32).
        offsets: ``[docs + 1]`` int64 document starts (and the end).
        meta: the folder's ``meta.json``.
    Raises:
        RCCError: when the folder was not written by ``rcc prepare-data`` or is incomplete.
    """

    def __init__(self, folder: str | Path, split: str = "train"):
        folder = Path(folder)
        self.folder, self.split = folder, split
        meta_path = folder / META_NAME
        if not meta_path.is_file():
            raise RCCError(f"{folder}: no {META_NAME}; prepare the data with `rcc prepare-data` first "
                           "(an interrupted run leaves no meta.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise RCCError(f"{meta_path}: unreadable ({err})") from None
        if self.meta.get("format") != TOKENS_FORMAT:
            raise RCCError(f"{folder}: format {self.meta.get('format')!r}, expected {TOKENS_FORMAT}")
        bin_path, idx_path = folder / f"{split}.bin", folder / f"{split}.idx"
        if not bin_path.is_file() or not idx_path.is_file():
            raise RCCError(f"{folder}: split {split!r} is missing ({bin_path.name}, {idx_path.name})")
        dtype = np.dtype(self.meta["dtype"])
        size = bin_path.stat().st_size // dtype.itemsize
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        self.offsets = np.fromfile(idx_path, dtype=np.int64)
        if len(self.offsets) == 0 or self.offsets[-1] != size:
            raise RCCError(f"{folder}: {split}.idx does not match {split}.bin; prepare the data again")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return int(self.offsets[-1])


def write_token_folder(folder: str | Path, splits: dict[str, list], vocab_size: int, **meta) -> dict:
    """Write already tokenized documents (``{"train": [ids, ...], "eval": [...]}``)
    as a token folder, e.g. for synthetic tasks. Returns the meta dict."""
    folder = Path(folder)
    dtype = token_dtype(vocab_size)
    info = {}
    for split, docs in splits.items():
        w = TokenWriter(folder, split, dtype)
        for doc in docs:
            w.write_document([doc])
        w.close()
        info[split] = {"docs": w.docs, "tokens": w.tokens}
    out = {"format": TOKENS_FORMAT, "dtype": dtype.name, "vocab_size": int(vocab_size), "splits": info, **meta}
    atomic_write_text(folder / META_NAME, json.dumps(out, indent=2))
    return out


def load_tokenizer(spec: str):
    """A tokenizer from a hub id, a local folder or ``embedded:smollm2``.

    Raises:
        RCCError: when it cannot be loaded.
    """
    from transformers import AutoTokenizer

    from .backbones import EMBEDDED, embedded_smollm2_file

    try:
        if spec == EMBEDDED:  # the tokenizer alone, without dequantising the weights
            path = embedded_smollm2_file()
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise RCCError(f"cannot load tokenizer {spec!r}: {str(err).splitlines()[0]}") from None


def _text_chunks(path: Path, size: int = 1 << 20) -> Iterator[str]:
    """A text file in pieces of about ``size`` bytes cut at line ends, so a file
    larger than memory streams (tokens across a cut may differ slightly)."""
    with open(path, "rb") as fh:
        offset = 0
        while True:
            block = fh.read(size)
            if not block:
                return
            block += fh.readline()
            try:
                yield block.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadRecord(f"{path}: not UTF-8 (bad byte at offset {offset + err.start})") from None
            offset += len(block)


def _documents(inputs: list[str], text_field: str, on_error: str, report: DataReport) -> Iterator[tuple[str, object]]:
    """``(location, text or iterator of text chunks)`` for every input document."""
    for source in inputs:
        path = Path(source)
        if path.is_file():
            files = [path]
        elif path.is_dir() and not _is_saved_dataset(path):
            files = _files(path, RECORD_SUFFIXES + TEXT_SUFFIXES)
            if not files:
                raise RCCError(f"{path}: no .txt, .jsonl or .json files in this folder")
        else:  # saved dataset or hf:NAME
            yield from _record_texts(iter_records(source, on_error, report), text_field, on_error, report)
            continue
        for f in files:
            if f.suffix in RECORD_SUFFIXES:
                yield from _record_texts(iter_records(str(f), on_error, report), text_field, on_error, report)
            elif f.stat().st_size == 0:
                raise RCCError(f"{f}: empty file")
            else:
                yield str(f), _text_chunks(f)


def _record_texts(records, text_field: str, on_error: str, report: DataReport):
    for where, record in records:
        text = record.get(text_field)
        if not isinstance(text, str):
            fields = ", ".join(sorted(record)) or "none"
            problem = "no" if text is None else f"a non-text ({type(text).__name__})"
            _policy(BadRecord(f"{where}: {problem} {text_field!r} field (fields: {fields}); "
                              "choose the text field with --text-field"), on_error, report)
            continue
        yield where, text


def prepare_data(inputs: list[str], output: str | Path, tokenizer, *, text_field: str = "text",
                 eval_fraction: float = 0.01, min_tokens: int = 2048, on_error: str = "fail",
                 on_short: str = "skip", append_eos: bool = True, seed: int = 0, overwrite: bool = False,
                 progress: bool = True, batch_docs: int = 256, max_tokens: int | None = None) -> dict:
    """Tokenize documents into a memory-mapped token folder with a held-out split.

    Writes ``train.bin``/``train.idx`` and ``eval.bin``/``eval.idx`` (a random
    ``eval_fraction`` of documents, fixed by ``seed``) and last ``meta.json``;
    streams, so corpora larger than memory work.

    Args:
        inputs: ``.txt`` files (one document each), ``.jsonl``/``.json`` files
            (one document per record, text in ``text_field``), folders of those,
            saved datasets or ``hf:NAME[:CONFIG][@SPLIT]``.
        min_tokens: documents with fewer tokens (usually one window W) are
            skipped and counted, never padded; ``on_short="fail"`` stops instead.
        on_error: ``"fail"`` or ``"skip"`` malformed records (bad JSON, no text field).
        max_tokens: stop once about this many tokens are written (e.g. a 10 GB
            slice of a streamed corpus); None reads everything.
    Returns:
        the ``meta.json`` content (counts of documents, tokens and what was skipped).
    Raises:
        RCCError: with file and line on bad data (``"fail"``), on empty inputs,
            when nothing is left, or when ``output`` holds a prepared folder.
    """
    from tqdm.auto import tqdm

    output = Path(output)
    if (output / META_NAME).exists() and not overwrite:
        raise RCCError(f"{output} already holds prepared data; choose another folder or pass --overwrite")
    if on_short not in ("skip", "fail") or on_error not in ("skip", "fail"):
        raise RCCError("on_error and on_short must be 'skip' or 'fail'")
    if not 0.0 <= eval_fraction < 1.0:
        raise RCCError(f"eval fraction must be within [0, 1); got {eval_fraction}")
    (output / META_NAME).unlink(missing_ok=True)
    created = not output.exists()
    min_tokens = max(1, min_tokens)
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    eos = tokenizer.eos_token_id if append_eos else None
    writers = {s: TokenWriter(output, s, dtype) for s in ("train", "eval")}
    report = DataReport()
    rng = random.Random(seed)
    bar = tqdm(unit="doc", desc="tokenizing", disable=not progress, dynamic_ncols=True)

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def store(where: str, chunks: Iterable) -> None:
        report.read += 1
        split = "eval" if rng.random() < eval_fraction else "train"
        tail = [[eos]] if eos is not None else []
        n_tail = len(tail)
        counted = [0]

        def counting():
            for c in chunks:
                counted[0] += len(c)
                yield c
            yield from tail

        try:
            n = writers[split].write_document(counting(), min_tokens + n_tail)
        except BadRecord as err:  # e.g. a text file that is not UTF-8 half-way through
            _policy(err, on_error, report)
            bar.update(1)
            return
        if n is None:
            err = BadRecord(f"{where}: {counted[0]} tokens, fewer than the minimum of {min_tokens} "
                            "(one window); lower --min-tokens to keep such documents")
            _policy(err, on_short, report, reason=f"documents shorter than {min_tokens} tokens")
        else:
            report.kept += 1
        bar.update(1)
        bar.set_postfix(tokens=sum(w.tokens for w in writers.values()), refresh=False)

    try:
        pending: list[tuple[str, str]] = []

        def flush() -> None:
            for (where, _), ids in zip(pending, encode([t for _, t in pending])):
                store(where, [ids])
            pending.clear()

        for where, text in _documents(list(inputs), text_field, on_error, report):
            if max_tokens is not None and sum(w.tokens for w in writers.values()) >= max_tokens:
                break
            if isinstance(text, str):
                pending.append((where, text))
                if len(pending) >= batch_docs:
                    flush()
            else:
                flush()
                store(where, (encode([chunk])[0] for chunk in text))
        flush()
    except BaseException:
        for w in writers.values():
            w.abort()
        if created and not any(output.iterdir()):
            output.rmdir()
        raise
    finally:
        bar.close()
    for w in writers.values():
        w.close()
    if report.kept == 0:
        raise RCCError(f"no document was kept: {report.summary()}")
    if eval_fraction > 0 and writers["eval"].docs == 0:
        log.warning("the eval split is empty (%d documents, eval fraction %s); raise --eval-fraction",
                    report.kept, eval_fraction)
    meta = {
        "format": TOKENS_FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "eos_appended": eos is not None,
        "min_tokens": min_tokens,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "sources": [str(s) for s in inputs],
        "max_tokens": max_tokens,
        "splits": {s: {"docs": w.docs, "tokens": w.tokens} for s, w in writers.items()},
        "report": report.to_dict(),
    }
    atomic_write_text(output / META_NAME, json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------- pretraining batches
class PretrainBatches(torch.utils.data.Dataset):
    """Compression-pretraining micro-batches from a token file (spec section 3).

    Batch ``i`` draws c in [min_windows, max_windows] (one c per batch, so rows
    stack), then for each row an objective: with probability
    ``reconstruct_fraction`` *reconstruction* (the decoder gets a random
    ``target_tokens`` span of the encoded text; its first cue_min..cue_max tokens
    are an uncounted cue), else *continuation* (the ``target_tokens`` after
    the encoded text). Spans never cross documents unless ``cross_documents``;
    starting points are uniform over all valid positions.

    ``__getitem__(i)`` returns ``context_ids [b, c*W]``, ``input_ids [b, T]``,
    ``labels [b, T]`` (int64; -100 = not counted).

    Raises:
        RCCError: when no document is long enough for some sample shape.
    """

    def __init__(self, tokens: TokenFile, *, window: int, batch_size: int, min_windows: int, max_windows: int,
                 target_tokens: int, cue_min: int, cue_max: int, reconstruct_fraction: float,
                 cross_documents: bool = False, seed: int = 0):
        self.tokens, self.window, self.batch_size = tokens, window, batch_size
        self.min_windows, self.max_windows, self.target = min_windows, max_windows, target_tokens
        self.cue = (cue_min, cue_max)
        self.recon = reconstruct_fraction
        self.seed = seed
        if cross_documents:
            self.starts = np.zeros(1, np.int64)
            lengths = np.array([len(tokens)], np.int64)
        else:
            self.starts = tokens.offsets[:-1]
            lengths = np.diff(tokens.offsets)
        self._cum: dict[int, np.ndarray] = {}
        for c in range(min_windows, max_windows + 1):
            need = []
            if reconstruct_fraction > 0:
                need.append(c * window)
            if reconstruct_fraction < 1:
                need.append(c * window + target_tokens)
            for n in need:
                cum = np.cumsum(np.maximum(lengths - n + 1, 0))
                if len(cum) == 0 or cum[-1] == 0:
                    longest = int(lengths.max()) if len(lengths) else 0
                    raise RCCError(
                        f"{tokens.folder} ({tokens.split}): no document has the {n} tokens a sample of {c} "
                        f"window(s) of {window} needs (longest: {longest}); lower max_windows or target_tokens, "
                        "or set cross_documents: true")
                self._cum[n] = cum

    def __len__(self) -> int:  # effectively endless; the trainer decides how many it takes
        return 2**62

    def _start(self, n: int, rng: np.random.Generator) -> int:
        cum = self._cum[n]
        u = int(rng.integers(cum[-1]))
        d = int(np.searchsorted(cum, u, side="right"))
        return int(self.starts[d]) + u - (int(cum[d - 1]) if d else 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        c = int(rng.integers(self.min_windows, self.max_windows + 1))
        n, T, b = c * self.window, self.target, self.batch_size
        context = np.empty((b, n), np.int64)
        decoder = np.empty((b, T), np.int64)
        labels = np.empty((b, T), np.int64)
        for row in range(b):
            recon = rng.random() < self.recon
            start = self._start(n if recon else n + T, rng)
            seq = np.asarray(self.tokens.tokens[start : start + n + (0 if recon else T)], dtype=np.int64)
            context[row] = seq[:n]
            if recon:
                s = int(rng.integers(0, n - T + 1))
                decoder[row] = labels[row] = seq[s : s + T]
                labels[row, : int(rng.integers(self.cue[0], self.cue[1] + 1))] = -100
            else:
                decoder[row] = labels[row] = seq[n:]
        return {"context_ids": torch.from_numpy(context), "input_ids": torch.from_numpy(decoder),
                "labels": torch.from_numpy(labels)}


# ------------------------------------------------------ fine-tuning batches
@dataclass
class Example:
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
    """``(text to compress, decoder prompt, target)`` of one QA example (spec section 2).

    - reconstruct: compress context + question; prompt = header; target =
      question + assistant header + answer (the decoder writes the question back);
    - manual: compress the context; prompt = header + question + assistant
      header; target = answer.
    """
    to_compress, prompt = build(context, question, mode)
    target = (question + ASSISTANT + answer if mode == "reconstruct" else answer) + answer_suffix
    return to_compress, prompt, target


def load_examples(sources, tokenizer, *, mode: str, window: int, max_windows: int, max_decoder_tokens: int,
                  answer_suffix: str, on_error: str = "fail", seed: int = 0,
                  progress: bool = True) -> tuple[list[Example], DataReport]:
    """Read and tokenize QA records for instruction fine-tuning.

    Records whose text to compress needs more than ``max_windows`` windows or
    whose prompt + target exceed ``max_decoder_tokens`` are skipped and
    counted; texts shorter than one window are kept and, as at inference, tiled
    to one window (spec section 1), and counted in the report's notes.

    Args:
        mode: ``"reconstruct"``, ``"manual"`` or ``"mixed"`` (a seeded coin per record).
    Raises:
        RCCError: on bad records (with ``on_error="fail"``), a text record
            without a tokenizer, or when no example is left.
    """
    from tqdm.auto import tqdm

    report = DataReport()
    rng = random.Random(seed)
    examples: list[Example] = []
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
            examples.append(Example(np.asarray(ctx, np.int64), np.asarray(ids, np.int64), np.asarray(labels, np.int64),
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

    bar = tqdm(unit="rec", desc="reading QA records", disable=not progress, dynamic_ncols=True)
    try:  # the bar is closed before an error is printed
        for where, record in iter_records(sources, on_error, report):
            report.read += 1
            bar.update(1)
            try:
                fields = qa_fields(record, where)
            except BadRecord as err:
                _policy(err, on_error, report)
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

    def __init__(self, examples: list[Example], *, window: int, batch_size: int, seed: int = 0, pad_id: int = 0):
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


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded ``(train, held-out)`` split of fine-tuning examples."""
    if fraction <= 0:
        return examples, []
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    n_eval = max(1, int(round(len(examples) * fraction)))
    if n_eval >= len(examples):
        raise RCCError(f"eval_fraction {fraction} leaves no training example out of {len(examples)}")
    held = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
