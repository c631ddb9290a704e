"""Objectives, schedules, checkpoints, kill-and-resume, and adversarial vs natural training."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robprune_fast import checkpoint, data, evaluate, models, objectives, train
from robprune_fast._atomic import atomic_write


# --- objectives ----------------------------------------------------------------------------------

def digits_batch(n=32):
    split = data.load("digits").train
    return split.images[:n].float() / 255, split.labels[:n]


OBJECTIVES = {
    "natural": {},
    "pgd": {"eps": 0.1, "steps": 3},
    "trades": {"eps": 0.1, "steps": 3, "beta": 6.0},
    "fgsm_rs": {"eps": 0.1},
    "ibp": {"eps": 0.05},
    "crown-ibp": {"eps": 0.05},
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objectives_give_a_differentiable_loss(name):
    assert sorted(OBJECTIVES) == objectives.known()
    torch.manual_seed(0)
    model = models.build("digits_cnn")
    x, y = digits_batch()
    loss, logits = objectives.build(name, **OBJECTIVES[name])(model, x, y, 0.5)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (32, 10)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.training  # attacks ran in eval mode, and the mode came back


def test_eps_ramp_starts_natural():
    torch.manual_seed(0)
    model = models.build("digits_cnn")
    x, y = digits_batch()
    natural, _ = objectives.build("natural")(model, x, y, 0.0)
    for name in ("pgd", "fgsm_rs", "trades"):
        hyper = {**OBJECTIVES[name], "eps_warmup": 0.5}
        if name == "trades":
            hyper["beta"] = 0.0
        loss, _ = objectives.build(name, **hyper)(model, x, y, 0.0)
        torch.testing.assert_close(loss, natural)
    assert objectives.ramp(0.25, 0.5) == 0.5 and objectives.ramp(0.9, 0.5) == 1.0


def test_objective_errors():
    with pytest.raises(ValueError, match="unknown objective 'mixtrain'; known objectives: crown-ibp, "
                                         "fgsm_rs, ibp, natural, pgd, trades"):
        objectives.build("mixtrain")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        objectives.build("pgd", eps=-1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        objectives.build("trades", eps=0.1, beta=-1)
    with pytest.raises(ValueError, match="eps_warmup"):
        objectives.build("fgsm_rs", eps=0.1, eps_warmup=2)
    with pytest.raises(ValueError, match="already registered"):
        objectives.register("pgd")(lambda: None)


# --- schedules and config ------------------------------------------------------------------------

def test_learning_rate_schedules():
    cfg = train.TrainConfig(epochs=10, lr=1.0, warmup_epochs=1, schedule="cosine")
    lrs = [train.learning_rate(cfg, s, 100) for s in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] < 0.001
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    step = train.TrainConfig(epochs=4, lr=1.0, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [train.learning_rate(step, s, 8) for s in (0, 3, 4, 6, 7)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01, 0.01])
    const = train.TrainConfig(lr=0.3, schedule="constant")
    assert train.learning_rate(const, 50, 100) == 0.3


@pytest.mark.parametrize("fields,match", [
    ({"optimizer": "rmsprop"}, "optimizer.*'sgd' or 'adam'"),
    ({"schedule": "linear"}, "schedule.*'cosine', 'step' or 'constant'"),
    ({"epochs": 0}, "epochs.*greater than or equal to 1"),
    ({"epochs": 2.5}, "epochs.*valid integer"), ({"epochs": True}, "epochs.*valid integer"),
    ({"batch_size": 0}, "batch_size.*greater than or equal to 1"),
    ({"batch_size": 64.0}, "batch_size.*valid integer"),
    ({"lr": 0.0}, "lr.*greater than 0"), ({"lr": math.inf}, "lr.*finite number"),
    ({"lr": math.nan}, "lr.*finite number"), ({"lr": "0.1"}, "lr.*valid number"),
    ({"momentum": 1.0}, "momentum.*less than 1"), ({"momentum": -0.1}, "momentum.*greater than"),
    ({"weight_decay": -1e-4}, "weight_decay.*greater than or equal to 0"),
    ({"weight_decay": math.inf}, "weight_decay.*finite number"),
    ({"gamma": 0.0}, "gamma.*greater than 0"), ({"gamma": 1.5}, "gamma.*less than or equal to 1"),
    ({"warmup_epochs": -1.0}, "warmup_epochs.*greater than or equal to 0"),
    ({"epochs": 2, "warmup_epochs": 3.0}, "warmup_epochs \\(3.0\\) must be <= epochs \\(2\\)"),
    ({"milestones": (0.75, 0.5)}, "milestones.*increasing fractions in \\(0, 1\\)"),
    ({"milestones": (0.0, 0.5)}, "milestones.*increasing"), ({"milestones": (0.5, 1.0)}, "milestones"),
    ({"milestones": (0.5, 0.5)}, "milestones.*increasing"),
    ({"augment": "yes"}, "augment.*valid boolean"), ({"seed": -1}, "seed.*greater than or equal to 0"),
    ({"lr_decay": 0.1}, "lr_decay.*Extra inputs are not permitted"),
])
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ValueError, match=re.compile(match, re.S)):
        train.TrainConfig(**fields)


def test_config_assignment_is_checked_too():
    cfg = train.TrainConfig()
    with pytest.raises(ValueError, match=re.compile("lr.*finite number", re.S)):
        cfg.lr = math.inf


def test_config_json_keeps_its_keys():
    """to_json() is part of every checkpoint's identity: its keys and values must not change."""
    cfg = train.TrainConfig(epochs=3, milestones=[0.25, 0.5], warmup_epochs=1)  # a list is taken
    assert cfg.to_json() == {
        "epochs": 3, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9,
        "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 1.0, "milestones": [0.25, 0.5],
        "gamma": 0.1, "augment": False, "seed": 0}
    assert cfg.milestones == (0.25, 0.5)
    assert train.TrainConfig(**cfg.to_json()) == cfg


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_checkpoint_round_trip_continues_identically(tmp_path, opt):
    x, y = digits_batch()
    cfg = train.TrainConfig(optimizer=opt, lr=0.01)
    torch.manual_seed(0)
    a = models.build("digits_mlp")
    opt_a = train.make_optimizer(a, cfg)
    objective = objectives.build("natural")
    train.train_step(a, opt_a, objective, x, y, 0.0, 0.01)
    checkpoint.save(tmp_path / "c.safetensors", a, opt_a, {"epoch": 7})

    b = models.build("digits_mlp")
    opt_b = train.make_optimizer(b, cfg)
    assert checkpoint.load(tmp_path / "c.safetensors", b, opt_b) == {"epoch": 7}
    assert json.loads((tmp_path / "c.json").read_text()) == {"epoch": 7}
    for _ in range(2):
        train.train_step(a, opt_a, objective, x, y, 0.0, 0.01)
        train.train_step(b, opt_b, objective, x, y, 0.0, 0.01)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("saved,loaded", [("sgd", "adam"), ("adam", "sgd")])
