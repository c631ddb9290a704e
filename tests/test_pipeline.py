"""The pruning pipeline and the robprune command: a tiny end-to-end run, what its directory and
table hold, resume after a kill at every stage, and configuration errors."""
import json

import pytest
import torch
import yaml

from robprune_fast import cli, compact, evaluate, models, pipeline, pruning, train
from robprune_fast import nn as rnn

TINY = {
    "name": "tiny", "seed": 0, "threads": 1,
    "data": {"dataset": "digits", "train_subset": 240},
    "model": {"name": "digits_cnn"},
    "objective": {"name": "ibp", "eps": 0.05, "hyper": {"eps_ramp": 0.5}},
    "pretrain": {"epochs": 2, "batch_size": 60, "optimizer": "adam", "lr": 0.003,
                 "weight_decay": 0.0, "progress_bar": False},
    "prune": {"sparsities": [0.9], "strategies": ["magnitude", "hydra"],
              "hydra": {"epochs": 1, "batch_size": 60, "progress_bar": False}},
    "finetune": {"epochs": 2, "batch_size": 60, "optimizer": "adam", "lr": 0.001,
                 "weight_decay": 0.0, "progress_bar": False},
    "eval": {"n": 100, "pgd_steps": 2, "verify": ["ibp"]},
}


def _config(tmp_path, name="run", **changes):
    tree = json.loads(json.dumps(TINY))
    tree["out_dir"] = str(tmp_path / name)
    for dotted, value in changes.items():
        node = tree
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny run."""
    tmp = tmp_path_factory.mktemp("reference")
    config = pipeline.load(_config(tmp))
    results = pipeline.Run(config).run()
    return tmp / "run", results


def test_run_directory_and_table(reference):
    out, results = reference
    for name in ("config.yaml", "log.txt", "events.jsonl", "results.json", "report.md", "report.png",
                 "dense/model.safetensors", "dense/eval.json", "s0.9-magnitude/pruned.safetensors",
                 "s0.9-hydra/hydra/checkpoint.safetensors", "s0.9-hydra/model.compact",
                 "s0.9-magnitude/finetune/metrics.jsonl"):
        assert (out / name).exists(), name
    rows = results["rows"]
    assert [r["variant"] for r in rows] == ["dense", "s0.9-magnitude", "s0.9-hydra"]
    for row in rows[1:]:
        # exact sparsity over all conv and linear weights, first and last layers included
        assert row["weights"]["kept"] == round(0.1 * row["weights"]["total"])
        assert row["files"]["compact_bytes"] < 0.2 * rows[0]["files"]["dense_bytes"]
    assert rows[0]["eval"]["subset"]["selection"] == "stratified"
    table = (out / "report.md").read_text()
    assert "| s0.9-hydra |" in table and "IBP-verified" in table and "(100%)" in table
    events = [json.loads(line)["stage"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert {"pretrain", "prune", "finetune", "eval", "report"} <= set(events)


def test_finetuning_never_revives_a_pruned_weight(reference):
    out, _ = reference
    run = pipeline.Run(pipeline.load(out.parent / "run.yaml"))
    dense = run.pretrain(compute=False)
    for strategy in ("magnitude", "hydra"):
        pruned = run.prune(dense, 0.9, strategy, compute=False)
        masks = {n: m.weight_mask.clone() for n, m in rnn.masked_modules(pruned).items()}
        tuned = run.finetune(pruned, 0.9, strategy, compute=False)
        for name, layer in rnn.masked_modules(tuned).items():
            assert torch.equal(layer.weight_mask, masks[name])
            assert (layer.weight * layer.weight_mask)[masks[name] == 0].eq(0).all()


def test_the_compact_file_reproduces_the_model(reference):
    out, _ = reference
    run = pipeline.Run(pipeline.load(out.parent / "run.yaml"))
    model = run.finetune(run.prune(run.pretrain(False), 0.9, "hydra", False), 0.9, "hydra", False).eval()
    fresh = models.build("digits_cnn").eval()
    compact.load_compact(fresh, out / "s0.9-hydra" / "model.compact")
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


class Killed(Exception):
    pass


@pytest.mark.parametrize("where,after", [("pretrain", 3), ("hydra", 2), ("finetune", 5),
                                         ("eval", 2), ("export", 1)])
def test_resume_after_a_kill_at_every_stage(reference, tmp_path, monkeypatch, where, after):
    """A run killed in a stage, started again, ends with the uninterrupted run's results."""
    ref_out, ref_results = reference
    calls = {"n": 0}

    def dying(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == after:
                raise Killed(where)
            return real(*args, **kwargs)
        return wrapper

    if where in ("pretrain", "hydra", "finetune"):
        folder = {"pretrain": "dense", "hydra": "hydra", "finetune": "finetune"}[where]
        real_train, real_step = train.train, train.train_step

        def counting_train(model, split, objective, config, out_dir, *args, **kwargs):
            # Only the steps of the stage to kill count.
            monkeypatch.setattr(train, "train_step", dying(real_step) if folder in str(out_dir)
                                else real_step)
            return real_train(model, split, objective, config, out_dir, *args, **kwargs)
        monkeypatch.setattr(train, "train", counting_train)
    elif where == "eval":
        monkeypatch.setattr(evaluate, "evaluate", dying(evaluate.evaluate))
    else:
        monkeypatch.setattr(compact, "save_compact", dying(compact.save_compact))
    config = pipeline.load(_config(tmp_path))
    with pytest.raises(Killed):
        pipeline.Run(config).run()
    monkeypatch.undo()
    results = pipeline.Run(config).run()
    for got, want in zip(results["rows"], ref_results["rows"]):
        assert got["eval"] == want["eval"] and got["weights"] == want["weights"], got["variant"]
    got, _ = compact.read_compact(tmp_path / "run" / "s0.9-hydra" / "model.compact")
    want, _ = compact.read_compact(ref_out / "s0.9-hydra" / "model.compact")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_stage_made_with_another_config_is_refused(reference, tmp_path):
    out, _ = reference
    changed = pipeline.load(_config(tmp_path, "other", pretrain__lr=0.01, out_dir=str(out)))
    with pytest.raises(ValueError, match="dense was made with another configuration.*pretrain"):
        pipeline.Run(changed).pretrain()


@pytest.mark.parametrize("overrides,match", [
    (["prune.sparsities=[1.5]"], r"prune.sparsities: .*sparsity must lie in \[0, 1\), got 1.5"),
    (["objective.eps=-0.1"], r"objective.eps: .*greater than or equal to 0"),
    (["pretrain.epochs=2.5"], r"pretrain.epochs: .*integer"),
    (["pretrain.colour=blue"], r"pretrain.colour: Extra inputs are not permitted"),
    (["model.name=resnet9000"], r"model.name: .*unknown model 'resnet9000'"),
    (["objective.name=crown-ibp", "model.name=vgg16_bn"], r"objective.name: crown-ibp cannot bound model 'vgg16_bn'"),
    (["data.dataset=cifar10", "data.source=/nonexistent/cifar"], r"data.source: /nonexistent/cifar does not exist"),
    (["objective.hyper={kappa_start: 2}"], r"objective.hyper: kappa_start must lie in \[0, 1\]"),
    (["prune.strategies=[hydra]", "prune.scope=global"], "HYDRA prunes layer by layer"),
])
def test_configuration_errors_name_the_key(tmp_path, capsys, overrides, match):
    path = _config(tmp_path)
    args = ["run", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(args) == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err), capsys.readouterr()
    assert not (tmp_path / "run").exists()  # refused before any work


def test_too_many_evaluation_points_are_refused_before_any_training(tmp_path):
    config = pipeline.load(_config(tmp_path, eval__n=10_000))
    with pytest.raises(ValueError, match="eval.n: 10000 exceeds the test split's 450 points"):
        pipeline.Run(config)
    assert not (tmp_path / "run" / "dense").exists()


def test_one_stage_needs_the_ones_before(tmp_path, capsys):
    path = _config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"dense/model.safetensors is missing: run `robprune pretrain`"):
        cli.main(["prune", str(path)])
    assert cli.main(["pretrain", str(path)]) == 0
    assert (tmp_path / "run" / "dense" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "s0.9-magnitude").exists()


