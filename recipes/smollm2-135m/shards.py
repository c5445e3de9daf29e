"""A training checkpoint's trained weights through the GPU machine's return
limits (at most 8 files of 16 MiB, 64 MiB in all; docs/training.md, "A GPU run
in 15 minutes"), and back into a model folder here.

- :func:`export` writes the trained parameters of ``checkpoints/step-N`` in
  bfloat16 as ``ckpt-S-II-of-NN.safetensors`` (files of at most ``max_mib``),
  slot S ``a`` or ``b`` in turn: a kill while one slot is written leaves the
  other one whole. Each file carries the step, its place, the training config
  and the trainer state in its metadata.
- :func:`newest` finds the newest slot whose files are all there and readable.
- :func:`join` (here, with rcc installed) rebuilds the model the config trains,
  loads those weights into it and saves it as ``rcc train`` saves ``final``.

    python recipes/smollm2-135m/shards.py join FOLDER_WITH_FILES runs/smollm2-135m/gpu/final
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "rcc-gpu-shards/1"
PATTERN = re.compile(r"ckpt-([ab])-(\d\d)-of-(\d\d)\.safetensors")
SLOTS = "ab"
RETURN_FILES = 8     # what one call brings back
OTHER_FILES = 2      # log.jsonl and status.json beside the shards


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    out, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key]
        if current and size + t.numel() * t.element_size() > max_bytes:
            out.append(current)
            current, size = {}, 0
        current[key] = t
        size += t.numel() * t.element_size()
    return out + ([current] if current else [])


def shard_count(checkpoint: Path, max_mib: float = 15.0) -> int:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        total = 0
        for key in fh.keys():
            sl = fh.get_slice(key)
            total += math.prod(sl.get_shape()) * (2 if sl.get_dtype() in ("F32", "F16", "BF16", "F64") else 8)
    return max(1, math.ceil(total / (max_mib * 2**20)))


def export(checkpoint: Path, out: Path, slot: str, max_mib: float = 15.0) -> list[Path]:
    """Write ``checkpoint``'s trained parameters (bf16) into ``out`` as slot ``slot``; returns the files.

    The slot's older files are removed first, so a kill mid-way leaves an
    incomplete slot that :func:`newest` passes over.
    """
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    groups = _shards(tensors, int(max_mib * 2**20))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"ckpt-{slot}-*-of-*.safetensors"):
        old.unlink()
    meta = {"format": FORMAT, "slot": slot, "step": checkpoint.name.removeprefix("step-").lstrip("0") or "0",
            "train_config": (checkpoint / "train_config.json").read_text(),
            "trainer_state": (checkpoint / "trainer_state.json").read_text()}
    paths = []
    for i, group in enumerate(groups):
        path = out / f"ckpt-{slot}-{i:02d}-of-{len(groups):02d}.safetensors"
        save_file(group, str(path), metadata={**meta, "index": str(i), "count": str(len(groups))})
        paths.append(path)
    return paths


def newest(folder: Path) -> tuple[int, list[Path], dict] | None:
    """``(step, files, metadata)`` of the newest slot in ``folder`` whose files are all
    there, readable and of one step; None when there is none."""
    found: dict[str, list[Path]] = {}
    for path in folder.glob("ckpt-*-of-*.safetensors"):
        if PATTERN.fullmatch(path.name):
            found.setdefault(path.name[5], []).append(path)
    best = None
    for files in found.values():
        metas = []
        try:
            for path in sorted(files):
                with safe_open(str(path), framework="pt") as fh:
                    metas.append(fh.metadata() or {})
                    for key in fh.keys():  # a truncated file fails here
                        fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError):
            continue
        counts = {m.get("count") for m in metas}
        steps = {m.get("step") for m in metas}
        if (len(counts) != 1 or len(steps) != 1 or int(counts.pop()) != len(files)
                or sorted(int(m["index"]) for m in metas) != list(range(len(files)))
                or any(m.get("format") != FORMAT for m in metas)):
            continue
        step = int(steps.pop())
        if best is None or step > best[0]:
            best = (step, sorted(files), metas[0])
    return best


def join(folder: Path, dest: Path) -> Path:
    """Rebuild the trained model from the newest whole slot in ``folder`` into ``dest``."""
    from rcc.train import save_final
    from rcc.train_config import TrainConfig
    from rcc.train_model import build_model

    found = newest(folder)
    if found is None:
        raise SystemExit(f"{folder}: no whole set of ckpt-*-of-*.safetensors files (see status.json there)")
    step, files, meta = found
    cfg = TrainConfig.from_dict(json.loads(meta["train_config"]))
    model = build_model(cfg)
    own = dict(model.named_parameters())
    weights = {}
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            weights.update({k: fh.get_tensor(k) for k in fh.keys()})
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in weights)
    unknown = sorted(set(weights) - set(own))
    if missing or unknown:
        raise SystemExit(f"{folder}: the weights do not fit the model of its train_config "
                         f"({len(missing)} missing, e.g. {missing[:1]}; {len(unknown)} unknown, e.g. {unknown[:1]})")
    with torch.no_grad():
        for name, value in weights.items():
            own[name].copy_(value.to(own[name].dtype))
    save_final(model, cfg, dest)
    (dest / "trainer_state.json").write_text(meta["trainer_state"])
    print(f"shards: step {step} from {len(files)} files of slot {meta['slot']} -> {dest}", file=sys.stderr)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    j = sub.add_parser("join", help="the returned files -> a model folder (here)")
    j.add_argument("folder", type=Path)
    j.add_argument("dest", type=Path)
    args = ap.parse_args()
    print(join(args.folder, args.dest))


if __name__ == "__main__":
    main()
