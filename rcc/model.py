"""RCCModel: an encoder LM, a decoder LM and the maps G and A_i (docs/method.md section 1).

Compose, do not subclass: the backbones are ordinary transformers causal LMs.
The decoder reads slots through ``inputs_embeds`` and per-layer additions
through forward hooks (:mod:`rcc.hooks`); nothing here depends on a backbone's
modeling code.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rcc import adapters, hooks, loss as fused_loss, positions, slots
from rcc.config import RCCConfig
from rcc.errors import RCCError
from rcc.memory import CompressedContext, kv_of, token_hash


@dataclass
class RCCOutput:
    """Result of :meth:`RCCModel.forward`.

    Attributes:
        loss: mean next-token cross-entropy over counted prompt labels (or None).
        logits: ``[batch, prompt_len, vocab]``; ``logits[:, t]`` predicts ``input_ids[:, t+1]``.
            When the loss was computed without logits (:mod:`rcc.loss`), they are
            computed from the kept hidden states on first access, so a caller that
            only needs the loss never holds ``[batch, prompt, vocab]`` of them.
    """

    # a dataclass, so that DDP finds the loss among the output's fields
    loss: torch.Tensor | None
    _logits: torch.Tensor | None = field(default=None, repr=False)
    _make_logits: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits, self._make_logits = self._make_logits(), None
        return self._logits


def _batch_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t [b, ...]`` for ``batch`` rows (a single row repeated)."""
    return t if t.shape[0] == batch else t.expand(batch, *t.shape[1:])