def test_checkpoint_refuses_another_optimizer(tmp_path, saved, loaded):
    x, y = digits_batch()
    model = models.build("digits_mlp")
    opt = train.make_optimizer(model, train.TrainConfig(optimizer=saved, lr=0.01))
    train.train_step(model, opt, objectives.build("natural"), x, y, 0.0, 0.01)
    checkpoint.save(tmp_path / "c.safetensors", model, opt)
    other = train.make_optimizer(model, train.TrainConfig(optimizer=loaded, lr=0.01))
    names = {"sgd": "SGD", "adam": "Adam"}
    with pytest.raises(ValueError, match=f"c.safetensors: the checkpoint holds {names[saved]} state, "
                                         f"the optimizer is {names[loaded]}"):
        checkpoint.load(tmp_path / "c.safetensors", model, other)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad meta"])
def test_damaged_checkpoint_is_named(tmp_path, damage):
    path = tmp_path / "c.safetensors"
    model = models.build("digits_mlp")
    checkpoint.save(path, model, meta={"epoch": 1})
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1000])
    elif damage == "garbage":
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    else:
        save_file({"model.0.weight": torch.zeros(1)}, path, metadata={"meta": "{not json"})
    for read in (lambda: checkpoint.read_meta(path), lambda: checkpoint.load(path, model)):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a readable checkpoint"):
            read()
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        checkpoint.read_meta(tmp_path / "nowhere.safetensors")


