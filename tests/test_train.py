"""Objectives, schedules, checkpoints, kill-and-resume, and adversarial vs natural training."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from robprune_fast import checkpoint, data, evaluate, models, objectives, train


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


@pytest.mark.parametrize("field,value,match", [
    ("optimizer", "rmsprop", "optimizer must be"), ("schedule", "linear", "schedule must be"),
    ("epochs", 0, "epochs must be >= 1"), ("lr", 0.0, "lr must be > 0"),
])
def test_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**{field: value})


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


def test_resume_refuses_a_different_run(tmp_path):
    full = data.load("digits").train
    split = data.Split(full.images[:64], full.labels[:64])
    model = models.build("digits_mlp")
    cfg = train.TrainConfig(epochs=1, batch_size=32, progress_bar=False)
    train.train(model, split, objectives.build("natural"), cfg, tmp_path)
    with pytest.raises(ValueError, match="belongs to a different run"):
        train.train(model, split, objectives.build("natural"),
                    train.TrainConfig(epochs=1, batch_size=16, progress_bar=False), tmp_path)


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
