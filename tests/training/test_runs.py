"""Run directories: what a rerun may change, a full disk while checkpointing, sampling a checkpoint, and a
task with two optimizers stepping through the generic loop."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cli_run

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "digits" / "dit.yaml")
SMALL = [
    "data.resolution=8", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2",
    "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1", "train.keep_checkpoints=0",
    "train.mixed_precision=fp32", "sample.steps=2",
]


def train(out, *extra, prelude=None):
    return cli_run.train(DIGITS, out, *SMALL, *extra, prelude=prelude)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line]


def test_rerun_with_another_config_is_refused_and_leaves_the_run_alone(tmp_path):
    """One refused rerun end to end (one line, exit 2, the run untouched); the other refused keys through the
    same check on the stored config.yaml, without a process each."""
    from omegaconf import OmegaConf

    from genvis.errors import GenvisError
    from genvis.training.checkpoint import check_rerun

    out = tmp_path / "run"
    train(out, "train.steps=2", "train.checkpoint_every=2")
    stored = (out / "config.yaml").read_bytes()
    code, _, stderr = cli_run.genvis("train", DIGITS, f"output_dir={out}", *SMALL, "train.steps=2",
                                     "train.checkpoint_every=2", "model.depth=3")
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1 and "model.depth (2 -> 3)" in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert (out / "config.yaml").read_bytes() == stored
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    config = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    assert check_rerun(out, config) == {}
    for key, value, listed in (("train.weight_decay", 0.1, "train.weight_decay (0.0 -> 0.1)"),
                               ("train.steps", 1, "train.steps (2 -> 1)"),
                               ("task.time_sampling", "uniform", "task.time_sampling ('logit_normal' -> 'uniform')")):
        changed = OmegaConf.create(config)
        OmegaConf.update(changed, key, value)
        with pytest.raises(GenvisError, match=re.escape(listed)):
            check_rerun(out, OmegaConf.to_container(changed))


def test_allowed_changes_resume_and_are_recorded(tmp_path):
    """train.steps upward and the sample defaults may change on a rerun: it resumes, records what changed, and
    reaches the weights of a run made with the final steps from the start."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    train(out, "train.steps=2", "train.checkpoint_every=2")
    stdout = train(out, "train.steps=4", "train.checkpoint_every=2", "sample.cfg=3.0")
    assert "resuming from" in stdout and "train.steps: 2 -> 4" in stdout
    history = [json.loads(line) for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert history == [{"step": 2, "changes": {"sample.cfg": [2.0, 3.0], "train.steps": [2, 4]}}]
    assert "steps: 4" in (out / "config.yaml").read_text()
    train(ref, "train.steps=4", "train.checkpoint_every=2")
    a, b = load_file(str(out / "model" / "diffusion_pytorch_model.safetensors")), load_file(str(ref / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a lower learning rate (the non-finite guard's advice) may continue the run from its last checkpoint
    stdout = train(out, "train.steps=6", "train.checkpoint_every=2", "sample.cfg=3.0", "train.lr=1e-4")
    assert "resuming from" in stdout and "train.lr: 0.001 -> 0.0001" in stdout


def test_a_run_that_failed_before_its_first_checkpoint_takes_a_corrected_config(tmp_path):
    out = tmp_path / "run"
    code, _, stderr = cli_run.genvis("train", DIGITS, f"output_dir={out}", *SMALL, "train.steps=2",
                                     f"tokenizer.path={tmp_path / 'none'}")
    assert code == 2 and "no config.json" in error_lines(stderr)[0]
    train(out, "train.steps=2", "train.checkpoint_every=2")  # nothing was trained: any config may start it
    assert "path: null" in (out / "config.yaml").read_text()


FULL_DISK = """
import accelerate
real = accelerate.Accelerator.save_state
def save_state(self, output_dir=None, **kwargs):
    if 'step_0000004' in str(output_dir):
        real(self, output_dir, **kwargs)  # part of the files, then the disk is full
        raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4032')
    return real(self, output_dir, **kwargs)
accelerate.Accelerator.save_state = save_state
"""


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    code, _, stderr = cli_run.genvis("train", DIGITS, f"output_dir={out}", *SMALL, "train.steps=6",
                                     "train.checkpoint_every=2", prelude=FULL_DISK)
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, stderr[-2000:]
    assert "disk full while writing checkpoint" in lines[0] and "step_0000004" in lines[0]
    assert "step_0000002, is kept" in lines[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no half-written step_0000004(.tmp)
    assert not (out / "model").exists()


def test_checkpoints_sample_with_their_ema_weights(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=4", "train.checkpoint_every=2")
    ckpt2, ckpt4 = out / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000004"
    for source, name in ((ckpt2, "c2"), (ckpt4, "c4"), (out, "final")):
        code, _, stderr = cli_run.genvis("sample", source, "--num-samples", "4", "--out", tmp_path / f"{name}.npz",
                                         "--precision", "fp32")
        assert code == 0, stderr[-2000:]
    c2, c4, final = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("c2", "c4", "final"))
    assert np.array_equal(c4, final)  # the export is the last checkpoint's EMA
    assert not np.array_equal(c2, c4)
    ema = load_file(str(ckpt2 / "ema" / "model" / "diffusion_pytorch_model.safetensors"))
    from genvis import load_model

    loaded = load_model(ckpt2).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ema.items())
    # a run still training (no model/ yet) points at its checkpoints
    import shutil

    shutil.rmtree(out / "model")
    code, _, stderr = cli_run.genvis("sample", out, "--num-samples", "2", "--out", tmp_path / "x.npz")
    assert code == 2 and "checkpoints/step_*" in error_lines(stderr)[0]


TWO_OPTIMIZERS = """
from dataclasses import dataclass
import torch
from genvis.registry import TASKS
from genvis.training.tasks import OptimizerSpec
from genvis.training.tasks.diffusion import DiffusionTask, DiffusionTaskConfig

@dataclass
class ToyConfig(DiffusionTaskConfig):
    name: str = "two-optimizers"

@TASKS.register("two-optimizers", schema=ToyConfig)
class TwoOptimizers(DiffusionTask):
    # Each loss has the value it would have alone, plus a term whose value is 0 and whose gradient reaches the
    # other optimizer's parameters (x - x.detach() is 0 with gradient 1): 100 into the critic from the model loss,
    # 100 into every model parameter from the critic loss. Stepped correctly, the model trains exactly as the
    # plain task and the critic c runs AdamW on (c - 3)^2 alone.
    def build(self, data):
        modules = super().build(data)
        modules["critic"] = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(modules["critic"].weight)
        return modules

    def optimizers(self):
        return [OptimizerSpec("model", ("model",)), OptimizerSpec("critic", ("critic",), lr_scale=10.0)]

    def losses(self, modules, batch, draws, step):
        c = modules["critic"].weight.sum()
        total = sum(p.sum() for p in modules["model"].parameters() if p.requires_grad)
        out = super().losses(modules, batch, draws, step)
        return {"model": out["model"] + (c - c.detach()) * 100.0,
                "critic": (c - 3.0) ** 2 + (total - total.detach()) * 100.0, "log/critic": c.detach()}
"""


def adamw_scalar(x, grad, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """AdamW (weight decay 0) on one scalar, written out: Kingma & Ba's update with bias correction."""
    m = v = 0.0
    for t in range(1, steps + 1):
        g = grad(x)
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        x -= lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)) ** 0.5 + eps)
    return x


def test_two_optimizers_step_their_own_modules_and_resume_exactly(tmp_path):
    plain, two, resumed = tmp_path / "plain", tmp_path / "two", tmp_path / "resumed"
    train(plain, "train.steps=4", "train.checkpoint_every=2")
    train(two, "train.steps=4", "train.checkpoint_every=2", "task.name=two-optimizers", prelude=TWO_OPTIMIZERS)
    train(resumed, "train.steps=2", "train.checkpoint_every=2", "task.name=two-optimizers", prelude=TWO_OPTIMIZERS)
    train(resumed, "train.steps=4", "train.checkpoint_every=2", "task.name=two-optimizers", prelude=TWO_OPTIMIZERS)
    ckpt = two / "checkpoints" / "step_0000004"
    assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin"}
    # the critic followed its own loss only (a leak of the model loss's +100 would send it the other way)
    c = load_file(str(ckpt / "model_1.safetensors"))["weight"].item()
    def clipped(g, max_norm=1.0):  # train.grad_clip = 1: torch's clip_grad_norm_ coefficient
        return g * min(1.0, max_norm / (abs(g) + 1e-6))

    expected = adamw_scalar(1.0, lambda x: clipped(2 * (x - 3.0)), steps=4, lr=1e-3 * 10.0)
    assert abs(c - expected) < 1e-6 and c > 1.03, (c, expected)
    # and no critic-loss gradient reached the model: it equals the plain task's
    a = load_file(str(ckpt / "model.safetensors"))
    b = load_file(str(plain / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # both optimizers' states are restored exactly on resume
    for name in ("model.safetensors", "model_1.safetensors"):
        x, y = load_file(str(ckpt / name)), load_file(str(resumed / "checkpoints" / "step_0000004" / name))
        assert all(torch.equal(x[k], y[k]) for k in x), name
