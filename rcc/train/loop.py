"""``rcc train``: compression pretraining and instruction fine-tuning (docs/method.md section 3).

A plain PyTorch loop on Hugging Face Accelerate, top to bottom:

    config -> model (:mod:`rcc.train.setup`: fresh backbones or ``init_from``; full / frozen / LoRA per side)
    -> data (deterministic micro-batches, :mod:`rcc.data`) -> AdamW + warm-up/cosine
    -> [resume from the newest checkpoint] -> loop over optimiser steps:
       grad_accum micro-batches, clip, step, log, evaluate, checkpoint
    -> ``<output_dir>/final``, which :meth:`rcc.RCCModel.from_pretrained` loads.

The same code runs on CPU, one GPU and many GPUs or nodes: start it with
``accelerate launch`` (DDP, FSDP or DeepSpeed ZeRO from an accelerate config
file, see ``configs/accelerate/``). Micro-batch ``i`` of the run is global
batch ``i * processes + rank``, so a checkpoint's data position is one integer
and a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rcc.data import FinetuneBatches, PretrainBatches, TokenFile, load_examples, split_examples
from rcc.errors import RCCError
from rcc.files import atomic_write_text
from rcc.model import RCCModel
from rcc.train.config import TrainConfig, dotted
from rcc.train.setup import (final_model, trainable_summary, wrap_by_layer_class, build_model, compile_layers,
                          make_optimizer, resolve_frozen_dtype, resolve_precision, store_frozen)
from rcc.train.state import DEEPSPEED_REFUSAL, check_training_state, load_training_state, save_training_state

log = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
TRAIN_CONFIG_NAME = "train_config.json"
# options that may change between a run and its resumption without a warning
_RESUMABLE = {f"run.{k}" for k in ("resume", "progress", "log_every", "eval_every", "eval_batches", "save_every",
                                   "keep_checkpoints", "num_workers", "tensorboard", "compile", "stop_at",
                                   "fit_schedule", "save_minutes", "eval_at_start")}
FIT_AFTER = 6  # run.fit_schedule measures the step time over steps 2..FIT_AFTER (step 1 warms up)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained :class:`RCCModel` (unwrapped, on the training device).
        final_dir: where it was saved (``<output_dir>/final``).
        step: optimiser steps done.
        metrics: the last logged training and evaluation values.
        is_main: whether this is the main process (the one that saved).
    """

    model: RCCModel
    final_dir: Path
    step: int
    metrics: dict
    is_main: bool = True


# ------------------------------------------------------------------- step
def _set_modes(model, cfg: TrainConfig, training: bool, accelerator) -> None:
    """Train mode for trained sides; a frozen side stays in eval mode (no dropout)."""
    model.train(training)
    plain = accelerator.unwrap_model(model)
    for side, mode in (("encoder", cfg.model.train_encoder), ("decoder", cfg.model.train_decoder)):
        if mode == "frozen":
            getattr(plain, side).eval()


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``
    at ``total`` (``step`` = optimiser steps already taken)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def training_loss(model, batch: dict[str, torch.Tensor], grad_windows: int = 0) -> torch.Tensor:
    """The loss one micro-batch contributes: the model's mean next-token
    cross-entropy over counted labels (docs/method.md section 3). The training loop and
    the fixture test both call this; ``grad_windows`` as in :class:`TrainConfig`."""
    return model(**batch, grad_windows=grad_windows or None).loss


