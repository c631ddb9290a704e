"""The stages of a pruning run, each resumable: a killed run started again redoes only what did
not finish, and a stage whose inputs changed is refused rather than mixed in.

    pretrain -> (per sparsity and strategy) prune -> finetune -> eval -> export -> report

The run directory holds the resolved ``config.yaml``, ``log.txt``, ``events.jsonl`` (one JSON
line per finished stage), ``dense/`` (the pretrained model, its evaluation) and one folder per
pruned variant, e.g. ``s0.9-magnitude/``: ``pruned.safetensors`` (the masks, and for HYDRA its
score training in ``hydra/``), ``finetune/`` (the training run), ``model.safetensors``,
``eval.json``, ``model.compact``; then ``results.json``, ``report.md`` and ``report.png``.
Every stage folder keeps ``spec.json``, the part of the configuration it was made from.
"""
from __future__ import annotations

import copy
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import checkpoint, compact, data, distributed, evaluate, models, objectives, pruning, train
from .. import nn as rnn
from .._atomic import atomic_write
from ..pruning import structured
from . import report
from .config import RunConfig, dump

MODEL = "model.safetensors"


def _train_config(section) -> train.TrainConfig:
    return train.TrainConfig(**section.model_dump(include=set(train.TrainConfig.model_fields)))


def _write_json(path: Path, value) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2)))


