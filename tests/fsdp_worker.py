"""Worker of test_train_speed's 2-process FSDP2 test (run by torch.distributed.run):
shard each decoder layer (by the class rcc train hands accelerate) and the whole
model with ``fully_shard`` on gloo, train two steps, gather the full state on
rank 0 and save it through ``rcc.train.setup.gathered_model``."""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from rcc import hooks
from rcc.data import PretrainBatches, TokenFile
from rcc.train.setup import gathered_model, build_model
from rcc.train.config import TrainConfig


def main(config: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = TrainConfig.load(config)
    torch.manual_seed(0)
    model = build_model(cfg, share_backbone=False).train()  # fully_shard wraps each side's layers apart
    names = {type(layer).__name__ for side in (model.encoder, model.decoder) for layer in hooks.decoder_layers(side)}
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
    batches = PretrainBatches(TokenFile(cfg.data.train_data), window=16, batch_size=2, min_windows=2, max_windows=2,
                              target_tokens=8, cue_min=2, cue_max=2, reconstruct_fraction=0.5)
    for step in range(2):  # micro-batch step * world + rank, as rcc train numbers them
        model(**batches[step * 2 + rank]).loss.backward()
        opt.step()
        opt.zero_grad()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        gathered_model(state, model).save_pretrained(out, include_backbones=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
