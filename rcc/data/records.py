"""Reading training records (JSONL, JSON lists, text files, saved and hub datasets)
with exact error locations, and the :class:`DataReport` of what was skipped."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from rcc.errors import RCCError

log = logging.getLogger(__name__)

RECORD_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
_SHOWN = 5  # locations kept per skip reason


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


def handle_bad_record(err: BadRecord, on_error: str, report: DataReport, reason: str = "malformed records") -> None:
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
                handle_bad_record(BadRecord(f"{where}: not UTF-8 (bad byte at column {err.start + 1})"), on_error, report)
                continue
            except json.JSONDecodeError as err:
                handle_bad_record(BadRecord(f"{where}: invalid JSON ({err.msg}: column {err.colno})"), on_error, report)
                continue
            if not isinstance(record, dict):
                handle_bad_record(BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}"), on_error, report)
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
            handle_bad_record(BadRecord(f"{path}#{i}: expected a JSON object, got {type(record).__name__}"), on_error, report)
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


def files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)


def is_saved_dataset(path: Path) -> bool:
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
        if is_saved_dataset(path) or (source.startswith("hf:") and not path.exists()):
            yield from _hf(source)
            continue
        if not path.exists():
            raise RCCError(f"{source}: no such file or folder (a Hugging Face hub dataset is written hf:NAME)")
        files = [path] if path.is_file() else files_under(path, RECORD_SUFFIXES)
        if not files:
            raise RCCError(f"{path}: no .jsonl or .json files in this folder")
        for f in files:
            if f.suffix == ".json":
                yield from _json_list(f, on_error, report)
            else:
                yield from _jsonl(f, on_error, report)

