"""The training loop: any objective, SGD/Adam, warm-up + cosine/step schedules, resumable runs.

Determinism is by construction: the learning rate is a pure function of the step, the batches of
an epoch depend only on (seed, epoch), and the global RNG (attack random starts) is reseeded from
(seed, epoch) at the start of every epoch.  A checkpoint written after an epoch therefore holds
everything needed to replay the rest of the run bit for bit, however the process died.  Only
finite weights are ever checkpointed: a run whose loss or weights go NaN/inf stops with an error.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm import tqdm

from . import checkpoint, distributed
from .data import Batches, Split, fingerprint
from .objectives import Objective

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
# Parts of a run's identity that older checkpoints do not record.
LATER_IDENTITY_KEYS = ("objective", "data")


Finite = Annotated[float, Field(allow_inf_nan=False)]


class TrainConfig(BaseModel):
    """The training hyper-parameters, checked on construction and on assignment.

    Strict: 2.5 epochs or "0.1" as lr are refused rather than converted (an int is a valid float),
    and so is any unknown field.  Errors (pydantic's ValidationError, a ValueError) name the field.
    """

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"  # SGD with momentum, or Adam
    lr: Finite = Field(0.1, gt=0)
    momentum: Finite = Field(0.9, ge=0, lt=1)  # SGD only
    weight_decay: Finite = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # after a linear warm-up
    warmup_epochs: Finite = Field(0.0, ge=0)
    milestones: tuple[Finite, ...] = (0.5, 0.75)  # step schedule: fractions of training
    gamma: Finite = Field(0.1, gt=0, le=1)  # step schedule: factor at each milestone
    augment: bool = False  # random crop (pad 4) + horizontal flip, on the device
    seed: int = Field(0, ge=0, lt=2 ** 32)  # seed * 1_000_003 + epoch must fit torch's 64-bit seeds
    progress_bar: bool = True

    @field_validator("milestones", mode="before")
    @classmethod
    def _milestones_from_json(cls, value):
        return tuple(value) if isinstance(value, list) else value  # to_json() writes a list

    @field_validator("milestones")
    @classmethod
    def _increasing_fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        points = (0.0, *value, 1.0)
        if any(a >= b for a, b in zip(points, points[1:])):
            raise ValueError(f"must be increasing fractions in (0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _warmup_within_training(self) -> "TrainConfig":
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= epochs ({self.epochs})")
        return self

    def to_json(self) -> dict:
        # progress_bar is cosmetic: a resumed run may show a bar the first one did not.
        return self.model_dump(mode="json", exclude={"progress_bar"})


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


def train_step(model, optimizer, objective: Objective, x, y, progress: float, lr: float,
               check_finite: bool = False):
    """One optimizer step on the global batch (x, y); returns (this process's summed loss,
    number correct) as tensors (no host sync). Under torchrun each process takes its share of
    the batch and the gradients are averaged (see ``distributed``).

    ``check_finite`` refuses a NaN/inf loss before it reaches the weights (FloatingPointError),
    at the price of a host sync.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = len(y)
    x, y = distributed.share(x, y)
    if x.is_cuda and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        loss, logits = objective(model, x, y, progress)
    if check_finite and not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.average_gradients(model, len(y), total)
    optimizer.step()
    return loss.detach() * len(y), (logits.argmax(1) == y).sum()


def _seed_epoch(seed: int, epoch: int) -> None:
    torch.manual_seed(seed * 1_000_003 + epoch + 1)  # seeds CUDA too


def run_identity(config: TrainConfig, objective: Objective, split: Split,
                 run_info: dict | None) -> dict:
    """What a checkpoint must share with a run that resumes it, as it reads back from JSON."""
    identity = {"config": config.to_json(), "run": run_info or {},
                "objective": getattr(objective, "spec", None), "data": fingerprint(split)}
    try:
        return json.loads(json.dumps(identity))  # tuples become lists, as in the checkpoint
    except TypeError as e:  # the checkpoint's header is JSON: its identity has to be too
        raise ValueError(f"run_info and the objective's spec must be JSON data: {e}") from e


def identity_differences(saved: dict, current: dict) -> list[str]:
    """"key.field: <saved> in the checkpoint, <current> now" for each entry that differs."""
    out = []
    for key, now in current.items():
        then = saved.get(key)
        if key in saved and then == now:
            continue
        if isinstance(then, dict) and isinstance(now, dict):
            out += [f"{key}.{f}: {_shown(then, f)} in the checkpoint, {_shown(now, f)} now"
                    for f in {**then, **now} if (f in then, then.get(f)) != (f in now, now.get(f))]
        else:
            out.append(f"{key}: {_shown(saved, key)} in the checkpoint, {now!r} now")
    return out


def _shown(d: dict, key: str) -> str:
    return repr(d[key]) if key in d else "(absent)"


def _check_resume(ckpt: Path, saved: dict, identity: dict) -> None:
    """Refuse a checkpoint of another run, saying what differs.

    A checkpoint written before the identity held the objective and the data still resumes:
    what it records is compared, with a warning about what it does not.
    """
    unrecorded = [key for key in LATER_IDENTITY_KEYS if key not in saved]
    differences = identity_differences(
        saved, {k: v for k, v in identity.items() if k not in unrecorded})
    if differences:
        raise ValueError(f"{ckpt} belongs to a different run: {'; '.join(differences)}. "
                         "Use a new out_dir or delete the checkpoint")
    if unrecorded:
        warnings.warn(f"{ckpt} records no {', '.join(unrecorded)}: resuming without checking them",
                      stacklevel=3)


def _all_finite(loss_sum: torch.Tensor, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> bool:
    """Whether the epoch's loss and everything a checkpoint would hold is finite: one host sync."""
    tensors = [loss_sum, *model.state_dict().values(),
               *(v for state in optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor))]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors
                             if t.is_floating_point()]).all())


