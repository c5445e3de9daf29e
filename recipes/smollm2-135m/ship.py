"""Copy a trained model folder (``rcc train``'s ``final/``) to where it ships,
its floating-point tensors stored as bfloat16 (40 MB instead of 80 MB; the
loader computes in float32 on a CPU). A model over reloadable backbones ships
without ``tokenizer/``: the loader takes the backbone's own tokenizer (3.4 MB
less, and its special tokens as the GGUF file defines them).

Usage: python3 ship.py SRC DST   (DST is replaced atomically)
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rcc.train.config import dotted


def main(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for f in tmp.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(f))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, str(f),
                  metadata=meta)
    # a manual-only last stage makes manual the model's own mode; checkpoints
    # written before rcc_config.json had the field get it from their train config
    config, train = json.loads((tmp / "rcc_config.json").read_text()), tmp / "train_config.json"
    if config.get("instruction_mode") is None and train.is_file():
        stage = dotted(json.loads(train.read_text()))  # nested, or flat from older versions
        if stage.get("task") == "finetune" and stage.get("data.instruction_mode") in ("manual", "reconstruct"):
            config["instruction_mode"] = stage["data.instruction_mode"]
            (tmp / "rcc_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if config.get("encoder_source") and config.get("decoder_source"):
        shutil.rmtree(tmp / "tokenizer", ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"ship.py: {dst} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
