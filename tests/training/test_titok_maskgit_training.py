"""TiTok + MaskGIT end to end on the digits at tiny sizes: the TiTok preset trains (the loss falls, the exported
tokenizer loads and its ids are what it reports), MaskGIT trains on its extracted 1D ids with TiTok's masking
recipe (the loss falls from ln V), `genvis sample` needs no flags and gives the library's images, the masked
loss is the published formula, and a MaskGIT refuses a multi-scale tokenizer. KL-TiTok's continuous tokens
feed a DiT as a 1 x K "image"."""
import numpy as np
import pytest
import torch

from cli_run import genvis, sample_images, train
from tiny_runs import ROOT

TITOK = str(ROOT / "configs" / "digits" / "titok.yaml")
MASKGIT = str(ROOT / "configs" / "digits" / "maskgit_titok.yaml")
TITOK_KL = str(ROOT / "configs" / "digits" / "titok_kl.yaml")
DIT_TITOK = str(ROOT / "configs" / "digits" / "dit_titok.yaml")
TINY_TITOK = ["tokenizer.encoder_width=32", "tokenizer.encoder_depth=1", "tokenizer.encoder_heads=2",
              "tokenizer.decoder_width=32", "tokenizer.decoder_depth=1", "tokenizer.decoder_heads=2",
              "tokenizer.num_latent_tokens=8", "tokenizer.codebook_size=64", "tokenizer.usage_decay=0.5",
              "tokenizer.restart_threshold=0.5", "task.disc_channels=16", "train.batch_size=16", "train.log_every=1",
              "train.mixed_precision=fp32", "train.keep_checkpoints=0", "train.warmup_steps=0", "train.lr=3e-3"]
SMALL_MASKGIT = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.dropout=0.0",
                 "model.attn_dropout=0.0", "train.batch_size=32", "train.log_every=1", "train.mixed_precision=fp32",
                 "train.keep_checkpoints=0", "train.warmup_steps=2", "train.lr=2e-3", "sample.num=10"]


@pytest.fixture(scope="module")
def tiny_titok(tmp_path_factory):
    run = tmp_path_factory.mktemp("titok") / "run"
    stdout = train(TITOK, run, *TINY_TITOK, "train.steps=30", "train.checkpoint_every=0", "task.disc_start=15")
    assert "titok tokenizer (8 ids of a 64-code vocabulary" in stdout
    return run


@pytest.fixture(scope="module")
def titok_ids(tiny_titok, tmp_path_factory):
    out = tmp_path_factory.mktemp("ids") / "ids"
    code, _, stderr = genvis("tokenizer", "extract", tiny_titok, "--data", TITOK, "--out", out)
    assert code == 0, stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def trained_maskgit(titok_ids, tmp_path_factory):
    out = tmp_path_factory.mktemp("maskgit") / "run"
    stdout = train(MASKGIT, out, f"data.path={titok_ids}", *SMALL_MASKGIT, "train.steps=40", "train.checkpoint_every=0")
    assert "masked-token cross-entropy" in stdout
    return out


def test_titok_training_reduces_the_loss_and_exports_a_tokenizer(tiny_titok, scalars):
    from genvis import load_tokenizer
    from genvis.data import build_dataset
    from genvis.config import load_config
    from genvis.tokenizers.titok import TiTokTokenizer

    rec = scalars(tiny_titok, "train/reconstruction")
    assert len(rec) == 30 and np.mean(rec[-5:]) < 0.8 * np.mean(rec[:5]), (rec[:5], rec[-5:])
    tok = load_tokenizer(tiny_titok)
    assert isinstance(tok, TiTokTokenizer) and tok.num_tokens == 8 and tok.vocab_size == 64
    dataset = build_dataset(load_config(TITOK).data, split="train")
    x = torch.stack([dataset[i][0] for i in range(16)])
    ids = tok.encode(x)
    assert ids.shape == (16, 8) and int(ids.max()) < 64
    err = (tok.decode(ids) - x).abs().mean()
    assert err < (x - x.mean()).abs().mean()  # reconstructs better than the mean image


