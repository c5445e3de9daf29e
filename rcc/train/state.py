"""Training checkpoints that load nothing by pickle (``rcc train``'s resume).

accelerate's ``save_state`` writes pickles (``optimizer.bin``,
``custom_checkpoint_0.pkl``, ``random_states_0.pkl``) and its ``load_state``
unpickles them, so a file planted in ``checkpoints/step-*/`` would run code on
``resume: auto``. This module writes the same state as tensors (safetensors)
and JSON, and reads only those; a folder that holds only accelerate's pickles
is refused, never opened.

One checkpoint folder::

    checkpoint.json           format, sharding, accelerate's micro-step counter, GradScaler state
    model.safetensors         trained parameters as full tensors (frozen weights come from the config)
    optimizer.safetensors     optimiser state tensors, named ``<i>/<name>`` (``3/exp_avg``)
    optimizer.json            the rest of the optimiser state: keys, scalar state, param groups
    scheduler.json            the LR scheduler's ``state_dict()``
    rng-<rank>.safetensors    each process's torch CPU / CUDA generator states (uint8 tensors),
                              with python ``random`` and numpy states as JSON in its metadata

(:mod:`rcc.train` adds ``trainer_state.json``, the data position, and
``train_config.json``, and makes the folder appear atomically.)

Distribution: one process or DDP -- the main process writes the shared files,
every process its RNG file, every process reads. FSDP (1 or 2) -- the full
state dicts of the trained parameters and of the optimiser are gathered to
the main process with ``torch.distributed.checkpoint.state_dict`` and handed
back with its ``set_*`` functions (not ``torch.distributed.checkpoint``'s
save/load: its ``.metadata`` file is a pickle). DeepSpeed is not supported
here: its optimiser state exists only in its own pickled checkpoint files
(see :data:`DEEPSPEED_REFUSAL`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from rcc.errors import RCCError
from rcc.files import atomic_save_file, atomic_write_text

FORMAT = "rcc-train-state/1"
MANIFEST = "checkpoint.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER = "scheduler.json"
# what accelerate's save_state wrote (rcc-llm before this format); never read
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
DEEPSPEED_REFUSAL = ("rcc train cannot resume under DeepSpeed: DeepSpeed keeps its optimiser state only in pickle "
                     "files, which rcc never loads (unpickling can run code); resume with DDP or FSDP "
                     "(configs/accelerate/ddp.yaml, fsdp.yaml) or start afresh with resume=never and a new output_dir")


def rng_name(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def _dist() -> tuple[int, int]:
    """``(rank, world)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers (not FSDP's: it shards)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _inner(optimizer):
    """The torch optimiser inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


# ------------------------------------------------------------- tensors
def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
    """Atomic safetensors file of CPU copies; tensors sharing memory (tied
    weights) are stored once and named in the ``aliases`` metadata."""
    out, aliases, seen = {}, {}, {}
    for k, v in tensors.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.cpu().contiguous()
    atomic_save_file(out, path, {**(meta or {}), "aliases": json.dumps(aliases)})


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors on the CPU, metadata)``.

    Raises:
        RCCError: when the file is missing, truncated or not safetensors.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise RCCError(f"{path}: cannot read this checkpoint file ({err}); the checkpoint is incomplete or corrupt, "
                       "delete it to resume from an earlier one") from None
    for alias, target in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[target]
    return tensors, meta


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RCCError(f"{path}: cannot read this checkpoint file ({err}); the checkpoint is incomplete or corrupt, "
                       "delete it to resume from an earlier one") from None


# ----------------------------------------------------------- optimiser
def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser ``state_dict()`` (keys: parameter indices, or names under
    FSDP) as ``(tensors, JSON-able rest)``."""
    keys = list(state["state"])
    tensors, scalars = {}, []
    for i, key in enumerate(keys):
        rest = {}
        for name, value in state["state"][key].items():
            if torch.is_tensor(value):
                tensors[f"{i}/{name}"] = value
            else:
                rest[name] = value
        scalars.append(rest)
    return tensors, {"keys": keys, "scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict, template: list[dict]) -> dict:
    """The inverse of :func:`_split_optimizer`; ``template`` (the live
    optimiser's param groups) turns JSON lists back into tuples (``betas``)."""
    state = {key: dict(scalars) for key, scalars in zip(rest["keys"], rest["scalars"])}
    for name, value in tensors.items():
        i, field = name.split("/", 1)
        state[rest["keys"][int(i)]][field] = value
    groups = []
    for group, live in zip(rest["param_groups"], template):
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v
                       for k, v in group.items()})
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------- RNG
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        tensors["torch_mps"] = torch.mps.get_rng_state()
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python_random": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([name, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    try:
        version, internal, gauss = json.loads(meta["python_random"])
        name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch_cpu"])
    except (KeyError, ValueError, TypeError) as err:
        raise RCCError(f"{path}: unreadable random state ({err}); delete the checkpoint to resume from an "
                       "earlier one") from None
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"], i)
    if "torch_mps" in tensors and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["torch_mps"])


