"""MaskGIT (genvis.models.maskgit): ImageBert's key layout, the forward against BERT's formulas written out here
(post-LayerNorm, erf GELU, learned positions, token type row 0), the one vocabulary (image ids, mask, classes,
null), BERT's init, the config section, the mask schedules and the official-checkpoint converter."""
import math

import pytest
import torch

from genvis.config import load_config
from genvis.errors import ConfigError, GenvisError
from genvis.models import load_model
from genvis.models.maskgit import MaskGIT, MaskGITConfig, convert_maskgit_state_dict
from genvis.samplers.tokens import mask_ratio
from genvis.registry import MODELS
from genvis.samplers.options import MASK_SCHEDULES

V, N, CLASSES, HIDDEN, DEPTH, HEADS, FFN = 16, 12, 10, 32, 2, 4, 48
TINY = dict(vocab_size=V, num_tokens=N, token_shape=(3, 4), num_classes=CLASSES, hidden_size=HIDDEN, depth=DEPTH,
            num_heads=HEADS, intermediate_size=FFN)


@pytest.fixture(scope="module")
def model():
    """A tiny MaskGIT with O(1) random weights everywhere (LayerNorm affine too), so every term of the forward
    moves the logits."""
    torch.manual_seed(0)
    m = MaskGIT(**TINY)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 2 and "embeddings" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0, 0.5)
    return m.eval()


def inputs(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V + 1, (b, N), generator=g)  # V = the mask id
    labels = torch.randint(0, CLASSES + 1, (b,), generator=g)  # CLASSES = the null class
    return ids, labels


# ----------------------------------------------------------------------------- layout

def expected_keys(depth):
    keys = ["model.embeddings.word_embeddings.weight", "model.embeddings.position_embeddings.weight",
            "model.embeddings.token_type_embeddings.weight", "model.embeddings.LayerNorm.weight",
            "model.embeddings.LayerNorm.bias"]
    for i in range(depth):
        p = f"model.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [p + name + ".weight", p + name + ".bias"]
    return keys + ["model.lm_head.weight", "model.lm_head.bias"]


def test_state_dict_is_imagebert_layout(model):
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected_keys(DEPTH))  # no position_ids buffer
    assert sd["model.embeddings.word_embeddings.weight"].shape == (V + CLASSES + 2, HIDDEN)  # ids, mask, classes, null
    assert sd["model.embeddings.position_embeddings.weight"].shape == (N + 1, HIDDEN)  # the class token + N
    assert sd["model.embeddings.token_type_embeddings.weight"].shape == (2, HIDDEN)  # BERT's type_vocab_size
    assert sd["model.encoder.layer.1.intermediate.dense.weight"].shape == (FFN, HIDDEN)
    assert sd["model.encoder.layer.1.output.dense.weight"].shape == (HIDDEN, FFN)
    assert sd["model.lm_head.weight"].shape == (V, HIDDEN)
    assert (model.mask_id, model.null_class, model.num_tokens, model.token_shape) == (V, CLASSES, N, (3, 4))
    assert model.num_params() == sum(v.numel() for v in sd.values())


def test_output_shape(model):
    ids, labels = inputs()
    logits = model(ids, labels)
    assert logits.shape == (3, N, V) and logits.dtype == torch.float32
    with pytest.raises(GenvisError, match=r"expected \[B, 12\]"):
        model(ids[:, :5], labels)


# ----------------------------------------------------------------------------- numerics

