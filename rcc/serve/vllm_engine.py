"""``rcc serve --engine vllm``: the HTTP service of :mod:`rcc.serve` with vLLM answering.

The store, the routes and the compression jobs are :class:`rcc.serve.engine.Engine`'s;
what changes: a context is kept as its slots (:class:`~rcc.vllm.slot_memory.SlotMemory`,
made by this process's encoder), and questions go to a vLLM ``LLMEngine`` serving the
exported decoder. The worker thread adds every waiting question to vLLM and steps it;
questions that arrive meanwhile join the running batch (vLLM's continuous batching),
and vLLM's prefix cache keeps each memory's slots, so only the first question on a
context runs them through the decoder. Answers stop as :func:`rcc.ask.ask`'s do (eos,
then the answer's ``<|im_end|>``; a request is aborted once its answer is closed).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rcc.errors import RCCError
from rcc.prompts import CHATML
from rcc.serve.engine import Engine, Question, ServeError, internal_error, load_serve_model
from rcc.serve.store import Store
from rcc.vllm.export import export_decoder, rcc_section
from rcc.vllm.generate import engine_args, prompt_for, sampling_for
from rcc.vllm.slot_memory import SlotMemory, check_slots, combine_slots, compress_slots

log = logging.getLogger(__name__)


def exported_folder(model, store: str | Path) -> Path:
    """The decoder exported for vLLM under the store (``vllm-<model id>``), exported once.

    Raises:
        RCCError: for a decoder the plugin does not serve.
    """
    fp = model.fingerprint()
    folder = Path(store) / f"vllm-{fp}"
    try:
        current = rcc_section(json.loads((folder / "config.json").read_text()))["model_id"] == fp
    except (OSError, ValueError, RCCError):
        current = False
    if not current:
        export_decoder(model, folder)
    return folder


@dataclass
class _Live:
    """A question running in vLLM."""

    q: Question
    prompt_len: int
    slots: int
    batch: int
    sent: str = ""
    ids: list[int] = field(default_factory=list)


class VLLMEngine(Engine):
    """:class:`~rcc.serve.engine.Engine` with vLLM running the decoder.

    Raises:
        RCCError: for a decoder the plugin does not serve (before vLLM starts).
    """

    id_suffix = "+vllm"

    def __init__(self, model, store: Store, cfg, metrics=None):
        from vllm import EngineArgs, LLMEngine

        folder = exported_folder(model, cfg.store)
        super().__init__(model, store, cfg, metrics)
        self.max_model_len = cfg.max_model_len or int(getattr(model.decoder.config, "max_position_embeddings", 4096))
        args = engine_args(folder, max_model_len=self.max_model_len, max_num_seqs=cfg.max_concurrent)
        self.llm = LLMEngine.from_engine_args(EngineArgs(**args))

    # ---------------------------------------------------------- memories
    def _check_fits(self, slots: int) -> None:
        super()._check_fits(slots)
        if slots + 1 > self.max_model_len:
            raise ServeError(413, f"the document compresses to {slots} slots, more than this vLLM engine's "
                                  f"--max-model-len {self.max_model_len} leaves room for (slots + prompt + "
                                  "answer); split it, or restart with a larger --max-model-len")

    def _make_memory(self, ids, progress=None, prefix=None) -> SlotMemory:
        return compress_slots(self.model, ids, self.cfg.window_batch_size, progress=progress, prefix=prefix)

    def _load_memory(self, path) -> SlotMemory:
        mem = SlotMemory.load(path)
        check_slots(self.model, mem)
        return mem

    def _combine(self, memories) -> SlotMemory:
        return combine_slots(self.model, memories)

    # --------------------------------------------------------- questions
    def _answer_batch(self) -> None:
        live: dict[str, _Live] = {}
        self._admit(live)
        while live:
            gone = [rid for rid, r in live.items() if r.q.cancelled]  # the client went away: stop its request
            if gone:
                self.llm.abort_request(gone)
                for rid in gone:
                    del live[rid]
                self.metrics.add("cancelled_questions", len(gone))
                self._release(len(gone))
                if not live:
                    break
            for out in self.llm.step():
                r = live.get(out.request_id)
                if r is not None and self._update(out.request_id, r, out):
                    del live[out.request_id]
            self._admit(live)

    def _take_all(self) -> list[Question]:
        with self._cv:
            self._drop_cancelled()
            taken, self._questions = self._questions, []
            return taken

    def _admit(self, live: dict[str, _Live]) -> None:
        """Hand every waiting question to vLLM (or answer it with its error)."""
        for q in self._take_all():
            try:
                rid, r = self._add(q, len(live) + 1)
                live[rid] = r
            except Exception as err:  # noqa: BLE001  (one question's failure is its own)
                if isinstance(err, ServeError):
                    status, msg = err.status, str(err)
                elif isinstance(err, (RCCError, ValueError)):  # vLLM refuses bad input with ValueError
                    status, msg = 422, str(err)
                else:
                    status, msg = 500, internal_error("adding a question to vLLM")
                q.sink.send("error", status, msg)
                self._release(1)

    def _add(self, q: Question, batch: int) -> tuple[str, _Live]:
        memory = self._memory(q.contexts)
        if q.mode == "reconstruct":  # the question's windows extend the memory, as `rcc ask --memory` does
            q_ids = self.tok("\n\n" + q.text, add_special_tokens=False, return_tensors="pt").input_ids
            memory = self._make_memory(q_ids, prefix=memory)
            self._check_fits(memory.num_slots)
        prompt = self.tok(CHATML.build("", q.text, q.mode)[1], add_special_tokens=False).input_ids
        opts = dict(q.options)
        if opts.pop("do_sample", False):
            opts.setdefault("temperature", 1.0)
        params = sampling_for(q.max_new_tokens, CHATML.stop_token_id(self.tok, q.mode), **opts)
        rid = uuid.uuid4().hex  # outputs and aborts use this id (vLLM suffixes its own internal one)
        self.llm.add_request(rid, prompt_for(memory, prompt), params)
        return rid, _Live(q=q, prompt_len=len(prompt), slots=memory.num_slots, batch=batch)

    def _update(self, rid: str, r: _Live, out) -> bool:
        """Stream the new text of one output; True once the question is answered."""
        ids = list(out.outputs[0].token_ids)
        self.metrics.add("sampled_tokens", len(ids) - len(r.ids))
        r.ids = list(ids)
        eos = self.tok.eos_token
        n = CHATML.answer_length(self.tok, ids, r.q.mode) if CHATML.finished(self.tok.decode(ids, skip_special_tokens=False),
                                                                 r.q.mode, eos) else None
        if n is not None:
            ids = ids[:n]
        text = self.tok.decode(ids, skip_special_tokens=False)
        if r.q.stream:
            self._flush(r, CHATML.visible_answer(text, r.q.mode, eos, r.q.stops))
        if n is None and not out.finished:
            return False
        if not out.finished:
            self.llm.abort_request([rid])
        # vLLM cuts its text at a stop string, not the token ids decoded here: cut the answer again
        question_back, answer = CHATML.split_answer(text, r.q.mode, eos, r.q.stops)
        if r.q.stream:
            self._flush(r, answer)
        n_answer = len(self.tok(answer, add_special_tokens=False).input_ids)
        self.metrics.add("generated_tokens", n_answer)
        self.metrics.observe("question_seconds", time.perf_counter() - r.q.queued)
        r.q.sink.send("done", {
            "answer": answer, "reconstructed_question": question_back, "mode": r.q.mode,
            "finish_reason": "stop" if CHATML.finished(text, r.q.mode, eos, r.q.stops) else "length",
            "prompt_tokens": r.prompt_len, "completion_tokens": n_answer, "slots": r.slots, "batch": r.batch,
        })
        self._release(1)
        return True

    @staticmethod
    def _flush(r: _Live, text: str) -> None:
        if len(text) > len(r.sent) and text.startswith(r.sent):
            r.q.sink.send("delta", text[len(r.sent):])
            r.sent = text

    def _release(self, n: int) -> None:
        with self._cv:
            self._inflight -= n

    def stop(self) -> None:
        super().stop()
        shutdown = getattr(self.llm, "shutdown", None) or getattr(getattr(self.llm, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


def load_vllm_engine(cfg) -> VLLMEngine:
    """``rcc serve --engine vllm``: the model ``cfg`` names, its decoder exported under the
    store and started in vLLM (not yet the worker thread).

    Raises:
        RCCError: for a model that cannot be loaded or a decoder the plugin does not serve.
    """
    store = Store(cfg.store)  # locked before the slow loads
    try:
        return VLLMEngine(load_serve_model(cfg), store, cfg)
    except BaseException:
        store.close()
        raise
