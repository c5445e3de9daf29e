"""Move a trained model's weights through a small pipe: ``split`` writes the
tensors of ``FINAL/model.safetensors`` in bfloat16 as files of at most
``--max-mib`` MiB each (with the configs beside them); ``join`` puts such files
back together as a folder that ``RCCModel.from_pretrained`` loads.

    python recipes/smollm2-135m/shards.py split runs/.../final $OUT [--max-mib 15]
    python recipes/smollm2-135m/shards.py join FOLDER_WITH_SHARDS runs/gpu/final

The GPU machine returns at most 8 files of 16 MiB each (see docs/training.md,
"A GPU run in 15 minutes"); LoRA r16 + G + A_i of the bundled recipe are 20.1 M
parameters, 40 MB in bfloat16: three shards. The loader reads half-precision
maps over a float32 backbone back as float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

NAME = "model.safetensors"
CONFIGS = ("rcc_config.json", "train_config.json")


def split(final: Path, out: Path, max_mib: float = 15.0) -> list[Path]:
    """bf16 shards of ``final/model.safetensors`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(final / NAME), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key].to(torch.bfloat16) if tensors[key].is_floating_point() else tensors[key]
        if current and size + t.numel() * t.element_size() > max_mib * 2**20:
            shards.append(current)
            current, size = {}, 0
        current[key] = t.contiguous()
        size += t.numel() * t.element_size()
    if current:
        shards.append(current)
    paths = []
    for i, shard in enumerate(shards):
        path = out / f"weights-{i:02d}-of-{len(shards):02d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        paths.append(path)
    for name in CONFIGS:
        if (final / name).is_file():
            shutil.copy(final / name, out / name)
    return paths


def join(folder: Path, dest: Path) -> Path:
    """One ``model.safetensors`` (+ configs) in ``dest`` from the shards in ``folder``."""
    files = sorted(folder.glob("weights-*-of-*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no weights-*-of-*.safetensors")
    total = int(files[0].name.split("-of-")[1].split(".")[0])
    if len(files) != total:
        raise SystemExit(f"{folder}: {len(files)} of {total} shards")
    tensors, meta = {}, None
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            meta = meta or fh.metadata()
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / NAME), metadata=meta)
    for name in CONFIGS:
        if (folder / name).is_file():
            shutil.copy(folder / name, dest / name)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("split")
    s.add_argument("final", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--max-mib", type=float, default=15.0)
    j = sub.add_parser("join")
    j.add_argument("folder", type=Path)
    j.add_argument("dest", type=Path)
    args = ap.parse_args()
    if args.what == "split":
        for p in split(args.final, args.out, args.max_mib):
            print(p, f"{p.stat().st_size / 2**20:.1f} MiB")
    else:
        print(join(args.folder, args.dest))


if __name__ == "__main__":
    main()
