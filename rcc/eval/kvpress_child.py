"""The kvpress side of the ``kvpress:<press>@<ratio>`` baselines. It runs in the
environment that has kvpress (``scripts/kvpress_env.sh``) as
``python -m rcc.eval.kvpress_child REQUEST.json RESULT.json``, started by
:mod:`rcc.eval.kvpress`; nothing else imports kvpress.

The request (JSON):

- ``decoder``: a ``save_pretrained`` folder the parent wrote: its decoder's
  backbone (LoRA adapters bypassed), loaded here with ``dtype`` on ``device``;
- ``presses``: ``[{"name", "press", "ratio"}]`` (``press`` a kvpress class or
  its short name: ``snapkv``, ``expected_attention``, ``knorm``, ``streaming_llm``...);
- ``items``: ``[{"key", "prefill", "post", "budgets", "stops", "max_new_tokens"}]``:
  token ids laid out by the parent with its own tokenizer. ``prefill`` (the
  context, with the chat header for chat prompts) is pre-filled under the press,
  which prunes every layer's cache to ``budgets[press name]`` positions;
  ``post`` (the question or the continuation cue) is then decoded greedily at
  positions that continue the original text, as kvpress's own pipeline does.

The result (JSON): ``versions``, and per press name either ``{"error": one line}``
or ``{"items": {key: {"token_ids", "kv_positions", "prefill_tokens", "seconds"}}}``
where ``kv_positions`` is the cache length every layer kept (measured, not assumed).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def press_class(kvpress, name: str):
    """The press class ``name`` means: a class name (``SnapKVPress``) or its short,
    case-insensitive form (``snapkv``, ``expected_attention``, ``streaming-llm``).

    Returns:
        ``(class, None)`` or ``(None, why not)``.
    """
    def key(text: str) -> str:
        k = text.lower().replace("_", "").replace("-", "")
        return k[:-5] if k.endswith("press") else k

    table = {key(n): getattr(kvpress, n) for n in dir(kvpress)
             if n.endswith("Press") and isinstance(getattr(kvpress, n), type)}
    cls = table.get(key(name))
    if cls is None:
        return None, f"kvpress has no press {name!r} (it has: {', '.join(sorted(table))})"
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if "compression_ratio" not in fields:
        return None, (f"{cls.__name__} takes no compression_ratio (it wraps or configures other presses); "
                      "use a scoring press such as snapkv, expected_attention, knorm or streaming_llm")
    needs = [n for n, f in fields.items() if n != "compression_ratio" and f.default is dataclasses.MISSING
             and f.default_factory is dataclasses.MISSING]
    if needs:
        return None, f"{cls.__name__} needs arguments this harness does not set ({', '.join(needs)})"
    return cls, None


def compression_ratio(prefill_tokens: int, budget: int) -> float:
    """The kvpress ``compression_ratio`` (fraction removed) that keeps ``budget`` of
    ``prefill_tokens`` positions: kvpress keeps ``int(n * (1 - ratio))``, so aim
    half a position above ``budget`` to land on it exactly."""
    if budget >= prefill_tokens:
        return 0.0
    return 1.0 - (budget + 0.5) / prefill_tokens


@torch.no_grad()
def run_item(model, press, item: dict, budget: int) -> dict:
    """Pre-fill ``item["prefill"]`` under ``press`` (a context manager factory,
    ``with press(model): ...``), then decode ``item["post"]`` greedily.

    Returns:
        ``{"token_ids", "kv_positions", "prefill_tokens", "seconds"}``;
        ``kv_positions`` is the longest layer's cache after the pre-fill.
    """
    from transformers import DynamicCache

    from ..hooks import cache_kwarg
    from .baselines import greedy

    t = time.perf_counter()
    device = next(model.parameters()).device
    prefill = list(item["prefill"])
    cache = DynamicCache()
    with press(model):
        model(input_ids=torch.tensor([prefill], device=device), use_cache=True, logits_to_keep=1,
              **{cache_kwarg(model): cache})
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    ids = greedy(model, list(item["post"]), int(item["max_new_tokens"]), set(item.get("stops", ())), cache=cache,
                 start=len(prefill))
    return {"token_ids": ids, "kv_positions": max(kept), "kv_positions_min": min(kept),
            "prefill_tokens": len(prefill), "budget": budget, "seconds": round(time.perf_counter() - t, 4)}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m rcc.eval.kvpress_child REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    import importlib.metadata as md

    import transformers
    from transformers import AutoModelForCausalLM

    from ..io import write_json

    transformers.utils.logging.disable_progress_bar()
    result: dict = {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                 "transformers": transformers.__version__}, "presses": {}}
    try:
        import kvpress
    except Exception as err:  # not installed, or does not import with this transformers
        result["error"] = f"kvpress does not import here ({_one_line(err)})"
        write_json(argv[1], result)
        return 0
    result["versions"]["kvpress"] = md.version("kvpress")
    model = AutoModelForCausalLM.from_pretrained(request["decoder"], dtype=getattr(torch, request["dtype"]))
    model = model.to(request["device"]).eval()
    items = request["items"]
    for spec in request["presses"]:
        name = spec["name"]
        cls, why = press_class(kvpress, spec["press"])
        if cls is None:
            result["presses"][name] = {"error": why}
            continue
        done = {}
        try:
            for k, item in enumerate(items, 1):
                budget = int(item["budgets"][name])
                press = cls(compression_ratio=compression_ratio(len(item["prefill"]), budget))
                out = run_item(model, press, item, budget)
                done[item["key"]] = out
                print(f"{name} [{k}/{len(items)}] {item['key']}: {out['prefill_tokens']} -> {out['kv_positions']} "
                      f"KV positions ({out['seconds']:.1f} s)", file=sys.stderr, flush=True)
        except Exception as err:  # a press that fails on this model: reported, the others still run
            result["presses"][name] = {"error": f"{cls.__name__} failed on {type(model).__name__}: {_one_line(err)}"}
            continue
        result["presses"][name] = {"press_class": cls.__name__, "items": done}
    write_json(argv[1], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
