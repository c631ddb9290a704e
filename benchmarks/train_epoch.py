"""Epoch time of PGD-10 adversarial training of cnn_small on CIFAR-10, three ways, one run.

1. ``project``:    this project's data path: uint8 tensors on the device, batched on-device
                   random crop (pad 4) + flip, then ``train.train_step``.
2. ``limit``:      the same steps on float batches prepared in memory beforehand, no augmentation:
                   what an epoch costs if the data path costs nothing.
3. ``dataloader``: the usual torchvision ImageFolder + RandomCrop/RandomHorizontalFlip/ToTensor
                   + DataLoader loop feeding the same ``train.train_step``.

All three start from the same weights with a fresh optimizer and run the same model, attack
(PGD-10, eps 8/255, step 2/255) and SGD.  Times are per optimizer step after a warm-up,
extrapolated to a full epoch; ``--max-steps`` bounds the timed steps for a quick run.

    python benchmarks/train_epoch.py --source ../shared/datasets/cifar10-jpeg.tar.gz \
        --max-steps 20 --out benchmarks/results/train_epoch_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from robprune_fast import data, models, objectives, train
from robprune_fast.bench import machine


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="CIFAR-10: ImageFolder .tar.gz or folder")
    p.add_argument("--cache-dir", help="default $ROBPRUNE_CACHE or ~/.cache/robprune_fast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-steps", type=int, help="timed steps per way (default: a full epoch)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes for the dataloader way")
    p.add_argument("--ways", default="limit,project,dataloader")
    p.add_argument("--out", default="benchmarks/results/train_epoch.json")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(batches, n_warmup: int, n_timed: int, init_state: dict, device: torch.device) -> dict:
    """Run warm-up + timed PGD-10 training steps drawn from ``batches``; seconds per step."""
    torch.manual_seed(0)
    model = models.build("cnn_small")
    model.load_state_dict(init_state)
    model = train.prepare(model, device).train()
    config = train.TrainConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer = train.make_optimizer(model, config)
    objective = objectives.build("pgd", eps=8 / 255, steps=10, step_size=2 / 255)
    it = iter(batches)
    for _ in range(n_warmup):
        x, y = next(it)
        train.train_step(model, optimizer, objective, x, y, 0.5, 0.1)
    sync(device)
    t0 = time.perf_counter()
    loss = None
    for _ in range(n_timed):
        x, y = next(it)
        loss, _ = train.train_step(model, optimizer, objective, x, y, 0.5, 0.1)
    loss = loss.item()  # waits for the device, like a real loop's logging would
    sync(device)
    seconds = time.perf_counter() - t0
    return {"timed_steps": n_timed, "seconds": seconds, "s_per_step": seconds / n_timed,
            "final_loss": loss}


def project_batches(split, batch_size, device):
    batches = data.Batches(split, batch_size, device, shuffle=True, augment=True, seed=0)
    epoch = 0
    while True:  # epochs back to back, as training does
        yield from batches.epoch(epoch)
        epoch += 1


def limit_batches(split, batch_size, device, n):
    """The first ``n`` batches, already float on the device: then cycled with no work at all."""
    ready = [(split.images[i:i + batch_size].to(device).float().div_(255),
              split.labels[i:i + batch_size].to(device))
             for i in range(0, n * batch_size, batch_size)]
    sync(device)
    while True:
        yield from ready


def dataloader_batches(root: Path, batch_size, device, workers):
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    dataset = torchvision.datasets.ImageFolder(root / "train", transform=tf)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def main():
    args = parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    dataset = data.load("cifar10", args.source, args.cache_dir)
    load_seconds = time.perf_counter() - t0
    split = dataset.train
    steps_per_epoch = len(split) // args.batch_size
    n_timed = min(args.max_steps or steps_per_epoch, steps_per_epoch)
    n_total = args.warmup_steps + n_timed

    torch.manual_seed(0)
    init_state = models.build("cnn_small").state_dict()
    makers = {
        "limit": lambda: limit_batches(split, args.batch_size, device, min(n_total, steps_per_epoch)),
        "project": lambda: project_batches(split, args.batch_size, device),
        "dataloader": lambda: dataloader_batches(data.source_root(args.source, args.cache_dir),
                                                 args.batch_size, device, args.workers),
    }
    ways = {}
    for name in args.ways.split(","):
        if name not in makers:
            raise SystemExit(f"unknown way {name!r}; known ways: {', '.join(makers)}")
        r = time_steps(makers[name](), args.warmup_steps, n_timed, init_state, device)
        r["epoch_s"] = r["s_per_step"] * steps_per_epoch
        r["samples_per_s"] = args.batch_size / r["s_per_step"]
        ways[name] = r
        print(f"{name:>10}: {r['s_per_step'] * 1e3:8.1f} ms/step, {r['epoch_s']:7.1f} s/epoch")

    result = {
        "benchmark": "PGD-10 adversarial training of cnn_small, CIFAR-10 (JPEG copy) train split",
        "machine": machine(args.device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "batch_size": args.batch_size, "steps_per_epoch": steps_per_epoch,
        "warmup_steps": args.warmup_steps, "dataloader_workers": args.workers,
        "dataset_load_seconds": load_seconds, "ways": ways,
    }
    if "limit" in ways:
        result["ratio_to_limit"] = {k: v["s_per_step"] / ways["limit"]["s_per_step"]
                                    for k, v in ways.items()}
        print("ratio to limit:", {k: round(v, 3) for k, v in result["ratio_to_limit"].items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
