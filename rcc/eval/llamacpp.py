"""The ``llamacpp`` baseline: what a CPU user would run instead of RCC, llama.cpp
(through llama-cpp-python) on the decoder backbone's own GGUF file, uncompressed.

llama-cpp-python compiles llama.cpp, so it lives in an environment of its own
(``scripts/llamacpp_env.sh`` builds ``.venv-llamacpp`` from the PyPI source)
and runs there as a child process, :mod:`rcc.eval.llamacpp_child`, which
answers JSON lines. What crosses over is token ids: every sample is laid out
by :class:`~rcc.eval.baselines.FullContext` (the ``full`` baseline) with the
parent's tokenizer, the same prompts and the same cut in the middle to the
decoder's positions, and llama.cpp pre-fills those ids and decodes greedily;
the parent decodes the ids it sends back. Before the first sample the child's
tokenizer (the GGUF's vocabulary) is checked against the parent's on a sample
text: the same ids, or the baseline is skipped with the first difference.

For the bundled model and ``embedded:smollm2`` the GGUF is
:func:`rcc.backbones.embedded_smollm2_file` (SmolLM2-135M-Instruct, Q4_1):
llama.cpp computes with the stored 4-bit weights, while ``full`` runs them
dequantised, so the two may differ in a token now and then. Another decoder
has no GGUF to run, and the baseline is skipped with that reason.

The child's interpreter: ``--llamacpp-python``, else ``$RCC_LLAMACPP_PYTHON``,
else ``.venv-llamacpp/bin/python`` beside this package's source tree, else this
interpreter when it has llama_cpp.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rcc.errors import RCCError
from rcc.eval.baselines import FullContext, max_positions

log = logging.getLogger(__name__)

NAME = "llamacpp"
ENV_VAR = "RCC_LLAMACPP_PYTHON"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the rcc package
CHILD = Path(__file__).resolve().with_name("llamacpp_child.py")
# what the tokenizers are compared on: the chat markers, the pass-key filler, digits, code, other scripts
TOKENIZER_SAMPLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
                    "The pass key is 68215. Remember it. 68215 is the pass key.\n\n"
                    "def f(x):\n    return x ** 2  # squares\n\tTabs,  double  spaces,\r\nCRLF; "
                    "naïve café, Straße, Ελληνικά, русский, 日本語, 😀 emoji.<|im_end|>\n<|im_start|>assistant\n")


def find_python(explicit: str | None = None) -> tuple[str | None, str]:
    """The interpreter of llama-cpp-python's environment: ``(path, "")`` or ``(None, why none)``.

    Raises:
        RCCError: when ``explicit`` or ``$RCC_LLAMACPP_PYTHON`` names no executable.
    """
    for source, path in (("--llamacpp-python", explicit), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if path:
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise RCCError(f"{source} {path}: no such executable; make the environment with "
                               "bash scripts/llamacpp_env.sh and give its bin/python")
            return path, ""
    local = SOURCE_ROOT / ".venv-llamacpp" / "bin" / "python"
    if local.is_file():
        return str(local), ""
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable, ""
    return None, (f"no llama-cpp-python environment (make it with bash scripts/llamacpp_env.sh, or give one "
                  f"with --llamacpp-python / ${ENV_VAR})")


def gguf_of(model) -> tuple[Path | None, str]:
    """The GGUF file of ``model``'s decoder backbone: ``(path, "")`` or ``(None, why none)``."""
    from rcc.backbones import EMBEDDED, embedded_smollm2_file

    source = getattr(model.config, "decoder_source", None)
    if source != EMBEDDED:
        return None, (f"llama.cpp runs a GGUF file, and this model's decoder ({source or 'no source recorded'}) "
                      f"has none; the baseline runs models over {EMBEDDED} (the bundled model's backbone)")
    return embedded_smollm2_file(), ""


