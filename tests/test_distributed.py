"""Data-parallel training under torchrun: two CPU processes (gloo) keep identical weights and
masks and end where one process with the same global batch ends."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robprune_fast import data, distributed, objectives, pruning, train
from robprune_fast import nn as rnn


def _model():
    torch.manual_seed(0)
    return rnn.convert(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))


def _train(out_dir):
    """Prune gradually while training two epochs of IBP on a digits sample; returns the model."""
    dataset = data.load_digits()
    split = dataset.train.select(data.stratified_subset(dataset.train, 200, 0))
    model = _model()
    config = train.TrainConfig(epochs=2, batch_size=50, optimizer="sgd", lr=0.05, progress_bar=False)
    objective = objectives.build("ibp", eps=0.02, eps_ramp=0.5)
    train.train(model, split, objective, config, out_dir,
                on_epoch_start=lambda epoch: pruning.prune(model, 0.5 * (epoch + 1) / 2))
    return model


def _worker(rank, world, port, out_dir, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.setup() == torch.device("cpu")
    model = _train(out_dir)
    torch.save({k: v.clone() for k, v in model.state_dict().items()},
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "run"), str(tmp_path)), nprocs=2,
             join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key  # in sync
    torch.set_num_threads(1)
    single = _train(tmp_path / "single").state_dict()
    for key, value in single.items():
        if key.endswith("weight_mask"):
            assert torch.equal(states[0][key], value), key
        else:  # the same steps; the all-reduce sums in another order
            torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