# ------------------------------------------------------------------- data
def build_data(cfg: TrainConfig, model: RCCModel):
    """``(train batches, eval batches or None, number of train batches per epoch or None)``.

    Raises:
        RCCError: on bad or unusable data, or token ids beyond the model's vocabulary.
    """
    window = model.config.window
    vocab = model.decoder.get_input_embeddings().num_embeddings
    if cfg.task == "pretrain":
        if not isinstance(cfg.data.train_data, str):
            raise RCCError("pretrain data.train_data must be one folder written by `rcc prepare-data`")
        opts = dict(window=window, batch_size=cfg.optim.batch_size, min_windows=cfg.data.min_windows,
                    max_windows=cfg.data.max_windows, target_tokens=cfg.data.target_tokens, cue_min=cfg.data.cue_min,
                    cue_max=cfg.data.cue_max, reconstruct_fraction=cfg.data.reconstruct_fraction,
                    cross_documents=cfg.data.cross_documents)
        train_tokens = TokenFile(cfg.data.train_data, "train")
        if train_tokens.vocab_size > vocab:
            raise RCCError(f"{cfg.data.train_data} was tokenized with a vocabulary of {train_tokens.vocab_size} ids, "
                           f"the model has {vocab}; prepare it with the model's tokenizer")
        train = PretrainBatches(train_tokens, seed=cfg.run.seed, **opts)
        evaluation = None
        if cfg.run.eval_batches:
            eval_tokens = TokenFile(cfg.data.eval_data or cfg.data.train_data, "eval")
            if cfg.data.eval_data and eval_tokens.num_docs == 0:  # a folder prepared as a whole for evaluation
                eval_tokens = TokenFile(cfg.data.eval_data, "train")
            if eval_tokens.num_docs == 0:
                log.warning("%s has an empty eval split; no evaluation", eval_tokens.folder)
            else:
                evaluation = PretrainBatches(eval_tokens, seed=cfg.run.seed + 1, **opts)
        return train, evaluation, None
    opts = dict(mode=cfg.data.instruction_mode, window=window, max_windows=cfg.data.max_windows,
                max_decoder_tokens=cfg.data.max_decoder_tokens, answer_suffix=cfg.data.answer_suffix,
                on_error=cfg.data.on_error, seed=cfg.run.seed, progress=cfg.run.progress)
    examples, report = load_examples(cfg.data.train_data, model.tokenizer, **opts)
    (log.warning if report.skipped else log.info)("fine-tuning data: %s", report.summary())
    held = load_examples(cfg.data.eval_data, model.tokenizer, **opts)[0] if cfg.data.eval_data else []
    if not held:
        examples, held = split_examples(examples, cfg.data.eval_fraction, cfg.run.seed)
    top = max(int(max(e.context.max(), e.input_ids.max())) for e in examples + held)
    if top >= vocab:
        raise RCCError(f"token id {top} in the fine-tuning data is beyond the model's vocabulary of {vocab}")
    tok = model.tokenizer
    pad = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)) if t is not None), 0)
    train = FinetuneBatches(examples, window=window, batch_size=cfg.optim.batch_size, seed=cfg.run.seed, pad_id=pad)
    evaluation = FinetuneBatches(held, window=window, batch_size=cfg.optim.batch_size, seed=cfg.run.seed + 1,
                                 pad_id=pad) if held else None
    return train, evaluation, len(train)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches, count: int, accelerator) -> dict[str, float]:
    """Token-weighted loss and next-token accuracy over held-out batches 0..count-1.

    Every process runs the same number of forward passes (FSDP needs it);
    padding batches get weight 0. Accuracy counts labels after the first
    decoder position (the first label is predicted from the last slot, whose
    logits the model does not return).
    """
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    for j in range(math.ceil(count / world)):
        i = j * world + rank
        batch = to_device(batches[i % count], accelerator.device)
        out = model(**batch)
        weight = 1.0 if i < count else 0.0
        labels = batch["labels"]
        n = (labels != -100).sum()
        nxt = labels[:, 1:]
        hit = (out.logits[:, :-1].argmax(-1) == nxt) & (nxt != -100)
        sums += weight * torch.stack([out.loss.double() * n, n.double(), hit.sum().double(), (nxt != -100).sum().double()])
    sums = accelerator.reduce(sums, "sum")
    return {"eval_loss": (sums[0] / sums[1]).item(), "eval_accuracy": (sums[2] / sums[3].clamp(min=1)).item(),
            "eval_tokens": int(sums[1].item())}


