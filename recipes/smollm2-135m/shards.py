"""A training checkpoint's trained weights through the GPU machine's return
limits (at most 8 files of 16 MiB, 64 MiB in all; docs/training.md, "A GPU run
in 15 minutes"), and back into a model folder here.

- :func:`export` writes the trained parameters of ``checkpoints/step-N`` in
  bfloat16 as ``ckpt-II-of-NN.safetensors`` (files of at most ``max_mib``),
  each written beside its name and renamed over the older one: ``$OUT`` holds
  one set (the bundled recipe's: three files, 38 MiB; two sets would be over the
  64 MiB that come back) and at most one partial file. Each file carries the
  step, its place, the training config and the trainer state in its metadata.
- :func:`newest` reads the set back, and refuses files of two steps (a kill
  between two renames) or a damaged file.
- :func:`join` (here, with rcc installed) rebuilds the model the config trains,
  loads those weights into it and saves it as ``rcc train`` saves ``final``.

    python recipes/smollm2-135m/shards.py join FOLDER_WITH_FILES runs/smollm2-135m/gpu/final
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "rcc-gpu-shards/1"
PATTERN = re.compile(r"ckpt-(\d\d)-of-(\d\d)\.safetensors")


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


def export(checkpoint: Path, out: Path, max_mib: float = 15.0) -> list[Path]:
    """Write ``checkpoint``'s trained parameters (bf16) into ``out``; returns the files.

    One file at a time is written beside its name (``*.part``) and renamed over
    the older one, so ``out`` never holds more than one set and one partial file.
    """
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    groups = _shards(tensors, int(max_mib * 2**20))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "step": checkpoint.name.removeprefix("step-").lstrip("0") or "0",
            "train_config": (checkpoint / "train_config.json").read_text(),
            "trainer_state": (checkpoint / "trainer_state.json").read_text()}
    paths = []
    for i, group in enumerate(groups):
        path = out / f"ckpt-{i:02d}-of-{len(groups):02d}.safetensors"
        part = path.with_name(path.name + ".part")
        save_file(group, str(part), metadata={**meta, "index": str(i), "count": str(len(groups))})
        os.replace(part, path)
        paths.append(path)
    for old in out.glob("ckpt-*-of-*.safetensors"):
        if old not in paths:
            old.unlink()  # a set of another size
    return paths


def newest(folder: Path) -> tuple[int, list[Path], dict] | None:
    """``(step, files, metadata)`` of the set in ``folder`` when every file is there,
    readable and of one step; None (and why, on stderr) otherwise."""
    files = sorted(p for p in folder.glob("ckpt-*-of-*.safetensors") if PATTERN.fullmatch(p.name))
    if not files:
        return None
    metas = []
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                metas.append(fh.metadata() or {})
                for key in fh.keys():  # a damaged file fails here
                    fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as err:
        print(f"shards: {folder}: a damaged file ({err})", file=sys.stderr)
        return None
    steps = sorted({m.get("step") for m in metas})
    if len(steps) != 1 or any(m.get("format") != FORMAT for m in metas) \
            or sorted(int(m["index"]) for m in metas) != list(range(len(files))) \
            or {int(m["count"]) for m in metas} != {len(files)}:
        print(f"shards: {folder}: not one whole set (steps {', '.join(map(str, steps))}: killed between two "
              "files?)", file=sys.stderr)
        return None
    return int(steps[0]), files, metas[0]


def join(folder: Path, dest: Path) -> Path:
    """Rebuild the trained model from the whole set in ``folder`` into ``dest``."""
    from rcc.train.loop import save_final
    from rcc.train.config import TrainConfig
    from rcc.train.setup import build_model

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
    print(f"shards: step {step} from {len(files)} files -> {dest}", file=sys.stderr)
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
