"""`rcc train` learns to read the compressed slots.

Task: reconstruction pretraining (docs/method.md section 3) on random tokens. Every
context is one window of 16 uniformly random tokens (ids 1..15) compressed at
ratio 4 into 4 slots; the decoder must write the window back after a 2-token
cue. Tokens are independent, so without the slots nothing beats guessing:
a context-blind model's held-out loss is at least ln(15) = 2.708 nats and its
accuracy about 1/15 = 0.067.

Measured on CPU (400 steps, about 10 s on one thread): held-out loss 1.31 and
accuracy 0.56 after training, against 2.708 / 0.067 for any context-blind
model; the untrained model scores 2.77 / 0.07, and the trained model given
another row's context falls back to chance (4.32 / 0.07).
"""

import math

import numpy as np
import pytest
import torch
import yaml

from rcc import RCCModel
from rcc.cli import main
from rcc.data import PretrainBatches, TokenFile, write_token_folder
from rcc.train.setup import build_model
from rcc.train.config import TrainConfig

V = 16  # ids 1..15 are drawn; 0 never appears
W, RATIO = 16, 4


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # 400 steps


@torch.no_grad()
def score(model, batches, shuffle_context=False) -> tuple[float, float]:
    """Held-out (loss, next-token accuracy) over counted labels; with
    ``shuffle_context`` each row reads another row's context."""
    model.eval()
    loss_sum = hits = count = 0.0
    for batch in batches:
        if shuffle_context:
            batch = dict(batch, context_ids=batch["context_ids"].roll(1, dims=0))
        out = model(**batch)
        n = (batch["labels"] != -100).sum().item()
        loss_sum += out.loss.item() * n
        nxt = batch["labels"][:, 1:]
        hits += ((out.logits[:, :-1].argmax(-1) == nxt) & (nxt != -100)).sum().item()
        count += n
    return loss_sum / count, hits / count


def test_rcc_train_learns_to_reconstruct_from_the_slots(tmp_path):
    rng = np.random.default_rng(0)
    write_token_folder(tmp_path / "tokens", {"train": [rng.integers(1, V, 2 * W) for _ in range(500)],
                                             "eval": [rng.integers(1, V, 2 * W) for _ in range(50)]}, V)
    cfg = dict(task="pretrain",
               model=dict(backbone=dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=256),
                          window=W, ratio=RATIO),
               data=dict(train_data=str(tmp_path / "tokens"), min_windows=1, max_windows=1, target_tokens=W,
                         cue_min=2, cue_max=2, reconstruct_fraction=1.0),
               optim=dict(batch_size=16, max_steps=400, lr=3e-3, warmup_steps=20),
               run=dict(output_dir=str(tmp_path / "run"), log_every=50, eval_every=200, eval_batches=4, save_every=0,
                        progress=False))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 0

    held_out = PretrainBatches(TokenFile(tmp_path / "tokens", "eval"), window=W, batch_size=16, min_windows=1,
                               max_windows=1, target_tokens=W, cue_min=2, cue_max=2, reconstruct_fraction=1.0, seed=99)
    batches = [held_out[i] for i in range(8)]
    trained = RCCModel.from_pretrained(str(tmp_path / "run" / "final"))
    untrained = build_model(TrainConfig.load(cfg))
    loss, acc = score(trained, batches)
    loss0, acc0 = score(untrained, batches)
    loss_blind, acc_blind = score(trained, batches, shuffle_context=True)
    floor = math.log(V - 1)
    print(f"\nheld-out loss / accuracy: trained {loss:.3f} / {acc:.3f}; context-blind bound {floor:.3f} / "
          f"{1 / (V - 1):.3f}; untrained {loss0:.3f} / {acc0:.3f}; trained with another row's context "
          f"{loss_blind:.3f} / {acc_blind:.3f}")
    assert loss < floor - 0.5, (loss, floor)  # no context-blind model can get below `floor` in expectation
    assert acc > 0.25 > 3 * (1 / (V - 1))
    assert loss0 > floor - 0.1 and acc0 < 0.15  # the untrained model does not read the slots
    assert acc_blind < 0.15 and loss_blind > floor  # the skill lives in the slots, not in the prompt
