"""lm-evaluation-harness on RCC: any lm-eval task, its context compressed (``rcc lm-eval``).

Registers the model ``rcc`` with lm-eval (``lm_eval.api.registry``). lm-eval 0.4 finds
models only in its own registry (no entry points), so its ``lm_eval`` command knows
``rcc`` only once this module is imported; run it through this module, which imports
it and hands the rest of the command line to lm-eval's own CLI::

    rcc lm-eval --model rcc --model_args model=rcc-smollm2-135m,prompt_tokens=32 --tasks TASK
    python -m rcc.eval.harness --model rcc --model_args model=embedded:smollm2,window=512,ratio=16 --tasks TASK

or, in Python, ``import rcc.eval.harness`` before ``lm_eval.simple_evaluate(model="rcc", ...)``
(or pass ``model=RCCLM(model=an_rcc_model)``).

How a request is split (every request type):

- the **prompt** the decoder reads as raw tokens: the text from the last occurrence of
  ``split`` (e.g. ``split=Question:``) when the context holds it, else the context's last
  ``prompt_tokens`` tokens (default 32; at least one, so that the decoder's first
  prediction comes from a token as in the tasks' own prompts);
- the **memory**: everything before it, compressed into slots (docs/method.md section 4); a context
  with nothing before its prompt (one token, or empty) compresses the end-of-text token.

``loglikelihood`` scores the continuation with the decoder after memory + prompt (one
compression per distinct memory, its continuations scored in batches of ``batch_size``);
``generate_until`` calls :meth:`rcc.RCCModel.generate` and cuts the text at the first
``until`` string; ``loglikelihood_rolling`` scores a text window by window, each window
of ``config.window`` tokens read raw after the slots of all windows before it (the
memory grows by one compressed window per step, :meth:`~rcc.RCCModel.compress` with
``prefix``), its first token predicted from the token before it.
"""

from __future__ import annotations

import codecs
import logging
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from rcc import adapters
from rcc.errors import RCCError

log = logging.getLogger(__name__)


