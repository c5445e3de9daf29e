"""The llama.cpp side of the ``llamacpp`` baseline and of ``benchmarks/llamacpp.py``.

It runs in the environment that has llama-cpp-python (``scripts/llamacpp_env.sh``
makes ``.venv-llamacpp``) as a script, not a module, so that it imports the
standard library, numpy and llama_cpp only (no torch: its RSS is llama.cpp's)::

    python rcc/eval/llamacpp_child.py GGUF N_CTX THREADS

It loads the GGUF (llama-cpp-python's defaults otherwise: weights as stored,
memory-mapped; f16 KV cache; batches of 512), writes one JSON line
``{"ready": true, ...}`` (or ``{"error": ...}`` and exits with status 2), then
answers one JSON request per line on stdin with one JSON line on stdout:

- ``{"op": "generate", "ids": [...], "max_new_tokens": n, "stops": [...],
  "repeats": 1}``: pre-fill ``ids`` from an empty cache, then greedy decoding
  (the argmax of llama.cpp's logits, up to ``n`` tokens or a stop id, which is
  not returned). Answers ``token_ids``, ``prefill_s``, ``ttft_s`` (from the
  ids to the first new token), ``decode_tok_s`` (after the first token, as
  ``rcc bench`` counts) and, with ``repeats`` > 1, the decode repeated that
  many times from the same pre-filled cache (``decode_tok_s_runs``);
- ``{"op": "tokenize", "text": "..."}``: llama.cpp's ids of ``text`` (no BOS;
  special tokens parsed), to check that its tokenizer agrees with the parent's;
- ``{"op": "reset_peak"}`` / ``{"op": "memory"}``: reset the peak RSS (Linux:
  ``/proc/self/clear_refs``) / read ``rss_mib`` and ``peak_mib`` (VmRSS, VmHWM).

A bad request (not JSON, an unknown op, ids that are not token ids of this
vocabulary, more than ``n_ctx`` positions) gets ``{"error": one line}``; the
child goes on. End of input ends it.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _status_mib(name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory() -> dict:
    """``rss_mib`` (VmRSS) and ``peak_mib`` (VmHWM, else ``ru_maxrss``) of this process."""
    import resource

    peak = _status_mib("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss_mib": _status_mib("VmRSS"), "peak_mib": round(peak, 1)}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Engine:
    """One llama.cpp model and context; greedy decoding on token ids."""

    def __init__(self, gguf: str, n_ctx: int, threads: int):
        import llama_cpp

        self.lib = llama_cpp
        t = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.load_s = time.perf_counter() - t
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.threads = threads

    def info(self) -> dict:
        import importlib.metadata as md

        lib, llm = self.lib, self.llm
        fa = {-1: "auto", 0: "disabled", 1: "enabled"}.get(getattr(llm.context_params, "flash_attn_type", None))
        return {"ready": True, "n_ctx": self.n_ctx, "n_ctx_train": lib.llama_model_n_ctx_train(llm.model),
                "n_vocab": self.n_vocab, "n_batch": llm.n_batch, "n_ubatch": llm.context_params.n_ubatch,
                "threads": self.threads, "flash_attn": fa, "bos": llm.token_bos(), "eos": llm.token_eos(),
                "load_s": round(self.load_s, 3), "file_type": llm.metadata.get("general.file_type"),
                "system_info": lib.llama_print_system_info().decode(errors="replace").strip(),
                "versions": {"python": sys.version.split()[0], "llama-cpp-python": md.version("llama-cpp-python")},
                **memory()}

    def _next(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def _decode(self, first: int, max_new_tokens: int, stops: set[int]) -> tuple[list[int], list[float]]:
        """Greedy from the logits already computed (``first`` the argmax of them):
        ``(new ids, arrival time of each)``."""
        out, times, nxt = [], [], first
        while len(out) < max_new_tokens and nxt not in stops:
            out.append(nxt)
            times.append(time.perf_counter())
            if len(out) == max_new_tokens:
                break
            self.llm.eval([nxt])
            nxt = self._next()
        return out, times

    def generate(self, ids: list[int], max_new_tokens: int, stops: set[int], repeats: int = 1) -> dict:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        out, times = self._decode(self._next(), max_new_tokens, stops)
        runs = [_tok_s(times)]
        for _ in range(repeats - 1):  # again from the pre-filled cache: the last id re-evaluated
            self.llm.n_tokens = len(ids) - 1  # eval() drops the cache past n_tokens
            self.llm.eval(ids[-1:])
            again, t = self._decode(self._next(), max_new_tokens, stops)
            runs.append(_tok_s(t) if again == out else None)  # greedy: the same tokens or not counted
        speeds = [r for r in runs if r is not None]
        perf = self.lib.llama_perf_context(self.llm.ctx)
        return {"token_ids": out, "prefill_tokens": len(ids), "prefill_s": round(t1 - t0, 4),
                "prefill_tok_s": round(len(ids) / max(t1 - t0, 1e-9), 1),
                "ttft_s": round(times[0] - t0, 4) if times else None,
                "decode_tok_s": round(sorted(speeds)[len(speeds) // 2], 2) if speeds else None,
                "decode_tok_s_runs": [None if r is None else round(r, 2) for r in runs],
                "repeats_same_tokens": all(r is not None for r in runs[1:]),
                "llama_perf": {"t_p_eval_ms": round(perf.t_p_eval_ms, 1), "n_p_eval": perf.n_p_eval,
                               "t_eval_ms": round(perf.t_eval_ms, 1), "n_eval": perf.n_eval}}

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _tok_s(times: list[float]) -> float | None:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None


def _ids(value, n_vocab: int, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{what} must be a list of integer token ids")
    bad = [i for i in value if not 0 <= i < n_vocab]
    if bad:
        raise ValueError(f"{what} holds {len(bad)} ids outside this vocabulary's 0..{n_vocab - 1} (e.g. {bad[0]})")
    return value


def handle(engine: Engine, line: str) -> dict:
    """The answer to one request line; ``ValueError`` for a bad request."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not a JSON request ({err.msg} at column {err.colno})") from None
    if not isinstance(req, dict):
        raise ValueError("a request is a JSON object with an op")
    op = req.get("op")
    if op == "generate":
        ids = _ids(req.get("ids"), engine.n_vocab, "ids")
        n, repeats = req.get("max_new_tokens"), req.get("repeats", 1)
        if not ids:
            raise ValueError("ids is empty: give at least one token id to pre-fill")
        if not isinstance(n, int) or n < 1 or not isinstance(repeats, int) or repeats < 1:
            raise ValueError("max_new_tokens and repeats must be integers of at least 1")
        if len(ids) + n > engine.n_ctx:
            raise ValueError(f"{len(ids)} ids + {n} new tokens exceed this context's {engine.n_ctx} positions")
        return engine.generate(ids, n, set(_ids(req.get("stops", []), engine.n_vocab, "stops")), repeats)
    if op == "tokenize":
        if not isinstance(req.get("text"), str):
            raise ValueError("tokenize needs a text string")
        return {"ids": engine.tokenize(req["text"])}
    if op == "reset_peak":
        return {"reset": reset_peak(), **memory()}
    if op == "memory":
        return memory()
    raise ValueError(f"unknown op {op!r}; use generate, tokenize, reset_peak or memory")


