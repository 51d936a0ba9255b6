"""A training run for test_train.py's kill-and-resume test: python train_child.py RUN_DIR STEPS [PRECISION]."""
import hashlib
import json
import sys
import time

import torch

from unclip_lite.config import TrainConfig
from unclip_lite.train import train

run_dir, steps = sys.argv[1], int(sys.argv[2])
precision = sys.argv[3] if len(sys.argv) > 3 else "fp32"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
w_true = torch.linspace(-1, 1, 8)


def get_batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=g)
    return {"x": x, "y": (x @ w_true)[:, None]}


def loss_fn(m, b):
    time.sleep(0.01)  # slow enough for the parent to kill it mid-run
    return torch.nn.functional.mse_loss(m(b["x"]).float(), b["y"])


cfg = TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_every=5, log_every=5,
                  precision=precision)
metrics = train(model, loss_fn, get_batch, cfg, run_dir=run_dir, progress=False)
weights = hashlib.sha1(b"".join(v.detach().float().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
print(json.dumps({"resumed_from": metrics["resumed_from"], "final_loss": metrics["final_loss"],
                  "history": metrics["loss_history"], "weights_sha1": weights}))