@register_model("rcc")
class RCCLM(TemplateLM):
    """An :class:`~rcc.RCCModel` as an lm-eval model (``--model rcc``).

    Args:
        model: a loaded :class:`~rcc.RCCModel`, or what ``rcc --model`` takes (the bundled
            model, a checkpoint, ``embedded:smollm2``, a backbone for a fresh model ...).
        base_model: the released layout's base model (as ``--base-model``).
        window, ratio: of a fresh model (a checkpoint keeps its own).
        device, dtype: as ``rcc --device / --dtype`` (default: cuda if here; bfloat16 on GPU).
        batch_size: continuations scored per decoder pass (``"auto"``: 8).
        split: the text that starts the prompt (its last occurrence; ``\\n`` escapes allowed).
        prompt_tokens: the prompt's length in tokens when ``split`` is unset or absent.
        window_batch_size: windows encoded per step while compressing.
        max_gen_toks: default generation budget of ``generate_until``.
        max_batch_size: accepted from lm-eval's CLI, unused.
    Raises:
        RCCError: on an unknown option or a bad value.
    """

    def __init__(self, model="rcc-smollm2-135m", base_model: str | None = None, window: int | None = None,
                 ratio: int | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str | None = 1, split: str | None = None, prompt_tokens: int = 32,
                 window_batch_size: int = 8, max_gen_toks: int = 256, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise RCCError(f"--model_args: unknown option(s) {', '.join(sorted(unknown))} for --model rcc; use model, "
                           "base_model, window, ratio, device, dtype, batch_size, split, prompt_tokens, "
                           "window_batch_size, max_gen_toks")
        if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
            raise RCCError(f"prompt_tokens={prompt_tokens!r}: must be a whole number >= 1")
        if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise RCCError(f"max_gen_toks={max_gen_toks!r}: must be a whole number >= 1")
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise RCCError(f"batch_size={batch_size!r}: must be at least 1")
        self.split = codecs.decode(str(split), "unicode_escape") if split not in (None, "") else None
        self.prompt_tokens, self.window_batch_size, self.max_gen_toks = prompt_tokens, window_batch_size, max_gen_toks
        if isinstance(model, torch.nn.Module):
            self.model, self.name = model.eval(), type(model).__name__
        else:
            from rcc.config import RCCConfig
            from rcc.loading import load_model, resolve_device, resolve_dtype

            dev = resolve_device(device or "auto")
            self.model = load_model(str(model), base_model=base_model, dtype=resolve_dtype(str(dtype), dev), device=dev,
                                    window=int(window or RCCConfig.window), ratio=int(ratio or RCCConfig.ratio))
            self.name = str(model)
            if not self.model.config.trained:
                log.warning("%s is an UNTRAINED RCC model (fresh G and A_i): its scores measure nothing", model)
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise RCCError(f"{self.name} has no tokenizer; lm-eval tasks are text (give a model with one, or base_model)")
        self._warned_split, self._empty = False, None

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "RCCLM":
        """lm-eval's way in: ``--model_args`` as a dict, plus its own ``--batch_size`` and
        ``--device``; the model's arguments win (lm-eval's CLI gives ``device="cuda:0"`` unless
        told otherwise, dropped here when no GPU is present: the device is then ``auto``)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            log.warning("lm-eval's device %s is not here; using the CPU", extra.pop("device"))
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "RCCLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.model.decoder.config.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", self.name)).replace("/", "__")

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the tokenizer's own chat template (SmolLM2's ChatML for the
        bundled model); with ``split`` unset the template's tail is what the decoder reads raw."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RCCError(f"{self.name}'s tokenizer has no chat template; drop --apply_chat_template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def split_request(self, context: str, continuation: str | None = None
                      ) -> tuple[list[int], list[int], list[int]]:
        """``(memory ids, prompt ids, continuation ids)`` of one request (see the module doc);
        the continuation is tokenized with the prompt, as lm-eval does for causal models."""
        cont: list[int] = []
        at = context.rfind(self.split) if self.split else -1
        if self.split and at <= 0 and not self._warned_split:
            log.warning("split %r not found before the end of a context: its last %d tokens are the prompt",
                        self.split, self.prompt_tokens)
            self._warned_split = True
        head, tail = (context[:at], context[at:]) if at > 0 else ("", context)
        if not tail:  # an empty context: lm-eval's convention, the end-of-text token
            ids = [self.prefix_token_id]
            cont = self.tok_encode(continuation) if continuation else []
        elif continuation is not None:
            ids, cont = self._encode_pair(tail, continuation)
        else:
            ids = self.tok_encode(tail)
        if head:
            return self.tok_encode(head), ids, cont
        keep = max(1, min(self.prompt_tokens, len(ids) - 1))
        memory = ids[: len(ids) - keep] or [self.prefix_token_id]
        return memory, ids[len(ids) - keep:], cont

    # ------------------------------------------------------------ scoring
    def _compress(self, ids: list[int], prefix=None):
        return self.model.compress(torch.tensor([ids]), window_batch_size=self.window_batch_size, prefix=prefix)

    @torch.no_grad()
    def score(self, memory, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after ``memory`` and its prompt, and whether
        it is the greedy one, for ``rows`` of ``(prompt ids, continuation ids)`` (one
        decoder pass over a batch right-padded after its slots)."""
        model = self.model
        seqs = [p + c[:-1] for p, c in rows]
        n = max(len(s) for s in seqs)
        model.check_positions(memory.num_slots + n)
        x = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), memory.num_slots + n, dtype=torch.long)
        mask[:, : memory.num_slots] = 1
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
            mask[i, memory.num_slots : memory.num_slots + len(s)] = 1
        cache = memory.cache(len(rows), model.device, model.dtype)
        with adapters.fast_inference(model.decoder):
            logits = model.decoder(input_ids=x.to(model.device), attention_mask=mask.to(model.device), use_cache=True,
                                   **{model._cache_kw: cache}).logits
        out = []
        for i, (p, c) in enumerate(rows):
            lp = F.log_softmax(logits[i, len(p) - 1 : len(p) - 1 + len(c)].float(), dim=-1)
            target = torch.tensor(c, device=lp.device)
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._loglikelihood_tokens([(r.args, *self.split_request(*r.args)) for r in requests], disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``(key, memory ids, prompt ids, continuation ids)``; one compression
        per distinct memory."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, memory, _, _) in enumerate(requests):
            groups[tuple(memory)].append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="rcc loglikelihood", disable=disable_tqdm or self.rank != 0)
        for memory_ids, members in groups.items():
            memory = self._compress(list(memory_ids))
            for s in range(0, len(members), self.batch_size):
                batch = members[s : s + self.batch_size]
                for i, res in zip(batch, self.score(memory, [(requests[i][2], requests[i][3]) for i in batch])):
                    results[i] = res
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
                bar.update(len(batch))
        bar.close()
        return results

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        W = self.model.config.window
        out = []
        for req in tqdm(requests, desc="rcc loglikelihood_rolling", disable=disable_tqdm or self.rank != 0):
            (text,) = req.args
            ids = self.tok_encode(text)
            total, memory = 0.0, None
            for start in range(0, len(ids), W):
                chunk = ids[start : start + W]
                before = [self.prefix_token_id] if start == 0 else ids[start - 1 : start]
                if memory is None and self._empty is None:  # the first window reads the end-of-text token
                    self._empty = self._compress([self.prefix_token_id])
                total += self.score(self._empty if memory is None else memory, [(before, chunk)])[0][0]
                if start + W < len(ids):  # the next window reads this one compressed
                    memory = self._compress(chunk, prefix=memory)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # ---------------------------------------------------------- generate
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out, memories = [], {}
        for req in tqdm(requests, desc="rcc generate_until", disable=disable_tqdm or self.rank != 0):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if not kwargs.get("do_sample") or kwargs.get("temperature") == 0.0:
                for k in ("do_sample", "temperature", "top_p", "top_k"):
                    kwargs.pop(k, None)
            memory_ids, prompt, _ = self.split_request(context)
            key = tuple(memory_ids)
            if key not in memories:
                memories = {key: self._compress(memory_ids)}  # consecutive requests often share a context
            if until:
                kwargs["stop_strings"] = until
            ids = self.model.generate(memories[key], torch.tensor([prompt]), max_new_tokens=max_new,
                                      eos_token_id=self.eot_token_id, **kwargs)
            text = self.tok_decode(ids[0].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def main(argv: list[str] | None = None) -> int:
    """``lm_eval``'s command line with ``--model rcc`` registered (``python -m rcc.eval.harness ...``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except RCCError as err:
        print(f"rcc: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