class LlamaCppChild:
    """llama.cpp in its own environment: one :mod:`~rcc.eval.llamacpp_child` process.

    Args:
        python: the environment's interpreter.
        gguf: the model file.
        n_ctx: context positions (pre-fill + new tokens must fit).
        threads: llama.cpp's threads (pre-fill and decode).
        env: extra environment variables for the child.
    Raises:
        RCCError: with the child's one-line reason when it does not start.
    """

    def __init__(self, python: str, gguf: str | Path, n_ctx: int, threads: int, env: dict | None = None):
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: llama.cpp's logs cannot block it
        self.proc = subprocess.Popen([python, str(CHILD), str(gguf), str(n_ctx), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env={**os.environ, **(env or {})})
        try:
            self.info = self._read()
        except RCCError:
            self.close()
            raise
        if "error" in self.info:
            self.close()
            raise RCCError(f"llama.cpp child: {self.info['error']}")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            tail = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()]
            raise RCCError(f"the llama.cpp child ({self.proc.args[0]}) exited with status {self.proc.returncode}: "
                           f"{tail[-1] if tail else 'no output'}")
        return json.loads(line)

    def request(self, op: str, **fields) -> dict:
        """One request (see :mod:`rcc.eval.llamacpp_child`); the answer.

        Raises:
            RCCError: when the child refuses it (its one-line reason) or has died.
        """
        if self.proc.poll() is not None:
            raise RCCError(f"the llama.cpp child has exited (status {self.proc.returncode})")
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if "error" in out:
            raise RCCError(f"llama.cpp child: {out['error']}")
        return out

    def close(self) -> None:
        """End the child (end of input, then a kill if it does not exit)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self) -> LlamaCppChild:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tokenizer_check(child: LlamaCppChild, tokenizer, text: str = TOKENIZER_SAMPLE) -> dict:
    """Tokenise ``text`` with the parent's tokenizer and llama.cpp's: ``{"agrees", "tokens", "first_difference"}``."""
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    theirs = child.request("tokenize", text=text)["ids"]
    diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if diff is None and len(ours) != len(theirs):
        diff = min(len(ours), len(theirs))
    return {"agrees": diff is None, "tokens": len(ours), "first_difference": None if diff is None else {
        "index": diff, "ours": ours[diff:diff + 5], "llamacpp": theirs[diff:diff + 5]}}


class LlamaCppMethod(FullContext):
    """``llamacpp``: :class:`FullContext`'s samples, prompts and cut, run by llama.cpp
    on the GGUF (greedy). Start it with :meth:`start`; :meth:`close` ends the child.

    Args:
        decoder, tokenizer: the RCC model's decoder (its positions set the cut and
            llama.cpp's context size) and tokenizer.
        child: the running :class:`LlamaCppChild`.
    """

    name = NAME

    def __init__(self, decoder, tokenizer, child: LlamaCppChild, details: dict | None = None):
        super().__init__(decoder, tokenizer)  # full's limit: the decoder's positions (llama.cpp's n_ctx holds them)
        self.child = child
        self.details = details or {}

    @classmethod
    def start(cls, model, python: str | None = None, threads: int | None = None) -> tuple[LlamaCppMethod | None, str]:
        """The method over ``model``'s decoder, its child started and its tokenizer
        checked: ``(method, "")`` or ``(None, why it cannot run)``."""
        python, why = find_python(python)
        if python is None:
            return None, why
        gguf, why = gguf_of(model)
        if gguf is None:
            return None, why
        limit = max_positions(model.decoder)
        if limit is None:
            return None, "the decoder records no maximum positions to size llama.cpp's context with"
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        # llama.cpp's OpenMP threads spin while they wait for each other; on a busy CPU a
        # preempted one stalls the rest (at load 16 here a 2-thread decode ran at 0.3 tokens/s
        # spinning, 37 waiting passively).
        # Waiting passively changes when threads run, not what they compute: the answers are the same.
        env = {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "passive"}
        try:
            child = LlamaCppChild(python, gguf, limit, threads, env=env)
        except RCCError as err:
            return None, str(err)
        details = {"python": python, "gguf": str(gguf), "env": env, **{k: child.info.get(k) for k in (
            "versions", "n_ctx", "n_ctx_train", "n_batch", "n_ubatch", "threads", "flash_attn", "system_info")}}
        try:
            check = tokenizer_check(child, model.tokenizer)
        except RCCError as err:
            child.close()
            return None, str(err)
        details["tokenizer_check"] = check
        if child.info["n_ctx"] < limit:
            child.close()
            return None, f"llama.cpp gave a context of {child.info['n_ctx']} positions, not the decoder's {limit}"
        if not check["agrees"]:
            child.close()
            d = check["first_difference"]
            return None, (f"llama.cpp's tokenizer of {gguf.name} differs from the model's at token {d['index']} "
                          f"({d['llamacpp']} against {d['ours']}): the GGUF is not this decoder's")
        if child.info["n_vocab"] != model.decoder.config.vocab_size:
            child.close()
            return None, (f"{gguf.name} has {child.info['n_vocab']} tokens, the decoder "
                          f"{model.decoder.config.vocab_size}: not the same model")
        return cls(model.decoder, model.tokenizer, child, details), ""

    def generate(self, ids: list[int], max_new_tokens: int, stops: set[int] = frozenset()) -> tuple[list[int], dict]:
        out = self.child.request("generate", ids=list(ids), max_new_tokens=max_new_tokens, stops=sorted(stops))
        return out["token_ids"], {"prefill_tokens": out["prefill_tokens"], "prefill_s": out["prefill_s"],
                                  "decode_tok_s": out["decode_tok_s"]}

    def close(self) -> None:
        self.child.close()

