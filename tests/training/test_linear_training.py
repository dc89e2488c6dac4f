"""Linear-attention DiT training: the digits preset trains and samples; a student inherits a trained DiT's
weights and is distilled from it (the loss against a hand computation, the teacher frozen and recorded)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli_run

ROOT = Path(__file__).resolve().parents[2]
DIT = str(ROOT / "configs" / "digits" / "dit.yaml")
LIT = str(ROOT / "configs" / "digits" / "lit.yaml")
DISTILL = str(ROOT / "configs" / "digits" / "lit_distill.yaml")
SMALL = ["data.resolution=8", "model.depth=2", "model.hidden_size=64", "train.batch_size=32", "train.lr=2e-3",
         "train.warmup_steps=2", "train.log_every=1", "train.keep_checkpoints=0", "train.mixed_precision=fp32",
         "train.checkpoint_every=0"]


def train(config, out, *extra):
    return cli_run.train(config, out, *SMALL, *extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny pixel DiT, 60 steps on the digits: the run the students inherit from and distil."""
    run = tmp_path_factory.mktemp("teacher") / "dit"
    train(DIT, run, "model.num_heads=4", "train.steps=60")
    return run


@pytest.mark.parametrize("recipe", ["lit", "sana", "dig"])
def test_linear_dit_preset_trains_and_samples(recipe, tmp_path, scalars):
    from genvis.models import load_model
    from genvis.models.linear_dit import LinearDiT

    run = tmp_path / "lit"
    heads = ["model.num_heads=4"] if recipe == "dig" else []  # DiT-tiny's 3 heads do not divide the test width 64
    stdout = train(LIT, run, f"model.recipe={recipe}", *heads, "train.steps=40")
    assert "training LinearDiT" in stdout
    loss = scalars(run, "train/loss_model")
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < 0.7 * sum(loss[:5]) / 5, loss
    model = load_model(run)
    expected = {"lit": ("relu", 5, "mlp"), "sana": ("relu", 0, "mixffn"), "dig": ("gated", 0, "mlp")}[recipe]
    assert type(model) is LinearDiT and (model.config.attention, model.config.v_conv, model.config.ffn) == expected
    code, stdout, stderr = cli_run.genvis("sample", run, "--num-samples", 4, "--steps", 3, "--sampler", "dpmpp-2m",
                                  "--out", tmp_path / "grid.png")
    assert code == 0 and (tmp_path / "grid.png").is_file(), stderr[-2000:]


def test_linear_dit_resumes_bit_exactly(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(LIT, whole, "train.steps=12", "train.checkpoint_every=6")
    train(LIT, split, "train.steps=6", "train.checkpoint_every=6")
    stdout = train(LIT, split, "train.steps=12", "train.checkpoint_every=6")
    assert "resuming from" in stdout
    for name in ("model.safetensors", "ema/model/diffusion_pytorch_model.safetensors"):
        a = load_file(str(whole / "checkpoints" / "step_0000012" / name))
        b = load_file(str(split / "checkpoints" / "step_0000012" / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_distillation_loss_is_the_objective_plus_the_weighted_teacher_match(teacher):
    from genvis.config import load_config
    from genvis.registry import TASKS
    from genvis.training.tasks.base import DataInfo

    cfg = load_config(DISTILL, [*SMALL, f"task.teacher={teacher}", "model.init_from=null", "task.weight=0.7"])
    task = TASKS.get("distill")(cfg)
    torch.manual_seed(0)
    modules = task.build(DataInfo(num_classes=10, image_shape=(1, 8, 8)))
    assert set(modules) == {"student", "teacher", "tokenizer"}
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(6)
    draws = task.draw(6, g)
    draws["drop"][:2] = True  # two labels dropped to the null class
    with torch.no_grad():
        out = task.losses(modules, [x0, labels], draws, step=0)

    # rectified flow: x_t = (1 - t) x0 + t noise, the network sees t, the target velocity is noise - x0
    t = draws["times"].float().view(-1, 1, 1, 1)
    noise = draws["noise"]
    x_t = (1 - t) * x0 + t * noise
    y = torch.where(draws["drop"], torch.full_like(labels, 10), labels)
    with torch.no_grad():
        s = modules["student"](x_t, t.flatten(), y)
        te = modules["teacher"](x_t, t.flatten(), y)
    objective = ((s - (noise - x0)) ** 2).mean()
    distill = ((s - te) ** 2).mean()
    assert torch.allclose(out["log/objective"], objective, rtol=1e-5)
    assert torch.allclose(out["log/distill"], distill, rtol=1e-5)
    assert torch.allclose(out["student"], objective + 0.7 * distill, rtol=1e-5)


def test_inherited_distilled_student(teacher, tmp_path, scalars):
    """Inheritance lists the new tensors and starts the student far closer to the task than a fresh one;
    distillation trains only the student, checkpoints no teacher and records which teacher it had."""
    from genvis.models import load_model
    from genvis.models.linear_dit import LinearDiT

    run = tmp_path / "student"
    stdout = train(DISTILL, run, f"model.init_from={teacher}", f"task.teacher={teacher}", "train.steps=20",
                   "train.checkpoint_every=20")
    new = [f"blocks.{i}.attn.v_conv.{p}" for i in range(2) for p in ("weight", "bias")]
    assert f"new ({len(new)}): {', '.join(new)};" in stdout, stdout
    assert "not used from the source (0)" in stdout

    scratch = tmp_path / "scratch"
    train(DISTILL, scratch, "model.init_from=null", f"task.teacher={teacher}", "train.steps=1")
    inherited_start, fresh_start = scalars(run, "train/objective")[0], scalars(scratch, "train/objective")[0]
    assert inherited_start < 0.8 * fresh_start, (inherited_start, fresh_start)
    assert scalars(run, "train/distill")[0] < 0.5 * scalars(scratch, "train/distill")[0]

    ckpt = run / "checkpoints" / "step_0000020"
    assert sorted(p.name for p in (ckpt / "ema").iterdir()) == ["student"]
    raw = load_file(str(ckpt / "model.safetensors"))
    assert set(raw) == set(load_model(run).state_dict())  # the student's tensors only
    record = json.loads((run / "model" / "teacher.json").read_text())
    digest = hashlib.sha256((teacher / "model" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert record["teacher"] == str((teacher / "model").resolve()) and record["weights_sha256"] == digest
    assert type(load_model(run)) is LinearDiT and type(load_model(ckpt)) is LinearDiT
    stdout = train(DISTILL, run, f"model.init_from={teacher}", f"task.teacher={teacher}", "train.steps=22",
                   "train.checkpoint_every=20")
    assert "resuming from" in stdout and "init_from" not in stdout  # the checkpoint's weights, not the source's


@pytest.mark.parametrize("extra, message", [
    (["task.objective=eps", "task.schedule=linear"], "has prediction_type 'velocity', the student 'eps'"),
    (["data.resolution=16"], "generates (1, 8, 8), the student (1, 16, 16)"),
    (["task.teacher=null"], "key 'task.teacher': distillation needs a teacher"),
])
def test_a_teacher_that_does_not_fit_is_one_line(teacher, tmp_path, extra, message):
    code, _, stderr = cli_run.genvis("train", DISTILL, f"output_dir={tmp_path / 'run'}", *SMALL, "model.init_from=null",
                                     f"task.teacher={teacher}", *extra, "train.steps=1")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and message in stderr and len(lines) == 1, stderr[-2000:]