def _check_each_step(device: torch.device) -> bool:
    """Whether to check every step's loss: free on the CPU, a host sync per step elsewhere."""
    return device.type == "cpu"


def _diverged(problem: str, epoch: int, epochs: int, ckpt: Path) -> FloatingPointError:
    """The error for a run that went NaN/inf in epoch ``epoch`` (0-based)."""
    kept = (f"{ckpt} keeps the run after epoch {epoch}/{epochs}" if epoch
            else "no checkpoint was written")
    return FloatingPointError(f"training diverged: {problem}; {kept} (a lower lr may help)")


def train(model: torch.nn.Module, split: Split, objective: Objective, config: TrainConfig,
          out_dir: str | Path, device="cpu", run_info: dict | None = None,
          on_epoch_start: Callable[[int], None] | None = None) -> list[dict]:
    """Train ``model`` in place on ``split``, resuming from ``out_dir`` if a checkpoint is there.

    Writes ``checkpoint.safetensors`` (+ ``.json``) after every epoch and one JSON line per epoch
    to ``metrics.jsonl``.  The checkpoint records the run's identity: the config, ``run_info``
    (model name, data set, ...), the objective's ``spec`` and a fingerprint of ``split``; a resume
    that differs in any of them is refused, naming what differs.  A NaN/inf loss or weight stops
    the run with a FloatingPointError before its checkpoint is written (on the CPU the loss is
    checked at every step, elsewhere once per epoch, to spare a host sync per step).
    ``on_epoch_start(epoch)`` runs before each epoch (a gradual pruning schedule, say); what it
    changes must live in the model's state, which the checkpoint holds. Under torchrun the
    processes share each batch (``distributed``) and only rank 0 writes files.
    Returns the metrics of every epoch, earlier runs' epochs included.
    """
    if len(split) == 0:
        raise ValueError("split is empty: there is nothing to train on")
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = prepare(model, device)
    optimizer = make_optimizer(model, config)
    batches = Batches(split, config.batch_size, device, shuffle=True, augment=config.augment,
                      drop_last=False, seed=config.seed)
    identity = run_identity(config, objective, split, run_info)

    history: list[dict] = []
    start_epoch = 0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        meta = checkpoint.read_meta(ckpt)
        _check_resume(ckpt, meta.get("identity", {}), identity)
        checkpoint.load(ckpt, model, optimizer)
        start_epoch, history = meta["epoch"] + 1, meta["history"]
    # Lines past the checkpoint come from an epoch that died before its checkpoint landed.
    if distributed.is_main():
        (out / METRICS).write_text("".join(json.dumps(h) + "\n" for h in history))

    total_steps = config.epochs * len(batches)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        _seed_epoch(config.seed, epoch)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(batches.epoch(epoch), total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not config.progress_bar, leave=False)
        for i, (x, y) in enumerate(bar):
            step = epoch * len(batches) + i
            try:
                loss, hits = train_step(model, optimizer, objective, x, y, step / total_steps,
                                        learning_rate(config, step, total_steps),
                                        check_finite=_check_each_step(device))
            except FloatingPointError as e:
                raise _diverged(f"{e} at epoch {epoch + 1}/{config.epochs}, step "
                                f"{i + 1}/{len(batches)}", epoch, config.epochs, ckpt) from None
            loss_sum += loss
            correct += hits
        distributed.sum_(loss_sum), distributed.sum_(correct)
        distributed.broadcast_buffers(model)
        if not _all_finite(loss_sum, model, optimizer):
            raise _diverged(f"the loss or the weights are not finite after epoch "
                            f"{epoch + 1}/{config.epochs}", epoch, config.epochs, ckpt)
        seconds = time.perf_counter() - t0
        n = len(split)
        record = {"epoch": epoch, "loss": loss_sum.item() / n, "train_acc": correct.item() / n,
                  "lr": learning_rate(config, step, total_steps), "seconds": seconds,
                  "samples_per_s": n / seconds}
        history.append(record)
        if distributed.is_main():
            checkpoint.save(ckpt, model, optimizer,
                            {"identity": identity, "epoch": epoch, "history": history})
            with open(out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
        distributed.barrier()
    return history