# ------------------------------------------------------------ checkpoints
def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _save_checkpoint(accelerator, output_dir: Path, state: dict, cfg: TrainConfig, parts: tuple) -> Path | None:
    """Trained parameters, optimiser, scheduler, RNG states (:mod:`rcc.train.state`,
    no pickles) and the data position, written to a temporary folder renamed when
    complete (a kill never leaves half a checkpoint). ``parts``: ``(model,
    optimizer, scheduler)``. Under DeepSpeed nothing is written (see
    :data:`rcc.train.state.DEEPSPEED_REFUSAL`)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return None
    root = output_dir / "checkpoints"
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-step-{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    model, optimizer, scheduler = parts
    save_training_state(tmp, model, optimizer, scheduler, fsdp=accelerator.distributed_type == DistributedType.FSDP,
                        scaler=accelerator.scaler, extra={"accelerator_step": accelerator.step})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / TRAIN_CONFIG_NAME, cfg.to_json())
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[: -cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _timed_save(budget: Budget, *args) -> float:
    """:func:`_save_checkpoint`, its duration kept in ``budget``; returns when it ended."""
    began = time.monotonic()
    _save_checkpoint(*args)
    ended = time.monotonic()
    budget.save_s = max(budget.save_s or 0.0, ended - began)
    return ended


def _resume_point(cfg: TrainConfig, output_dir: Path) -> Path | None:
    existing = checkpoints(output_dir)
    if cfg.run.resume == "never":
        if existing:
            raise RCCError(f"{output_dir} already holds checkpoints (newest {existing[-1].name}); pass resume=auto "
                           "to continue that run, or choose another output_dir")
        return None
    if cfg.run.resume == "auto":
        path = existing[-1] if existing else None
    else:
        path = Path(cfg.run.resume)
        if not (path / STATE_NAME).is_file():
            raise RCCError(f"{path}: not a training checkpoint (no {STATE_NAME})")
    if path is not None:
        check_training_state(path)  # refuses an older checkpoint of pickles before any work
    return path


def _check_resume_config(path: Path, cfg: TrainConfig) -> None:
    try:
        saved = dotted(json.loads((path / TRAIN_CONFIG_NAME).read_text()))  
    except (OSError, json.JSONDecodeError, AttributeError, RCCError):
        return
    changed = sorted(k for k, v in dotted(cfg.to_dict()).items() if k not in _RESUMABLE and saved.get(k, v) != v)
    if changed:
        log.warning("resuming %s with changed options %s; the run will not repeat an uninterrupted one",
                    path, ", ".join(changed))


def _any(flag: bool, accelerator) -> bool:
    """Whether ``flag`` holds on any process (all processes decide together)."""
    if accelerator.num_processes == 1:
        return flag  # no device round trip
    late = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(late, "max").item() > 0)


class Budget:
    """The run's time limits and what it measured of itself: ``run.max_minutes``
    (spent: stop once past it), ``run.stop_at`` (stopped and saved by then: stop
    while one more step, an evaluation and a save still fit) and, for
    ``run.fit_schedule``, the steps the time left buys."""

    def __init__(self, run, trained: int = 0) -> None:
        now = time.monotonic()
        # before a save was measured: a checkpoint (weights and two AdamW moments in float32) on a slow disk
        self.save_guess = 1.0 + 12 * trained / 50e6
        self.spent_at = now + 60 * run.max_minutes if run.max_minutes else None
        self.done_by = now + (run.stop_at - time.time()) if run.stop_at is not None else None
        self.steps: list[float] = []
        self.save_s: float | None = None
        self.eval_s = 0.0

    @property
    def limited(self) -> bool:
        return self.spent_at is not None or self.done_by is not None

    def _save_reserve(self) -> float:  # a checkpoint and ``final``
        return 2 * (self.save_s if self.save_s is not None else self.save_guess)

    def over(self) -> bool:
        now = time.monotonic()
        if self.spent_at is not None and now > self.spent_at:
            return True
        step = max(self.steps[-5:], default=0.0)
        return self.done_by is not None and now + step + self.eval_s + self._save_reserve() > self.done_by

    def fit(self, step: int, total: int) -> int:
        """The total steps that end with the time (at most ``total``), from the pace of steps 2..``step``."""
        pace = sum(self.steps[1:step]) / max(1, step - 1)
        now = time.monotonic()
        lefts = [self.spent_at - now] if self.spent_at is not None else []  # spent: the saves come after it
        if self.done_by is not None:
            lefts.append(self.done_by - now - self._save_reserve() - self.eval_s)
        left = min(lefts)
        return max(step + 1, min(total, step + int(0.95 * left / max(pace, 1e-9))))


# ------------------------------------------------------------------- loop
def train(config: TrainConfig | str | Path | dict, overrides: list[str] | tuple[str, ...] = (),
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train an RCC model as a config says (the Python form of ``rcc train``):
    :func:`setup`, then :func:`fit`.

    Args:
        config: a :class:`TrainConfig`, a dict of options, or a YAML/JSON file.
        overrides: ``key=value`` strings applied on top (see :meth:`TrainConfig.load`).
        on_step: called after every optimiser step (and its logging, evaluation
            and checkpoint) with the step number and the latest metrics.
    Returns:
        :class:`TrainResult`; the model is also saved to ``<output_dir>/final``.
    Raises:
        RCCError: on an invalid config, bad data, or an ``output_dir`` that holds
            another run's checkpoints with ``resume=never``.
    """
    return fit(setup(TrainConfig.load(config, overrides)), on_step)