def _as_batch(ids, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise RCCError(f"{name} must be [batch, tokens] token ids, got shape {tuple(ids.shape)}")
    return ids.long()


class RCCModel(nn.Module):
    """Recurrent Context Compression over two Hugging Face causal LMs.

    Args:
        encoder: causal LM E (L_E layers, hidden H_E); its LM head is never run.
        decoder: causal LM D (L_D layers, hidden H_D).
        config: :class:`RCCConfig` (window, ratio, pooling, level map).
        tokenizer: optional tokenizer shared by both sides (needed by :meth:`ask`).

    Attributes:
        G: ``Linear(H_E, H_D, bias=False)``, slot input embedding from level 0.
        A: ``ModuleList`` of L_D ``Linear(H_E, H_D, bias=False)``, added after
            decoder layer i at slot positions.

    Raises:
        RCCError: when the backbones' layers cannot be found or the level map does not fit.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, config: RCCConfig, tokenizer=None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.config = config
        self.tokenizer = tokenizer
        enc_layers = len(hooks.decoder_layers(encoder))
        dec_layers = len(hooks.decoder_layers(decoder))
        self.level_map = config.levels_for_layers(enc_layers, dec_layers)
        h_e, h_d = encoder.config.hidden_size, decoder.config.hidden_size
        self.G = nn.Linear(h_e, h_d, bias=False)
        self.A = nn.ModuleList(nn.Linear(h_e, h_d, bias=False) for _ in range(dec_layers))
        dtype = next(decoder.parameters()).dtype
        device = next(decoder.parameters()).device
        self.G.to(device=device, dtype=dtype)
        self.A.to(device=device, dtype=dtype)
        self._cache_kw = hooks.cache_kwarg(decoder)
        self.position_limit = hooks.absolute_position_limit(decoder)
        self._positions_warned = False  # the rotary warning is given once (check_positions)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_backbones(
        cls,
        encoder: nn.Module,
        decoder: nn.Module,
        window: int = RCCConfig.window,
        ratio: int = RCCConfig.ratio,
        tokenizer=None,
        pooling: str = RCCConfig.pooling,
        level_map: list[list[int]] | None = None,
        encoder_source: str | None = None,
        decoder_source: str | None = None,
    ) -> "RCCModel":
        """A fresh, untrained RCC model over two backbones.

        Initialisation (for training): every A_i is zero, so at step 0 the
        decoder computes exactly what the pretrained backbone computes on the
        slot embeddings and training starts from the backbone's loss, not from
        noise injected into every layer; A_i still get gradients (their input,
        the encoder state, is non-zero). G is the identity when H_E == H_D (both
        sides usually start from one backbone, so a slot starts as the embedding
        of its block's last token, an in-distribution input), else a random map
        scaled to the decoder embeddings' standard deviation.
        """
        if encoder is decoder:
            raise RCCError("encoder and decoder must be separate model instances (separate weights); load the backbone twice")
        config = RCCConfig(
            window=window,
            ratio=ratio,
            pooling=pooling,
            level_map=level_map,
            encoder_config=encoder.config.to_dict(),
            decoder_config=decoder.config.to_dict(),
            encoder_source=encoder_source,
            decoder_source=decoder_source,
            trained=False,
        )
        model = cls(encoder, decoder, config, tokenizer=tokenizer)
        with torch.no_grad():
            for a in model.A:
                a.weight.zero_()
            h_e, h_d = model.G.in_features, model.G.out_features
            if h_e == h_d:
                model.G.weight.copy_(torch.eye(h_d))
            else:
                # G(x) then has the decoder embeddings' per-element scale
                s_d = decoder.get_input_embeddings().weight.float().std().item()
                s_e = encoder.get_input_embeddings().weight.float().std().item()
                model.G.weight.normal_(0.0, s_d / (math.sqrt(h_e) * max(s_e, 1e-8)))
        return model

    @classmethod
    def from_parts(cls, parts, device=None) -> "RCCModel":
        """Assemble a model from a checkpoint's :class:`rcc.checkpoint.Parts` (weights
        of G and A_i loaded strictly, cast to ``parts.dtype``, in eval mode).

        Raises:
            RCCError: when the projections' weights do not fit the backbones.
        """
        from rcc.checkpoint import load_glue

        model = cls(parts.encoder, parts.decoder, parts.config, tokenizer=parts.tokenizer)
        load_glue(model, parts.glue, f"{parts.source} (G and A_i)")
        if parts.dtype is not None:
            model.to(parts.dtype)
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, device=None,
                        share_backbone: bool = True) -> "RCCModel":
        """Load a model saved by :meth:`save_pretrained` (local folder, hub id, or
        a bundled model's name such as ``rcc-smollm2-135m``); see :func:`rcc.checkpoint.read_pretrained`.

        Args:
            dtype: parameter dtype (default: as stored).
            share_backbone: hold one frozen backbone for both sides when they come from
                the same source (see :func:`rcc.checkpoint.read_pretrained`).
        Raises:
            RCCError: when it is not an rcc-llm checkpoint, or its files are corrupt or mismatched.
        """
        from rcc.checkpoint import read_pretrained

        return cls.from_parts(read_pretrained(name_or_path, dtype=dtype, share_backbone=share_backbone), device=device)

    @classmethod
    def from_original(cls, weights: str, base_model, dtype: torch.dtype | None = None, tokenizer=None) -> "RCCModel":
        """Load the authors' released layout (docs/method.md section 5); see :func:`rcc.checkpoint.read_original`."""
        from rcc.checkpoint import read_original

        return cls.from_parts(read_original(weights, base_model=base_model, dtype=dtype, tokenizer=tokenizer))

    def save_pretrained(self, path: str, include_backbones: bool | None = None) -> None:
        """Write ``rcc_config.json`` + ``model.safetensors`` (+ tokenizer) to ``path``."""
        from rcc.checkpoint import save_pretrained

        save_pretrained(self, path, include_backbones=include_backbones)

    def __repr__(self) -> str:
        e, d = self.encoder, self.decoder
        state = (
            "UNTRAINED: G and A_i are freshly initialised, answers are meaningless until trained"
            if not self.config.trained
            else "trained"
        )
        return (
            f"RCCModel(encoder={type(e).__name__}[{len(self.A) and len(hooks.decoder_layers(e))} layers, "
            f"hidden {self.G.in_features}], decoder={type(d).__name__}[{len(self.A)} layers, hidden "
            f"{self.G.out_features}], window={self.config.window}, ratio={self.config.ratio}, "
            f"pooling={self.config.pooling!r}, {state})"
        )

    # ----------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """A short identity of this model's configuration and weights.

        Hashes the config and, for every parameter, its name, shape and 16
        evenly spaced values rounded to bfloat16 (so the same weights loaded in
        another dtype or device keep their identity; different weights change it).
        """
        h = hashlib.sha256()
        cfg = self.config
        h.update(f"{cfg.window}/{cfg.ratio}/{cfg.pooling}/{self.level_map}".encode())
        # per child, so that a side whose frozen weights are the other side's tensors
        # (rcc.backbones.shared_copy) lists them as a separate copy would: same identity
        params = [(n, p) for side, child in self.named_children() for n, p in child.named_parameters(prefix=side)]
        for name, p in params:
            flat = p.detach().reshape(-1)
            count = min(16, flat.numel())
            idx = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            sample = flat[idx].to(torch.bfloat16).float().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # ------------------------------------------------------------ compress
    def encode_windows(self, windows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compress windows into projected slots (:mod:`rcc.slots`).

        Args:
            windows: ``[num_windows, W]`` token ids; positions restart at 0 in each.
        Returns:
            ``(embeds, additions)``: ``embeds = G(level 0 slots): [num_windows, k, H_D]``
            and, for each decoder layer i, ``A_i(mean of its levels): [num_windows, k, H_D]``.
        """
        return slots.project(self, *slots.encode_levels(self, windows))

    def _encode_levels(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's slot states before G and A_i; see :func:`rcc.slots.encode_levels`."""
        return slots.encode_levels(self, windows)

    def iter_slots(
        self, context_ids: torch.Tensor, window_batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Projected slots of ``context_ids [batch, n]``, a batch of windows at a time, in
        context order; shapes and arguments as in :func:`rcc.slots.iter_slots`."""
        return slots.iter_slots(self, context_ids, window_batch_size)

    def _check_context(self, context_ids) -> torch.Tensor:
        ids = _as_batch(context_ids, "context_ids")
        if ids.shape[1] == 0:
            raise RCCError("the context is empty; give at least one token of context")
        return ids

    def check_positions(self, total: int, new_tokens: int = 0, what: str = "slots + prompt") -> None:
        """Refuse (absolute positions) or warn once (rotary) when ``total`` decoder positions
        and up to ``new_tokens`` generated ones exceed what the decoder was trained on;
        see :func:`rcc.positions.check_positions`.

        Raises:
            RCCError: for learned absolute position embeddings beyond their table.
        """
        positions.check_positions(self, total, new_tokens, what)

    @torch.no_grad()
    def kv_bytes_per_slot(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one slot of one context takes in a :class:`CompressedContext` (its keys and
        values in every decoder layer), in ``dtype`` (default: the model's); measured by
        pre-filling one position, so it holds for any cache layout."""
        from transformers import DynamicCache

        cache = DynamicCache()
        embeds = torch.zeros(1, 1, self.G.out_features, device=self.device, dtype=self.dtype)
        self.decoder(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        size = (dtype or self.dtype).itemsize
        return sum((k.numel() + v.numel()) * size for k, v in kv_of(cache))

    def slot_bytes_per_slot(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one slot's decoder inputs take in a memory (:attr:`CompressedContext.slots`:
        G and every A_i), in ``dtype`` (default: the model's)."""
        return (len(self.A) + 1) * self.G.out_features * (dtype or self.dtype).itemsize

    @torch.no_grad()
    def compress(
        self,
        context_ids,
        window_batch_size: int | None = 8,
        progress: Callable[[int], None] | None = None,
        prefix: CompressedContext | None = None,
        keep_slots: bool = True,
    ) -> CompressedContext:
        """Compress a context into the decoder's KV cache, streaming (docs/method.md section 4).

        Each batch of windows is encoded, projected and pre-filled into the
        decoder's cache before the next batch is encoded, so peak memory is the
        weights + the cache for n/r slots + one batch of windows' activations.

        Args:
            context_ids: ``[batch, n]`` or ``[n]`` token ids.
            window_batch_size: windows encoded per step (None: all at once).
            progress: called with the number of windows done after each step.
            prefix: a memory to extend (append to): the new windows' slots come after
                its slots (they attend to them) and only the new windows are encoded.
                The cut is kept: the new text gets windows of its own, so the result
                equals compressing both texts at once when the prefix's texts and this
                one are whole windows (docs/method.md section 4); ``segments`` records
                the cut. The prefix itself is not modified.
            keep_slots: also keep the slots' decoder inputs (:attr:`CompressedContext.slots`,
                1.55x the KV cache's size for SmolLM2), which a memory needs to be read
                after another one (:meth:`combine`); an appended memory keeps them when
                its prefix has them.
        Returns:
            a :class:`CompressedContext` with ``num_slots = windows * W / r``
            (plus the prefix's slots).
        Raises:
            RCCError: on an empty context or a context beyond an absolute-position decoder.
        """
        ids = self._check_context(context_ids)
        n = ids.shape[1]
        before = 0 if prefix is None else prefix.num_slots
        self.check_positions(before + self.config.slots_for(n), what="the slots")
        if prefix is not None:
            self.check_memory(prefix)
            cache = prefix.cache(ids.shape[0], self.device, self.dtype)
            keep_slots = keep_slots and prefix.slots is not None
        else:
            from transformers import DynamicCache

            cache = DynamicCache()
        done, parts = 0, []
        if keep_slots and prefix is not None:
            parts.append(_batch_to(prefix.slots, ids.shape[0]).to(self.device, self.dtype))
        with adapters.fast_inference(self.encoder, self.decoder):
            for embeds, additions in self.iter_slots(ids, window_batch_size):
                self._prefill(cache, embeds, additions)
                if keep_slots:
                    parts.append(torch.stack([embeds, *additions], dim=2))  # [batch, j*k, L_D + 1, H_D]
                done += embeds.shape[1] // self.config.slots_per_window
                if progress is not None:
                    progress(done)
        content = token_hash(ids) if prefix is None else token_hash(ids) + "+" + prefix.content_hash
        return CompressedContext(
            kv=[(k, v) for k, v in kv_of(cache)],
            num_tokens=n + (0 if prefix is None else prefix.num_tokens),
            num_slots=cache.get_seq_length(),
            window=self.config.window,
            ratio=self.config.ratio,
            model_id=self.fingerprint(),
            content_hash=hashlib.sha256(content.encode()).hexdigest() if prefix is not None else content,
            slots=torch.cat(parts, dim=1) if keep_slots else None,
            segments=(() if prefix is None else prefix.pieces) + (n,),
            parents=() if prefix is None else (prefix.content_hash,),
        )

    def _prefill(self, cache, embeds: torch.Tensor, additions: list[torch.Tensor]) -> None:
        """Run slots ``embeds [batch, j, H_D]`` (with ``additions``: L_D x ``[batch, j, H_D]``)
        through the decoder, appending their keys and values to ``cache``."""
        with hooks.inject(hooks.decoder_layers(self.decoder), additions):
            self.decoder(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})

    @torch.no_grad()
    def combine(self, memories, window_batch_size: int | None = 8) -> CompressedContext:
        """One memory that reads ``memories`` in the order given, for one question over
        several documents: the first memory's KV cache as it is, then the slots of each
        next one pre-filled after all before it (one decoder pass over their slots, n/r
        positions; no text is encoded). It equals compressing the documents' texts at
        once when each is whole windows (docs/method.md section 4).

        Args:
            memories: :class:`CompressedContext` s of this model, all of one batch size;
                every one but the first must hold its slot inputs (``slots``).
            window_batch_size: windows' slots pre-filled per decoder call.
        Returns:
            a :class:`CompressedContext` with the summed slots and tokens, the segments of
            all in order, their content hashes as ``parents``, and slot inputs when all have them.
        Raises:
            RCCError: for an empty list, a memory from another model (window, ratio),
                one without slot inputs after the first, different batch sizes, or
                more slots than the decoder's positions (with the numbers).
        """
        memories = list(memories)
        if not memories or not all(isinstance(m, CompressedContext) for m in memories):
            raise RCCError("combine needs a list of one or more CompressedContext memories")
        for i, m in enumerate(memories):
            try:
                self.check_memory(m)
            except RCCError as err:
                raise RCCError(f"memory {i + 1} of {len(memories)}: {err}") from None
            if i and m.slots is None:
                raise RCCError(f"memory {i + 1} of {len(memories)} holds no slot inputs (compressed with "
                               "--no-slots, or by an older rcc-llm), so it cannot be read after another; compress "
                               "it again, or put it first")
        if len({m.batch_size for m in memories}) != 1:
            raise RCCError(f"the memories hold {sorted({m.batch_size for m in memories})} contexts each; combine "
                           "memories of one batch size")
        total = sum(m.num_slots for m in memories)
        positions.check_slot_total(self, total, [m.num_slots for m in memories], what=f"the {len(memories)} memories")
        if len(memories) == 1:
            return memories[0]
        first = memories[0]
        cache = first.cache(None, self.device, self.dtype)
        step = self.config.slots_per_window * (int(window_batch_size) if window_batch_size else total)
        with adapters.fast_inference(self.decoder):
            for m in memories[1:]:
                for start in range(0, m.num_slots, step):
                    embeds, additions = m.slot_inputs(start, start + step)
                    self._prefill(cache, embeds.to(self.device, self.dtype),
                                  [a.to(self.device, self.dtype) for a in additions])
        hashes = [m.content_hash for m in memories]
        slots = None
        if all(m.slots is not None for m in memories):
            slots = torch.cat([m.slots.to(self.device, self.dtype) for m in memories], dim=1)
        return CompressedContext(
            kv=[(k, v) for k, v in kv_of(cache)], num_tokens=sum(m.num_tokens for m in memories), num_slots=total,
            window=self.config.window, ratio=self.config.ratio, model_id=first.model_id,
            content_hash=hashlib.sha256("+".join(hashes).encode()).hexdigest(), slots=slots,
            segments=tuple(x for m in memories for x in m.pieces), parents=tuple(hashes))

    def check_memory(self, memory: CompressedContext) -> None:
        """Raises RCCError when ``memory`` was made by another model."""
        mine = self.fingerprint()
        if memory.model_id != mine or memory.window != self.config.window or memory.ratio != self.config.ratio:
            raise RCCError(
                f"this memory was made by another model (model id {memory.model_id}, window "
                f"{memory.window}, ratio {memory.ratio}) than the one loaded (model id {mine}, window "
                f"{self.config.window}, ratio {self.config.ratio}); compress the context again with this model"
            )
        if len(memory.kv) != len(self.A):
            raise RCCError(f"memory has {len(memory.kv)} layers, the decoder {len(self.A)}; recompress")

    # ------------------------------------------------------------- forward
    def forward(
        self,
        context_ids: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        window_batch_size: int | None = None,
        grad_windows: int | None = None,
        focus_windows: torch.Tensor | None = None,
    ) -> RCCOutput:
        """One pass over slots + prompt (training and scoring).

        Args:
            context_ids: ``[batch, n]`` context to compress (same n in the batch).
            input_ids: ``[batch, m]`` decoder prompt.
            labels: ``[batch, m]`` aligned with ``input_ids``; -100 = not counted.
                Slot positions are never counted; the last slot's logits predict
                ``labels[:, 0]`` (docs/method.md section 3).
            attention_mask: ``[batch, m]`` for the prompt (1 = real token).
            window_batch_size: windows of each row encoded together (None: all;
                with ``grad_windows``, those without gradient go 8 at a time).
            grad_windows: when set and gradients are on, each row backpropagates
                through this many of its windows, drawn at random (torch's
                generator); its other windows are encoded without gradient. The
                outputs are those of a full pass; only the gradient is truncated
                (windows are encoded independently), so long contexts cost about
                a forward pass per extra window.
            focus_windows: ``[batch]`` with ``grad_windows``: a window of each row
                that is always among those with gradient (the one that holds the
                answer, so the encoder learns to pack it); -1 = none, all drawn.
        Returns:
            :class:`RCCOutput` with ``logits [batch, m, vocab]`` and the mean loss.
            With labels the loss is a fused head + cross-entropy over the labelled
            positions (:func:`rcc.loss.next_token_loss`); the logits are then
            computed only if the caller reads them.
        """
        ctx = self._check_context(context_ids).to(self.device)
        input_ids = _as_batch(input_ids, "input_ids").to(self.device)
        embeds, additions = slots.all_slots(self, ctx, window_batch_size, grad_windows, focus_windows)
        P, m = embeds.shape[1], input_ids.shape[1]
        self.check_positions(P + m)
        tok = self.decoder.get_input_embeddings()(input_ids)
        inputs = torch.cat([embeds.to(tok.dtype), tok], dim=1)
        mask = None
        if attention_mask is not None:
            am = attention_mask.to(self.device)
            mask = torch.cat([torch.ones(am.shape[0], P, dtype=am.dtype, device=am.device), am], dim=1)
        if labels is not None:
            labels = _as_batch(labels, "labels").to(self.device)
            if labels.shape != input_ids.shape:
                raise RCCError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        head = fused_loss.plain_head(self.decoder)  # at call time: LoRA may wrap the head later
        if head is None:  # logit scaling or softcapping after the head: the decoder's own logits
            with hooks.inject(hooks.decoder_layers(self.decoder), additions):
                out = self.decoder(inputs_embeds=inputs, attention_mask=mask, use_cache=False, logits_to_keep=m + 1)
            kept = out.logits  # positions P-1 .. P+m-1
            loss = None
            if labels is not None:
                scores = kept[:, :m]
                if scores.dtype in (torch.float16, torch.bfloat16):
                    scores = scores.float()
                loss = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), labels.reshape(-1), ignore_index=-100)
            return RCCOutput(loss=loss, _logits=kept[:, 1:])
        # the decoder as body + head (what its forward computes): the loss reads the
        # hidden states at labelled positions only, never [batch, prompt, vocab] logits
        with hooks.inject(hooks.decoder_layers(self.decoder), additions):
            out = hooks.backbone_body(self.decoder)(inputs_embeds=inputs, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state[:, P - 1 :]  # [batch, m+1, H_D]: positions P-1 .. P+m-1

        def make_logits() -> torch.Tensor:
            return head(hidden)[:, 1:]

        if labels is None:
            return RCCOutput(loss=None, _logits=make_logits())
        loss = fused_loss.next_token_loss(hidden[:, :m], head, labels)
        return RCCOutput(loss=loss, _make_logits=make_logits)

    # ----------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        context,
        prompt_ids,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None | str = "default",
        window_batch_size: int | None = 8,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate after the slots and the prompt (greedy unless told otherwise).

        Args:
            context: a :class:`CompressedContext`, or context token ids ``[batch, n]``.
            prompt_ids: ``[batch, m]`` (or ``[m]``); a batch of questions may share
                one single-context memory. Pad on the LEFT with ``attention_mask``.
            attention_mask: ``[batch, m]`` for the prompt.
            max_new_tokens: as in transformers.
            eos_token_id: id(s) that end a row; ``"default"`` keeps the decoder's
                generation config, None disables end-of-sequence stopping.
            **generate_kwargs: any ``transformers`` generation option (``do_sample``,
                ``temperature``, ``top_p``, ``repetition_penalty``, ``stop_strings``,
                ``streamer``, ``stopping_criteria`` ...).
        Returns:
            new token ids ``[batch, new_tokens]`` (finished rows padded with the pad id).
        Raises:
            RCCError: on an empty prompt, a memory from another model, positions
            beyond an absolute-position decoder, or sampling values out of
            :func:`rcc.generation.check_sampling`'s ranges (the CLI's and the server's rules).
        """
        from rcc.generation import check_max_new_tokens, check_sampling

        check_max_new_tokens(max_new_tokens, name=str)
        check_sampling(*(generate_kwargs.get(k) for k in ("temperature", "top_p", "top_k", "repetition_penalty")),
                       name=str)
        made_here = not isinstance(context, CompressedContext)
        memory = self.compress(context, window_batch_size, keep_slots=False) if made_here else context
        if not made_here:  # a memory compressed just now is this model's by construction
            self.check_memory(memory)
        prompt = _as_batch(prompt_ids, "prompt_ids").to(self.device)
        if prompt.shape[1] == 0:
            raise RCCError("the prompt is empty; give at least one prompt token")
        b, m, P = prompt.shape[0], prompt.shape[1], memory.num_slots
        self.check_positions(P + m, new_tokens=max_new_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt)
        attention_mask = attention_mask.to(self.device)
        if made_here and b == memory.batch_size:
            # a memory made for this call alone is moved into the cache layer by layer
            # (not copied whole), so the slots are held once (docs/method.md section 4)
            from transformers import DynamicCache

            kv, memory, cache = memory.kv, None, DynamicCache()
            for i in range(len(kv)):
                (k, v), kv[i] = kv[i], None
                cache.update(k, v, i)
        else:
            cache = memory.cache(b, self.device, self.dtype)
        # Slot positions are already in the cache; generate() skips cached
        # positions of input_ids, so they only need placeholder ids.
        placeholder = torch.zeros(b, P, dtype=prompt.dtype, device=self.device)
        full_ids = torch.cat([placeholder, prompt], dim=1)
        full_mask = torch.cat([torch.ones_like(placeholder), attention_mask], dim=1)
        opts = {"do_sample": False, "max_new_tokens": max_new_tokens}
        if eos_token_id != "default":
            opts["eos_token_id"] = eos_token_id
        if self.decoder.generation_config.pad_token_id is None:
            pad = eos_token_id if isinstance(eos_token_id, int) else self.decoder.generation_config.eos_token_id
            if isinstance(pad, list):
                pad = pad[0]
            opts["pad_token_id"] = pad if pad is not None else 0
        if generate_kwargs.get("stop_strings") and "tokenizer" not in generate_kwargs:
            generate_kwargs["tokenizer"] = self.tokenizer
        opts.update(generate_kwargs)
        if not opts.get("do_sample"):
            for k in ("temperature", "top_p", "top_k"):
                if opts.get(k) is None:
                    opts.pop(k, None)
        with adapters.fast_inference(self.decoder):
            out = self.decoder.generate(input_ids=full_ids, attention_mask=full_mask, **{self._cache_kw: cache}, **opts)
        return out[:, P + m :]

    # ------------------------------------------------------------------ ask
    def ask(self, context, question: str, mode: str | None = None, **kwargs):
        """Answer a question about a text, a saved memory (:class:`CompressedContext`) or
        a list of memories read in order as one (``model.ask([m1, m2], question)``, see
        :meth:`combine`) with one of the two instruction modes (docs/method.md section 2);
        see :func:`rcc.ask.ask` for the options. ``mode=None`` takes the model's own for text
        (``config.instruction_mode``, else ``"reconstruct"``) and ``"manual"`` for memories.

        Returns:
            :class:`rcc.ask.Answer` (``answer`` and, for ``"reconstruct"``,
            the ``reconstructed_question``).
        """
        from rcc.ask import ask

        return ask(self, context, question, mode=mode, **kwargs)
