"""The engine: one worker thread owns the model and runs, in this order of
priority, (1) batches of questions, (2) compression jobs.

A compression job reports progress after every step of
``window_batch_size`` windows; between steps the worker answers every waiting
question, so a long document never holds questions up for more than one step.
Questions on one context with the same options share one ``generate`` call over
one memory (a single-context cache repeated across the batch, prompts padded on
the left), as many as ``max_batch`` at a time.

A question whose client goes away is cancelled (:meth:`Question.cancel`): dropped
if it is still waiting, and its row stops at the next token if it is being
generated (:class:`RowStops`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from rcc.errors import RCCError
from rcc.memory import CompressedContext
from rcc.ask import AnswerDone
from rcc.prompts import CHATML
from rcc.serve.config import ServeConfig
from rcc.serve.metrics import Metrics
from rcc.serve.store import Store, context_id

log = logging.getLogger(__name__)


class ServeError(RCCError):
    """A user mistake with its HTTP status (404 unknown id, 409 not ready, 413, 429 ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Cancelled(Exception):
    """A context was deleted while it was being compressed."""


def internal_error(what: str) -> str:
    """Log the exception being handled with a fresh id (traceback in the server's log)
    and return the client's message, which names the id and nothing internal."""
    eid = uuid.uuid4().hex[:12]
    log.exception("%s failed (error id %s)", what, eid)
    return f"internal server error (id {eid}); the server's log has the details under that id"


class Sink:
    """One request's events, handed from the worker thread to the server's event loop.

    Events: ``("delta", text)``, ``("done", result dict)``, ``("error", status, message)``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


@dataclass
class Question:
    """One question waiting for the worker; questions with equal ``key`` are batched.
    ``contexts`` are the ids of the contexts it reads, in order (one, or several read as one)."""

    contexts: tuple[str, ...]
    text: str
    mode: str
    max_new_tokens: int
    options: tuple  # sorted (name, value) generation options; ("stop", (strings...)) among them
    sink: Sink
    stream: bool = False
    queued: float = field(default_factory=time.perf_counter)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def key(self) -> tuple:
        return (self.contexts, self.mode, self.max_new_tokens, self.options)

    @property
    def stops(self) -> tuple[str, ...]:
        return dict(self.options).get("stop", ())

    def cancel(self) -> None:
        """The client went away: drop the question, or stop its row at the next token."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class MemoryCache:
    """Loaded memories, least recently used evicted past ``budget`` bytes (the one
    in use is always kept)."""

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[str, CompressedContext] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, cid: str) -> CompressedContext | None:
        with self._lock:
            mem = self._items.get(cid)
            if mem is not None:
                self._items.move_to_end(cid)
            return mem

    def put(self, cid: str, mem: CompressedContext) -> None:
        with self._lock:
            self._items[cid] = mem
            self._items.move_to_end(cid)
            while len(self._items) > 1 and self.nbytes() > self.budget:
                self._items.popitem(last=False)

    def pop(self, cid: str) -> None:
        with self._lock:
            self._items.pop(cid, None)

    def drop_with(self, cid: str) -> None:
        """Forget the combined memories that read ``cid`` (keys ``id+id+...``)."""
        with self._lock:
            for key in [k for k in self._items if "+" in k and cid in k.split("+")]:
                del self._items[key]

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


