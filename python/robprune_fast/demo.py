"""Train one robust model and evaluate it: ``python -m robprune_fast.demo [options]``.

With no options it runs the ``make demo`` recipe: PGD adversarial training of a small CNN on the
embedded 8x8 digits (no files, no network, about a minute on a laptop CPU), then benign and PGD-50
accuracy, written to ``<out>/results.json``.  The same options train cnn_small etc. on CIFAR-10.
A killed run resumes from its last epoch when started again with the same options.
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import torch

from . import data, evaluate, models, objectives, train
from ._atomic import atomic_write


def number(text: str) -> float:
    """Accept "0.1" as well as "8/255"."""
    return float(Fraction(text))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m robprune_fast.demo", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits", choices=data.KNOWN_DATASETS)
    p.add_argument("--source", help="cifar10/imagefolder: folder or .tar.gz")
    p.add_argument("--cache-dir", help="decoded-data cache (default $ROBPRUNE_CACHE or ~/.cache)")
    p.add_argument("--model", help="default: digits_cnn on digits, else cnn_small",
                   choices=sorted(models.MODELS))
    p.add_argument("--objective", default="pgd", choices=objectives.known())
    p.add_argument("--eps", type=number, help="L-inf budget in [0,1] pixels; default 0.1 on digits, "
                   "8/255 otherwise")
    p.add_argument("--steps", type=int, default=10, help="attack steps while training")
    p.add_argument("--step-size", type=number, help="default: the objective's own")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES beta")
    p.add_argument("--eps-warmup", type=float, default=0.0, help="fraction of training to ramp eps")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "step", "constant"))
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) + flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads; default 1 on digits (its tensors are "
                   "too small to gain from threads, and lose badly on a busy machine), else torch's")
    p.add_argument("--eval-steps", type=int, default=50, help="PGD steps at evaluation")
    p.add_argument("--eval-restarts", type=int, default=1)
    p.add_argument("--eval-n", type=int, help="evaluate on a seeded class-stratified sample of N "
                   "test points (default: all of them)")
    p.add_argument("--autoattack-n", type=int, default=0, help="AutoAttack on a seeded "
                   "class-stratified sample of N test points, drawn from those evaluated "
                   "(default 0: none)")
    p.add_argument("--out", default="runs/demo", help="run folder: checkpoint, metrics, results.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def objective_hyper(args) -> dict:
    """The hyper-parameters each objective takes, from the command line."""
    attack = {"eps": args.eps, "eps_warmup": args.eps_warmup, "step_size": args.step_size}
    return {
        "natural": {},
        "pgd": {**attack, "steps": args.steps},
        "trades": {**attack, "steps": args.steps, "beta": args.beta},
        "fgsm_rs": attack,
        # Certified training needs its eps ramp: half the run unless --eps-warmup says otherwise.
        "ibp": {"eps": args.eps, "eps_ramp": args.eps_warmup or 0.5},
        "crown-ibp": {"eps": args.eps, "eps_ramp": args.eps_warmup or 0.5},
    }[args.objective]


def main(argv=None) -> dict:
    args = parse_args(argv)
    digits = args.dataset == "digits"
    args.model = args.model or ("digits_cnn" if digits else "cnn_small")
    args.eps = args.eps if args.eps is not None else (0.1 if digits else 8 / 255)
    threads = args.threads or (1 if digits else None)
    if threads:
        torch.set_num_threads(threads)

    dataset = data.load(args.dataset, args.source, args.cache_dir)
    torch.manual_seed(args.seed)  # the initial weights
    model = models.build(args.model, num_classes=dataset.num_classes)
    hyper = objective_hyper(args)
    config = train.TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        augment=args.augment, seed=args.seed, progress_bar=not args.no_progress)
    run_info = {"dataset": args.dataset, "source": args.source, "model": args.model,
                "objective": args.objective, "hyper": hyper}

    t0 = time.perf_counter()
    history = train.train(model, dataset.train, objectives.build(args.objective, **hyper), config,
                          args.out, args.device, run_info)
    t1 = time.perf_counter()
    metrics = evaluate.evaluate(model, dataset.test, eps=args.eps, device=args.device,
                                n=args.eval_n, pgd_steps=args.eval_steps,
                                pgd_restarts=args.eval_restarts, autoattack_n=args.autoattack_n,
                                seed=args.seed)
    results = {**run_info, "config": config.to_json(), "device": str(args.device),
               "train_seconds_this_process": t1 - t0, "eval_seconds": time.perf_counter() - t1,
               "history": history, "eval": metrics}
    path = Path(args.out) / "results.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(f"{args.model} on {args.dataset}, {args.objective} eps={args.eps:.4g}: "
          f"benign {metrics['benign_acc']:.2%}, PGD-{args.eval_steps} {metrics['pgd']['acc']:.2%}"
          + (f", AutoAttack {metrics['autoattack']['acc']:.2%}" if "autoattack" in metrics else "")
          + f" -> {path}")
    return results


if __name__ == "__main__":
    main()
