"""Compression-pretraining micro-batches from a token file (docs/method.md section 3)."""

from __future__ import annotations

import numpy as np
import torch

from rcc.errors import RCCError
from rcc.data.tokens import TokenFile


class PretrainBatches(torch.utils.data.Dataset):
    """Compression-pretraining micro-batches from a token file (docs/method.md section 3).

    Batch ``i`` draws c in [min_windows, max_windows] (one c per batch, so rows
    stack), then for each row an objective: with probability
    ``reconstruct_fraction`` *reconstruction* (the decoder gets a random
    ``target_tokens`` span of the encoded text; its first cue_min..cue_max tokens
    are an uncounted cue), else *continuation* (the ``target_tokens`` after
    the encoded text). Spans never cross documents unless ``cross_documents``;
    starting points are uniform over all valid positions.

    ``__getitem__(i)`` returns ``context_ids [b, c*W]``, ``input_ids [b, T]``,
    ``labels [b, T]`` (int64; -100 = not counted).

    Raises:
        RCCError: when no document is long enough for some sample shape.
    """

    def __init__(self, tokens: TokenFile, *, window: int, batch_size: int, min_windows: int, max_windows: int,
                 target_tokens: int, cue_min: int, cue_max: int, reconstruct_fraction: float,
                 cross_documents: bool = False, seed: int = 0):
        self.tokens, self.window, self.batch_size = tokens, window, batch_size
        self.min_windows, self.max_windows, self.target = min_windows, max_windows, target_tokens
        self.cue = (cue_min, cue_max)
        self.recon = reconstruct_fraction
        self.seed = seed
        if cross_documents:
            self.starts = np.zeros(1, np.int64)
            lengths = np.array([len(tokens)], np.int64)
        else:
            self.starts = tokens.offsets[:-1]
            lengths = np.diff(tokens.offsets)
        self._cum: dict[int, np.ndarray] = {}
        for c in range(min_windows, max_windows + 1):
            need = []
            if reconstruct_fraction > 0:
                need.append(c * window)
            if reconstruct_fraction < 1:
                need.append(c * window + target_tokens)
            for n in need:
                cum = np.cumsum(np.maximum(lengths - n + 1, 0))
                if len(cum) == 0 or cum[-1] == 0:
                    longest = int(lengths.max()) if len(lengths) else 0
                    raise RCCError(
                        f"{tokens.folder} ({tokens.split}): no document has the {n} tokens a sample of {c} "
                        f"window(s) of {window} needs (longest: {longest}); lower max_windows or target_tokens, "
                        "or set cross_documents: true")
                self._cum[n] = cum

    def __len__(self) -> int:  # effectively endless; the trainer decides how many it takes
        return 2**62

    def _start(self, n: int, rng: np.random.Generator) -> int:
        cum = self._cum[n]
        u = int(rng.integers(cum[-1]))
        d = int(np.searchsorted(cum, u, side="right"))
        return int(self.starts[d]) + u - (int(cum[d - 1]) if d else 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        c = int(rng.integers(self.min_windows, self.max_windows + 1))
        n, T, b = c * self.window, self.target, self.batch_size
        context = np.empty((b, n), np.int64)
        decoder = np.empty((b, T), np.int64)
        labels = np.empty((b, T), np.int64)
        for row in range(b):
            recon = rng.random() < self.recon
            start = self._start(n if recon else n + T, rng)
            seq = np.asarray(self.tokens.tokens[start : start + n + (0 if recon else T)], dtype=np.int64)
            context[row] = seq[:n]
            if recon:
                s = int(rng.integers(0, n - T + 1))
                decoder[row] = labels[row] = seq[s : s + T]
                labels[row, : int(rng.integers(self.cue[0], self.cue[1] + 1))] = -100
            else:
                decoder[row] = labels[row] = seq[n:]
        return {"context_ids": torch.from_numpy(context), "input_ids": torch.from_numpy(decoder),
                "labels": torch.from_numpy(labels)}