# --------------------------------------------------------------- API
def save_training_state(folder: str | Path, model: torch.nn.Module, optimizer, scheduler, *, fsdp: bool = False,
                        scaler=None, extra: dict | None = None) -> None:
    """Write the trained parameters, optimiser, scheduler and RNG states to ``folder``.

    Every process calls it (under FSDP the state is gathered collectively);
    the main process writes the shared files, each process its
    ``rng-<rank>.safetensors``. ``folder`` must exist; the caller makes the
    checkpoint appear atomically (all processes done -> rename).

    Args:
        model: the prepared model (DDP / FSDP wrapped or plain); only
            parameters with ``requires_grad`` are stored.
        optimizer: its optimiser (a torch optimiser or accelerate's wrapper).
        scheduler: an LR scheduler whose ``state_dict()`` is JSON-able
            (``LambdaLR``: base and last learning rates, step counters).
        fsdp: whether ``model`` is sharded by FSDP (1 or 2).
        scaler: a ``torch.amp.GradScaler`` (fp16), or None.
        extra: small JSON-able values returned by :func:`load_training_state`.
    """
    folder = Path(folder)
    rank, world = _dist()
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(model, options=options)  # collective; full tensors on rank 0 only
        optim = get_optimizer_state_dict(model, _inner(optimizer), options=options)
    elif rank == 0:
        weights = {n: p for n, p in _plain(model).named_parameters() if p.requires_grad}
        optim = optimizer.state_dict()
    tensors, meta = _rng_state()
    _write_tensors(folder / rng_name(rank), tensors, meta)
    if rank != 0:
        return
    _write_tensors(folder / MODEL, weights, {"format": FORMAT})
    opt_tensors, opt_rest = _split_optimizer(optim)
    _write_tensors(folder / OPTIMIZER, opt_tensors, {"format": FORMAT})
    atomic_write_text(folder / OPTIMIZER_META, json.dumps(opt_rest))
    atomic_write_text(folder / SCHEDULER, json.dumps(scheduler.state_dict()))
    manifest = {"format": FORMAT, "sharding": "fsdp" if fsdp else "none", "world": world,
                "scaler": scaler.state_dict() if scaler is not None else None, "extra": extra or {}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))  # last: its presence marks a full write


