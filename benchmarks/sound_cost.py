"""What sound bounds cost: verified accuracy and time of each method with the rounding accounted
for (``sound=True``, the default) and in exact arithmetic (``sound=False``, no certificate).

    python benchmarks/sound_cost.py --checkpoint runs/ibp_cnn_small/checkpoint.safetensors \
        --source ../shared/datasets/cifar10-jpeg.tar.gz --repeats 5

The model is a checkpoint written by ``benchmarks/verified_train.py`` (or ``train.train``); the
points are the data set's test split (``--n`` of them, stratified, all by default). Sound and
exact runs of a method take turns in every repetition (bench.timeit); medians in seconds, as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robprune_fast import bounds, checkpoint, data, models
from robprune_fast._atomic import atomic_write
from robprune_fast.bench import machine, timeit


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", default="cnn_small", choices=sorted(models.MODELS))
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.KNOWN_DATASETS))
    p.add_argument("--source", default=None)
    p.add_argument("--eps", type=float, default=2 / 255)
    p.add_argument("--n", type=int, default=None, help="stratified test points (default: all)")
    p.add_argument("--methods", nargs="+", default=["ibp", "crown-ibp"], choices=bounds.METHODS)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/sound_cost_cpu.json")
    args = p.parse_args(argv)

    dataset = data.load(args.dataset, args.source)
    test = dataset.test
    if args.n is not None:
        test = test.select(data.stratified_subset(test, args.n, seed=0))
    x, y = test.images.float() / 255, test.labels
    model = models.build(args.model, num_classes=dataset.num_classes)
    checkpoint.load(args.checkpoint, model)
    model.eval()

    verified = {}

    def run(method, sound):
        def go():
            v = bounds.verified_accuracy(model, x, y, args.eps, method,
                                         batch_size=args.batch_size, sound=sound)
            verified[(method, sound)] = v.verified.float().mean().item()
        return go

    variants = {f"{m}_{'sound' if s else 'exact'}": run(m, s)
                for m in args.methods for s in (True, False)}
    seconds = timeit(variants, torch.device("cpu"), args.repeats)
    rows = {m: {"verified_sound": verified[(m, True)], "verified_exact": verified[(m, False)],
                "seconds_sound": seconds[f"{m}_sound"], "seconds_exact": seconds[f"{m}_exact"],
                "sound_over_exact": seconds[f"{m}_sound"] / seconds[f"{m}_exact"]}
            for m in args.methods}
    result = {"checkpoint": args.checkpoint, "model": args.model, "eps": args.eps,
              "points": len(test), "subset": "all" if args.n is None else f"stratified {args.n}",
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": machine(),
              "torch": torch.__version__, "methods": rows}
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    for m, r in rows.items():
        print(f"{m}: sound {r['verified_sound']:.2%} in {r['seconds_sound']:.2f} s, exact "
              f"{r['verified_exact']:.2%} in {r['seconds_exact']:.2f} s "
              f"({r['sound_over_exact']:.2f}x)")
    return result


if __name__ == "__main__":
    main()
