"""The learning-rate schedule (warmup, then constant / linear / cosine down to lr * lr_end_ratio) and the AdamW
groups without weight decay, against hand-computed values."""
import math

import pytest
import torch

from genvis.config import load_config
from genvis.errors import ConfigError
from genvis.training.loop import lr_at, param_groups


def cfg(*overrides):
    return load_config(None, ["output_dir=/tmp/unused", "train.steps=11", "train.lr=1.0", "train.warmup_steps=1",
                              *overrides])


def test_constant_after_warmup_is_the_old_rule():
    c = cfg("train.warmup_steps=4")
    assert [lr_at(c, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_linear_decay_reaches_the_end_ratio_at_the_last_step():
    c = cfg("train.lr_schedule=linear", "train.lr_end_ratio=0.1")
    # step 0 is warmup (lr 1 * 1/1); steps 1..10 decay linearly from 1 to 0.1: 1 - 0.9 (s - 1) / 9
    assert lr_at(c, 0) == 1.0
    for s in range(1, 11):
        assert lr_at(c, s) == pytest.approx(1 - 0.9 * (s - 1) / 9)
    assert lr_at(c, 10) == pytest.approx(0.1)


def test_cosine_decay():
    c = cfg("train.lr_schedule=cosine", "train.lr_end_ratio=0.0")
    assert lr_at(c, 1) == pytest.approx(1.0)
    assert lr_at(c, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(c, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 9)))


def test_bad_schedule_is_one_line():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        cfg("train.lr_schedule=step")
    with pytest.raises(ConfigError, match="train.lr_end_ratio"):
        cfg("train.lr_end_ratio=1.5")


def test_no_weight_decay_group_from_the_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)

        def no_weight_decay(self):
            return ["a.bias", "b.weight"]

    net, plain = Net(), torch.nn.Linear(2, 2)
    groups = param_groups({"net": net}, ["net"], 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert groups[0]["params"] == [net.a.weight, net.b.bias] and groups[1]["params"] == [net.a.bias, net.b.weight]
    # a module without no_weight_decay keeps one group in parameter order (the optimizer state as before)
    groups = param_groups({"plain": plain}, ["plain"], 0.05)
    assert len(groups) == 1 and groups[0]["params"] == [plain.weight, plain.bias]