def bert_reference(sd, ids, labels, heads, eps=1e-12):
    """ImageBert's forward from BERT's formulas, float64: tokens [class + V + 1, ids...]; h = LN(word + type[0] +
    pos); per layer h = LN(h + (softmax(q k^T / sqrt(d)) v) W_o), h = LN(h + gelu_erf(h W_1) W_2); logits of the
    image positions by lm_head."""
    w = {k: v.double() for k, v in sd.items()}

    def ln(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def lin(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    tokens = torch.cat([(labels + V + 1)[:, None], ids], dim=1)
    B, L = tokens.shape
    e = "model.embeddings."
    h = w[e + "word_embeddings.weight"][tokens] + w[e + "token_type_embeddings.weight"][0] \
        + w[e + "position_embeddings.weight"][:L]
    h = ln(h, e + "LayerNorm")
    C = h.shape[-1]
    d = C // heads
    for i in range(DEPTH):
        p = f"model.encoder.layer.{i}."
        q, k, v = (lin(h, p + f"attention.self.{n}").reshape(B, L, heads, d).transpose(1, 2) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, L, C)
        h = ln(h + lin(o, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        f = lin(h, p + "intermediate.dense")
        f = 0.5 * f * (1 + torch.erf(f / math.sqrt(2)))
        h = ln(h + lin(f, p + "output.dense"), p + "output.LayerNorm")
    return lin(h, "model.lm_head")[:, 1:]


def test_forward_is_bert(model):
    for seed in range(3):
        ids, labels = inputs(seed)
        got = model(ids, labels)
        expected = bert_reference(model.state_dict(), ids, labels, HEADS)
        assert (got.double() - expected).abs().max() < 1e-5
        assert expected.abs().max() > 0.5  # the logits are not trivially small


def test_dropout_only_in_training(model):
    m = MaskGIT(**{**TINY, "dropout": 0.3, "attn_dropout": 0.3})
    m.load_state_dict(model.state_dict())
    ids, labels = inputs()
    m.eval()
    torch.testing.assert_close(m(ids, labels), model(ids, labels), rtol=0, atol=0)
    m.train()
    torch.manual_seed(0)
    a = m(ids, labels)
    b = m(ids, labels)
    assert not torch.allclose(a, b)


def test_vocabulary_of_classes_mask_and_null(model):
    ids, _ = inputs(b=4)
    base = model(ids, torch.tensor([0, 3, 9, CLASSES]))
    other = model(ids, torch.tensor([1, 3, 8, CLASSES]))
    assert (base[0] - other[0]).abs().max() > 1e-2 and (base[2] - other[2]).abs().max() > 1e-2  # the label matters
    torch.testing.assert_close(base[1], other[1], rtol=0, atol=0)
    m = MaskGIT(**TINY)
    m.load_state_dict(model.state_dict())
    m.eval()
    table = m.model.embeddings.word_embeddings.weight
    with torch.no_grad():  # the null class is row V + 1 + num_classes: give it class 3's embedding (row V + 4)
        table[V + 1 + CLASSES] = table[V + 1 + 3]
    torch.testing.assert_close(m(ids, torch.full((4,), CLASSES)), m(ids, torch.full((4,), 3)), rtol=0, atol=0)
    # the mask id is row V: changing it moves the logits of masked inputs only
    masked = ids.clone()
    masked[:, :4] = V
    unmasked = ids.clamp(max=V - 1)
    labels = torch.tensor([0, 1, 2, 3])
    before_m, before_u = m(masked, labels), m(unmasked, labels)
    with torch.no_grad():
        table[V] += torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))  # not a constant: LN removes it
    assert (m(masked, labels) - before_m).abs().max() > 1e-2
    torch.testing.assert_close(m(unmasked, labels), before_u, rtol=0, atol=0)


def test_flops_per_image_counts_every_matmul(model):
    """flops_per_image against torch's FlopCounterMode over a forward with the math attention (batched matmuls,
    which the counter sees), and against the sizes written out: 2 x (layers x (N + 1) x (4 C^2 + 2 C F) + attention
    + N C V)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ids, labels = inputs(b=2)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels)
    tokens = N + 1
    by_hand = 2 * (DEPTH * (tokens * (4 * HIDDEN**2 + 2 * HIDDEN * FFN) + 2 * tokens**2 * HIDDEN) + N * HIDDEN * V)
    assert model.flops_per_image() == by_hand
    assert counter.get_total_flops() == 2 * by_hand


def test_bert_init():
    torch.manual_seed(0)
    m = MaskGIT(**{**TINY, "hidden_size": 64, "intermediate_size": 256})
    for name, p in m.named_parameters():
        if "LayerNorm.weight" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.004, name


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(str(tmp_path / "m"))
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is MaskGIT and loaded.token_shape == (3, 4) and loaded.num_classes == CLASSES
    ids, labels = inputs()
    torch.testing.assert_close(loaded(ids, labels), model(ids, labels), rtol=0, atol=0)


# ----------------------------------------------------------------------------- mask schedules

@pytest.mark.parametrize("schedule,half", [("arccos", 2 / 3), ("cosine", math.sqrt(0.5)), ("linear", 0.5)])
def test_mask_ratio(schedule, half):
    # arccos: acos(0.5) = pi / 3 -> (pi / 3) / (pi / 2) = 2 / 3; cosine: cos(pi / 4) = 1 / sqrt(2)
    for r, expected in ((0.0, 1.0), (0.5, half), (1.0, 0.0)):
        assert abs(mask_ratio(r, schedule) - expected) < 1e-12, (schedule, r)
    got = mask_ratio(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), schedule)
    assert torch.allclose(got, torch.tensor([1.0, half, 0.0], dtype=torch.float64), atol=1e-12)
    r = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert (mask_ratio(r, schedule).diff() < 0).all()  # strictly decreasing


def test_mask_schedules_named_once():
    assert MASK_SCHEDULES == ("arccos", "cosine", "linear")
    with pytest.raises(GenvisError, match="expected one of: arccos, cosine, linear"):
        mask_ratio(0.5, "square")


# ----------------------------------------------------------------------------- config

def test_config_builds_through_the_registry():
    entry = MODELS.entry("maskgit")
    assert entry.schema is MaskGITConfig and entry.meta["cls"] is MaskGIT and entry.meta["task"] == "tokens"
    assert entry.meta["family"] == "maskgit"
    m = entry.factory(MaskGITConfig(depth=1, hidden_size=32, num_heads=2), vocab_size=8, token_shape=[4, 4],
                      num_classes=5)
    assert (m.num_tokens, m.token_shape, m.mask_id, m.null_class) == (16, (4, 4), 8, 5)
    assert m.config.intermediate_size == 128  # null = 4 x hidden
    cfg = load_config(None, ["output_dir=x", "model.arch=maskgit", "model.depth=4", "sample.steps=12"])
    assert isinstance(cfg.model, MaskGITConfig) and cfg.model.depth == 4 and cfg.task.name == "tokens"
    assert type(cfg.sample).__name__ == "MaskGITSampling" and cfg.sample.steps == 12


@pytest.mark.parametrize("override,needle", [
    ("model.depth=0", "key 'model.depth': must be >= 1"),
    ("model.num_heads=5", "key 'model.num_heads': 5 does not divide model.hidden_size = 768"),
    ("model.intermediate_size=0", "key 'model.intermediate_size'"),
    ("model.dropout=1.0", "key 'model.dropout': 1.0: expected a value in [0, 1)"),
    ("model.attn_dropout=-0.1", "key 'model.attn_dropout'"),
    ("model.class_dropout=1.5", "key 'model.class_dropout'"),
    ("sample.mask_schedule=square", "key 'sample.mask_schedule'"),
    ("model.embed_dim=64", "model.embed_dim"),
])
def test_config_errors_are_one_line(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output_dir=x", "model.arch=maskgit", override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_constructor_refuses_a_token_shape_that_does_not_fit():
    with pytest.raises(ConfigError, match="product is num_tokens = 12"):
        MaskGIT(**{**TINY, "token_shape": (4, 4)})


# ----------------------------------------------------------------------------- official checkpoints

def test_convert_official_state_dict(model):
    official = {k: v.clone() for k, v in model.state_dict().items()}
    official["model.embeddings.position_ids"] = torch.arange(N + 1)[None]  # older transformers saved it
    config, state = convert_maskgit_state_dict(official, "gen.bin", num_heads=HEADS, token_shape=(3, 4))
    assert config == dict(vocab_size=V, num_tokens=N, token_shape=(3, 4), num_classes=CLASSES, hidden_size=HIDDEN,
                          depth=DEPTH, num_heads=HEADS, intermediate_size=FFN)
    m = MaskGIT(**config).eval()
    m.load_state_dict(state, strict=True)
    ids, labels = inputs()
    torch.testing.assert_close(m(ids, labels), model(ids, labels), rtol=0, atol=0)
    assert convert_maskgit_state_dict(official, "gen.bin", num_heads=HEADS)[0]["token_shape"] == (N,)  # TiTok's 1D
    broken = dict(official)
    del broken["model.encoder.layer.1.output.dense.bias"]
    with pytest.raises(GenvisError) as err:
        convert_maskgit_state_dict(broken, "gen.bin", num_heads=HEADS)
    assert "gen.bin" in str(err.value) and "layer.1.output.dense.bias" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(GenvisError, match="missing key"):
        convert_maskgit_state_dict({"pos_1LC": torch.zeros(1)}, "var.pth")
    with pytest.raises(GenvisError, match="not divisible by 5 heads"):
        convert_maskgit_state_dict(official, "gen.bin", num_heads=5)


def test_import_cli_records_the_tokenizer_and_samples_with_no_flags(tmp_path):
    """`genvis import maskgit` of an official-layout .bin (with BertModel's position_ids), with its TiTok: the
    folder loads the same weights, records the tokenizer, and `genvis sample` needs no flag; a tokenizer of
    another vocabulary is refused in one line."""
    import numpy as np

    from cli_run import genvis
    from genvis.models import load_model
    from genvis.tokenizers.titok import TiTokTokenizer

    torch.manual_seed(0)
    source = MaskGIT(vocab_size=16, num_tokens=6, token_shape=(6,), num_classes=10, hidden_size=32, depth=2,
                     num_heads=4, intermediate_size=64)
    official = {**source.state_dict(), "model.embeddings.position_ids": torch.arange(7)[None]}
    torch.save(official, tmp_path / "generator.bin")
    tiny = dict(image_size=16, in_channels=1, patch_size=4, decoder_patch_size=4, num_latent_tokens=6, encoder_width=32,
                encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, token_size=4)
    TiTokTokenizer(**tiny, codebook_size=16).save_pretrained(tmp_path / "titok")
    code, stdout, stderr = genvis("import", "maskgit", tmp_path / "generator.bin", tmp_path / "out", "--heads", "4",
                                  "--tokenizer", tmp_path / "titok")
    assert code == 0, stderr[-2000:]
    assert "2 blocks, width 32, vocabulary 16, 6 tokens, 10 classes" in stdout
    model = load_model(tmp_path / "out")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    code, _, stderr = genvis("sample", tmp_path / "out", "--num-samples", "4", "--out", tmp_path / "s.npz")
    assert code == 0, stderr[-2000:]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 16, 16, 3)
    TiTokTokenizer(**tiny, codebook_size=32).save_pretrained(tmp_path / "other")
    code, _, stderr = genvis("import", "maskgit", tmp_path / "generator.bin", tmp_path / "bad", "--heads", "4",
                             "--tokenizer", tmp_path / "other")
    assert code != 0 and len(stderr.strip().splitlines()) == 1 and "vocabulary is 16" in stderr and "32" in stderr
    assert not (tmp_path / "bad").exists()