def test_maskgit_training_reduces_the_loss_and_samples_with_no_flags(trained_maskgit, tiny_titok, scalars, tmp_path):
    from genvis import load_tokenizer
    from genvis.config import load_config
    from genvis.generate import class_labels, generate, sample_generators
    from genvis.models import load_model
    from genvis.models.maskgit import MaskGIT
    from genvis.samplers.tokens import decode_maskgit

    loss = scalars(trained_maskgit, "train/loss_model")
    assert len(loss) == 40 and np.mean(loss[-5:]) < 0.85 * np.mean(loss[:5]), (loss[:5], loss[-5:])
    assert loss[0] == pytest.approx(np.log(64), abs=0.15)  # near-uniform logits at BERT's initialisation
    model = load_model(trained_maskgit)
    assert isinstance(model, MaskGIT) and model.token_shape == (8,) and model.config.vocab_size == 64
    arr = sample_images(trained_maskgit, 10, tmp_path)
    assert arr.shape == (10, 16, 16, 3)
    tokenizer = load_tokenizer(trained_maskgit)
    assert torch.equal(tokenizer.quantize.embedding.weight, load_tokenizer(tiny_titok).quantize.embedding.weight)
    labels = class_labels(10, 10)
    sampling = load_config(str(trained_maskgit / "config.yaml")).sample  # the preset's: 8 steps, temperature 3
    assert (sampling.steps, sampling.temperature) == (8, 3.0)
    images = generate(model, tokenizer, labels, seed=0, sampling=sampling)
    expected = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(arr[..., :1], expected)
    # generate = the decoding loop (the run's options) then TiTok's decoder, per-sample generators (0, i)
    ids = decode_maskgit(model, labels, generators=sample_generators(0, range(10)), steps=8, temperature=3.0)
    torch.testing.assert_close(images, tokenizer.decode(ids))


def test_masked_loss_is_the_published_formula(titok_ids):
    """TiTok's MLMLoss: cross-entropy (label smoothing) weighted 1 on masked and 0.1 on visible tokens, divided
    by the total weight; round(N acos(u) / (pi / 2)) tokens masked (at least 1)."""
    import math

    import torch.nn.functional as F

    from genvis.config import load_config
    from genvis.data import build_dataset
    from genvis.training.tasks.base import DataInfo
    from genvis.registry import TASKS

    cfg = load_config(MASKGIT, [f"data.path={titok_ids}", *SMALL_MASKGIT])
    task = TASKS.get("tokens")(cfg)
    dataset = build_dataset(cfg.data, split="train")
    modules = task.build(DataInfo(num_classes=10, image_shape=tuple(dataset.item_shape), encoded_by=str(dataset.encoded_by)))
    model = modules["model"].eval()
    items = torch.stack([dataset[i][0] for i in range(6)])
    labels = torch.tensor([dataset[i][1] for i in range(6)])
    draws = task.draw(6, torch.Generator().manual_seed(3))
    out = task.losses(modules, (items, labels), draws, 0)
    ids = items.long()
    counts = [max(1, round(8 * math.acos(float(u)) / (math.pi / 2))) for u in draws["progress"]]
    masked = torch.zeros(6, 8, dtype=torch.bool)
    for i, c in enumerate(counts):
        masked[i, torch.argsort(draws["order"][i]) < c] = True
    assert masked.sum(1).tolist() == counts
    y = torch.where(draws["drop"], torch.full_like(labels, 10), labels)
    logits = model(torch.where(masked, torch.full_like(ids, 64), ids), y)
    ce = F.cross_entropy(logits.reshape(-1, 64), ids.reshape(-1), label_smoothing=0.1, reduction="none").view(6, 8)
    w = masked.float() + 0.1 * (~masked).float()
    torch.testing.assert_close(out["model"], (ce * w).sum() / w.sum())


def test_maskgit_refuses_a_multiscale_tokenizer(tmp_path):
    from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer

    folder = tmp_path / "msvq"
    MultiScaleVQTokenizer(in_channels=1, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, norm_groups=8,
                          codebook_size=32, scales=(1, 2, 4)).save_pretrained(folder)
    code, _, stderr = genvis("train", MASKGIT, f"output_dir={tmp_path / 'run'}", "data.name=digits", "data.path=null",
                             "data.resolution=16", "data.channels=1", f"tokenizer.path={folder}", "train.steps=1")
    assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert "MultiScaleVQTokenizer" in stderr and "sequence or grid" in stderr