@dataclass
class Run:
    """A training run as :func:`setup` prepares it and :func:`fit` runs it: the
    accelerator, the prepared model, optimizer and schedule, the data, and the
    state (``step``, ``micro_step``, ``tokens``, ``total_steps``, ``world``),
    restored from ``resume_from`` when the run continues one."""

    cfg: TrainConfig
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_batches: object
    eval_batches: object
    eval_count: int
    state: dict
    resume_from: Path | None
    writer: object = None

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step: the accelerator and precision, the model
    (frozen weights stored in the compute dtype, compiled, sharded as asked), the
    data, the optimizer and schedule, the state of the run it resumes, the run
    folder's config and the TensorBoard writer.

    Raises:
        RCCError: as :func:`train`.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed


    precision = resolve_precision(cfg, torch.cuda.is_available())
    # several processes and no GPU (`accelerate launch --multi_gpu` or torchrun
    # on a CPU machine): accelerate runs DDP on gloo only when told cpu=True
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state: a second run in this process (a
        # notebook, the pinned-loss tests) with another precision would be refused
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(
        cpu=multi_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.optim.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.run.ddp_find_unused_parameters)])
    main = accelerator.is_main_process
    output_dir = Path(cfg.run.output_dir)
    resume_from = _resume_point(cfg, output_dir)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and resume_from is not None:
        raise RCCError(DEEPSPEED_REFUSAL)
    set_seed(cfg.run.seed)

    # model and data
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    model = build_model(cfg)
    frozen = resolve_frozen_dtype(cfg, precision, sharded)
    if store_frozen(model, cfg, frozen):
        log.info("frozen backbone weights stored in %s, trained parameters in %s (mixed_precision=%s)",
                 str(frozen).removeprefix("torch."), cfg.model.dtype, precision)
    if cfg.run.compile:
        log.info("compiled %d decoder layers (torch.compile; the first steps compile)", compile_layers(model))
    if accelerator.distributed_type == DistributedType.FSDP:
        wrap_by_layer_class(accelerator, model)
    train_batches, eval_batches, epoch_batches = build_data(cfg, model)
    world = accelerator.num_processes
    total_steps = cfg.optim.max_steps or math.ceil(cfg.optim.epochs * epoch_batches / (world * cfg.optim.grad_accum))
    eval_count = min(cfg.run.eval_batches, len(eval_batches)) if eval_batches is not None else 0

    # optimiser and schedule (stepped once per optimiser step; not handed to
    # accelerate, which would step it once per process)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    # the schedule reads the run's total from its state: fit_schedule and a resume may change it
    state = {"step": 0, "micro_step": 0, "tokens": 0, "total_steps": total_steps, "world": world}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, state["total_steps"], cfg.optim.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)

    if deepspeed and (cfg.run.save_every or cfg.run.max_minutes) and main:
        log.warning("DeepSpeed: rcc train writes no checkpoints to resume from (%s)", DEEPSPEED_REFUSAL)
    if resume_from is not None:
        saved = json.loads((resume_from / STATE_NAME).read_text())
        if saved["world"] != world:
            raise RCCError(f"{resume_from} was written by {saved['world']} processes and this run has {world}; "
                           "resume with the same number of processes")
        _check_resume_config(resume_from, cfg)
        extra = load_training_state(resume_from, model, optimizer, scheduler, scaler=accelerator.scaler,
                                    fsdp=accelerator.distributed_type == DistributedType.FSDP)
        accelerator.step = int(extra.get("accelerator_step", saved["micro_step"]))
        if cfg.run.fit_schedule and saved.get("total_steps"):  # the schedule fitted by the run it continues
            total_steps = min(total_steps, int(saved["total_steps"]))
        state.update(saved, total_steps=total_steps)
        log.info("resumed from %s (step %d)", resume_from, state["step"])
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / TRAIN_CONFIG_NAME, cfg.to_json())
        log.info("training %s: %s; %d steps of %d x %d x %d micro-batches", cfg.task,
                 trainable_summary(accelerator.unwrap_model(model)), total_steps, world, cfg.optim.grad_accum,
                 cfg.optim.batch_size)
    writer = None
    if main and cfg.run.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed; logging to %s only", output_dir / "log.jsonl")
    return Run(cfg, accelerator, model, optimizer, scheduler, train_batches, eval_batches, eval_count, state,
               resume_from, writer)


