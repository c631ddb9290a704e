"""Certified (IBP / CROWN-IBP) training of cnn_small, then benign, PGD and verified accuracy.

    python benchmarks/verified_train.py --method ibp --epochs 20 --out runs/ibp_cnn_small
    python benchmarks/verified_train.py --method crown-ibp --loss-fusion --ibp-init --reg \\
        --epochs 20 --out runs/crown_ibp_cnn_small
    python benchmarks/verified_train.py --dataset digits --eps 0.05 --epochs 5 --out runs/digits

Defaults: CIFAR-10 from ../shared/datasets/cifar10-jpeg.tar.gz, cnn_small, eps 2/255, Adam 5e-4
(Shi et al. 2021's optimiser), eps ramped over the middle of training (``--eps-start``,
``--eps-ramp`` as fractions of training, ``--schedule linear|smooth``), kappa 1 -> 0.5 (IBP) or
1 -> 0 (CROWN-IBP), beta 1 -> 0 (CROWN-IBP).  ``--ibp-init`` and ``--reg`` are Shi et al.'s IBP
initialisation and warm-up regularisers.  ``--subset N`` trains on a seeded class-stratified
sample of N training images.

The run folder gets checkpoint.safetensors (+ .json) after every epoch, metrics.jsonl (one line per
epoch; train_acc is the IBP/CROWN-IBP-certified training accuracy at that step's eps) and, at the
end, results.json with benign, PGD and verified (IBP and CROWN-IBP) accuracy on a seeded
class-stratified sample of ``--eval-n`` test images (the same points for all three; ``eval.subset``
describes them), plus ``verified_but_attacked`` (must be 0).  A killed run resumes from its last
epoch when started again with the same options.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from robprune_fast import data, evaluate, models, objectives, train
from robprune_fast._atomic import atomic_write
from robprune_fast.bench import machine
from robprune_fast.demo import number

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg.tar.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "digits"))
    p.add_argument("--source", default=str(DEFAULT_SOURCE), help="CIFAR-10 folder or .tar.gz")
    p.add_argument("--model", help="default: cnn_small (digits: digits_cnn)")
    p.add_argument("--method", default="ibp", choices=("ibp", "crown-ibp"))
    p.add_argument("--eps", type=number, default=2 / 255, help='e.g. "2/255"')
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eps-start", type=float, default=0.05, help="fraction of training at eps 0")
    p.add_argument("--eps-ramp", type=float, default=0.5, help="fraction of training ramping eps")
    p.add_argument("--schedule", default="smooth", choices=objectives.SCHEDULES)
    p.add_argument("--kappa-start", type=float, default=1.0)
    p.add_argument("--kappa-end", type=float, help="default 0.5 (ibp), 0 (crown-ibp)")
    p.add_argument("--loss-fusion", action="store_true", help="CROWN-IBP only")
    p.add_argument("--ibp-init", action="store_true", help="Shi et al.'s IBP initialisation")
    p.add_argument("--reg", action="store_true", help="Shi et al.'s warm-up regularisers")
    p.add_argument("--subset", type=int, help="train on a seeded class-stratified sample of N "
                   "training images")
    p.add_argument("--eval-n", type=int, help="evaluate on a seeded class-stratified sample of N "
                   "test points (default: 1000, or all of a smaller test split)")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/verified_train")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.loss_fusion and args.method != "crown-ibp":
        p.error("--loss-fusion needs --method crown-ibp")
    return args


def objective_hyper(args) -> dict:
    hyper = dict(eps=args.eps, eps_start=args.eps_start, eps_ramp=args.eps_ramp,
                 schedule=args.schedule, kappa_start=args.kappa_start, reg=args.reg)
    if args.kappa_end is not None:
        hyper["kappa_end"] = args.kappa_end
    if args.loss_fusion:
        hyper["loss_fusion"] = True
    return hyper


def main(argv=None) -> dict:
    args = parse_args(argv)
    digits = args.dataset == "digits"
    model_name = args.model or ("digits_cnn" if digits else "cnn_small")
    dataset = data.load(args.dataset, None if digits else args.source)
    train_split = dataset.train
    if args.subset is not None:
        train_split = train_split.select(data.stratified_subset(train_split, args.subset, args.seed))
    eval_n = args.eval_n if args.eval_n is not None else min(1000, len(dataset.test))

    torch.manual_seed(args.seed)
    model = models.build(model_name, num_classes=dataset.num_classes)
    if args.ibp_init:
        objectives.ibp_initialization(model)
    hyper = objective_hyper(args)
    config = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adam",
                               lr=args.lr, weight_decay=0.0, schedule="step",
                               milestones=(0.75, 0.9), gamma=0.2, seed=args.seed,
                               progress_bar=not args.no_progress)
    run_info = {"dataset": args.dataset, "subset": args.subset, "model": model_name,
                "objective": args.method, "hyper": hyper, "ibp_init": args.ibp_init}

    t0 = time.perf_counter()
    history = train.train(model, train_split, objectives.build(args.method, **hyper), config,
                          args.out, args.device, run_info)
    t1 = time.perf_counter()
    metrics = evaluate.evaluate(model, dataset.test, eps=args.eps, device=args.device,
                                n=eval_n, pgd_steps=args.pgd_steps,
                                pgd_restarts=args.pgd_restarts, seed=args.seed,
                                verify=("ibp", "crown-ibp"))
    results = {**run_info, "config": config.to_json(), "device": str(args.device),
               "machine": machine(args.device),
               "threads": torch.get_num_threads(),
               "train_seconds_this_process": t1 - t0, "eval_seconds": time.perf_counter() - t1,
               "history": history, "eval": metrics}
    path = Path(args.out) / "results.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    v = metrics["verified"]
    print(f"{model_name} {args.method} eps={args.eps:.4g}, {len(history)} epochs: benign "
          f"{metrics['benign_acc']:.2%}, PGD-{args.pgd_steps} {metrics['pgd']['acc']:.2%}, "
          f"verified IBP {v['ibp']['acc']:.2%}, CROWN-IBP {v['crown-ibp']['acc']:.2%} -> {path}")
    return results


if __name__ == "__main__":
    main()