def test_channel_pruning_and_no_finetuning_run(tmp_path):
    config = pipeline.load(_config(tmp_path, prune__structure="channel", prune__sparsities=[0.5],
                                   prune__strategies=["magnitude"], finetune__enabled=False))
    results = pipeline.Run(config).run()
    dense, pruned = results["rows"]
    assert pruned["files"]["parameters"] < dense["files"]["parameters"]  # physically smaller
    assert pruned["variant"] == "channel-s0.5-magnitude"


def test_compressed_finetuning_follows_the_masked_one(reference, tmp_path):
    """finetune.compressed trains the kept weights only (nn.compress) and ends where the masked
    fine-tuning ends, up to rounding (other summation orders), masks unchanged; the schedule
    that changes masks while fine-tuning is refused."""
    out, _ = reference
    run = pipeline.Run(pipeline.load(_config(tmp_path, finetune__compressed=True)))
    ref = pipeline.Run(pipeline.load(out.parent / "run.yaml"))
    pruned = ref.prune(ref.pretrain(compute=False), 0.9, "magnitude", compute=False)
    want = ref.finetune(pruned, 0.9, "magnitude", compute=False)
    pruned = ref.prune(ref.pretrain(compute=False), 0.9, "magnitude", compute=False)
    got = run.finetune(pruned, 0.9, "magnitude")
    assert set(rnn.masked_modules(got)) == set(rnn.masked_modules(want))
    for name, layer in rnn.masked_modules(got).items():
        ref = want.get_submodule(name)
        assert torch.equal(layer.weight_mask, ref.weight_mask)
        torch.testing.assert_close(layer.weight, ref.weight * ref.weight_mask, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="finetune.compressed: the cubic schedule"):
        pipeline.load(_config(tmp_path, name="cubic", finetune__compressed=True, prune__schedule="cubic",
                              prune__strategies=["magnitude"]))
