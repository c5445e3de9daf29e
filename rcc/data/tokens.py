"""Memory-mapped token files (``rcc prepare-data``): writing, reading, preparing a corpus."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from rcc.errors import RCCError
from rcc.files import atomic_write_text
from rcc.data.records import (RECORD_SUFFIXES, TEXT_SUFFIXES, BadRecord, DataReport, files_under, handle_bad_record,
                      is_saved_dataset, iter_records)

log = logging.getLogger(__name__)

TOKENS_FORMAT = "rcc-tokens/1"
META_NAME = "meta.json"


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

    from rcc.backbones import EMBEDDED, embedded_smollm2_file

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
        elif path.is_dir() and not is_saved_dataset(path):
            files = files_under(path, RECORD_SUFFIXES + TEXT_SUFFIXES)
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
            handle_bad_record(BadRecord(f"{where}: {problem} {text_field!r} field (fields: {fields}); "
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
            handle_bad_record(err, on_error, report)
            bar.update(1)
            return
        if n is None:
            err = BadRecord(f"{where}: {counted[0]} tokens, fewer than the minimum of {min_tokens} "
                            "(one window); lower --min-tokens to keep such documents")
            handle_bad_record(err, on_short, report, reason=f"documents shorter than {min_tokens} tokens")
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