def test_atomic_write_removes_dead_writers_temporaries(tmp_path):
    target = tmp_path / "c.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer answers
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".c.safetensors.{dead.pid}.tmp"
        in_flight = tmp_path / f".c.safetensors.{live.pid}.tmp"
        other_target = tmp_path / f".d.safetensors.{dead.pid}.tmp"
        not_ours = tmp_path / ".c.safetensors.backup.tmp"
        for f in (stale, in_flight, other_target, not_ours):
            f.write_text("half")
        atomic_write(target, lambda tmp: Path(tmp).write_text("whole"))
        assert target.read_text() == "whole"
        assert not stale.exists()
        assert in_flight.exists() and other_target.exists() and not_ours.exists()
    finally:
        live.kill()
        live.wait()


def test_checkpoint_refuses_a_different_model(tmp_path):
    checkpoint.save(tmp_path / "c.safetensors", models.build("digits_mlp"))
    with pytest.raises(ValueError, match="does not match the model"):
        checkpoint.load(tmp_path / "c.safetensors", models.build("digits_cnn"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        checkpoint.load(tmp_path / "missing.safetensors", models.build("digits_mlp"))


# --- kill and resume -----------------------------------------------------------------------------

RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from robprune_fast import data, models, objectives, train
    out, kill_at = sys.argv[1], int(sys.argv[2])
    full = data.load("digits").train
    split = data.Split(full.images[:300], full.labels[:300])
    torch.manual_seed(0)
    model = models.build("digits_cnn")
    base = objectives.build("pgd", eps=0.1, steps=2)
    calls = 0
    def objective(model, x, y, progress):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real crash
        return base(model, x, y, progress)
    cfg = train.TrainConfig(epochs=3, batch_size=32, lr=0.05, warmup_epochs=1, augment=True,
                            seed=7, progress_bar=False)
    train.train(model, split, objective, cfg, out, run_info={"test": "resume"})
""")


def start_training(script, out, kill_at=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(kill_at)], env=env,
                            stderr=subprocess.PIPE, text=True)


def finish(proc):
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_killed_run_resumes_to_bitwise_identical_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    # The uninterrupted run and the doomed one run side by side (10 steps/epoch: killed in epoch 2).
    straight = start_training(script, tmp_path / "straight")
    killed = start_training(script, tmp_path / "resumed", kill_at=16)
    rc, err = finish(killed)
    assert rc == -9, err
    after_kill = checkpoint.read_meta(tmp_path / "resumed" / train.CHECKPOINT)
    assert after_kill["epoch"] == 0
    resumed = start_training(script, tmp_path / "resumed")
    for proc in (straight, resumed):
        rc, err = finish(proc)
        assert rc == 0, err

    a, b = models.build("digits_cnn"), models.build("digits_cnn")
    checkpoint.load(tmp_path / "straight" / train.CHECKPOINT, a)
    checkpoint.load(tmp_path / "resumed" / train.CHECKPOINT, b)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    lines = (tmp_path / "resumed" / train.METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert json.loads(lines[0]) == after_kill["history"][0]  # epoch 0 was not trained again


def small_digits(n=64):
    full = data.load("digits").train
    return data.Split(full.images[:n], full.labels[:n])


def test_resume_refuses_a_different_run(tmp_path):
    split = small_digits()
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=1, batch_size=32, progress_bar=False)
    train.train(model, split, objectives.build("natural"), cfg, tmp_path)
    with pytest.raises(ValueError, match="belongs to a different run.*config.batch_size: 32 in the "
                                         "checkpoint, 16 now"):
        train.train(model, split, objectives.build("natural"),
                    train.TrainConfig(epochs=1, batch_size=16, progress_bar=False), tmp_path)


def test_resume_refuses_another_objective(tmp_path):
    split = small_digits()
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=1, batch_size=32, progress_bar=False)
    train.train(model, split, objectives.build("pgd", eps=0.1, steps=2), cfg, tmp_path)
    with pytest.raises(ValueError, match="belongs to a different run.*objective.eps: 0.1 in the "
                                         "checkpoint, 0.2 now"):
        train.train(model, split, objectives.build("pgd", eps=0.2, steps=2), cfg, tmp_path)
    with pytest.raises(ValueError, match="objective.name: 'pgd' in the checkpoint, 'natural' now"):
        train.train(model, split, objectives.build("natural"), cfg, tmp_path)


def test_resume_refuses_other_data(tmp_path):
    split = small_digits()
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=1, batch_size=32, progress_bar=False)
    natural = objectives.build("natural")
    train.train(model, split, natural, cfg, tmp_path)
    relabelled = data.Split(split.images, split.labels.roll(1))
    with pytest.raises(ValueError, match="belongs to a different run.*data.labels_sha256"):
        train.train(model, relabelled, natural, cfg, tmp_path)
    images = split.images.clone()
    images[5, 0, 3, 3] ^= 1  # one bit of one pixel
    with pytest.raises(ValueError, match="data.images_sha256"):
        train.train(model, data.Split(images, split.labels), natural, cfg, tmp_path)
    with pytest.raises(ValueError, match="data.size: 64 in the checkpoint, 63 now"):
        train.train(model, data.Split(split.images[:63], split.labels[:63]), natural, cfg, tmp_path)
    assert train.train(model, small_digits(), natural, cfg, tmp_path)  # the same data resumes


def test_resume_of_a_checkpoint_without_objective_and_data_warns(tmp_path):
    """Checkpoints written before the run identity held the objective and data still resume."""
    split = small_digits()
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=2, batch_size=32, progress_bar=False)
    optimizer = train.make_optimizer(model, cfg)
    old_identity = {"config": cfg.to_json(), "run": {}}
    history = [{"epoch": 0, "loss": 1.0}]
    checkpoint.save(tmp_path / train.CHECKPOINT, model, optimizer,
                    {"identity": old_identity, "epoch": 0, "history": history})
    with pytest.warns(UserWarning, match="records no objective, data: resuming without checking them"):
        result = train.train(model, split, objectives.build("natural"), cfg, tmp_path)
    assert [h["epoch"] for h in result] == [0, 1]
    assert set(checkpoint.read_meta(tmp_path / train.CHECKPOINT)["identity"]) == {
        "config", "run", "objective", "data"}


def test_resume_refuses_a_checkpoint_without_identity(tmp_path):
    model = models.build("digits_mlp")
    checkpoint.save(tmp_path / train.CHECKPOINT, model, meta={"epoch": 0, "history": []})
    with pytest.raises(ValueError, match="belongs to a different run: config: \\(absent\\) in the "
                                         "checkpoint"):
        train.train(model, small_digits(), objectives.build("natural"),
                    train.TrainConfig(epochs=1, progress_bar=False), tmp_path)


def test_identity_must_be_json(tmp_path):
    objective = objectives.build("natural")
    objective.spec = {"name": "natural", "schedule": lambda t: t}
    with pytest.raises(ValueError, match="objective's spec must be JSON data.*function"):
        train.train(models.build("digits_mlp"), small_digits(), objective,
                    train.TrainConfig(epochs=1, progress_bar=False), tmp_path)


def test_empty_split_is_refused(tmp_path):
    empty = data.Split(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="split is empty"):
        train.train(models.build("digits_mlp"), empty, objectives.build("natural"),
                    train.TrainConfig(epochs=1, progress_bar=False), tmp_path)


def poisoned(step_to_poison, poison):
    """The natural objective, with ``poison(loss, model)`` applied at one call (1-based)."""
    base, calls = objectives.build("natural"), [0]

    def objective(model, x, y, progress):
        calls[0] += 1
        loss, logits = base(model, x, y, progress)
        return (poison(loss, model) if calls[0] == step_to_poison else loss), logits
    return objective


def test_non_finite_loss_stops_before_the_checkpoint(tmp_path):
    split = small_digits(96)  # 3 steps per epoch
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=3, batch_size=32, progress_bar=False)
    nan_loss = poisoned(5, lambda loss, model: loss * math.nan)  # epoch 2, step 2
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2/3, step 2/3.*checkpoint"
                                                 r".safetensors keeps the run after epoch 1/3"):
        train.train(model, split, nan_loss, cfg, tmp_path)
    meta = checkpoint.read_meta(tmp_path / train.CHECKPOINT)
    assert meta["epoch"] == 0
    restored = models.build("digits_mlp")
    checkpoint.load(tmp_path / train.CHECKPOINT, restored)
    assert all(torch.isfinite(p).all() for p in restored.state_dict().values())
    # On the CPU the bad loss never reached the weights: the model can still be inspected.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    lines = (tmp_path / train.METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]


def test_non_finite_loss_without_step_checks_stops_at_the_epoch_end(tmp_path, monkeypatch):
    """As on a GPU, where the loss is only checked once per epoch (its summed loss)."""
    monkeypatch.setattr(train, "_check_each_step", lambda device: False)
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=3, batch_size=32, progress_bar=False)
    nan_loss = poisoned(5, lambda loss, model: loss * math.nan)  # epoch 2, step 2
    with pytest.raises(FloatingPointError, match=r"not finite after epoch 2/3.*keeps the run after "
                                                 r"epoch 1/3"):
        train.train(model, small_digits(96), nan_loss, cfg, tmp_path)
    assert checkpoint.read_meta(tmp_path / train.CHECKPOINT)["epoch"] == 0
    restored = models.build("digits_mlp")
    checkpoint.load(tmp_path / train.CHECKPOINT, restored)
    assert all(torch.isfinite(p).all() for p in restored.state_dict().values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A finite loss with an infinite gradient (sqrt at 0) turns the weights to NaN in the last
    step of the epoch: the per-epoch check catches what no loss has shown yet."""
    split = small_digits(64)  # 2 steps per epoch
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=2, batch_size=32, progress_bar=False)

    def infinite_gradient(loss, model):
        first = next(model.parameters())
        return loss + (first * 0).abs().sqrt().sum()
    with pytest.raises(FloatingPointError, match=r"not finite after epoch 1/2.*no checkpoint"):
        train.train(model, split, poisoned(2, infinite_gradient), cfg, tmp_path)
    assert not (tmp_path / train.CHECKPOINT).exists()


# --- the point of it all -------------------------------------------------------------------------

def test_adversarial_training_beats_natural_under_pgd(tmp_path):
    ds = data.load("digits")
    cfg = train.TrainConfig(epochs=8, batch_size=64, lr=0.05, warmup_epochs=1, progress_bar=False)
    robust = {}
    for name, hyper in (("natural", {}), ("pgd", {"eps": 0.1, "steps": 5})):
        torch.manual_seed(0)
        model = models.build("digits_cnn")
        train.train(model, ds.train, objectives.build(name, **hyper), cfg, tmp_path / name)
        result = evaluate.evaluate(model, ds.test, eps=0.1, pgd_steps=20, pgd_restarts=2)
        assert result["benign_acc"] > 0.9
        assert result["pgd"]["acc"] <= result["benign_acc"]
        robust[name] = result["pgd"]["acc"]
    assert robust["pgd"] > robust["natural"] + 0.15, robust


def test_evaluate_reports_autoattack_on_a_subset():
    pytest.importorskip("pyautoattack")
    ds = data.load("digits")
    torch.manual_seed(0)
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=2, batch_size=64, lr=0.05, progress_bar=False)
    batches = data.Batches(ds.train, 64)
    opt = train.make_optimizer(model, cfg)
    for x, y in batches:
        train.train_step(model, opt, objectives.build("natural"), x, y, 0.0, 0.05)
    result = evaluate.evaluate(model, ds.test, eps=0.1, n=60, pgd_steps=10, autoattack_n=20)
    aa = result["autoattack"]
    assert result["n"] == 60 and aa["n"] == 20
    assert aa["acc"] <= result["benign_acc"] + 0.1  # 20 of the 60 points: sampling slack
    assert 0 <= aa["pgd_acc_same_points"] <= 1


def test_demo_command_writes_results(tmp_path):
    from robprune_fast import demo

    argv = ["--epochs", "1", "--steps", "2", "--eval-n", "30", "--eval-steps", "3", "--no-progress",
            "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)]
    results = demo.main(argv)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["eval"] == results["eval"] and saved["model"] == "digits_cnn"
    assert saved["objective"] == "pgd" and saved["hyper"]["eps"] == 0.1
    assert saved["eval"]["n"] == 30 and len(saved["history"]) == 1
    with pytest.raises(ValueError, match="belongs to a different run"):
        demo.main(argv + ["--eps", "8/255"])
