"""The ``robprune`` command.

    robprune run CONFIG.yaml [--set key=value ...]      every stage
    robprune pretrain | prune | finetune | eval | export | report CONFIG.yaml [--set ...]
                                                       one stage (earlier ones must be done)
    robprune bench [bench options]                      the kernel microbenchmarks

``--set`` overrides a config entry, e.g. ``--set prune.sparsities=[0.9,0.99]`` or
``--set pretrain.epochs=5`` (values are YAML). A killed run started again resumes where it
stopped. Under ``torchrun --nproc_per_node=N`` the same commands train data-parallel.
"""
from __future__ import annotations

import argparse
import sys

STAGES = ("run", "pretrain", "prune", "finetune", "eval", "export", "report")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="robprune", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        s = sub.add_parser(stage, help="every stage" if stage == "run" else f"the {stage} stage only")
        s.add_argument("config", help="the run's YAML configuration")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config entry (repeatable), e.g. prune.sparsities=[0.9]")
    sub.add_parser("bench", help="the kernel microbenchmarks (python -m robprune_fast.bench)",
                   add_help=False)
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    if args.command == "bench":
        from . import bench
        bench.main(rest)
        return 0
    if rest:
        print(f"robprune {args.command}: unexpected arguments {rest}", file=sys.stderr)
        return 2
    from .pipeline import Run, load
    try:
        config = load(args.config, args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"robprune: {e}", file=sys.stderr)
        return 2
    run = Run(config)
    if args.command == "run":
        results = run.run()
    else:
        results = run.run(until=args.command, only=True)
    if results is not None:
        from .pipeline.report import table
        print(table(results["rows"]))
        print(f"-> {run.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