_OUT = sys.stdout  # the protocol's stream; main() points file descriptor 1 at stderr


def _send(obj: dict) -> None:
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def main(argv: list[str] | None = None) -> int:
    """``python llamacpp_child.py GGUF N_CTX THREADS``: llama.cpp greedy decoding on token ids,
    JSON lines on stdin/stdout."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or not all(a.isdigit() for a in argv[1:]):
        print("usage: python llamacpp_child.py GGUF N_CTX THREADS", file=sys.stderr)
        return 2
    gguf, n_ctx, threads = argv[0], int(argv[1]), int(argv[2])
    global _OUT
    # llama.cpp's C code may print to file descriptor 1: keep the protocol on a copy of it
    _OUT = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if not os.path.isfile(gguf):
        _send({"error": f"{gguf}: no such GGUF file"})
        return 2
    if n_ctx < 1 or threads < 1:
        _send({"error": "N_CTX and THREADS must be at least 1"})
        return 2
    try:
        engine = Engine(gguf, n_ctx, threads)
    except ImportError as err:
        _send({"error": f"llama_cpp does not import here ({_one_line(err)}); make the environment with "
                        "bash scripts/llamacpp_env.sh"})
        return 2
    except Exception as err:  # llama.cpp refused the file
        _send({"error": f"llama.cpp cannot load {gguf}: {_one_line(err)}"})
        return 2
    _send(engine.info())
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            _send(handle(engine, line))
        except ValueError as err:
            _send({"error": " ".join(str(err).split())})
        except Exception as err:  # llama.cpp failed on a valid request: said, and the child goes on
            _send({"error": f"llama.cpp failed: {_one_line(err)}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
