"""Model configuration: one dataclass, one field per fact, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from rcc.errors import RCCError

POOLINGS = ("last", "mean")
CONFIG_FILE = "rcc_config.json"  # an RCC model folder's config (rcc.checkpoint writes it beside the weights)


@dataclass
class RCCConfig:
    """What defines an RCC model beyond its two backbones' own configs.

    Attributes:
        window: tokens per encoder window W (docs/method.md section 1).
        ratio: compression ratio r; each window gives ``window // ratio`` slots.
        pooling: how a block of r encoder states becomes one slot: ``"last"``
            keeps the state at the block's last token (the released model),
            ``"mean"`` averages the block's states at every level.
        level_map: for each decoder layer i, the encoder levels whose mean feeds
            A_i. ``None`` means the default mapping of :meth:`levels_for_layers`.
        encoder_config / decoder_config: the backbones' ``PretrainedConfig`` as
            a dict, so a model can be rebuilt without the hub.
        encoder_source / decoder_source: where the backbone weights come from
            when a checkpoint does not carry them (a hub id, a local path or
            ``"embedded:smollm2"``); ``None`` when the checkpoint carries them.
        trained: False for a model freshly built by ``from_backbones``; its
            projections are an initialisation, not learned.
        instruction_mode: the instruction mode (docs/method.md section 2) a question is
            asked in when the caller names none: ``"manual"`` for a model
            fine-tuned in that mode only; ``None`` means ``"reconstruct"``,
            the released model's.
    """

    window: int = 2048
    ratio: int = 32
    pooling: str = "last"
    level_map: list[list[int]] | None = None
    encoder_config: dict[str, Any] = field(default_factory=dict)
    decoder_config: dict[str, Any] = field(default_factory=dict)
    encoder_source: str | None = None
    decoder_source: str | None = None
    trained: bool = True
    instruction_mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window <= 0:
            raise RCCError(f"window must be a positive integer, got {self.window!r}")
        if not isinstance(self.ratio, int) or self.ratio <= 0:
            raise RCCError(f"ratio must be a positive integer, got {self.ratio!r}")
        if self.window % self.ratio:
            raise RCCError(
                f"window ({self.window}) is not divisible by ratio ({self.ratio}); "
                "choose a window that is a multiple of the ratio, e.g. "
                f"{(self.window // self.ratio + 1) * self.ratio}"
            )
        if self.instruction_mode not in (None, "reconstruct", "manual"):
            raise RCCError(f"instruction_mode must be reconstruct or manual, got {self.instruction_mode!r}")
        if self.pooling not in POOLINGS:
            raise RCCError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def slots_per_window(self) -> int:
        """k = W / r."""
        return self.window // self.ratio

    def slots_for(self, n_tokens: int) -> int:
        """Number of slots a context of ``n_tokens`` compresses to (after padding)."""
        return windows_for(n_tokens, self.window) * self.slots_per_window

    def levels_for_layers(self, encoder_layers: int, decoder_layers: int) -> list[list[int]]:
        """Encoder levels (0 = embeddings, j = output of layer j-1) feeding each A_i.

        Default mapping (docs/method.md section 1): decoder layer i reads the mean of the
        encoder levels in ``(i * L_E / L_D, (i + 1) * L_E / L_D]``. With equal
        depths this is level i+1; with L_E = 2 L_D it is the original's mean of
        levels 2i+1 and 2i+2. With a shallower encoder (L_E < L_D) the interval
        can hold no integer; the layer then reads level ceil((i + 1) L_E / L_D),
        so every level is used and the last decoder layer reads the last level.

        Raises:
            RCCError: if an explicit ``level_map`` does not fit the depths.
        """
        if self.level_map is not None:
            if len(self.level_map) != decoder_layers:
                raise RCCError(
                    f"level_map has {len(self.level_map)} entries but the decoder has "
                    f"{decoder_layers} layers; give one list of encoder levels per decoder layer"
                )
            for levels in self.level_map:
                if not levels or any(not 1 <= lv <= encoder_layers for lv in levels):
                    raise RCCError(
                        f"level_map entry {levels} is invalid: levels must be non-empty and "
                        f"within 1..{encoder_layers} (the encoder has {encoder_layers} layers)"
                    )
            return [list(map(int, levels)) for levels in self.level_map]
        out = []
        for i in range(decoder_layers):
            lo = (i * encoder_layers) // decoder_layers + 1
            hi = ((i + 1) * encoder_layers) // decoder_layers
            if hi < lo:  # shallower encoder: ceil((i+1) L_E / L_D)
                hi = lo = -(-((i + 1) * encoder_layers) // decoder_layers)
            out.append(list(range(lo, hi + 1)))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RCCConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RCCError(
                f"unknown RCC config fields {unknown}; this file was written by a newer or "
                "different tool version"
            )
        return cls(**data)


def windows_for(n_tokens: int, window: int) -> int:
    """Number of W-token windows a context of ``n_tokens`` is padded to (docs/method.md section 1)."""
    if n_tokens <= 0:
        raise RCCError("the context is empty; give at least one token of context")
    return max(1, -(-n_tokens // window))
