"""What a user means by a model name (``--model`` of the CLI, the server):
the bundled model, our checkpoints, the authors' released layout, or a fresh
model over a backbone. Sits above :mod:`rcc.model` and :mod:`rcc.checkpoint`."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
from typing import TYPE_CHECKING

from rcc.bundled import resolve_bundled
from rcc.config import CONFIG_FILE, RCCConfig
from rcc.errors import RCCError

if TYPE_CHECKING:  # imported when a model is loaded: building the CLI's parser stays light
    import torch

    from rcc.model import RCCModel

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")  # --dtype: "auto" is the device's best
_FROZEN = [False]  # whether a load has frozen this process's objects (gc.freeze) yet


@contextlib.contextmanager
def quiet_gc():
    """Python's cyclic garbage collector held off while a model loads, and after the
    process's first load the objects then alive frozen out of its later passes.

    Loading imports transformers' modeling code and builds thousands of modules:
    millions of long-lived objects that each full collection walks again, for
    nothing (they stay alive), and the collections that follow the load (compressing,
    generating) walk them again too: the README command took 8.6 s instead of 7.4 s with the
    collector as it is (``python benchmarks/readme_speed.py --plain-gc``, README.md).
    ``gc.freeze`` only exempts the objects alive at that moment
    from cyclic collection (reference counting still frees them); it is done once per
    process, so a long test session or a server that loads again does not keep
    freezing the cyclic garbage of its earlier work. The collector's state is
    restored on the way out, error or not. The frozen objects are unfrozen at exit, so
    the interpreter's last collection still frees them: native modules that check for
    leaks at exit (triton's nanobind under vLLM) would otherwise print hundreds of lines
    after the CLI's last one.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        if was_enabled and not _FROZEN[0]:
            gc.freeze()
            atexit.register(gc.unfreeze)
            _FROZEN[0] = True
    finally:
        if was_enabled:
            gc.enable()


def load_model(spec: str, base_model: str | None = None, dtype: torch.dtype | None = None,
               device=None, window: int = RCCConfig.window, ratio: int = RCCConfig.ratio) -> RCCModel:
    """Resolve what a user means by a model name (CLI ``--model``, server).

    - ``base_model`` given: ``spec`` is the authors' released layout (docs/method.md section 5);
    - ``"rcc-smollm2-135m"`` (:data:`rcc.bundled.DEFAULT_MODEL`): the model shipped in the package;
    - a folder or hub repo with ``rcc_config.json``: our format;
    - ``"embedded:smollm2"`` or any other causal LM folder / hub id: a fresh,
      untrained RCC model over that backbone, held once for both sides (``window``, ``ratio``);
    - ``"random:pythia-1.4b[:layers=N]"``: a fresh RCC model over two separate random-weight
      backbones of that shape (:func:`rcc.backbones.random_backbone`; no tokenizer), as the
      paper's fully fine-tuned encoder and decoder are two models (memory benchmarks).

    Raises:
        RCCError: when nothing loadable is found, or the bundled model's weights are missing.
    """
    with quiet_gc():
        return _load_model(spec, base_model, dtype, device, window, ratio)


def _load_model(spec, base_model, dtype, device, window, ratio) -> RCCModel:
    """:func:`load_model`, with the collector as the caller left it."""
    from rcc.backbones import EMBEDDED, RANDOM, load_backbone, random_backbone, resolve_local_or_hub, shared_copy
    from rcc.model import RCCModel

    if base_model:
        model = RCCModel.from_original(spec, base_model=base_model, dtype=dtype)
    elif spec.startswith(RANDOM):
        model = RCCModel.from_backbones(random_backbone(spec, dtype, seed=0), random_backbone(spec, dtype, seed=1),
                                        window=window, ratio=ratio, encoder_source=spec, decoder_source=spec)
    elif spec == EMBEDDED:
        encoder, tok = load_backbone(spec, dtype)
        decoder = shared_copy(encoder)  # a fresh model for inference: the frozen backbone held once
        model = RCCModel.from_backbones(encoder, decoder, window=window, ratio=ratio, tokenizer=tok,
                                        encoder_source=spec, decoder_source=spec)
    else:
        root = resolve_local_or_hub(resolve_bundled(spec),
                                    allow_patterns=["*.json", "*.safetensors", "tokenizer/*", "*.model", "*.txt"])
        if (root / CONFIG_FILE).is_file():
            model = RCCModel.from_pretrained(str(root), dtype=dtype)
        elif (root / "config.json").is_file():
            encoder, tok = load_backbone(str(root), dtype)
            decoder = shared_copy(encoder)
            model = RCCModel.from_backbones(encoder, decoder, window=window, ratio=ratio, tokenizer=tok,
                                            encoder_source=spec, decoder_source=spec)
        else:
            raise RCCError(
                f"{spec}: neither an rcc-llm checkpoint ({CONFIG_FILE}) nor a transformers model "
                "(config.json); for the authors' released weights add --base-model"
            )
    if device is not None:
        model.to(device)
    return model.eval()


def resolve_device(name: str) -> str:
    """``--device`` checked against this machine (before any model is loaded);
    ``"auto"`` is ``"cuda"`` when a CUDA GPU is here, else ``"cpu"``.

    Raises:
        RCCError: for a name torch does not know or a device that is not here.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RCCError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RCCError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RCCError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                           f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise RCCError(f"--device {name}: no Apple GPU is available here; use --device cpu")
    elif dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise RCCError(f"--device {name}: no {dev.type} device is available here; use cpu or cuda")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``--dtype`` (one of :data:`DTYPES`) on ``device``: ``"auto"`` is the fastest correct
    dtype there (:func:`rcc.precision.auto_dtype`: bfloat16 on a GPU; on a CPU, bfloat16
    where it has native bf16 matrix units, else float32); any other name as it is."""
    import torch

    if name == "auto":
        from rcc.precision import auto_dtype

        chosen = auto_dtype(device)
        log.info("--dtype auto on %s: %s", device, chosen)
        return getattr(torch, chosen)
    return getattr(torch, name)
