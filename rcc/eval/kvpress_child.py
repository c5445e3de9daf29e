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
  context, with the chat header for chat prompts) is pre-filled once; each press
  prunes its own copy of every layer's cache to ``budgets[press name]``
  positions (:func:`run_presses`); ``post`` (the question or the continuation
  cue) is then decoded greedily from each press's cache at positions that
  continue the original text, as kvpress's own pipeline does;
- ``separate`` (optional): pre-fill once per press, kvpress's own way.

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


def _layer_cache(kwargs: dict) -> tuple[str, object]:
    """The keyword an attention layer got its KV cache by, and the cache."""
    key = "past_key_values" if "past_key_values" in kwargs else "cache"
    return key, kwargs[key]


@torch.no_grad()
def run_presses(model, presses: dict, item: dict, separate: bool = False, alone: set[str] = frozenset()) -> dict:
    """Pre-fill ``item["prefill"]`` once for all ``presses`` (name -> kvpress press),
    then decode ``item["post"]`` greedily from each press's cache.

    Every attention layer's forward hook hands each press its own copy of the
    layer's fresh keys and values and calls the press's own ``forward_hook``
    (kvpress's, unchanged), which prunes that copy as it would prune the model's
    cache with ``with press(model):``. A press prunes after the layer's attention,
    so it never changes the pre-fill's own computation: one pre-fill serves every
    press and ratio. ``separate=True`` runs each press alone, kvpress's own way
    (``with press(model)``), one pre-fill each (the tests compare the two); so
    do the presses named in ``alone`` (those whose ``__call__`` does more than
    hook the layers: extra passes, patched attention).

    Returns:
        name -> ``{"token_ids", "kv_positions", "kv_positions_min", "prefill_tokens",
        "seconds"}``, or ``{"error": one line}`` for a press that raised.
    """
    from transformers import DynamicCache

    from rcc.hooks import cache_kwarg, decoder_layers
    from rcc.eval.baselines import greedy

    device = next(model.parameters()).device
    prefill = torch.tensor([list(item["prefill"])], device=device)
    kw = cache_kwarg(model)
    out: dict = {}
    caches: dict = {}
    prefill_s: dict = {}
    shared = {} if separate else {n: p for n, p in presses.items() if n not in alone}
    for name, press in presses.items():
        if name not in shared:
            t1 = time.perf_counter()
            caches[name] = DynamicCache(config=model.config)
            try:
                with press(model):
                    model(input_ids=prefill, use_cache=True, logits_to_keep=1, **{kw: caches[name]})
            except Exception as err:
                out[name] = {"error": _one_line(err)}
            prefill_s[name] = time.perf_counter() - t1
    if shared:
        t1 = time.perf_counter()
        body = getattr(model, "model", None)
        for name, press in shared.items():  # what BasePress.__call__ does before it hooks the layers
            try:
                getattr(press, "post_init_from_model", lambda m: None)(model)
            except Exception as err:
                out[name] = {"error": _one_line(err)}
        for layer in decoder_layers(model):
            if body is not None and hasattr(body, "rotary_emb"):
                layer.self_attn.rotary_emb = body.rotary_emb
        own_caches = {name: DynamicCache(config=model.config) for name in shared if name not in out}
        caches.update(own_caches)

        def hook(module, args, kwargs, output):
            key, cache = _layer_cache(kwargs)
            full = cache.layers[module.layer_idx]
            for name, own in own_caches.items():
                if name in out:
                    continue
                own.layers[module.layer_idx].update(full.keys, full.values)  # a copy: the press prunes its own
                try:
                    shared[name].forward_hook(module, args, {**kwargs, key: own}, output)
                except Exception as err:
                    out[name] = {"error": _one_line(err)}
            return output

        handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
        try:
            model(input_ids=prefill, use_cache=True, logits_to_keep=1, **{kw: DynamicCache(config=model.config)})
        finally:
            for h in handles:
                h.remove()
        prefill_s.update(dict.fromkeys(shared, time.perf_counter() - t1))
    for name, cache in caches.items():
        if name in out:
            continue
        t = time.perf_counter()
        kept = [layer.keys.shape[-2] for layer in cache.layers]
        try:
            ids = greedy(model, list(item["post"]), int(item["max_new_tokens"]), set(item.get("stops", ())),
                         cache=cache, start=prefill.shape[1])
        except Exception as err:
            out[name] = {"error": _one_line(err)}
            continue
        out[name] = {"token_ids": ids, "kv_positions": max(kept), "kv_positions_min": min(kept),
                     "prefill_tokens": prefill.shape[1],
                     "seconds": round(prefill_s[name] + time.perf_counter() - t, 4), "shared_prefill": name in shared}
    return out


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

    from rcc.files import write_json

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
    items, separate = request["items"], bool(request.get("separate", False))
    classes, done = {}, {}
    alone = set()  # presses whose __call__ does more than BasePress's (hook the layers): their own pre-fill
    for spec in request["presses"]:
        cls, why = press_class(kvpress, spec["press"])
        if cls is None:
            result["presses"][spec["name"]] = {"error": why}
        else:
            classes[spec["name"]], done[spec["name"]] = cls, {}
            if cls.__call__ is not kvpress.BasePress.__call__:
                alone.add(spec["name"])
    for k, item in enumerate(items, 1):
        presses = {}
        for name, cls in classes.items():
            if name in result["presses"]:
                continue
            try:
                presses[name] = cls(compression_ratio=compression_ratio(len(item["prefill"]), item["budgets"][name]))
            except Exception as err:
                result["presses"][name] = {"error": f"{cls.__name__}: {_one_line(err)}"}
        if not presses:
            break
        t = time.perf_counter()
        for name, got in run_presses(model, presses, item, separate, alone).items():
            if "error" in got:  # a press that fails on this model: reported, the others go on
                result["presses"][name] = {"error": f"{classes[name].__name__} failed on {type(model).__name__}: "
                                                    f"{got['error']}"}
            else:
                got["budget"] = int(item["budgets"][name])
                done[name][item["key"]] = got
        kept = sorted({done[n][item["key"]]["kv_positions"] for n in presses if item["key"] in done[n]})
        print(f"kvpress [{k}/{len(items)}] {item['key']}: {len(item['prefill'])} tokens -> {kept} KV positions, "
              f"{len(presses)} presses ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    for name, cls in classes.items():
        if name not in result["presses"]:
            result["presses"][name] = {"press_class": cls.__name__, "items": done[name]}
    write_json(argv[1], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
