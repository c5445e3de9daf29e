"""The kvpress baselines (``kvpress:<press>@<ratio>``): presses of NVIDIA's
kvpress on the decoder's backbone, on the same samples as RCC, keeping
``ceil(n / ratio)`` KV positions of an ``n``-token context (``@16`` keeps 1/16;
without ``@`` the RCC model's own ratio, RCC's slot budget).

kvpress 0.5.5 declares ``transformers<5.3`` and this package runs newer ones,
so kvpress lives in an environment of its own (``scripts/kvpress_env.sh`` makes
``.venv-kvpress``) and runs there as a child process
(:mod:`rcc.eval.kvpress_child`). What crosses over is exact: the parent writes
its decoder's backbone (adapters bypassed: for the bundled model the plain
SmolLM2 of the GGUF) as a ``save_pretrained`` folder, and lays out every
sample as token ids with its own tokenizer, the same layout as the ``full``
baseline (cut in the middle to the decoder's positions when longer); the
child sends back the generated ids and the KV positions each layer kept, and
the parent decodes them. All presses and samples of one evaluation share one
child process.

The child's interpreter: ``--kvpress-python``, else ``$RCC_KVPRESS_PYTHON``,
else ``.venv-kvpress/bin/python`` beside this package's source tree, else this
interpreter when it has kvpress. Without one, or when a press cannot run, the
press is reported as skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rcc.errors import RCCError

ENV_VAR = "RCC_KVPRESS_PYTHON"
DEFAULT_PRESSES = ("snapkv", "expected_attention")  # what --baseline runs
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the rcc package
_SPEC = re.compile(r"^kvpress(?::([A-Za-z][A-Za-z0-9_-]*))?(?:@([0-9]*\.?[0-9]+))?$")


@dataclass(frozen=True)
class PressSpec:
    """One ``kvpress:<press>@<ratio>`` baseline.

    Attributes:
        press: the kvpress press, short (``snapkv``) or class name (``SnapKVPress``).
        ratio: context tokens per kept KV position (None: the RCC model's ratio).
    """

    press: str
    ratio: float | None = None

    def name(self, default_ratio: float) -> str:
        return f"kvpress:{self.press}@{self.ratio_or(default_ratio):g}"

    def ratio_or(self, default_ratio: float) -> float:
        return float(self.ratio if self.ratio is not None else default_ratio)


def parse_spec(text: str) -> PressSpec:
    """``kvpress``, ``kvpress:snapkv`` or ``kvpress:snapkv@16``.

    Raises:
        RCCError: on another form or a ratio not above 1.
    """
    m = _SPEC.match(text.strip())
    if not m:
        raise RCCError(f"bad kvpress baseline {text!r}: write kvpress:PRESS@RATIO, e.g. kvpress:snapkv@16 "
                       "(PRESS a kvpress press such as snapkv, expected_attention, knorm, streaming_llm)")
    ratio = float(m.group(2)) if m.group(2) else None
    if ratio is not None and ratio <= 1:
        raise RCCError(f"{text}: the ratio (context tokens per kept KV position) must be above 1, e.g. @16")
    return PressSpec(m.group(1) or DEFAULT_PRESSES[0], ratio)


def budget(context_tokens: int, ratio: float) -> int:
    """KV positions a press keeps for a context of ``context_tokens``: ``ceil(n / ratio)``, at least 1."""
    return max(1, math.ceil(context_tokens / ratio))


def _importable() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def find_python(explicit: str | None = None) -> tuple[str | None, str]:
    """The interpreter of kvpress's environment: ``(path, "")`` or ``(None, why none)``."""
    for source, path in (("--kvpress-python", explicit), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if path:
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise RCCError(f"{source} {path}: no such executable; make the environment with "
                               "bash scripts/kvpress_env.sh and give its bin/python")
            return path, ""
    local = SOURCE_ROOT / ".venv-kvpress" / "bin" / "python"
    if local.is_file():
        return str(local), ""
    if _importable():
        return sys.executable, ""
    return None, (f"no kvpress environment (make it with bash scripts/kvpress_env.sh, or give one with "
                  f"--kvpress-python / ${ENV_VAR}); kvpress 0.5.5 needs transformers<5.3, so it cannot share this one")


def save_backbone(decoder, folder: str | Path) -> Path:
    """Write ``decoder``'s backbone (LoRA adapters left out, weights shared, not
    copied) as a transformers ``save_pretrained`` folder any transformers 5 loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rcc.adapters import base_state

    cfg = decoder.config.to_dict()
    for key in ("quantization_config", "transformers_version", "_name_or_path"):  # the GGUF's, not ours
        cfg.pop(key, None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):  # no weights allocated: the decoder's own tensors are assigned
        clean = AutoModelForCausalLM.from_config(config, dtype=decoder.dtype)
    clean.load_state_dict(base_state(decoder), assign=True, strict=True)
    clean.save_pretrained(str(folder))
    return Path(folder)


class KVPressBaselines:
    """All ``kvpress:*`` baselines of one evaluation, run together in one child process.

    Args:
        decoder, tokenizer: the RCC model's decoder and tokenizer.
        specs: the parsed baselines.
        default_ratio: the ratio of a spec without ``@`` (the RCC model's).
        python: the child's interpreter (None: :func:`find_python`).
    """

    def __init__(self, decoder, tokenizer, specs: list[PressSpec], default_ratio: float, python: str | None = None):
        from rcc.eval.baselines import FullContext

        self.decoder, self.tokenizer = decoder, tokenizer
        self.specs = list(specs)
        self.default_ratio = default_ratio
        self.names = [s.name(default_ratio) for s in self.specs]
        self.python, self.why_not = find_python(python)
        self.layout = FullContext(decoder, tokenizer)  # the same reading as `full`: cut in the middle if too long
        self.details: dict = {}

    def item(self, key: str, pre: list[int], context_ids: list[int], post: list[int], max_new_tokens: int,
             stops: set[int]) -> tuple[dict, dict]:
        """One sample laid out for the child: ``(item, info)``; the press pre-fills
        ``pre + context`` and keeps ``ceil(len(context_ids) / ratio)`` positions of it."""
        ctx, info = self.layout.select(list(context_ids), self.layout._room(len(pre) + len(post), max_new_tokens))
        prefill = list(pre) + ctx
        budgets = {name: min(len(prefill), budget(len(context_ids), s.ratio_or(self.default_ratio)))
                   for name, s in zip(self.names, self.specs)}
        return ({"key": key, "prefill": prefill, "post": list(post), "budgets": budgets, "stops": sorted(stops),
                 "max_new_tokens": max_new_tokens}, info)

    def items(self, examples: list, prompts: list[str], max_new_tokens: int) -> tuple[list[dict], dict]:
        """Every (sample, prompt) laid out for the child as ``full`` lays it out
        (:class:`~rcc.eval.baselines.FullContext`); ``layout[key]`` says how to
        read its answer back: ``(example index, prompt or None, info)``."""
        from rcc.prompts import ASSISTANT, HEADER
        from rcc.eval.baselines import encode_text, continuation_prompt, stop_ids

        tok = self.tokenizer
        items, layout = [], {}
        for i, ex in enumerate(examples):
            if not ex.is_question:  # a continuation sample: context ids, then the cue ids
                item, info = self.item(ex.id, [], ex.context_ids, ex.prompt_ids, len(ex.target_ids), set())
                items.append(item)
                layout[ex.id] = (i, None, info)
                continue
            ctx = encode_text(tok, ex.context)
            for prompt in prompts:
                key = f"{ex.id}/{prompt}"
                if prompt == "chat":
                    post = encode_text(tok, "\n\n" + ex.question + ASSISTANT)
                    item, info = self.item(key, encode_text(tok, HEADER), ctx, post, max_new_tokens, stop_ids(tok))
                else:
                    post = continuation_prompt(tok, ex.context, ex.continuation)[1]
                    item, info = self.item(key, [], ctx, post, max_new_tokens, set())
                items.append(item)
                layout[key] = (i, prompt, info)
        return items, layout

    def prediction(self, prompt: str | None, out: dict, info: dict):
        """The :class:`~rcc.eval.task.Prediction` of the child's output for one item."""
        from rcc.eval.baselines import answer_text, continuation_answer
        from rcc.eval.task import Prediction

        ids, tok = out["token_ids"], self.tokenizer
        if prompt == "chat":
            text = answer_text(tok, ids)
        elif prompt == "continuation":
            text = continuation_answer(tok.decode(ids), tok.eos_token)
        else:
            text = tok.decode(ids)
        kept = {k: out[k] for k in ("kv_positions", "kv_positions_min", "budget", "prefill_tokens", "shared_prefill")}
        return Prediction(text, ids, {**info, **kept})

    def run(self, items: list[dict], progress: Callable[[str], None] | None = None,
            separate: bool = False) -> tuple[dict, dict]:
        """Run every press on every item in the child (one pre-fill per item for
        all presses; ``separate``: one per press, see
        :func:`rcc.eval.kvpress_child.run_presses`).

        Returns:
            ``(outputs, skipped)``: ``outputs[name][key]`` is the child's record
            of an item (``token_ids``, ``kv_positions``, ...); ``skipped[name]``
            the one-line reason a press did not run.
        """
        if not self.names:
            return {}, {}
        if self.python is None:
            return {}, {name: self.why_not for name in self.names}
        import torch

        with tempfile.TemporaryDirectory(prefix="rcc-kvpress-") as tmp:
            save_backbone(self.decoder, Path(tmp) / "decoder")
            request = {"decoder": str(Path(tmp) / "decoder"), "dtype": str(self.decoder.dtype).replace("torch.", ""),
                       "device": str(next(self.decoder.parameters()).device), "items": items, "separate": separate,
                       "presses": [{"name": n, "press": s.press, "ratio": s.ratio_or(self.default_ratio)}
                                   for n, s in zip(self.names, self.specs)]}
            req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
            req.write_text(json.dumps(request))
            del request
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            tail = self._child(req, out, progress)
            if not out.is_file():
                last = tail[-1] if tail else "no output"
                why = f"the kvpress child ({self.python}) failed: {last}"
                return {}, {name: why for name in self.names}
            result = json.loads(out.read_text())
        self.details = {"python": self.python, "versions": result.get("versions", {})}
        if "error" in result:
            return {}, {name: result["error"] for name in self.names}
        outputs, skipped = {}, {}
        for name in self.names:
            got = result["presses"].get(name, {"error": "the child returned nothing for it"})
            if "error" in got:
                skipped[name] = got["error"]
            else:
                outputs[name] = got["items"]
                self.details.setdefault("press_classes", {})[name] = got.get("press_class")
        return outputs, skipped

    def _child(self, request: Path, result: Path, progress: Callable[[str], None] | None) -> list[str]:
        """Run the child; stream its stderr lines to ``progress``; return the last ones."""
        env = dict(os.environ)
        # the child imports this very source tree, whatever rcc its environment has installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("HF_HUB_OFFLINE", "1")
        proc = subprocess.Popen([self.python, "-m", "rcc.eval.kvpress_child", str(request), str(result)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=env)
        tail: list[str] = []
        for line in proc.stderr:
            line = line.rstrip()
            if not line:
                continue
            tail = (tail + [line])[-20:]
            if progress is not None and line.startswith("kvpress ["):
                progress(line)
        proc.wait()
        if proc.returncode != 0:
            result.unlink(missing_ok=True)
        return tail