class RowStops(StoppingCriteria):
    """Ends a row of a batch whose question was cancelled or whose answer holds one of
    the stop strings, and counts the tokens sampled for rows still running.

    The stop-string test decodes the row (as :class:`rcc.ask.AnswerDone` does) and
    searches only the text the newest token can have completed: per step it costs the
    row's length plus stops x longest stop, whatever the vocabulary (transformers'
    ``stop_strings`` precomputes tables of vocabulary x stop length per stop string,
    which took 44 s for 2,000 short stops and 14.6 GiB for four long ones).
    """

    def __init__(self, tokenizer, start: int, mode: str, questions: list[Question], metrics: Metrics):
        self.tok, self.start, self.mode, self.qs, self.metrics = tokenizer, start, mode, questions, metrics
        self.stops = questions[0].stops  # a batch shares its options
        self.longest = max(map(len, self.stops), default=0)
        self.done = [False] * len(questions)
        self.seen = [0] * len(questions)  # answer characters already searched

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.metrics.add("sampled_tokens", self.done.count(False))
        for i, q in enumerate(self.qs):
            if self.done[i]:
                continue
            if q.cancelled:
                self.done[i] = True
                continue
            if self.stops:
                text = CHATML.answer_part(self.tok.decode(input_ids[i, self.start:], skip_special_tokens=False), self.mode)
                if text is not None:
                    tail = text[max(0, self.seen[i] - self.longest - 4):]  # 4: half-decoded characters
                    self.done[i] = any(s in tail for s in self.stops)
                    self.seen[i] = len(text)
        return torch.tensor(self.done, device=input_ids.device)


class _RowStreamer:
    """A ``generate`` streamer for a batch: each row's new answer text goes to its sink."""

    def __init__(self, tokenizer, mode: str, sinks: list[Sink | None], stops: tuple[str, ...] = ()):
        self.tok, self.mode, self.sinks, self.stops = tokenizer, mode, sinks, stops
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.sent = [""] * len(sinks)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        value = value.reshape(len(self.sinks), -1)
        for i, sink in enumerate(self.sinks):
            self.ids[i].extend(value[i].tolist())
            if sink is not None:
                self.flush(i, CHATML.visible_answer(self.tok.decode(self.ids[i], skip_special_tokens=False), self.mode,
                                             self.tok.eos_token, self.stops))

    def flush(self, i: int, text: str) -> None:
        if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
            self.sinks[i].send("delta", text[len(self.sent[i]) :])
            self.sent[i] = text

    def end(self) -> None:
        pass