def fit(run: Run, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """The training loop over a :class:`Run` from :func:`setup`: optimiser steps
    with gradient accumulation, logging, evaluation, checkpoints (every
    ``save_every`` steps, every ``save_minutes``, at the end and when the time
    budget is spent), then the final model in ``<output_dir>/final``.

    Args:
        on_step: as :func:`train`.
    """
    from tqdm.auto import tqdm

    cfg, accelerator, model, optimizer, scheduler = run.cfg, run.accelerator, run.model, run.optimizer, run.scheduler
    state, writer, output_dir = run.state, run.writer, run.output_dir
    eval_batches, eval_count = run.eval_batches, run.eval_count
    main, world, total_steps = accelerator.is_main_process, state["world"], state["total_steps"]


    # micro-batch i of this process is global batch i * world + rank; the
    # loader gets its own generator so that it draws nothing from the global
    # RNG (whose restored state drives dropout after a resume)
    first = state["micro_step"] * world + accelerator.process_index
    cuda = accelerator.device.type == "cuda"
    workers = cfg.run.num_workers if cfg.run.num_workers is not None else (2 if cuda else 0)
    loader = torch.utils.data.DataLoader(
        run.train_batches, batch_size=None, num_workers=workers, pin_memory=cuda,
        sampler=range(first, total_steps * cfg.optim.grad_accum * world, world), generator=torch.Generator())
    batches = iter(loader)
    bar = tqdm(total=total_steps, initial=state["step"], disable=not (main and cfg.run.progress), unit="step",
               dynamic_ncols=True, desc=cfg.task)
    metrics: dict = {}
    # no host sync in the step: counters are Python ints and the loss sum stays
    # on the device until it is logged
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    micro_batches = tokens = 0
    clock = time.perf_counter()
    budget = Budget(cfg.run, sum(p.numel() for p in model.parameters() if p.requires_grad))
    fitting = cfg.run.fit_schedule and run.resume_from is None
    last_save = time.monotonic()

    def held_out(step: int) -> dict:
        """Evaluate on the held-out batches, record it as ``step``'s, and time it."""
        began = time.monotonic()
        _set_modes(model, cfg, False, accelerator)
        result = {"step": step, **evaluate(model, eval_batches, eval_count, accelerator)}
        _set_modes(model, cfg, True, accelerator)
        _record(main, output_dir, writer, result)
        if main:
            line = (f"step {step}: eval loss {result['eval_loss']:.4f}, accuracy "
                    f"{result['eval_accuracy']:.3f} ({result['eval_tokens']} tokens)")
            bar.write(line) if not bar.disable else log.info(line)
        budget.eval_s = max(budget.eval_s, time.monotonic() - began)
        return result

    if eval_count and cfg.run.eval_at_start and state["step"] == 0:
        metrics.update(held_out(0))
        clock = time.perf_counter()
    _set_modes(model, cfg, True, accelerator)
    try:
        while state["step"] < total_steps:
            began = time.monotonic()
            for _ in range(cfg.optim.grad_accum):
                host_batch = next(batches)
                tokens += host_batch["context_ids"].numel() + host_batch["input_ids"].numel()
                batch = to_device(host_batch, accelerator.device)
                with accelerator.accumulate(model):
                    loss = training_loss(model, batch, cfg.data.grad_windows)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state["micro_step"] += 1
                loss_sum += loss.detach().double()
                micro_batches += 1
            scheduler.step()
            state["step"] += 1
            step = state["step"]
            bar.update(1)
            if fitting and step in (1, FIT_AFTER) and cuda:
                torch.cuda.synchronize(accelerator.device)  # the pace is the device's, not the launch queue's
            budget.steps.append(time.monotonic() - began)
            if fitting and step == FIT_AFTER and step < total_steps:
                fitted = budget.fit(step, total_steps)
                if world > 1:  # every process runs the same schedule: the smallest
                    fitted = int(accelerator.gather(torch.tensor([fitted], device=accelerator.device)).min().item())
                if fitted < total_steps and main:
                    log.info("fit_schedule: %d steps fit the time left (%.3f s a step); the schedule ends at step "
                             "%d instead of %d", fitted, sum(budget.steps[1:]) / (step - 1), fitted, total_steps)
                total_steps = state["total_steps"] = fitted
                bar.total = total_steps

            if step % cfg.run.log_every == 0 or step == total_steps:
                counts = torch.tensor([micro_batches, tokens], dtype=torch.float64, device=loss_sum.device)
                total = accelerator.reduce(torch.cat([loss_sum.reshape(1), counts]), "sum").tolist()
                seconds = time.perf_counter() - clock
                state["tokens"] += int(total[2])
                metrics = {"step": step, "loss": total[0] / total[1],
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": total[2] / max(seconds, 1e-9),
                           "tokens": state["tokens"]}
                loss_sum.zero_()
                micro_batches = tokens = 0
                clock = time.perf_counter()
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                _record(main, output_dir, writer, metrics)
            if eval_count and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == total_steps):
                metrics.update(held_out(step))
                clock = time.perf_counter()
            stop = budget.limited and step < total_steps and _any(budget.over(), accelerator)
            due = cfg.run.save_minutes is not None and time.monotonic() - last_save > 60 * cfg.run.save_minutes
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == total_steps or stop or \
                    _any(due, accelerator):
                last_save = _timed_save(budget, accelerator, output_dir, dict(state), cfg, (model, optimizer, scheduler))
                clock = time.perf_counter()
            if stop and main:
                why = (f"max_minutes={cfg.run.max_minutes:g} is spent" if budget.spent_at is not None
                       and time.monotonic() > budget.spent_at else "run.stop_at is near")
                log.warning("%s: stopping at step %d of %d (resume=auto continues)", why, step, total_steps)
            if on_step is not None:
                on_step(step, dict(metrics))
            if stop:
                break
    finally:
        bar.close()
        if writer is not None:
            writer.close()

    # the result: what was trained, loadable with RCCModel.from_pretrained
    final = final_model(accelerator, model)
    final_dir = output_dir / "final"
    if main:
        save_final(final, cfg, final_dir)
        log.info("saved %s", final_dir)
    accelerator.wait_for_everyone()
    return TrainResult(model=accelerator.unwrap_model(model), final_dir=final_dir, step=state["step"],
                       metrics=metrics, is_main=main)


def save_final(model: RCCModel, cfg: TrainConfig, folder: Path) -> None:
    """Save a trained model as ``rcc train`` saves ``final``: marked trained, the
    fine-tuning mode recorded, backbones left out when their sources are known,
    the training config beside it."""
    model.config.trained = True
    if cfg.task == "finetune" and cfg.data.instruction_mode != "mixed":
        model.config.instruction_mode = cfg.data.instruction_mode
    model.save_pretrained(str(folder), include_backbones=not (model.config.encoder_source and model.config.decoder_source))
    atomic_write_text(Path(folder) / TRAIN_CONFIG_NAME, cfg.to_json())


def _record(main: bool, output_dir: Path, writer, values: dict) -> None:
    """Append to ``log.jsonl`` (exact floats) and TensorBoard, on the main process."""
    if not main:
        return
    with open(output_dir / "log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(values) + "\n")
    if writer is not None:
        for k, v in values.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k if k.startswith("eval") else f"train/{k}", v, values["step"])


def print_config(config: str | Path, overrides: list[str]) -> str:
    """The resolved config as JSON (``rcc train --print-config``)."""
    return TrainConfig.load(config, overrides).to_json()