def check_training_state(folder: str | Path) -> dict:
    """The checkpoint's manifest, after checking it is this format.

    Raises:
        RCCError: for a folder holding accelerate's pickle files of an older
            rcc-llm (they are never opened) or no complete checkpoint.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise RCCError(f"{folder} holds pickle files ({', '.join(pickles[:3])}) from an older rcc train, which rcc "
                           "no longer loads (unpickling can run code); start afresh: delete this checkpoint or pass "
                           "resume=never with a new output_dir")
        raise RCCError(f"{folder}: not a complete training checkpoint (no {MANIFEST}); delete it to resume from an "
                       "earlier one")
    manifest = _read_json(folder / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise RCCError(f"{folder / MANIFEST}: unknown checkpoint format {found!r}; this rcc-llm reads {FORMAT}")
    return manifest


def load_training_state(folder: str | Path, model: torch.nn.Module, optimizer, scheduler, *, fsdp: bool = False,
                        scaler=None) -> dict:
    """Restore what :func:`save_training_state` wrote; every process calls it
    with the objects built for this run (same config, same process count).

    Returns:
        the ``extra`` values saved with it.
    Raises:
        RCCError: for an older pickle checkpoint, a missing or corrupt file,
            a checkpoint written under another sharding, or weights that do
            not fit the model (names or shapes).
    """
    folder = Path(folder)
    manifest = check_training_state(folder)
    rank, _ = _dist()
    sharding = "fsdp" if fsdp else "none"
    if manifest.get("sharding") != sharding:
        raise RCCError(f"{folder} was written {'under FSDP' if manifest.get('sharding') == 'fsdp' else 'without FSDP'} "
                       f"and this run is {'under FSDP' if fsdp else 'not'}; resume it the way it was started")
    weights, _ = _read_tensors(folder / MODEL)
    opt_tensors, _ = _read_tensors(folder / OPTIMIZER)
    try:
        optim = _join_optimizer(opt_tensors, _read_json(folder / OPTIMIZER_META), _inner(optimizer).param_groups)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
        raise RCCError(f"{folder / OPTIMIZER_META}: unreadable optimiser state ({err!r}); delete the checkpoint to "
                       "resume from an earlier one") from None
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        _check_holds_trained(model, weights, folder)
        options = StateDictOptions(full_state_dict=True, strict=False)
        result = set_model_state_dict(model, weights, options=options)
        if result.unexpected_keys:
            raise RCCError(f"{folder / MODEL} holds {len(result.unexpected_keys)} weights this model lacks "
                           f"(e.g. {result.unexpected_keys[0]}); it was written for another model")
        _load_optimizer(lambda: set_optimizer_state_dict(model, _inner(optimizer), optim,
                                                         options=StateDictOptions(full_state_dict=True)), folder)
    else:
        _load_trained(_plain(model), weights, folder / MODEL)
        _load_optimizer(lambda: optimizer.load_state_dict(optim), folder)
    saved = _read_json(folder / SCHEDULER)
    live = scheduler.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(live) or saved.get("lr_lambdas") != live.get("lr_lambdas"):
        raise RCCError(f"{folder / SCHEDULER}: not the state of this run's learning-rate schedule; "
                       "delete the checkpoint to resume from an earlier one")
    scheduler.load_state_dict(saved)  # JSON data only; the fields are checked against the live schedule's
    if scaler is not None and manifest.get("scaler") is not None:
        scaler.load_state_dict(manifest["scaler"])
    tensors, meta = _read_tensors(folder / rng_name(rank))
    _set_rng_state(tensors, meta, folder / rng_name(rank))
    return manifest.get("extra", {})


def _load_optimizer(load, folder: Path) -> None:
    """Run ``load``; torch's complaints about a state of another optimiser become one line."""
    try:
        load()
    except (KeyError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:200]
        raise RCCError(f"{folder}: the optimiser state does not fit this run's optimiser ({detail}); it was written "
                       "by a run with other trained parameters or settings") from None


def _load_trained(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Copy stored parameters into ``model``; every trained parameter must be there.

    Raises:
        RCCError: on missing trained parameters, unknown names or other shapes.
    """
    own = dict(model.named_parameters())
    _check_holds_trained(model, weights, path.parent)
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise RCCError(f"{path} holds {len(unknown)} weights this model lacks (e.g. {unknown[0]}); "
                       "it was written for another model")
    for name, value in weights.items():
        if own[name].shape != value.shape:
            raise RCCError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is {tuple(own[name].shape)}; "
                           "it was written for another model")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value)


def _check_holds_trained(model: torch.nn.Module, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Raises RCCError unless ``weights`` has every parameter ``model`` trains
    (names as in the unwrapped model; FSDP1's wrapper names are dropped)."""
    wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
    trained = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            for w in wrappers:
                name = name.replace(w, "")
            trained.add(name)
    missing = sorted(trained - set(weights))
    if missing:
        raise RCCError(f"{folder} lacks {len(missing)} of the parameters this config trains (e.g. {missing[0]}); "
                       "it was written by a run that trained other parts of the model")
