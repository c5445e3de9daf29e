"""Training configuration: one dataclass, validated on creation, saved as JSON
beside every checkpoint. ``rcc train CONFIG.yaml key=value ...`` builds it."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RCCError

TASKS = ("pretrain", "finetune")
SIDE_MODES = ("full", "frozen", "lora")
INSTRUCTION_MODES = ("reconstruct", "manual", "mixed")
PRECISIONS = ("auto", "no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class TrainConfig:
    """Everything one training run needs (spec section 3).

    Model:
        backbone: hub id, local folder, ``"embedded:smollm2"``, or an inline
            transformers config (``{model_type: llama, hidden_size: 64, ...}``,
            random weights from ``seed``) used for both sides.
        encoder_backbone / decoder_backbone: a different backbone for one side.
        tokenizer: tokenizer to use instead of the backbone's (required by
            ``finetune`` on text with an inline backbone).
        init_from: a saved RCC model (``rcc train`` output ``final/``) to start
            from instead of fresh backbones: the curriculum's second stage, or
            fine-tuning a compression-pretrained model.
        window / ratio / pooling: W, r and slot pooling of a fresh model
            (default 2048 / 32 / "last"); with ``init_from`` they must match or be unset.
        dtype: parameter dtype (mixed precision keeps float32 master weights).
        train_encoder / train_decoder: ``"full"``, ``"frozen"`` or ``"lora"``;
            G and A_i are always trained.
        lora_r / lora_alpha / lora_dropout / lora_target_modules: peft LoRA
            settings (target modules None: peft's default for the architecture).
        gradient_checkpointing: recompute backbone activations in backward.

    Data:
        task: ``"pretrain"`` (compression pretraining on a token folder from
            ``rcc prepare-data``) or ``"finetune"`` (QA records, JSONL/JSON/HF).
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
            step; the rest are encoded without gradient (0: all). Makes long contexts cost about a forward pass per
            extra window, so the decoder learns to search many slots cheaply.
        target_tokens: pretrain decoder span (reconstruction span or continuation).
        cue_min / cue_max: reconstruction cue length (uncounted first tokens).
        reconstruct_fraction: share of pretrain samples that reconstruct (the
            rest continue the text after the encoded part).
        cross_documents: pretrain spans may cross document boundaries (the
            token stream is used as one text); else each sample lies in one document.
        instruction_mode: finetune mode of spec section 2, or ``"mixed"``
            (each record gets one of the two at random, fixed by ``seed``).
        answer_suffix: appended to each finetune answer (taught as the stop marker).
        max_decoder_tokens: finetune records with longer prompt + target are skipped.
        eval_fraction: finetune without ``eval_data``: share of records held out.
        on_error: ``"fail"`` or ``"skip"`` malformed finetune records.

    Optimisation:
        lr, lr_encoder, lr_decoder, lr_glue: learning rates (None: ``lr``);
            ``lr_glue`` is for G and A_i.
        weight_decay (matrices only), adam_beta1/2, max_grad_norm (0: off).
        warmup_steps, min_lr_ratio: linear warm-up, then cosine to ``lr * min_lr_ratio``.
        batch_size: micro-batch per process; grad_accum: micro-batches per step.
        max_steps: optimiser steps (pretrain: required); epochs: finetune
            passes over the data when ``max_steps`` is unset.
        max_minutes: wall-clock budget of this run (None: none): when it is
            spent the run saves a checkpoint and ``final`` and stops early
            (the schedule still assumes ``max_steps``; a later run with
            ``resume=auto`` continues it).
        mixed_precision: ``"auto"`` = bf16 on a GPU that supports it, else off.

    Run:
        output_dir, seed, log_every, eval_every (0: only at the end),
        eval_batches (0: no evaluation), save_every (0: only at the end), keep_checkpoints,
        resume (``"auto"``: continue from the newest checkpoint in
        ``output_dir``; ``"never"``; or a checkpoint folder), num_workers,
        progress, tensorboard.

    Raises:
        RCCError: on any invalid value, naming the field and what is allowed.
    """

    # model
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
    # data
    task: str = "pretrain"
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
    # optimisation
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
    max_minutes: float | None = None
    mixed_precision: str = "auto"
    ddp_find_unused_parameters: bool = False
    # run
    output_dir: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: str = "auto"
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        if self.output_dir is None:
            raise RCCError("output_dir is not set; give output_dir=PATH (where checkpoints and the model go)")
        if self.train_data is None:
            raise RCCError("train_data is not set; give a prepared token folder (pretrain) or QA records (finetune)")
        if self.backbone is None and self.init_from is None and not (self.encoder_backbone and self.decoder_backbone):
            raise RCCError("no model: set backbone (hub id, path, embedded:smollm2 or an inline config) or init_from")
        if self.init_from is not None and (self.backbone or self.encoder_backbone or self.decoder_backbone):
            raise RCCError("give either init_from (a saved RCC model) or backbone, not both")
        for name, allowed in (("task", TASKS), ("train_encoder", SIDE_MODES), ("train_decoder", SIDE_MODES),
                              ("instruction_mode", INSTRUCTION_MODES), ("mixed_precision", PRECISIONS),
                              ("dtype", DTYPES), ("on_error", ("fail", "skip"))):
            if getattr(self, name) not in allowed:
                raise RCCError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.pooling is not None and self.pooling not in ("last", "mean"):
            raise RCCError(f"pooling must be 'last' or 'mean'; got {self.pooling!r}")
        positive = ("lora_r", "min_windows", "max_windows", "target_tokens", "max_decoder_tokens", "batch_size",
                    "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise RCCError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("window", "ratio", "max_steps", "max_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise RCCError(f"{name} must be positive; got {getattr(self, name)}")
        for name in ("grad_windows", "warmup_steps", "eval_every", "eval_batches", "save_every", "num_workers", "cue_min", "weight_decay",
                     "max_grad_norm", "lr_encoder", "lr_decoder", "lr_glue", "lr", "lora_dropout"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RCCError(f"{name} must not be negative; got {value}")
        for name in ("reconstruct_fraction", "min_lr_ratio", "eval_fraction", "adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RCCError(f"{name} must be within [0, 1]; got {getattr(self, name)}")
        if self.eval_fraction >= 1.0:
            raise RCCError("eval_fraction must be below 1 (some records must remain for training)")
        if self.min_windows > self.max_windows:
            raise RCCError(f"min_windows ({self.min_windows}) is larger than max_windows ({self.max_windows})")
        if self.cue_min > self.cue_max:
            raise RCCError(f"cue_min ({self.cue_min}) is larger than cue_max ({self.cue_max})")
        if self.task == "pretrain":
            if self.max_steps is None:
                raise RCCError("pretrain needs max_steps (the number of optimiser steps)")
            if self.reconstruct_fraction > 0 and self.cue_max >= self.target_tokens:
                raise RCCError(f"cue_max ({self.cue_max}) must be smaller than target_tokens "
                               f"({self.target_tokens}) so that some span tokens are counted")
            window = self.window or 2048
            if self.reconstruct_fraction > 0 and self.target_tokens > self.min_windows * window and self.init_from is None:
                raise RCCError(f"a reconstruction span of target_tokens={self.target_tokens} does not fit in a "
                               f"context of min_windows={self.min_windows} x window={window} tokens")
        elif self.max_steps is None and self.epochs is None:
            raise RCCError("finetune needs max_steps or epochs")
        if self.epochs is not None and self.epochs <= 0:
            raise RCCError(f"epochs must be positive; got {self.epochs}")
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            raise RCCError(f"resume must be 'auto', 'never' or a checkpoint folder; {self.resume!r} is not a folder")

    # ------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Raises RCCError on unknown keys, suggesting the closest known one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
                raise RCCError(f"unknown training option {key!r}{hint}")
        return cls(**data)

    @classmethod
    def load(cls, source: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """A config from a YAML (or JSON) file or a dict, with ``key=value`` overrides.

        Values are parsed as YAML (``lr=3e-4``, ``resume=never``,
        ``lora_target_modules=[q_proj,v_proj]``); ``backbone.hidden_size=32``
        sets one key of a dict-valued option.

        Raises:
            RCCError: on an unreadable file, bad YAML, a malformed override or an invalid value.
        """
        if isinstance(source, TrainConfig):
            source = source.to_dict()
        data = dict(source) if isinstance(source, dict) else read_yaml(source) if source is not None else {}
        return cls.from_dict(apply_overrides(data, overrides))


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
            raise RCCError(f"override {item!r} is not KEY=VALUE (e.g. lr=3e-4)")
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


def _check_types(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, str) and hints[f.name] in (float, float | None):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
                setattr(cfg, f.name, value)
            except ValueError:
                pass
        if not _accepts(value, hints[f.name]):
            want = " or ".join("null" if h is type(None) else getattr(h, "__name__", str(h))
                               for h in (typing.get_args(hints[f.name]) or (hints[f.name],)))
            raise RCCError(f"{f.name} must be {want}; got {value!r} ({type(value).__name__})")
        if hints[f.name] in (float, float | None) and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
