"""Config: YAML + dotted overrides on typed schemas; bad keys and values are one-line errors naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from genvis.config import load_config
from genvis.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits" / "dit.yaml")


def test_yaml_and_overrides_are_typed():
    cfg = load_config(DIGITS, ["train.steps=200", "model.size=S", "train.lr=3e-4", "data.random_flip=true", "output_dir=/tmp/x"])
    assert cfg.train.steps == 200 and isinstance(cfg.train.steps, int)
    assert cfg.model.size == "S" and cfg.train.lr == pytest.approx(3e-4) and cfg.data.random_flip is True
    assert cfg.output_dir == "/tmp/x"
    for key in ("seed", "output_dir"):
        assert hasattr(cfg, key)
    assert cfg.train.checkpoint_every == 200 and cfg.train.sample_every == 0 and cfg.train.batch_size == 128


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.stepz=10", "train.stepz"),
        ("train.steps=ten", "train.steps"),
        ("model.sise=tiny", "model.sise"),
        ("model.size=huge", "model.size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=-1", "train.lr"),
        ("train.mixed_precision=fp64", "train.mixed_precision"),
        ("data.channels=2", "data.channels"),
        ("model.arch=unet", "model.arch"),
        ("task.name=gan", "task.name"),
        ("task.objectiv=flow", "task.objectiv"),
        ("task.objective=x0", "task.objective"),
        ("task.flow_shift=0", "task.flow_shift"),
        ("sample.sampler=euler-ancestral", "sample.sampler"),
        ("sample.stepz=10", "sample.stepz"),
        ("sample.steps=0", "sample.steps"),
        ("sample.options.order=3", "sample.options"),  # euler takes no options
        ("sample.cfg_interval=[0.9,0.1]", "sample.cfg_interval"),
        ("sample.grid=999,500,", "sample.grid"),
        ("tokenizer.pth=x", "tokenizer.pth"),
    ],
)
def test_bad_override_names_full_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and "\n" not in msg


def test_typo_in_yaml_names_file_and_full_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(DIGITS).read_text().replace("  batch_size: 128", "  batch_sise: 128"))
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert "train.batch_sise" in str(err.value) and str(bad) in str(err.value)
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text(Path(DIGITS).read_text().replace("  steps: 800", "  steps: [1, 2]"))
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(str(wrong_type))


def test_cli_exits_nonzero_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "genvis", "train", DIGITS, f"output_dir={tmp_path}/run", "train.stepz=3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "train.stepz" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written for a bad config


def test_sections_are_typed_by_their_registry_entries():
    cfg = load_config(DIGITS, ["output_dir=/tmp/x", "sample.sampler=unipc", "sample.options.order=3", "sample.cfg_interval=[0.1,0.9]"])
    assert type(cfg.model).__name__ == "DiTConfig" and type(cfg.task).__name__ == "DiffusionTaskConfig"
    assert type(cfg.sample).__name__ == "DiffusionSampling"
    assert cfg.sample.options == {"order": 3} and cfg.sample.cfg_interval == [0.1, 0.9]
    assert cfg.task.objective == "flow" and cfg.model.patch_size == 4 and cfg.tokenizer.path is None


def test_config_module_imports_no_model_code():
    code = "import sys, genvis.config; print(sorted(m for m in sys.modules if m.startswith(('genvis.models', 'genvis.training'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("section", ["model", "task", "sample", "data", "train"])
def test_a_null_section_is_one_line(tmp_path, section):
    bad = tmp_path / "null.yaml"
    bad.write_text(f"output_dir: /tmp/x\n{section}:\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert f"'{section}'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("preset", sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").glob("*/*.yaml")))
def test_every_preset_loads(preset):
    """Every shipped preset passes its typed schemas (a renamed key would otherwise surface only at train time)."""
    cfg = load_config(str(ROOT / "configs" / preset), ["output_dir=/tmp/unused"])
    assert cfg.task.name in ("diffusion", "distill", "tokenizer", "tokens")


@pytest.mark.parametrize("depth,published", [(16, 310e6), (20, 600e6), (24, 1.0e9), (30, 2.0e9)])
def test_imagenet_var_presets_build_the_official_sizes(depth, published):
    """configs/imagenet256/var-d*.yaml over VAR's tokenizer (4,096 codes of dim 32, 10 scales = 680 tokens, 1,000
    classes) build VAR-d{depth}: the parameter count of the official modules, counted here from their shapes
    (per block 18 C^2 + 14 C + H; embeddings (32 + 1 + 1001 + 1 + 680 + 10) C; head_nm 2 C^2 + 2 C; head 4096 C + 4096;
    C = 64 depth, H = depth), and the paper's rounded sizes (310M, 600M, 1.0B, 2.0B)."""
    import torch

    from genvis.models.var import VAR_SCALES
    from genvis.registry import MODELS

    cfg = load_config(str(ROOT / "configs" / "imagenet256" / f"var-d{depth}.yaml"), ["output_dir=/tmp/unused"])
    with torch.device("meta"):
        model = MODELS.get("var")(cfg.model, vocab_size=4096, token_dim=32, scales=VAR_SCALES, num_classes=1000)
    c, h = 64 * depth, depth
    official = depth * (18 * c * c + 14 * c + h) + 1725 * c + 2 * c * c + 2 * c + 4096 * c + 4096
    assert model.num_params() == official
    assert abs(official - published) / published < 0.05
    assert cfg.train.lr == pytest.approx((8e-5 if depth >= 24 else 1e-4) * cfg.train.batch_size / 256)


@pytest.mark.parametrize("preset,side,vocab,params", [("vq-16.yaml", (16, 16), 16384, 71_883_403),
                                                      ("var-vae.yaml", (680,), 4096, 108_948_355)])
def test_imagenet_tokenizer_presets_build_the_official_architectures(preset, side, vocab, params):
    """The ImageNet-256 VQ presets build LlamaGen VQ-16's and VAR vae_ch160v4096z32's architectures (parameter
    counts of the official modules; built on the meta device, nothing allocated)."""
    import torch

    from genvis.registry import TOKENIZERS

    cfg = load_config(str(ROOT / "configs" / "imagenet256" / preset), ["output_dir=/tmp/unused"])
    with torch.device("meta"):
        tokenizer = TOKENIZERS.get(cfg.tokenizer.arch).from_section(cfg.tokenizer, (3, 256, 256))
    assert tuple(tokenizer.latent_shape((3, 256, 256))) == side and tokenizer.vocab_size == vocab
    assert sum(p.numel() for p in tokenizer.parameters()) == params
