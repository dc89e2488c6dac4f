"""`genvis sample`: output formats, labels, and sample i depending only on (seed, i)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import genvis
from genvis.cli import main
from genvis.models.dit import DiT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_dit, save_model):
    return save_model(random_dit(0), tmp_path_factory.mktemp("m") / "model")


def sample(model_dir, out, *args):
    code = main(["sample", str(model_dir), "--out", str(out), "--steps", "5", "--precision", "fp32", *args])
    assert code == 0


def test_npz_is_adm_style_and_batch_size_independent(model_dir, tmp_path):
    sample(model_dir, tmp_path / "a.npz", "--num-samples", "12", "--batch-size", "12", "--seed", "7")
    sample(model_dir, tmp_path / "b.npz", "--num-samples", "12", "--batch-size", "5", "--seed", "7")
    sample(model_dir, tmp_path / "c.npz", "--num-samples", "12", "--batch-size", "5", "--seed", "8")
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in "abc")
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (12, 8, 8, 3)
    assert np.array_equal(a["labels"], np.arange(12) % 10)  # balanced by default
    assert np.array_equal(a["arr_0"], b["arr_0"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])
    # sample i of a longer run is the same image
    sample(model_dir, tmp_path / "d.npz", "--num-samples", "3", "--batch-size", "2", "--seed", "7")
    assert np.array_equal(np.load(tmp_path / "d.npz")["arr_0"], a["arr_0"][:3])


def test_classes_options_and_folder_and_grid(model_dir, tmp_path):
    sample(model_dir, tmp_path / "one.npz", "--num-samples", "4", "--classes", "3")
    assert np.array_equal(np.load(tmp_path / "one.npz")["labels"], [3, 3, 3, 3])
    sample(model_dir, tmp_path / "list.npz", "--num-samples", "5", "--classes", "0,1,2")
    assert np.array_equal(np.load(tmp_path / "list.npz")["labels"], [0, 1, 2, 0, 1])
    sample(model_dir, tmp_path / "pngs", "--num-samples", "3", "--classes", "0,1,2")
    files = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png", "samples.json"]
    manifest = json.loads((tmp_path / "pngs" / "samples.json").read_text())
    assert manifest["labels"] == [0, 1, 2] and manifest["files"] == files[:3]
    assert Image.open(tmp_path / "pngs" / "000000.png").size == (8, 8)
    sample(model_dir, tmp_path / "grid.png", "--num-samples", "20", "--balanced")
    # 10 columns (one per class) x 2 rows of 8x8 tiles with 2-px padding
    assert Image.open(tmp_path / "grid.png").size == (10 * 10 + 2, 2 * 10 + 2)


def test_image_matches_python_api(model_dir, tmp_path):
    from genvis.generate import class_labels, generate, to_uint8

    sample(model_dir, tmp_path / "x.npz", "--num-samples", "4", "--seed", "3", "--sampler", "ddim")
    model = genvis.load_model(model_dir)
    imgs = generate(model, None, class_labels(4, 10), seed=3, sampler="ddim", steps=5, precision="fp32")
    assert np.array_equal(np.repeat(to_uint8(imgs), 3, axis=-1), np.load(tmp_path / "x.npz")["arr_0"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--sampler", "nope"], "nope"),
        (["--classes", "12"], "12"),
        (["--sampler", "ddim", "--option", "etta=1"], "etta"),
        (["--sampler", "ddpm", "--option", "variance=medium"], "medium"),
        (["--grid", "karas"], "karras"),
        (["--grid", "karras", "--grid-option", "rh=3"], "rho"),
        (["--grid", "999,999,0"], "strictly decrease"),
        (["--cfg", "2", "--cfg-interval", "0.9,0.1"], "t_lo < t_hi"),
        (["--cfg", "2", "--cfg-interval", "0.1"], "T_LO,T_HI"),
        (["--cfg-schedule", "cosine"], "constant, linear"),
        (["--option", "order"], "KEY=VALUE"),
        (["--cache-refresh", "2", "--cache-keep-blocks", "1"], "--cache-keep-blocks: 1: expected 0..0"),
        (["--grid", "karras", "--grid-option", "rho=abc"], "rho='abc'; expected a number"),
        (["--grid", "karras", "--grid-option", "rho=0"], "rho must be > 0"),
        (["--sampler", "ddim", "--option", "eta=abc"], "eta='abc'; expected a number"),
        (["--sampler", "ddim", "--option", "eta=-1"], "eta=-1; expected >= 0"),
        (["--sampler", "rk45", "--option", "rtol=0"], "rtol=0; expected > 0"),
        (["--sampler", "diffusers:DDIMScheduler", "--option", "scheduler_kwargs={bad"], "not valid JSON"),
        (["--stitch-fraction", "1.5", "--stitch-small", "x"], "--stitch-fraction: 1.5"),
        (["--steps", "0"], "--steps: 0: expected >= 1"),
        (["--mask-schedule", "cosine"], "--mask-schedule: does not apply to diffusion models"),
        (["--no-anneal-softmax"], "--anneal-softmax: does not apply to diffusion models"),
        (["--num-samples", "0"], "--num-samples 0: expected >= 1"),
        (["--classes", ""], "--classes: '': empty"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--precision", "fp64"], "fp64"),
        (["--num", "3"], "unrecognized arguments: --num"),  # no abbreviations: torchrun would claim them
    ],
)
def test_bad_input_one_line(model_dir, tmp_path, capsys, args, needle):
    code = main(["sample", str(model_dir), "--out", str(tmp_path / "x.npz"), "--steps", "2", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x.npz").exists()


def test_grid_interval_and_options_reach_the_sampler(model_dir, tmp_path):
    """CLI flags give the same images as the Python API with the same grid, guidance and options."""
    from genvis.generate import class_labels, generate, to_uint8

    sample(model_dir, tmp_path / "x.npz", "--num-samples", "4", "--sampler", "ddim", "--option", "eta=0.5", "--grid", "karras",
           "--grid-option", "rho=5", "--cfg", "2", "--cfg-interval", "0.2,0.8", "--cfg-schedule", "linear")
    model = genvis.load_model(model_dir)
    imgs = generate(model, None, class_labels(4, 10), seed=0, sampler="ddim", steps=5, grid="karras", grid_options={"rho": 5},
                    cfg=2.0, cfg_interval=[0.2, 0.8], cfg_schedule="linear", precision="fp32", options={"eta": 0.5})
    assert np.array_equal(np.repeat(to_uint8(imgs), 3, axis=-1), np.load(tmp_path / "x.npz")["arr_0"])
    plain = generate(model, None, class_labels(4, 10), seed=0, sampler="ddim", steps=5, grid="karras", grid_options={"rho": 5},
                     cfg=2.0, precision="fp32", options={"eta": 0.5})
    assert not torch.equal(plain, imgs)  # the interval and schedule changed the result


def test_stitch_and_cache_flags(model_dir, tmp_path, random_dit, save_model):
    """--stitch-small with fraction 1 is the small model alone; caching with refresh 1 is exact, refresh 2 differs."""
    save_model(random_dit(1), tmp_path / "small")
    sample(model_dir, tmp_path / "s.npz", "--num-samples", "3", "--stitch-small", str(tmp_path / "small"), "--stitch-fraction", "1")
    sample(tmp_path / "small", tmp_path / "alone.npz", "--num-samples", "3")
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], np.load(tmp_path / "alone.npz")["arr_0"])
    sample(model_dir, tmp_path / "half.npz", "--num-samples", "3", "--stitch-small", str(tmp_path / "small"), "--stitch-fraction", "0.4")
    assert not np.array_equal(np.load(tmp_path / "half.npz")["arr_0"], np.load(tmp_path / "alone.npz")["arr_0"])
    sample(model_dir, tmp_path / "plain.npz", "--num-samples", "3")
    sample(model_dir, tmp_path / "c1.npz", "--num-samples", "3", "--cache-refresh", "1")
    sample(model_dir, tmp_path / "c2.npz", "--num-samples", "3", "--cache-refresh", "2", "--cache-keep-blocks", "0")
    plain, c1, c2 = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("plain", "c1", "c2"))
    assert np.array_equal(plain, c1) and not np.array_equal(plain, c2)


def test_grid_search_writes_a_grid_that_sample_reads(model_dir, tmp_path, capsys):
    import json

    out = tmp_path / "grid.json"
    assert main(["samplers", "search", str(model_dir), "--sampler", "ddim", "--steps", "3", "--out", str(out), "--num-samples", "4",
                 "--population", "4", "--generations", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["schedule"] == "linear" and data["steps"] == 3 and len(data["timesteps"]) == 4
    assert data["timesteps"][0] == 999 and data["timesteps"][-1] == -1
    # the recorded score is the RMS distance of that grid's samples to the rk45 reference
    from genvis.generate import class_labels, generate

    model = genvis.load_model(model_dir)
    common = dict(seed=0, batch_size=4, precision="fp32")
    ref = generate(model, None, class_labels(4, 10), sampler="rk45", steps=1, options={"rtol": 1e-5, "atol": 1e-5}, **common)
    ours = generate(model, None, class_labels(4, 10), sampler="ddim", steps=3, grid=str(out), **common)
    assert abs(torch.sqrt(torch.mean((ours.double() - ref.double()) ** 2)).item() - data["score"]) < 1e-6
    sample(model_dir, tmp_path / "x.png", "--num-samples", "2", "--sampler", "ddim", "--grid", str(out))
    assert main(["samplers", "search", str(model_dir), "--steps", "3", "--out", str(tmp_path / "g.txt")]) == 2


def test_diffusers_scheduler_options_from_the_command_line(model_dir, tmp_path):
    from genvis.generate import class_labels, generate, to_uint8

    sample(model_dir, tmp_path / "d.npz", "--num-samples", "3", "--sampler", "diffusers:DPMSolverMultistepScheduler",
           "--option", 'scheduler_kwargs={"solver_order": 3, "timestep_spacing": "trailing"}')
    model = genvis.load_model(model_dir)
    imgs = generate(model, None, class_labels(3, 10), seed=0, sampler="diffusers:DPMSolverMultistepScheduler", steps=5,
                    precision="fp32", options={"scheduler_kwargs": {"solver_order": 3, "timestep_spacing": "trailing"}})
    assert np.array_equal(np.repeat(to_uint8(imgs), 3, axis=-1), np.load(tmp_path / "d.npz")["arr_0"])


def test_samplers_command_lists_every_sampler_grid_and_option(capsys):
    from genvis.registry import SAMPLERS
    from genvis.samplers.grids import GRIDS

    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    for name in list(SAMPLERS.names()) + list(GRIDS):
        assert f"  {name} " in out, name
    assert "eta=0.0" in out and "rho=7.0" in out and "diffusers:<SchedulerClass>" in out


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["sample", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_python_m_and_accelerate_launch(model_dir, tmp_path):
    out = tmp_path / "acc.npz"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "genvis", "sample", str(model_dir),
           "--out", str(out), "--num-samples", "2", "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)


def tiny_vae(seed=0, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    config = {"latent_channels": 4, **config}
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                         norm_num_groups=4, sample_size=16, **config)


def test_imported_latent_model_samples_with_its_recorded_tokenizer(tmp_path, capsys):
    """`genvis import dit --tokenizer VAE` records the tokenizer, so `genvis sample` needs no flag; the images are
    the VAE's decode of the sampled latents divided by the scaling factor (SD-VAE's convention)."""
    from genvis.generate import class_labels, generate, to_uint8

    vae = tiny_vae(scaling_factor=0.18215)
    vae.save_pretrained(str(tmp_path / "vae"))
    torch.manual_seed(1)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save({"ema": dit.state_dict()}, tmp_path / "ckpt.pt")
    assert main(["import", "dit", str(tmp_path / "ckpt.pt"), str(tmp_path / "no_tok"), "--arch", "DiT-S/2"]) == 2  # depth 1
    capsys.readouterr()
    from genvis.models.dit import DIT_SIZES

    DIT_SIZES_BACKUP = dict(DIT_SIZES)
    DIT_SIZES["S"] = (1, 32, 2)  # a tiny "DiT-S/2" so the import's --arch check passes
    try:
        assert main(["import", "dit", str(tmp_path / "ckpt.pt"), str(tmp_path / "latent_dit"), "--arch", "DiT-S/2"]) == 0
        assert main(["import", "dit", str(tmp_path / "ckpt.pt"), str(tmp_path / "with_tok"), "--arch", "DiT-S/2",
                     "--tokenizer", str(tmp_path / "vae")]) == 0
    finally:
        DIT_SIZES.clear()
        DIT_SIZES.update(DIT_SIZES_BACKUP)
    # without a recorded tokenizer: one line saying what to pass
    assert main(["sample", str(tmp_path / "latent_dit"), "--out", str(tmp_path / "x.npz"), "--num-samples", "2", "--steps", "2"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    sample(tmp_path / "latent_dit", tmp_path / "x.npz", "--num-samples", "2", "--tokenizer", str(tmp_path / "vae"))
    sample(tmp_path / "with_tok", tmp_path / "y.npz", "--num-samples", "2")  # recorded: no flag
    arr = np.load(tmp_path / "x.npz")["arr_0"]
    assert arr.shape == (2, 16, 16, 3)  # 8x8 latents decoded by the 2x VAE
    assert np.array_equal(arr, np.load(tmp_path / "y.npz")["arr_0"])
    m = genvis.load_model(tmp_path / "with_tok")
    latents = generate(m, None, class_labels(2, 10), seed=0, steps=5, precision="fp32")
    with torch.no_grad():
        ref = vae.decode(latents / 0.18215).sample
    assert np.array_equal(np.repeat(to_uint8(ref), 1, axis=-1), arr)
    # a tokenizer whose latents do not fit the model is refused at import
    tiny_vae(latent_channels=8).save_pretrained(str(tmp_path / "vae8"))
    DIT_SIZES["S"] = (1, 32, 2)
    try:
        assert main(["import", "dit", str(tmp_path / "ckpt.pt"), str(tmp_path / "bad"), "--arch", "DiT-S/2",
                     "--tokenizer", str(tmp_path / "vae8")]) == 2
    finally:
        DIT_SIZES.clear()
        DIT_SIZES.update(DIT_SIZES_BACKUP)
    assert "8 channels" in capsys.readouterr().err and not (tmp_path / "bad").exists()