def test_maskgit_trains_over_a_vq_grid(tmp_path):
    """Over a VQ tokenizer's 2D ids (a 4x4 grid of the 16x16 digits, encoded on the fly): the model's token shape is
    the grid, the loss is finite with gradients, and generate decodes [B, 4, 4] ids through the VQ decoder."""
    from genvis.config import load_config
    from genvis.data import build_dataset
    from genvis.generate import class_labels, generate
    from genvis.registry import TASKS
    from genvis.tokenizers.vq import VQTokenizer
    from genvis.training.tasks.base import DataInfo

    torch.manual_seed(0)
    folder = tmp_path / "vq"
    VQTokenizer(in_channels=1, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, norm_groups=8,
                codebook_size=32, codebook_dim=8).save_pretrained(folder)
    cfg = load_config(MASKGIT, ["data.name=digits", "data.path=null", "data.resolution=16", "data.channels=1",
                                f"tokenizer.path={folder}", *SMALL_MASKGIT])
    task = TASKS.get("tokens")(cfg)
    modules = task.build(DataInfo(num_classes=10, image_shape=(1, 16, 16)))
    model = modules["model"]
    assert model.token_shape == (4, 4) and model.num_tokens == 16 and model.config.vocab_size == 32
    dataset = build_dataset(cfg.data, split="train")
    images = torch.stack([dataset[i][0] for i in range(8)])
    labels = torch.tensor([dataset[i][1] for i in range(8)])
    out = task.losses(modules, (images, labels), task.draw(8, torch.Generator().manual_seed(0)), 0)
    out["model"].backward()
    assert torch.isfinite(out["model"]) and model.model.lm_head.weight.grad.abs().sum() > 0
    assert torch.equal(task.ids_of((images, labels)), modules["tokenizer"].encode(images).flatten(1))
    samples = generate(model.eval(), modules["tokenizer"], class_labels(2, 10), seed=0, sampling=cfg.sample)
    assert samples.shape == (2, 1, 16, 16)


def test_dit_over_kl_titok_tokens(tmp_path, scalars):
    """KL-TiTok preset (tiny) -> `genvis tokenizer extract` stores [C, 1, K] tokens -> the DiT preset over them
    (patch 1, input [1, K]) trains, its loss falls, and `genvis sample` decodes through the recorded KL-TiTok
    with no flags, giving the library's images."""
    from genvis import load_tokenizer
    from genvis.config import load_config
    from genvis.generate import class_labels, generate, to_uint8
    from genvis.models import load_model
    from genvis.models.dit import DiT

    tok_run, latents, run = tmp_path / "titok", tmp_path / "latents", tmp_path / "dit"
    stdout = train(TITOK_KL, tok_run, *TINY_TITOK, "tokenizer.stats_images=256", "train.steps=20",
                   "train.checkpoint_every=0", "task.disc_start=10")
    assert "titok tokenizer (latents 4x1x8" in stdout
    code, _, stderr = genvis("tokenizer", "extract", tok_run, "--data", TITOK_KL, "--out", latents)
    assert code == 0, stderr[-2000:]
    train(DIT_TITOK, run, f"data.path={latents}", "model.depth=2", "model.hidden_size=64", "model.num_heads=2",
          "train.batch_size=32", "train.steps=30", "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=1",
          "train.checkpoint_every=0", "train.keep_checkpoints=0", "train.mixed_precision=fp32", "sample.steps=4")
    loss = scalars(run, "train/loss_model")
    assert len(loss) == 30 and np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), (loss[:5], loss[-5:])
    model = load_model(run)
    assert isinstance(model, DiT) and model.sample_shape == (4, 1, 8) and list(model.config.input_size) == [1, 8]
    assert model.pos_embed.shape == (1, 8, 64) and model.patch_size == 1
    arr = sample_images(run, 6, tmp_path)
    assert arr.shape == (6, 16, 16, 3)
    tokenizer = load_tokenizer(run)
    assert tokenizer.latent_shape((1, 16, 16)) == (4, 1, 8)
    sampling = load_config(str(run / "config.yaml")).sample
    expected = to_uint8(generate(model, tokenizer, class_labels(6, 10), seed=0, sampling=sampling))
    assert np.abs(arr[..., :1].astype(int) - expected.astype(int)).max() <= 1
