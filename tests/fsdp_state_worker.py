"""One process of tests/train/test_train_state.py's FSDP2 check (run by torch.distributed.run, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_state_worker.py OUT PHASE

PHASE: ``straight`` (4 steps), ``cut`` (2 steps, then rcc's training state
into OUT/ckpt) or ``resume`` (a fresh model and optimiser, the state loaded,
2 more steps). ``straight`` and ``resume`` write the full trained weights to
OUT/<phase>.safetensors. The model has a frozen layer and dropout, so the
weights are equal only when parameters, optimiser, scheduler and each
process's own RNG state all came back.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from rcc.train.state import load_training_state, save_training_state


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 16),
                                torch.nn.GELU(), torch.nn.Linear(16, 4))
    model[0].requires_grad_(False)
    for layer in (model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def steps(model, optimizer, scheduler, first: int, last: int) -> None:
    rank = dist.get_rank()
    for step in range(first, last):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def main(out: Path, phase: str) -> None:
    dist.init_process_group("gloo")
    model, optimizer, scheduler = build()
    if phase == "resume":
        torch.manual_seed(12345)  # a different RNG state: the loaded one must replace it
        load_training_state(out / "ckpt", model, optimizer, scheduler, fsdp=True)
        steps(model, optimizer, scheduler, 2, 4)
    else:
        torch.manual_seed(100 + dist.get_rank())  # each process its own dropout stream: the RNG files differ
        steps(model, optimizer, scheduler, 0, 2 if phase == "cut" else 4)
    if phase == "cut":
        if dist.get_rank() == 0:
            (out / "ckpt").mkdir()
        dist.barrier()
        save_training_state(out / "ckpt", model, optimizer, scheduler, fsdp=True)
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, str(out / f"{phase}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