class Engine:
    """The model, the store and the worker thread that runs them.

    Args:
        model: an :class:`~rcc.RCCModel` with a tokenizer.
        store: the :class:`Store`.
        cfg: the :class:`ServeConfig`.
    """

    #: added to the model's fingerprint in context ids: engines that keep different memories
    #: (KV cache here, slots for vLLM) never share a store entry
    id_suffix = ""

    def __init__(self, model, store: Store, cfg: ServeConfig, metrics: Metrics | None = None):
        if model.tokenizer is None:
            raise RCCError(f"{cfg.model} has no tokenizer; the server needs one to read documents and questions")
        self.model, self.store, self.cfg = model, store, cfg
        self.tok = model.tokenizer
        self.metrics = metrics or Metrics()
        self.model_id = model.fingerprint() + self.id_suffix
        self.cache = MemoryCache(cfg.cache_mib * 2**20)
        self._cv = threading.Condition()
        self._questions: list[Question] = []
        self._jobs: deque[str] = deque(self.store.recover(self.model_id))
        self._cancelled: set[str] = set()
        self._inflight = 0
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="rcc-engine", daemon=True)

    # ---------------------------------------------------------- lifecycle
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._questions)

    def gauges(self) -> dict:
        return {"queue_depth": self.queue_depth(), "questions_in_flight": self._inflight,
                "compression_jobs_waiting": len(self._jobs), "cache_entries": len(self.cache),
                "cache_bytes": self.cache.nbytes(), "contexts": self.store.counts()}

    # ------------------------------------------------------------ contexts
    def add_context(self, text: str, name: str | None = None) -> tuple[dict, bool]:
        """Queue a document for compression; ``(row, created)``. The same document
        again is the same entry (a failed one is queued again).

        Raises:
            ServeError: 422 for an empty document, 413 past ``max_context_tokens``.
        """
        if not text.strip():
            raise ServeError(422, "the document is empty; send some text to compress")
        cid = context_id(text, self.model_id)
        row = self.store.get(cid)
        if row is not None and row["status"] != "failed":
            return row, False
        n = len(self.tok(text, add_special_tokens=False).input_ids)
        if n > self.cfg.max_context_tokens:
            raise ServeError(413, f"the document has {n} tokens, more than this server's limit of "
                                  f"{self.cfg.max_context_tokens}; split it, or restart the server with a larger "
                                  "--max-context-tokens")
        cfg = self.model.config
        self._check_fits(cfg.slots_for(n))
        self.store.add(cid, text, name, n, cfg.slots_for(n) // cfg.slots_per_window, self.model_id)
        return self._queue(cid), True

    def append_context(self, parent: str, text: str, name: str | None = None) -> tuple[dict, bool]:
        """Queue ``text`` to be appended to the ready context ``parent``: a new context
        (content-addressed by the parent and the text) whose memory is the parent's with
        the new text's windows after it; only those are encoded, and the parent is not
        changed. ``(row, created)``.

        Raises:
            ServeError: 404/409 for a parent that cannot be read, 422 for an empty text,
                413 when both together pass ``max_context_tokens`` or the decoder's positions.
        """
        row = self.check_ready(parent)
        if not text.strip():
            raise ServeError(422, "the text to append is empty; send some text")
        cid = context_id(text, f"{self.model_id}\nappend to {parent}")
        child = self.store.get(cid)
        if child is not None and child["status"] != "failed":
            return child, False
        n = len(self.tok(text, add_special_tokens=False).input_ids)
        total = row["tokens"] + n
        if total > self.cfg.max_context_tokens:
            raise ServeError(413, f"context {parent} ({row['tokens']} tokens) and the {n} new tokens make {total}, "
                                  f"more than this server's limit of {self.cfg.max_context_tokens} "
                                  "(--max-context-tokens)")
        cfg = self.model.config
        self._check_total([row["slots"], cfg.slots_for(n)], f"context {parent} and the new text")
        self.store.add(cid, text, name, total, cfg.slots_for(n) // cfg.slots_per_window, self.model_id, parent=parent)
        return self._queue(cid), True

    def _queue(self, cid: str) -> dict:
        with self._cv:
            self._cancelled.discard(cid)
            self._jobs.append(cid)
            self._cv.notify_all()
        return self.store.get(cid)

    def check_contexts(self, cids: tuple[str, ...]) -> None:
        """The contexts one question reads together, checked before any work: each ready,
        their tokens within ``max_context_tokens`` and their slots within the decoder's positions.

        Raises:
            ServeError: 404/409 for a context that cannot answer, 413 past a limit.
        """
        rows = [self.check_ready(c) for c in cids]
        if len(rows) < 2:
            return
        total = sum(r["tokens"] for r in rows)
        if total > self.cfg.max_context_tokens:
            raise ServeError(413, f"the {len(rows)} contexts hold {total} tokens in all, more than this server's "
                                  f"limit of {self.cfg.max_context_tokens} (--max-context-tokens); ask over fewer")
        self._check_total([r["slots"] for r in rows], f"the {len(rows)} contexts")

    def _check_total(self, slots: list[int], what: str) -> None:
        """Raises ServeError 413 when memories of ``slots`` read together pass the decoder's positions."""
        from rcc.positions import check_slot_total

        try:
            check_slot_total(self.model, sum(slots), slots, what=what)
        except RCCError as err:
            raise ServeError(413, str(err)) from None
        self._check_fits(sum(slots))

    def _check_fits(self, slots: int) -> None:
        """Raises ServeError 413 when ``slots`` slot positions are more than the decoder takes."""
        try:
            self.model.check_positions(slots)
        except RCCError as err:
            raise ServeError(413, str(err)) from None

    # the memory a context is kept as (the vLLM engine keeps the slots instead, rcc/serve/vllm_engine.py)
    def _make_memory(self, ids, progress=None, prefix=None):
        return self.model.compress(ids, window_batch_size=self.cfg.window_batch_size, progress=progress, prefix=prefix)

    def _load_memory(self, path):
        mem = CompressedContext.load(path, device=self.model.device)
        self.model.check_memory(mem)
        return mem

    def _combine(self, memories):
        return self.model.combine(memories, self.cfg.window_batch_size)

    def delete_context(self, cid: str) -> None:
        """Raises ServeError 404 for an unknown id."""
        if self.store.get(cid) is None:
            raise ServeError(404, f"no context {cid}; list them with GET /v1/contexts")
        with self._cv:
            self._cancelled.add(cid)
        self.store.delete(cid)
        self.cache.pop(cid)
        self.cache.drop_with(cid)

    def _memory(self, cids: tuple[str, ...] | str) -> CompressedContext:
        """The memory of one context, or of several read as one (combined once, then
        kept in the cache like any memory)."""
        if isinstance(cids, str) or len(cids) == 1:
            return self._one_memory(cids if isinstance(cids, str) else cids[0])
        key = "+".join(cids)
        mem = self.cache.get(key)
        if mem is not None:
            self.metrics.add("cache_hits")
            return mem
        parts = [self._one_memory(c) for c in cids]
        try:
            mem = self._combine(parts)
        except RCCError as err:
            raise ServeError(409, f"contexts {', '.join(cids)} cannot be read together: {err}") from None
        self.cache.put(key, mem)
        return mem

    def _one_memory(self, cid: str) -> CompressedContext:
        mem = self.cache.get(cid)
        if mem is not None:
            self.metrics.add("cache_hits")
            return mem
        self.check_ready(cid)
        self.metrics.add("cache_misses")
        try:
            mem = self._load_memory(self.store.memory_path(cid))
        except RCCError as err:
            self.store.update(cid, status="failed", error=str(err))
            raise ServeError(409, f"context {cid}: {err}; DELETE it and POST the document again") from None
        self.cache.put(cid, mem)
        return mem

    def check_ready(self, cid: str) -> dict:
        """The row of a context that can answer questions.

        Raises:
            ServeError: 404 unknown, 409 not (yet) ready.
        """
        row = self.store.get(cid)
        if row is None:
            raise ServeError(404, f"no context {cid}; POST the document to /v1/contexts first, or list them with "
                                  "GET /v1/contexts")
        if row["status"] == "failed":
            raise ServeError(409, f"context {cid} failed to compress ({row['error']}); POST the document again")
        if row["status"] != "ready":
            raise ServeError(409, f"context {cid} is still {row['status']} ({row['windows_done']}/"
                                  f"{row['windows_total']} windows); poll GET /v1/contexts/{cid} until its status "
                                  "is ready")
        return row

    # ----------------------------------------------------------- questions
    def submit(self, q: Question) -> None:
        """Queue a question.

        Raises:
            ServeError: 404/409 for a context that cannot answer, 429 when the queue is full.
        """
        if self.cache.get("+".join(q.contexts)) is None:
            self.check_contexts(q.contexts)
        with self._cv:
            if self._inflight >= self.cfg.max_concurrent:
                self.metrics.add("rejected_queue_full")
                raise ServeError(429, f"the server is answering {self._inflight} questions, its limit "
                                      f"(--max-concurrent {self.cfg.max_concurrent}); retry in a moment")
            self._inflight += 1
            self._questions.append(q)
            self._cv.notify_all()

    # -------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._questions and not self._jobs:
                    self._cv.wait()
                if self._stop:
                    return
                job = None if self._questions else self._jobs.popleft()
            if job is None:
                self._answer_batch()
            else:
                self._compress(job)

    def _drop_cancelled(self) -> None:
        """Forget waiting questions whose clients went away (caller holds ``_cv``)."""
        gone = [q for q in self._questions if q.cancelled]
        if gone:
            self._questions = [q for q in self._questions if not q.cancelled]
            self._inflight -= len(gone)
            self.metrics.add("cancelled_questions", len(gone))

    def _take_batch(self) -> list[Question]:
        with self._cv:
            self._drop_cancelled()
            if not self._questions:
                return []
            key = self._questions[0].key
            batch = [q for q in self._questions if q.key == key][: self.cfg.max_batch]
            for q in batch:
                self._questions.remove(q)
            return batch

    def _answer_batch(self) -> None:
        batch = self._take_batch()
        if not batch:
            return
        try:
            self._answer(batch)
        except ServeError as err:
            for q in batch:
                q.sink.send("error", err.status, str(err))
        except RCCError as err:
            for q in batch:
                q.sink.send("error", 422, str(err))
        except Exception:  # a bug or the device: the clients get a 500 and an id, the server stays up
            message = internal_error(f"answering {len(batch)} questions")
            for q in batch:
                q.sink.send("error", 500, message)
        finally:
            with self._cv:
                self._inflight -= len(batch)

    def _answer(self, batch: list[Question]) -> None:
        memory = self._memory(batch[0].contexts)
        mode = batch[0].mode
        if mode == "manual":
            groups = [(memory, batch)]
        else:  # each question's windows extend the memory, as `rcc ask --memory` does
            by_slots: dict[int, list] = {}
            for q in batch:
                q_ids = self.tok("\n\n" + q.text, add_special_tokens=False, return_tensors="pt").input_ids
                mem = self._make_memory(q_ids, prefix=memory)
                by_slots.setdefault(mem.num_slots, []).append((q, mem))
            groups = [(_stack([m for _, m in pairs]), [q for q, _ in pairs]) for pairs in by_slots.values()]
        for mem, qs in groups:
            self._generate(mem, qs, mode)

    def _generate(self, memory: CompressedContext, qs: list[Question], mode: str) -> None:
        """One ``generate`` call for questions sharing a memory (``batch_size`` 1) or
        each with its own (``batch_size == len(qs)``)."""
        tok = self.tok
        rows = [tok(CHATML.build("", q.text, mode)[1], add_special_tokens=False).input_ids for q in qs]
        m = max(map(len, rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.tensor([[pad] * (m - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (m - len(r)) + [1] * len(r) for r in rows])
        eos = tok.eos_token
        eos_id = CHATML.stop_token_id(tok, mode)
        stops = qs[0].stops
        rows_done = RowStops(tok, memory.num_slots + m, mode, qs, self.metrics)
        criteria = StoppingCriteriaList([AnswerDone(tok, memory.num_slots + m, mode), rows_done])
        streamer = _RowStreamer(tok, mode, [q.sink if q.stream else None for q in qs], stops)
        opts = {k: v for k, v in qs[0].options if k != "stop"}  # stop strings: RowStops, not transformers'
        out = self.model.generate(memory, ids, attention_mask=mask, max_new_tokens=qs[0].max_new_tokens,
                                  eos_token_id=eos_id, stopping_criteria=criteria, streamer=streamer, **opts)
        self.metrics.add("batches")
        self.metrics.add("batched_questions", len(qs))
        for i, q in enumerate(qs):
            if q.cancelled:
                self.metrics.add("cancelled_questions")
                continue
            text = tok.decode(out[i].tolist(), skip_special_tokens=False)
            question_back, answer = CHATML.split_answer(text, mode, eos, stops)
            if q.stream:
                streamer.flush(i, answer)
            n_answer = len(tok(answer, add_special_tokens=False).input_ids)
            self.metrics.add("generated_tokens", n_answer)
            self.metrics.observe("question_seconds", time.perf_counter() - q.queued)
            q.sink.send("done", {
                "answer": answer,
                "reconstructed_question": question_back,
                "mode": mode,
                "finish_reason": "stop" if CHATML.finished(text, mode, eos, stops) else "length",
                "prompt_tokens": len(rows[i]),
                "completion_tokens": n_answer,
                "slots": memory.num_slots,
                "batch": len(qs),
            })

    def _compress(self, cid: str) -> None:
        row = self.store.get(cid)
        if row is None or row["status"] != "queued":
            return
        self.store.update(cid, status="compressing", attempts=row["attempts"] + 1, windows_done=0)
        t = time.perf_counter()
        try:
            prefix = None
            if row["parent"]:  # an append: the parent's memory file stays until this is done (Store.collect)
                try:
                    prefix = self._load_memory(self.store.memory_path(row["parent"]))
                except RCCError as err:
                    raise RCCError(f"the context it appends to ({row['parent']}) cannot be read: {err}") from None
            text = self.store.text_path(cid).read_text(encoding="utf-8")
            ids = self.tok(text, add_special_tokens=False, return_tensors="pt").input_ids

            def progress(done: int) -> None:
                self.store.update(cid, windows_done=done)
                if cid in self._cancelled:
                    raise _Cancelled
                while self._questions:  # questions first: they wait at most one compression step
                    self._answer_batch()

            memory = self._make_memory(ids, progress=progress, prefix=prefix)
            if cid in self._cancelled:
                raise _Cancelled
            path = memory.save(self.store.memory_path(cid))
            self.store.update(cid, status="ready", slots=memory.num_slots, bytes=path.stat().st_size,
                              windows_done=row["windows_total"], error=None)
            self.store.text_path(cid).unlink(missing_ok=True)
            if self.store.get(cid) is None:  # deleted while saving
                self.store.delete(cid)
                return
            self.cache.put(cid, memory)
            self.metrics.add("compressed_tokens", ids.shape[1])
            self.metrics.observe("compress_seconds", time.perf_counter() - t)
        except _Cancelled:
            self.store.delete(cid)
        except RCCError as err:
            self.store.update(cid, status="failed", error=str(err))
        except Exception:
            self.store.update(cid, status="failed", error="compression failed: " + internal_error(f"compressing {cid}"))
        finally:
            if row["parent"]:
                self.store.collect()  # a deleted parent's file is no longer needed


def _stack(memories: list[CompressedContext]) -> CompressedContext:
    """One memory holding several single-context memories of equal length: ``[batch, kv_heads, slots, head_dim]``."""
    if len(memories) == 1:
        return memories[0]
    first = memories[0]
    kv = [(torch.cat([m.kv[i][0] for m in memories]), torch.cat([m.kv[i][1] for m in memories]))
          for i in range(len(first.kv))]
    return CompressedContext(kv=kv, num_tokens=first.num_tokens, num_slots=first.num_slots, window=first.window,
                             ratio=first.ratio, model_id=first.model_id, content_hash=first.content_hash)


def load_engine(cfg: ServeConfig) -> Engine:
    """Open (and lock) the store, then load the model named by ``cfg.model`` (not yet started).

    Raises:
        RCCError: when another server holds the store (before the slow model load), or
            the model cannot be loaded.
    """
    store = Store(cfg.store)
    try:
        return Engine(load_serve_model(cfg), store, cfg)
    except BaseException:
        store.close()
        raise


def load_serve_model(cfg: ServeConfig):
    """The :class:`~rcc.RCCModel` ``cfg`` names, on its device and dtype, in eval mode.

    Raises:
        RCCError: for a device that is not here, or a model that cannot be loaded.
    """
    from rcc.loading import load_model, resolve_dtype

    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = cfg.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RCCError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    model = load_model(cfg.model, dtype=resolve_dtype(cfg.dtype, device), device=device)
    if not model.config.trained:
        log.warning("%s is an UNTRAINED RCC model; its answers are meaningless until it is trained", cfg.model)
    return model.eval()
