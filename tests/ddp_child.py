"""A small stage trained by the one training loop, for test_distributed.py; run it plainly or under
torchrun: python ddp_child.py RUN_DIR STEPS BATCH OUT_JSON. Rank 0 writes OUT_JSON."""
import json
import sys
import time

import torch

from unclip_lite.config import TrainConfig
from unclip_lite.runtime import is_main_process
from unclip_lite.train import train

run_dir, steps, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
slow = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
w_true = torch.linspace(-1, 1, 8)


def get_batch(step):  # the global batch: a pure function of the step
    g = torch.Generator().manual_seed(step)
    x = torch.randn(batch, 8, generator=g)
    return {"x": x, "y": (x @ w_true)[:, None] + 0.1 * torch.randn(batch, 1, generator=g)}


def loss_fn(m, b):
    time.sleep(slow)
    return torch.nn.functional.mse_loss(m(b["x"]).float(), b["y"])


cfg = TrainConfig(steps=steps, batch_size=batch, lr=3e-3, warmup_steps=2, checkpoint_every=5, log_every=1,
                  precision="fp32", ema_decay=0.9)
metrics = train(model, loss_fn, get_batch, cfg, run_dir=run_dir, progress=False)
if is_main_process():
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    with open(out, "w") as f:
        json.dump({"history": metrics["loss_history"], "weights": weights, "resumed_from": metrics["resumed_from"],
                   "world_size": metrics.get("world_size", 1)}, f)
