"""The training loop: any objective, SGD/Adam, warm-up + cosine/step schedules, resumable runs.

Determinism is by construction: the learning rate is a pure function of the step, the batches of
an epoch depend only on (seed, epoch), and the global RNG (attack random starts) is reseeded from
(seed, epoch) at the start of every epoch.  A checkpoint written after an epoch therefore holds
everything needed to replay the rest of the run bit for bit, however the process died.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .data import Batches, Split
from .objectives import Objective

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"           # "sgd" (with momentum) or "adam"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"         # "cosine", "step" or "constant", after a linear warm-up
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training
    gamma: float = 0.1
    augment: bool = False            # random crop (pad 4) + horizontal flip, on the device
    seed: int = 0
    progress_bar: bool = True

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.milestones = tuple(self.milestones)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("progress_bar")  # cosmetic: a resumed run may show a bar the first one did not
        d["milestones"] = list(d["milestones"])
        return d


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = round(config.warmup_epochs * total_steps / config.epochs)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * t))
    if config.schedule == "step":
        return config.lr * config.gamma ** sum(t >= m for m in config.milestones)
    return config.lr


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: CPU autocast is slower there and changes results."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to the device; channels_last on CUDA, where cuDNN's convolutions prefer it."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def train_step(model, optimizer, objective: Objective, x, y, progress: float, lr: float):
    """One optimizer step; returns (loss, number correct) as tensors (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if x.is_cuda and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        loss, logits = objective(model, x, y, progress)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def _seed_epoch(seed: int, epoch: int) -> None:
    torch.manual_seed(seed * 1_000_003 + epoch + 1)  # seeds CUDA too


def train(model: torch.nn.Module, split: Split, objective: Objective, config: TrainConfig,
          out_dir: str | Path, device="cpu", run_info: dict | None = None) -> list[dict]:
    """Train ``model`` in place on ``split``, resuming from ``out_dir`` if a checkpoint is there.

    Writes ``checkpoint.safetensors`` (+ ``.json``) after every epoch and one JSON line per epoch
    to ``metrics.jsonl``.  ``run_info`` (model name, objective and its hyper-parameters, data set)
    is stored with the checkpoint; a resume with a different config or run_info is refused.
    Returns the metrics of every epoch, earlier runs' epochs included.
    """
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = prepare(model, device)
    optimizer = make_optimizer(model, config)
    batches = Batches(split, config.batch_size, device, shuffle=True, augment=config.augment,
                      drop_last=False, seed=config.seed)
    identity = {"config": config.to_json(), "run": run_info or {}}

    history: list[dict] = []
    start_epoch = 0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        meta = checkpoint.read_meta(ckpt)
        if meta.get("identity") != json.loads(json.dumps(identity)):
            raise ValueError(f"{ckpt} belongs to a different run (config or run_info differ); "
                             "use a new out_dir or delete the checkpoint")
        checkpoint.load(ckpt, model, optimizer)
        start_epoch, history = meta["epoch"] + 1, meta["history"]
    # Lines past the checkpoint come from an epoch that died before its checkpoint landed.
    (out / METRICS).write_text("".join(json.dumps(h) + "\n" for h in history))

    total_steps = config.epochs * len(batches)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        _seed_epoch(config.seed, epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(batches.epoch(epoch), total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not config.progress_bar, leave=False)
        for i, (x, y) in enumerate(bar):
            step = epoch * len(batches) + i
            loss, hits = train_step(model, optimizer, objective, x, y, step / total_steps,
                                    learning_rate(config, step, total_steps))
            loss_sum += loss * len(y)
            correct += hits
        seconds = time.perf_counter() - t0
        n = len(split)
        record = {"epoch": epoch, "loss": loss_sum.item() / n, "train_acc": correct.item() / n,
                  "lr": learning_rate(config, step, total_steps), "seconds": seconds,
                  "samples_per_s": n / seconds}
        history.append(record)
        checkpoint.save(ckpt, model, optimizer,
                        {"identity": identity, "epoch": epoch, "history": history})
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
    return history
