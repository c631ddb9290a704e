"""The configuration of a pruning run: a YAML file with command-line overrides, validated by
pydantic before any work starts.

Unknown keys, wrong types and impossible values (a sparsity outside [0, 1), eps < 0, an
objective or verifier that cannot bound the model, a data source that does not exist, an
evaluation subset larger than the test split) are refused with a message naming the key, e.g.
``prune.sparsities.0: sparsity must lie in [0, 1), got 1.5``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import models, objectives
from ..train import TrainConfig


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    dataset: Literal["digits", "cifar10", "imagefolder"] = "digits"
    source: str | None = None         # cifar10 / imagefolder: a folder or a .tar.gz
    cache_dir: str | None = None      # decoded-data cache (default $ROBPRUNE_CACHE or ~/.cache)
    train_subset: int | None = Field(None, ge=1)  # a seeded class-stratified sample to train on

    @model_validator(mode="after")
    def _source(self):
        if self.dataset == "digits" and self.source is not None:
            raise ValueError("source: the digits data set is embedded and takes no source")
        if self.dataset != "digits":
            if self.source is None:
                raise ValueError(f"source: dataset {self.dataset!r} needs a source (a folder or a .tar.gz)")
            if not Path(self.source).exists():
                raise ValueError(f"source: {self.source} does not exist")
        return self


class ModelConfig(Strict):
    name: str = "digits_cnn"          # a zoo network (robprune_fast.models)
    ibp_init: bool = False            # Shi et al.'s IBP initialisation before pre-training

    @field_validator("name")
    @classmethod
    def _known(cls, name):
        if name not in models.MODELS:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(models.MODELS))}")
        return name


class ObjectiveConfig(Strict):
    name: str = "ibp"
    eps: float = Field(0.05, ge=0, allow_inf_nan=False)  # L-inf budget in [0, 1] pixel units
    hyper: dict[str, Any] = {}        # the objective's other hyper-parameters

    @model_validator(mode="after")
    def _builds(self):
        if self.name not in objectives.known():
            raise ValueError(f"name: unknown objective {self.name!r}; known: {', '.join(objectives.known())}")
        try:
            objectives.build(self.name, **self.arguments())
        except (TypeError, ValueError) as e:
            raise ValueError(f"hyper: {e}") from None
        return self

    def arguments(self) -> dict:
        return {} if self.name == "natural" else {"eps": self.eps, **self.hyper}


class PretrainConfig(TrainConfig):
    weights: str | None = None        # start from these weights (safetensors) instead of training

    @field_validator("weights")
    @classmethod
    def _exists(cls, path):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{path} does not exist")
        return path


class HydraConfig(TrainConfig):
    """The score training of HYDRA (SGD on the scores, weights frozen), with HYDRA's defaults."""
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.1, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)


class PruneConfig(Strict):
    sparsities: list[float] = [0.9]   # each pruned model reuses the pretrained one
    strategies: list[Literal["magnitude", "random", "hydra"]] = ["magnitude"]
    scope: Literal["layer", "global"] = "layer"
    structure: Literal["unstructured", "channel", "n:m"] = "unstructured"
    n_m: list[int] = [2, 4]           # n kept of every m (structure "n:m")
    exclude: list[str] = []           # layer names kept dense, or "first" / "last"
    schedule: Literal["one-shot", "cubic"] = "one-shot"  # cubic: gradually during fine-tuning
    hydra: HydraConfig = HydraConfig()

    @field_validator("sparsities")
    @classmethod
    def _in_range(cls, values):
        if not values:
            raise ValueError("give at least one sparsity")
        for s in values:
            if not (0 <= s < 1 and math.isfinite(s)):
                raise ValueError(f"sparsity must lie in [0, 1), got {s}")
        return values

    @field_validator("n_m")
    @classmethod
    def _pair(cls, value):
        if len(value) != 2 or not 0 < value[0] <= value[1]:
            raise ValueError(f"n_m must be [n, m] with 0 < n <= m, got {value}")
        return value

    @model_validator(mode="after")
    def _combinations(self):
        if self.structure == "n:m" and set(self.strategies) - {"magnitude", "random"}:
            raise ValueError("strategies: n:m pruning supports magnitude and random")
        if self.structure == "channel" and "hydra" in self.strategies:
            raise ValueError("strategies: channel pruning supports magnitude and random")
        if self.schedule == "cubic" and set(self.strategies) != {"magnitude"}:
            raise ValueError("schedule: the cubic schedule prunes by magnitude")
        if self.scope == "global" and "hydra" in self.strategies:
            raise ValueError("scope: HYDRA prunes layer by layer")
        return self