class Run:
    """One run directory and what its stages share: the config, the data, the device."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.out = Path(config.out_dir)
        self.device = self._device()
        self.log = self._logger()
        self._check_config_file()
        seed = config.seed
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.dataset = data.load(config.data.dataset, config.data.source, config.data.cache_dir)
        self.train_split = self.dataset.train
        if config.data.train_subset is not None:
            chosen = data.stratified_subset(self.dataset.train, config.data.train_subset, seed)
            self.train_split = self.dataset.train.select(chosen)
        if config.eval.n is not None and config.eval.n > len(self.dataset.test):
            raise ValueError(f"eval.n: {config.eval.n} exceeds the test split's "
                             f"{len(self.dataset.test)} points")

    # --- the run directory --------------------------------------------------------------------

    def _device(self) -> torch.device:
        launched = distributed.setup()
        if launched is not None:
            return launched
        name = self.config.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def _logger(self) -> logging.Logger:
        self.out.mkdir(parents=True, exist_ok=True)
        log = logging.getLogger(f"robprune.{self.out.resolve()}")
        if not log.handlers and distributed.is_main():
            log.setLevel(logging.INFO)
            handler = logging.FileHandler(self.out / "log.txt")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)
        return log

    def _check_config_file(self) -> None:
        """The resolved config goes to config.yaml; a resumed run may change anything, since
        each stage checks the part of it that made its outputs (spec.json)."""
        if distributed.is_main():
            (self.out / "config.yaml").write_text(dump(self.config))

    def event(self, stage: str, **fields) -> None:
        record = {"time": time.time(), "stage": stage, **fields}
        self.log.info(json.dumps(record))
        if distributed.is_main():
            with open(self.out / "events.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def stage_dir(self, folder: Path, spec: dict) -> Path:
        """folder, made, with its spec.json checked against spec (a stage made from another
        configuration is refused, naming the differences)."""
        folder.mkdir(parents=True, exist_ok=True)
        spec = json.loads(json.dumps(spec))
        path = folder / "spec.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != spec:
                keys = sorted(k for k in {**saved, **spec} if saved.get(k) != spec.get(k))
                raise ValueError(f"{folder} was made with another configuration ({', '.join(keys)} "
                                 "differ); use another out_dir or delete that folder")
        elif distributed.is_main():
            _write_json(path, spec)
        return folder

    # --- models -------------------------------------------------------------------------------------

    def build(self) -> torch.nn.Module:
        torch.manual_seed(self.config.seed)  # the initial weights
        return models.build(self.config.model.name, num_classes=self.dataset.num_classes)

    def objective(self, stage: str):
        cfg = self.config.objective
        if stage == "finetune" and self.config.finetune.objective is not None:
            cfg = self.config.finetune.objective
        return objectives.build(cfg.name, **cfg.arguments()), cfg

    def _run_info(self, stage: str, objective_cfg) -> dict:
        return {"stage": stage, "model": self.config.model.name, "dataset": self.config.data.dataset,
                "objective": objective_cfg.model_dump(mode="json")}

    def _save(self, model, path: Path, meta: dict) -> None:
        if distributed.is_main():
            checkpoint.save(path, model, meta=meta)
        distributed.barrier()

    # --- stages ---------------------------------------------------------------------------------

    def missing(self, path: Path, command: str):
        return FileNotFoundError(f"{path} is missing: run `robprune {command}` with this "
                                 "config first")

    def pretrain(self, compute: bool = True) -> torch.nn.Module:
        """The dense robust model: trained with the run's objective, or the given weights.
        compute=False: only load it (FileNotFoundError naming the command that makes it)."""
        cfg = self.config
        folder = self.stage_dir(self.out / "dense", {
            "data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
            "seed": cfg.seed,
            "objective": cfg.objective.model_dump(mode="json"),
            "pretrain": cfg.pretrain.model_dump(mode="json", exclude={"progress_bar"})})
        model = self.build()
        if (folder / MODEL).exists():
            checkpoint.load(folder / MODEL, model)
            return model.to(self.device)
        if not compute:
            raise self.missing(folder / MODEL, "pretrain")
        if cfg.pretrain.weights is not None:
            checkpoint.load(cfg.pretrain.weights, model)
        else:
            if cfg.model.ibp_init:
                objectives.ibp_initialization(model)
            objective, objective_cfg = self.objective("pretrain")
            history = train.train(model, self.train_split, objective, _train_config(cfg.pretrain),
                                  folder / "train", self.device, self._run_info("pretrain", objective_cfg))
            self.event("pretrain", epochs=len(history), last=history[-1] if history else None)
        self._save(model, folder / MODEL, {"stage": "pretrain"})
        return model.to(self.device)

    def variant_name(self, sparsity: float, strategy: str) -> str:
        structure = self.config.prune.structure
        prefix = "" if structure == "unstructured" else f"{structure.replace(':', '')}-"
        return f"{prefix}s{sparsity:g}-{strategy}"

    def prune(self, dense: torch.nn.Module, sparsity: float, strategy: str,
              compute: bool = True) -> torch.nn.Module:
        """The pruned model (masked layers) of one variant; HYDRA trains its scores here."""
        cfg = self.config.prune
        folder = self.stage_dir(self.out / self.variant_name(sparsity, strategy), {
            "sparsity": sparsity, "strategy": strategy,
            "prune": cfg.model_dump(mode="json", exclude={"sparsities", "strategies"})})
        model = rnn.convert(self.build()).to(self.device)
        path = folder / "pruned.safetensors"
        if path.exists():
            checkpoint.load(path, model)
            return model
        if not compute:
            raise self.missing(path, "prune")
        model.load_state_dict(dense.state_dict(), strict=True)
        if cfg.schedule == "one-shot":
            kwargs = dict(strategy=strategy, scope=cfg.scope, structure=cfg.structure,
                          exclude=cfg.exclude, n_m=tuple(cfg.n_m), seed=self.config.seed)
            if cfg.structure != "n:m":
                kwargs["sparsity"] = sparsity
            pruning.prune(model, **kwargs)
            if strategy == "hydra":
                self._train_scores(model, folder)
        report_ = pruning.count(model)
        self._save(model, path, {"stage": "prune", "prune": report_.to_json()})
        self.event("prune", variant=folder.name, sparsity=report_.sparsity, kept=report_.kept)
        return model

    def _train_scores(self, model, folder: Path) -> None:
        objective, objective_cfg = self.objective("pretrain")
        with pruning.hydra.only_scores_train(model):
            train.train(model, self.train_split, objective, _train_config(self.config.prune.hydra),
                        folder / "hydra", self.device, self._run_info("hydra", objective_cfg))
        pruning.hydra.finish(model)

    def shaped(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as fine-tuning and deployment see it: channel pruning's units removed."""
        if self.config.prune.structure != "channel":
            return model
        example = self.dataset.test.images[:2].float().div(255).to(self.device)
        return structured.shrink(model.eval(), example)

    def finetune(self, pruned: torch.nn.Module, sparsity: float, strategy: str,
                 compute: bool = True) -> torch.nn.Module:
        """The pruned model fine-tuned with the run's objective (or finetune.objective), the
        cubic schedule pruning it on the way; pruned weights stay exactly zero."""
        cfg = self.config.finetune
        folder = self.out / self.variant_name(sparsity, strategy)
        model = self.shaped(pruned)
        path = folder / MODEL
        if path.exists():
            checkpoint.load(path, model)
            return model.to(self.device)
        if not compute:
            raise self.missing(path, "finetune")
        if cfg.enabled:
            objective, objective_cfg = self.objective("finetune")
            info = self._run_info("finetune", objective_cfg)
            if cfg.compressed:
                rnn.compress(model)  # the kept weights train; masked again for what follows
                info["compressed"] = True  # its checkpoints hold compressed layers
            history = train.train(model, self.train_split, objective, _train_config(cfg),
                                  folder / "finetune", self.device, info,
                                  on_epoch_start=self._gradual(model, sparsity))
            rnn.decompress(model)
            self.event("finetune", variant=folder.name, epochs=len(history))
        self._save(model, path, {"stage": "finetune"})
        return model

    def _gradual(self, model, sparsity):
        """The cubic schedule's pruning before each fine-tuning epoch (None for one-shot):
        from 0 to the target over the first three quarters of the epochs."""
        prune_cfg, epochs = self.config.prune, self.config.finetune.epochs
        if prune_cfg.schedule != "cubic":
            return None
        end = max(1, (3 * epochs) // 4)
        return lambda epoch: pruning.prune(
            model, pruning.schedules.cubic(0.0, sparsity, 0, end, epoch), scope=prune_cfg.scope,
            exclude=prune_cfg.exclude, seed=self.config.seed)

    def evaluate(self, model: torch.nn.Module, folder: Path) -> dict:
        """Benign, PGD (AutoAttack) and verified accuracy on the configured test points."""
        path = folder / "eval.json"
        if path.exists():
            return json.loads(path.read_text())
        cfg = self.config.eval
        eps = cfg.eps if cfg.eps is not None else self.config.objective.eps
        result = evaluate.evaluate(model, self.dataset.test, eps=eps, device=self.device,
                                   batch_size=cfg.batch_size, n=cfg.n, pgd_steps=cfg.pgd_steps,
                                   pgd_restarts=cfg.pgd_restarts, autoattack_n=cfg.autoattack_n,
                                   seed=self.config.seed, verify=tuple(cfg.verify))
        result = json.loads(json.dumps(result))  # as results.json and a resumed run hold it
        if result.get("verified_but_attacked"):
            raise RuntimeError(f"{folder}: {result['verified_but_attacked']} certified points were "
                               "broken by PGD: a false certificate, the run stops")
        if distributed.is_main():
            _write_json(path, result)
        self.event("eval", folder=folder.name, benign=result["benign_acc"], pgd=result["pgd"]["acc"])
        return result

    def export(self, model: torch.nn.Module, folder: Path) -> dict:
        """The deployable files of a model and their sizes: a dense checkpoint of the stripped
        network, and (masked layers) the compact file."""
        sizes_path = folder / "sizes.json"
        if sizes_path.exists():
            return json.loads(sizes_path.read_text())
        plain = rnn.strip(copy.deepcopy(model))
        dense_path = folder / "stripped.safetensors"
        self._save(plain, dense_path, {"stage": "export"})
        sizes = {"dense_bytes": dense_path.stat().st_size,
                 "parameters": sum(p.numel() for p in plain.parameters()),
                 "nonzero_parameters": sum(int(p.count_nonzero()) for p in plain.parameters())}
        if self.config.export_compact and rnn.masked_modules(model):
            if distributed.is_main():
                compact.save_compact(model, folder / "model.compact",
                                     meta={"model": self.config.model.name, "variant": folder.name})
            distributed.barrier()
            sizes["compact_bytes"] = (folder / "model.compact").stat().st_size
        if distributed.is_main():
            _write_json(sizes_path, sizes)
        return sizes

    # --- the whole run ----------------------------------------------------------------------------

    def variants(self):
        cfg = self.config.prune
        sparsities = cfg.sparsities if cfg.structure != "n:m" else [1 - cfg.n_m[0] / cfg.n_m[1]]
        return [(s, k) for s in sparsities for k in cfg.strategies]

    STAGES = ("pretrain", "prune", "finetune", "eval", "export", "report")

    def run(self, until: str = "report", only: bool = False) -> dict | None:
        """The stages up to ``until`` for the dense model and every variant; with ``only``, the
        earlier stages must be done already (their outputs are loaded, never recomputed).
        Returns the results (also results.json) when the report is made."""
        last = self.STAGES.index(until)
        computes = lambda stage: not only or stage == until
        dense = self.pretrain(computes("pretrain"))
        self.dense_weights = _weight_counts(dense)["total"]
        models_ = [("dense", None, None, dense)]
        if last >= self.STAGES.index("prune"):
            for sparsity, strategy in tqdm(self.variants(), desc="variants",
                                           disable=not distributed.is_main()):
                model = self.prune(dense, sparsity, strategy, computes("prune"))
                if last >= self.STAGES.index("finetune"):
                    model = self.finetune(model, sparsity, strategy, computes("finetune"))
                models_.append((self.variant_name(sparsity, strategy), sparsity, strategy, model))
        if last < self.STAGES.index("eval"):
            return None
        rows = [self._row(*entry) for entry in models_]
        if until != "report":
            return None
        results = {"config": self.config.model_dump(mode="json"), "rows": rows}
        if distributed.is_main():
            _write_json(self.out / "results.json", results)
            report.write(self.out, results)
        self.event("report", variants=len(rows) - 1)
        return results

    def _row(self, name, sparsity, strategy, model) -> dict:
        folder = self.out / name
        counts = _weight_counts(model, self.dense_weights)
        return {"variant": name, "sparsity": sparsity, "strategy": strategy,
                "weights": counts, "files": self.export(model, folder),
                "eval": self.evaluate(model, folder)}


def _weight_counts(model, dense_total: int | None = None) -> dict:
    """Kept and total conv and linear weights (masked ones not kept), against dense_total, the
    dense network's count (a shrunk network has fewer in all)."""
    kept = total = 0
    for m in model.modules():

        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            with torch.no_grad():
                weight = m.weight * m.effective_mask() if isinstance(m, (rnn.MaskedLinear, rnn.MaskedConv2d)) else m.weight
            kept += int(weight.count_nonzero())
            total += m.weight.numel()
    total = dense_total or total
    return {"kept": kept, "total": total, "sparsity": 1 - kept / total if total else 0.0,
            "compression": total / kept if kept else float("inf")}
