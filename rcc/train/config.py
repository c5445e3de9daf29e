"""Training configuration: a few nested dataclasses, validated on creation,
saved as JSON beside every checkpoint. ``rcc train CONFIG.yaml key=value ...``
builds it.

The file has one section per concern, plus the task::

    task: pretrain             # or finetune
    model: {backbone: ..., window: 512, ratio: 32, train_encoder: lora, ...}
    data:  {train_data: ..., max_windows: 1, target_tokens: 512, ...}
    optim: {lr: 5.0e-4, batch_size: 16, max_steps: 326, ...}
    run:   {output_dir: ..., seed: 0, save_every: 250, ...}

``model.window``, ``model.ratio`` and ``model.pooling`` are the fields of
:class:`rcc.config.RCCConfig` of the same names, and their defaults are
RCCConfig's (stated once, there). ``null`` (the default here) means *unset*:
a fresh model takes RCCConfig's default, a run with ``model.init_from`` keeps
the saved model's value (:meth:`ModelOptions.rcc_config`).

Files, dicts and ``key=value`` overrides written before the sections existed
(``lr: 1e-4`` at the top level) still load: each such key moves to its section
(``optim.lr``) and one warning line names the new keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcc.config import POOLINGS, RCCConfig
from rcc.errors import RCCError

log = logging.getLogger(__name__)

TRAIN_TASKS = ("pretrain", "finetune")
SIDE_MODES = ("full", "frozen", "lora")
INSTRUCTION_MODES = ("reconstruct", "manual", "mixed")
PRECISIONS = ("auto", "no", "bf16", "fp16")
PARAM_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _check_values(options, section: str, choices: dict[str, tuple] | None = None, positive: tuple[str, ...] = (),
                  positive_or_none: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                  unit: tuple[str, ...] = ()) -> None:
    """One section's per-option rules: a value among ``choices``, ``positive`` (> 0),
    ``positive_or_none``, ``non_negative`` (>= 0 or None), ``unit`` (within [0, 1]).

    Raises:
        RCCError: naming the first bad option by its dotted key.
    """
    for name, allowed in (choices or {}).items():
        if getattr(options, name) not in allowed:
            raise RCCError(f"{section}.{name} must be one of {', '.join(allowed)}; got {getattr(options, name)!r}")
    for name in positive:
        if getattr(options, name) <= 0:
            raise RCCError(f"{section}.{name} must be positive; got {getattr(options, name)}")
    for name in positive_or_none:
        if getattr(options, name) is not None and getattr(options, name) <= 0:
            raise RCCError(f"{section}.{name} must be positive; got {getattr(options, name)}")
    for name in non_negative:
        value = getattr(options, name)
        if value is not None and value < 0:
            raise RCCError(f"{section}.{name} must not be negative; got {value}")
    for name in unit:
        if not 0.0 <= getattr(options, name) <= 1.0:
            raise RCCError(f"{section}.{name} must be within [0, 1]; got {getattr(options, name)}")


@dataclass
class ModelOptions:
    """``model:`` what is trained.

    Attributes:
        backbone: hub id, local folder, ``"embedded:smollm2"``, or an inline
            transformers config (``{model_type: llama, hidden_size: 64, ...}``,
            random weights from ``run.seed``) used for both sides.
        encoder_backbone / decoder_backbone: a different backbone for one side.
        tokenizer: tokenizer to use instead of the backbone's (required by
            ``finetune`` on text with an inline backbone).
        init_from: a saved RCC model (``rcc train`` output ``final/``) to start
            from instead of fresh backbones: the curriculum's second stage, or
            fine-tuning a compression-pretrained model.
        window / ratio / pooling: W, r and slot pooling, the
            :class:`~rcc.config.RCCConfig` fields. ``None`` (unset): a fresh model
            takes RCCConfig's default, ``init_from`` keeps the saved model's
            value. With ``init_from`` a set window must match the saved one;
            ratio and pooling may change (no parameter depends on them).
        dtype: dtype the backbones are loaded in and the trained parameters
            (LoRA, G, A_i, a side trained in full) are kept in; float32 unless
            the whole run is to be in another dtype.
        frozen_dtype: dtype the frozen backbone weights are stored in during
            training (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``).
            ``auto`` = the compute dtype: bfloat16 / float16 under
            ``run.mixed_precision`` bf16 / fp16 (so autocast never re-casts a
            frozen weight per step), else ``dtype``; under FSDP / DeepSpeed
            always ``dtype`` (their shards hold one dtype; their own mixed
            precision casts). An explicit value must be ``dtype`` or the
            compute dtype. A side trained in full keeps ``dtype`` throughout.
        train_encoder / train_decoder: ``"full"``, ``"frozen"`` or ``"lora"``;
            G and A_i are always trained.
        lora_r / lora_alpha / lora_dropout / lora_target_modules: peft LoRA
            settings (target modules None: peft's default for the architecture).
        gradient_checkpointing: recompute backbone activations in backward.
    """

    backbone: str | dict | None = None
    encoder_backbone: str | dict | None = None
    decoder_backbone: str | dict | None = None
    tokenizer: str | None = None
    init_from: str | None = None
    window: int | None = None
    ratio: int | None = None
    pooling: str | None = None
    dtype: str = "float32"
    train_encoder: str = "full"
    train_decoder: str = "full"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list | None = None
    gradient_checkpointing: bool = False
    frozen_dtype: str = "auto"

    def rcc_fields(self) -> dict[str, Any]:
        """The :class:`RCCConfig` fields this config sets (window, ratio, pooling that are not None)."""
        return {k: getattr(self, k) for k in ("window", "ratio", "pooling") if getattr(self, k) is not None}

    def rcc_config(self, base: RCCConfig | None = None) -> RCCConfig:
        """The model config a run trains with: ``base`` (the ``init_from`` model's
        config) or, for fresh backbones, RCCConfig's defaults, with the fields
        this config sets replacing theirs.

        Raises:
            RCCError: when the result is invalid (e.g. a window that is not a multiple of the ratio).
        """
        return dataclasses.replace(base, **self.rcc_fields()) if base is not None else RCCConfig(**self.rcc_fields())

    def check(self) -> None:
        """This section's own rules (a model source, known modes and dtypes, the
        fresh model's RCCConfig). Raises RCCError."""
        if self.backbone is None and self.init_from is None and not (self.encoder_backbone and self.decoder_backbone):
            raise RCCError("no model: set model.backbone (hub id, path, embedded:smollm2 or an inline config) "
                           "or model.init_from")
        if self.init_from is not None and (self.backbone or self.encoder_backbone or self.decoder_backbone):
            raise RCCError("give either model.init_from (a saved RCC model) or model.backbone, not both")
        _check_values(self, "model", choices={"train_encoder": SIDE_MODES, "train_decoder": SIDE_MODES,
                                              "dtype": PARAM_DTYPES, "frozen_dtype": ("auto", *PARAM_DTYPES[:3])},
                      positive=("lora_r",), positive_or_none=("window", "ratio"), non_negative=("lora_dropout",))
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise RCCError(f"model.pooling must be {' or '.join(map(repr, POOLINGS))}; got {self.pooling!r}")
        if self.init_from is None:  # a fresh model's RCCConfig exists now: its checks (window a multiple of ratio)
            try:
                self.rcc_config()
            except RCCError as err:
                raise RCCError(f"model: {err}") from None


@dataclass
class DataOptions:
    """``data:`` what the model is trained on.

    Attributes:
        train_data / eval_data: pretrain: a prepared folder (evaluation uses
            the held-out split of ``eval_data``, else of ``train_data``; a folder
            prepared with ``--eval-fraction 0`` is used whole); finetune:
            file(s), folders or ``hf:NAME[:CONFIG][@SPLIT]``.
        min_windows / max_windows: pretrain contexts have c windows, c uniform
            in [min, max] per micro-batch; finetune skips records whose text to
            compress needs more than ``max_windows`` windows.
        grad_windows: backpropagate through at most this many windows of each
            context: the one that holds a finetune record's answer (when it
            occurs verbatim in the context) and others drawn at random each
            step; the rest are encoded without gradient (0: all). Makes long
            contexts cost about a forward pass per extra window, so the decoder
            learns to search many slots cheaply.
        target_tokens: pretrain decoder span (reconstruction span or continuation).
        cue_min / cue_max: reconstruction cue length (uncounted first tokens).
        reconstruct_fraction: share of pretrain samples that reconstruct (the
            rest continue the text after the encoded part).
        cross_documents: pretrain spans may cross document boundaries (the
            token stream is used as one text); else each sample lies in one document.
        instruction_mode: finetune mode of docs/method.md section 2, or ``"mixed"``
            (each record gets one of the two at random, fixed by ``run.seed``).
        answer_suffix: appended to each finetune answer (taught as the stop marker).
        max_decoder_tokens: finetune records with longer prompt + target are skipped.
        eval_fraction: finetune without ``eval_data``: share of records held out.
        on_error: ``"fail"`` or ``"skip"`` malformed finetune records.
    """

    train_data: str | list | None = None
    eval_data: str | list | None = None
    min_windows: int = 1
    max_windows: int = 1
    grad_windows: int = 0
    target_tokens: int = 512
    cue_min: int = 10
    cue_max: int = 20
    reconstruct_fraction: float = 1.0
    cross_documents: bool = False
    instruction_mode: str = "reconstruct"
    answer_suffix: str = "<|im_end|>"
    max_decoder_tokens: int = 1024
    eval_fraction: float = 0.0
    on_error: str = "fail"

    def check(self) -> None:
        """This section's own rules. Raises RCCError."""
        if self.train_data is None:
            raise RCCError("data.train_data is not set; give a prepared token folder (pretrain) "
                           "or QA records (finetune)")
        _check_values(self, "data", choices={"instruction_mode": INSTRUCTION_MODES, "on_error": ("fail", "skip")},
                      positive=("min_windows", "max_windows", "target_tokens", "max_decoder_tokens"),
                      non_negative=("grad_windows", "cue_min"),
                      unit=("reconstruct_fraction", "eval_fraction"))
        if self.eval_fraction >= 1.0:
            raise RCCError("data.eval_fraction must be below 1 (some records must remain for training)")
        if self.min_windows > self.max_windows:
            raise RCCError(f"data.min_windows ({self.min_windows}) is larger than data.max_windows ({self.max_windows})")
        if self.cue_min > self.cue_max:
            raise RCCError(f"data.cue_min ({self.cue_min}) is larger than data.cue_max ({self.cue_max})")


@dataclass
class OptimOptions:
    """``optim:`` how parameters are updated.

    Attributes:
        lr, lr_encoder, lr_decoder, lr_glue: learning rates (None: ``lr``);
            ``lr_glue`` is for G and A_i.
        weight_decay (matrices only), adam_beta1/2, max_grad_norm (0: off).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine to ``lr * min_lr_ratio``.
        batch_size: micro-batch per process; grad_accum: micro-batches per step.
        max_steps: optimiser steps (pretrain: required); epochs: finetune
            passes over the data when ``max_steps`` is unset.
    """

    lr: float = 1e-4
    lr_encoder: float | None = None
    lr_decoder: float | None = None
    lr_glue: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    batch_size: int = 6
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None

    def check(self) -> None:
        """This section's own rules. Raises RCCError."""
        _check_values(self, "optim", positive=("batch_size", "grad_accum"), positive_or_none=("max_steps", "epochs"),
                      non_negative=("warmup_steps", "weight_decay", "max_grad_norm", "lr_encoder", "lr_decoder",
                                    "lr_glue", "lr"),
                      unit=("min_lr_ratio", "adam_beta1", "adam_beta2"))


@dataclass
class RunOptions:
    """``run:`` where and how the run executes.

    Attributes:
        output_dir (required), seed, log_every, eval_every (0: only at the end),
        eval_batches (0: no evaluation), save_every (0: only at the end), keep_checkpoints.
        resume: ``"auto"`` (continue from the newest checkpoint in ``output_dir``),
            ``"never"``, or a checkpoint folder.
        num_workers: data loader processes (None: 2 on a GPU, with pinned
            memory, 0 on a CPU).
        progress, tensorboard.
        compile: ``torch.compile`` each decoder layer's own forward (both
            sides); RCC's per-layer hooks run outside the compiled region. Costs
            compilation time at start (and a C compiler on CPU).
        max_minutes: wall-clock budget of this run (None: none): when it is
            spent the run saves a checkpoint and ``final`` and stops early
            (the schedule still assumes ``optim.max_steps``; a later run with
            ``resume=auto`` continues it).
        stop_at: a Unix time (``time.time()``) by which the run has stopped and
            saved (None: none), e.g. the end of a borrowed machine's call: the
            run stops at the last step after which one more step and a save
            still fit (both as measured in this run), and saves a checkpoint
            and ``final``.
        fit_schedule: with ``stop_at`` or ``max_minutes``, shrink
            ``optim.max_steps`` once the step time is measured (steps 2-6) to
            the steps the time left buys, so that the warm-up and cosine
            schedule end when the time does (a resumed run keeps the saved
            total).
        save_minutes: also save a checkpoint when this many minutes have
            passed since the last one (None: by ``save_every`` only).
        mixed_precision: the compute dtype of the step (autocast): ``"auto"`` =
            bf16 on a GPU that supports it, fp16 on an older GPU; on a CPU bf16
            where it has native bf16 matrix units (AMX; avx512_bf16 when a
            measured matmul says so, :mod:`rcc.precision`), else off (float32).
            ``"no"`` keeps float32 (exact, machine-independent results).
        eval_at_start: also evaluate before the first step of a run that starts
            at step 0 (logged as step 0): the starting model's held-out loss, the
            baseline the run's curve is read against.
        ddp_find_unused_parameters: passed to DDP.
    """

    output_dir: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str = "auto"
    num_workers: int | None = None
    progress: bool = True
    tensorboard: bool = True
    max_minutes: float | None = None
    stop_at: float | None = None
    fit_schedule: bool = False
    save_minutes: float | None = None
    mixed_precision: str = "auto"
    ddp_find_unused_parameters: bool = False
    compile: bool = False
    eval_at_start: bool = False

    def check(self) -> None:
        """This section's own rules. Raises RCCError."""
        if self.output_dir is None:
            raise RCCError("run.output_dir is not set; give run.output_dir=PATH (where checkpoints and the model go)")
        _check_values(self, "run", choices={"mixed_precision": PRECISIONS}, positive=("log_every", "keep_checkpoints"),
                      positive_or_none=("max_minutes", "stop_at", "save_minutes"),
                      non_negative=("eval_every", "eval_batches", "save_every", "num_workers"))
        if self.fit_schedule and self.stop_at is None and self.max_minutes is None:
            raise RCCError("run.fit_schedule fits the schedule to a time budget; give run.stop_at or run.max_minutes")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise RCCError(f"run.resume must be 'auto', 'never' or a checkpoint folder; {self.resume!r} is not a "
                           "folder")


SECTIONS: dict[str, type] = {"model": ModelOptions, "data": DataOptions, "optim": OptimOptions, "run": RunOptions}
# the section of each option: {"lr": "optim", ...} (for messages: "did you mean 'optim.lr'?")
SECTION_OF: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def _key(name: str) -> str:
    """The dotted key of an option (``"lr"`` -> ``"optim.lr"``), as messages name it."""
    return f"{SECTION_OF[name]}.{name}" if name in SECTION_OF else name


@dataclass
class TrainConfig:
    """Everything one training run needs (docs/method.md section 3).

    Attributes:
        task: ``"pretrain"`` (compression pretraining on a token folder from
            ``rcc prepare-data``) or ``"finetune"`` (QA records, JSONL/JSON/HF).
        model / data / optim / run: the sections (:class:`ModelOptions`,
            :class:`DataOptions`, :class:`OptimOptions`, :class:`RunOptions`);
            a dict is accepted for each and checked for unknown keys.

    Raises:
        RCCError: on any invalid value, naming the field (``optim.lr``) and what is allowed.
    """

    task: str = "pretrain"
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _section(name, value))
            elif not isinstance(value, cls):
                raise RCCError(f"{name} must be a mapping of option: value; got {value!r}")
        if self.run.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.run.mixed_precision = "no"
        if not isinstance(self.task, str):
            raise RCCError(f"task must be str; got {self.task!r} ({type(self.task).__name__})")
        for name in SECTIONS:
            _check_types(getattr(self, name), name)
        if self.task not in TRAIN_TASKS:
            raise RCCError(f"task must be one of {', '.join(TRAIN_TASKS)}; got {self.task!r}")
        # each section's own rules, in the order a config file reads (the run's folder first)
        for name in ("run", "data", "model", "optim"):
            getattr(self, name).check()
        # rules across sections
        m, d, o = self.model, self.data, self.optim
        fresh = m.rcc_config() if m.init_from is None else None
        if self.task == "pretrain":
            if o.max_steps is None:
                raise RCCError("pretrain needs optim.max_steps (the number of optimiser steps)")
            if d.reconstruct_fraction > 0 and d.cue_max >= d.target_tokens:
                raise RCCError(f"data.cue_max ({d.cue_max}) must be smaller than data.target_tokens "
                               f"({d.target_tokens}) so that some span tokens are counted")
            if fresh is not None and d.reconstruct_fraction > 0 and d.target_tokens > d.min_windows * fresh.window:
                raise RCCError(f"a reconstruction span of data.target_tokens={d.target_tokens} does not fit in a "
                               f"context of data.min_windows={d.min_windows} x model.window={fresh.window} tokens")
        elif o.max_steps is None and o.epochs is None:
            raise RCCError("finetune needs optim.max_steps or optim.epochs")

    # ------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        """The nested form: ``{"task": ..., "model": {...}, "data": {...}, "optim": {...}, "run": {...}}``."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "training config") -> "TrainConfig":
        """A config from its nested form.

        Raises:
            RCCError: on unknown keys (suggesting the closest known one: ``lr`` at the
            top is ``optim.lr``) or an invalid value.
        """
        data = _copy_sections(data)
        for key in data:
            if key != "task" and key not in SECTIONS:
                raise RCCError(f"unknown training option {key!r}{_hint(key)}")
        return cls(**data)

    @classmethod
    def load(cls, source: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """A config from a YAML (or JSON) file or a dict, with ``key=value`` overrides.

        Values are parsed as YAML (``optim.lr=3e-4``, ``run.resume=never``,
        ``model.lora_target_modules=[q_proj,v_proj]``); ``model.backbone.hidden_size=32``
        sets one key of a dict-valued option.

        Raises:
            RCCError: on an unreadable file, bad YAML, a malformed override or an invalid value.
        """
        if isinstance(source, TrainConfig):
            source = source.to_dict()
        name = "training config" if source is None or isinstance(source, dict) else str(source)
        data = dict(source) if isinstance(source, dict) else read_yaml(source) if source is not None else {}
        return cls.from_dict(apply_overrides(_copy_sections(data), list(overrides)), name)


def _copy_sections(data: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a config dict, with an empty section (``run:`` with every option
    commented out, read as None) as ``{}``."""
    out = json.loads(json.dumps(data))
    for name in SECTIONS:
        if name in out and out[name] is None:
            out[name] = {}
    return out


def dotted(data: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict as one level of dotted keys: ``{"task": ..., "optim.lr": ...}``."""
    out = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _hint(key: str, section: str | None = None) -> str:
    """``"; did you mean 'optim.lr'?"`` for an unknown key, or the known keys."""
    if section is None:  # a top-level key: a section, the task, or an option without its section
        names = ["task", *SECTIONS, *SECTION_OF]
        close = difflib.get_close_matches(key, names, n=1)
        if close:
            return f"; did you mean {_key(close[0])!r}?"
        return f"; known keys: task, {', '.join(SECTIONS)}"
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"; did you mean {section + '.' + close[0]!r}?"
    if key in SECTION_OF:  # the right option in the wrong section
        return f"; did you mean {_key(key)!r}?"
    close = difflib.get_close_matches(key, list(SECTION_OF), n=1)
    if close:
        return f"; did you mean {_key(close[0])!r}?"
    return f"; known keys of {section}: {', '.join(names)}"


def _section(name: str, values: dict[str, Any]):
    """The ``name`` section's dataclass from a dict. Raises RCCError on unknown keys."""
    cls = SECTIONS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise RCCError(f"unknown training option {name + '.' + str(key)!r}{_hint(str(key), name)}")
    return cls(**values)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` with ``key=value`` / ``key.sub=value`` strings applied (values parsed as YAML).

    Raises:
        RCCError: on an item that is not KEY=VALUE or a value that is not valid YAML.
    """
    data = json.loads(json.dumps(data))  # a deep copy; nested dicts are edited below
    yaml = _yaml()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RCCError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise RCCError(f"override {item!r}: the value is not valid YAML; quote it") from None
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return data


def _yaml():
    try:
        import yaml
    except ImportError:
        raise RCCError("reading YAML configs needs pyyaml: pip install 'rcc-llm[train]'") from None
    return yaml


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping from a file.

    Raises:
        RCCError: when missing, unparsable or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RCCError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RCCError(f"{path}: cannot read ({err})") from None
    yaml = _yaml()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RCCError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RCCError(f"{path}: a training config must be a mapping of option: value")
    return data


def _accepts(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (list, dict, str):
        return isinstance(value, hint)
    if origin in (list, dict):
        return isinstance(value, origin)
    return True


def _check_types(section: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, str) and hints[f.name] in (float, float | None):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
                setattr(section, f.name, value)
            except ValueError:
                pass
        if not _accepts(value, hints[f.name]):
            want = " or ".join("null" if h is type(None) else getattr(h, "__name__", str(h))
                               for h in (typing.get_args(hints[f.name]) or (hints[f.name],)))
            raise RCCError(f"{prefix}.{f.name} must be {want}; got {value!r} ({type(value).__name__})")
        if hints[f.name] in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            setattr(section, f.name, float(value))
