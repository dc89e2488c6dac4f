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
        ("task.objective=score", "task.objective"),  # the digits preset's schedule is flow: score is allowed ...
        ("task.cosine_weight=1.0 task.objective=eps", "task.cosine_weight"),  # ... the cosine loss is velocity's
        ("task.schedule=linear", "task.objective"),  # flow on DiT's discrete VP
        ("model.recipe=sana", "model.recipe"),
        ("model.norm=batchnorm", "model.norm"),
        ("model.ffn=geglu", "model.ffn"),
        ("model.rope=true model.hidden_size=40 model.num_heads=4", "model.rope"),  # head width 10
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
    if override == "task.objective=score":
        load_config(DIGITS, [override])
        override = "task.objective=score task.schedule=linear"
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, override.split())
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


def test_imagenet_maskgit_preset_builds_titoks_generator():
    """configs/imagenet256/maskgit-titok-l32.yaml over TiTok-L-32's ids (4,096 codes, 32 tokens, 1,000 classes)
    builds ImageBert's L-32 generator: BERT with C = 768, 24 layers, MLP 3,072, counted from BertModel's shapes
    (word (4096 + 1000 + 2) C, position 33 C, token type 2 C, embedding LayerNorm 2 C; per layer 4 C^2 + 4 C
    attention, 2 x 2 C LayerNorms, 2 C F + F + C MLP; lm_head 4096 C + 4096)."""
    import torch

    from genvis.registry import MODELS

    cfg = load_config(str(ROOT / "configs" / "imagenet256" / "maskgit-titok-l32.yaml"), ["output_dir=/tmp/unused"])
    with torch.device("meta"):
        model = MODELS.get("maskgit")(cfg.model, vocab_size=4096, token_shape=(32,), num_classes=1000)
    c, f = 768, 3072
    official = (5098 + 33 + 2 + 2) * c + 24 * (4 * c * c + 4 * c + 4 * c + 2 * c * f + f + c) + 4096 * c + 4096
    assert model.num_params() == official
    assert (cfg.sample.steps, cfg.sample.temperature, cfg.sample.cfg, cfg.sample.cfg_schedule) == (8, 9.5, 5.5, "linear")


@pytest.mark.parametrize("preset,widths,tokens", [("titok-l32.yaml", (1024, 24), 32), ("titok-b64.yaml", (768, 12), 64),
                                                  ("titok-s128.yaml", (512, 8), 128)])
def test_imagenet_titok_presets_build_the_official_sizes(preset, widths, tokens):
    """TiTok-L-32 / B-64 / S-128 (single stage): the ViT sizes TiTok names, 16x16 patches of 256x256 images,
    K latent tokens and 4,096 l2-normalised 12-dim codes; parameters counted from the official shapes
    (per block 12 W^2 + 13 W; patch embed 768 W + W; class, 257 positions and K latent positions (+ K latent
    tokens in the encoder); ln_pre / ln_post 4 W; encoder conv_out 12 W + 12; decoder_embed 12 W + W, mask
    token W, ffn W x 768 + 768, conv_out 3 x 3 x 3 x 3 + 3)."""
    import torch

    from genvis.registry import TOKENIZERS

    cfg = load_config(str(ROOT / "configs" / "imagenet256" / preset), ["output_dir=/tmp/unused"])
    with torch.device("meta"):
        tokenizer = TOKENIZERS.get(cfg.tokenizer.arch).from_section(cfg.tokenizer, (3, 256, 256))
    w, d = widths
    blocks = d * (12 * w * w + 13 * w)
    encoder = blocks + 768 * w + w + (1 + 257 + tokens) * w + 4 * w + 12 * w + 12 + tokens * w
    decoder = blocks + 12 * w + w + (1 + 257 + tokens + 1) * w + 4 * w + w * 768 + 768 + 81 + 3
    assert tokenizer.num_tokens == tokens and tokenizer.vocab_size == 4096
    assert sum(p.numel() for p in tokenizer.parameters()) == encoder + decoder + 4096 * 12


def test_imagenet_lightningdit_preset_builds_lightningdit_xl_1():
    """configs/imagenet256/lightningdit-xl-1.yaml on VA-VAE's 32 x 16 x 16 latents builds LightningDiT-XL/1: width
    1152, 28 blocks, 16 heads, patch 1, RMSNorm, SwiGLU (hidden int(2/3 x 4608) = 3072), RoPE, sin-cos kept;
    parameters counted from its official shapes (per block: qkv 3 D^2 + 3 D, proj D^2 + D, SwiGLU w12 2 H D + 2 H
    and w3 H D + D, two RMSNorm weights 2 D, adaLN 6 D^2 + 6 D; embedders: patch 32 D + D, timestep 256 D + D +
    D^2 + D, labels 1001 D, pos_embed 256 D; final layer: RMSNorm D, adaLN 2 D^2 + 2 D, linear 32 D + 32)."""
    import torch

    from genvis.registry import MODELS

    cfg = load_config(str(ROOT / "configs" / "imagenet256" / "lightningdit-xl-1.yaml"), ["output_dir=/tmp/unused"])
    with torch.device("meta"):
        model = MODELS.get("dit")(cfg.model, sample_shape=(32, 16, 16), num_classes=1000, learn_sigma=False,
                                  prediction_type="velocity", schedule="flow")
    d, h = 1152, 3072
    block = 3 * d * d + 3 * d + d * d + d + 2 * h * d + 2 * h + h * d + d + 2 * d + 6 * d * d + 6 * d
    official = 28 * block + 32 * d + d + 256 * d + d + d * d + d + 1001 * d + 256 * d + d + 2 * d * d + 2 * d + 32 * d + 32
    assert sum(p.numel() for p in model.state_dict().values()) == official
    assert (model.config.norm, model.config.ffn, model.config.rope, model.config.use_pos_embed) == ("rmsnorm", "swiglu",
                                                                                                     True, True)
    assert (cfg.task.cosine_weight, cfg.sample.steps, cfg.sample.cfg) == (1.0, 250, 10.0)