class FinetuneConfig(TrainConfig):
    enabled: bool = True
    objective: ObjectiveConfig | None = None  # None: the pretraining objective (the paper's insight)
    # Train the kept weights only (nn.compress: no dense weight gradient, optimiser state for the
    # kept weights); the same steps as the masked model's, in other summation orders.
    compressed: bool = False


class EvalConfig(Strict):
    n: int | None = Field(None, ge=1)  # a seeded class-stratified sample of the test split; None: all
    eps: float | None = Field(None, ge=0, allow_inf_nan=False)  # None: the objective's eps
    pgd_steps: int = Field(50, ge=1)
    pgd_restarts: int = Field(1, ge=1)
    autoattack_n: int = Field(0, ge=0)
    verify: list[Literal["ibp", "crown-ibp", "crown"]] = ["ibp", "crown-ibp"]
    batch_size: int = Field(256, ge=1)


class RunConfig(Strict):
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = Field(0, ge=0)
    device: str = "auto"              # "auto": cuda when available, else cpu
    threads: int | None = Field(None, ge=1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    pretrain: PretrainConfig = PretrainConfig()
    prune: PruneConfig = PruneConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    export_compact: bool = True

    @model_validator(mode="after")
    def _fixed_masks(self):
        if self.finetune.compressed and self.prune.schedule == "cubic":
            raise ValueError("finetune.compressed: the cubic schedule changes the masks while fine-tuning, "
                             "and compressed layers keep them fixed; use prune.schedule=one-shot")
        return self

    @model_validator(mode="after")
    def _boundable(self):
        """Certified objectives and verifiers must be able to bound the model's layers."""
        from ..bounds.compile import compile_model
        import torch
        ops = compile_model(models.build(self.model.name), torch.float32)
        crown_free = [op.name for op in ops if not op.supports_crown]
        objectives_used = [("objective.name", self.objective.name)]
        if self.finetune.objective is not None:
            objectives_used.append(("finetune.objective.name", self.finetune.objective.name))
        for key, name in objectives_used + [("eval.verify", m) for m in self.eval.verify]:
            if name in ("crown-ibp", "crown") and crown_free:
                raise ValueError(f"{key}: {name} cannot bound model {self.model.name!r} (its "
                                 f"layers {crown_free[:3]} support IBP only); use ibp")
        return self


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The run configuration of a YAML file (None: the defaults) with ``key.sub=value``
    overrides (values parsed as YAML: 0.9, [0.9, 0.99], true, "text"); ValueError naming the
    key on anything invalid."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants key=value, got {item!r}")
        _set(tree, key.strip(), yaml.safe_load(text))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ValueError(_describe(e)) from None


def _describe(error: ValidationError) -> str:
    """One line per problem, each starting with the dotted key at fault (a section's own check
    names its field first, "field: message", which joins the key)."""
    lines = []
    for item in error.errors():
        parts = [str(part) for part in item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        field = re.match(r"([a-z_.]+): (.*)", message, re.S)
        if field:
            parts.append(field.group(1))
            message = field.group(2)
        lines.append(f"{'.'.join(parts) or '(config)'}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def dump(config: RunConfig) -> str:
    """The resolved configuration as YAML (what the run directory keeps)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
