"""VAR decoding (genvis.samplers.tokens): filtering as VAR's sample_with_top_k_top_p_, the KV-cache loop against a
plain loop written here that recomputes the whole teacher-forcing forward at every scale, guidance as
s_k cond - (s_k - 1) uncond with s_k = 1 + (cfg - 1) k / (S - 1), per-sample generators (batch-size
independence), the options' checks, and the smoothed (Gumbel-mixture) features."""
import math

import pytest
import torch
import torch.nn.functional as F

import genvis.samplers.tokens as tokens
from genvis.cli import main
from genvis.errors import GenvisError, OptionError
from genvis.generate import generate, sample_generators
from genvis.models.var import VAR
from genvis.samplers.options import VARSampling
from genvis.samplers.tokens import decode_var, filter_logits, guidance_scale
from genvis.tokenizers import record_tokenizer
from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer

SCALES = (1, 2, 3, 4)  # 30 tokens; the tokenizer's last scale 4 -> 8x8 images (ch_mult (1, 2))
VOCAB, Z, CLASSES = 32, 8, 5


@pytest.fixture(scope="module")
def var():
    """A tiny VAR with random O(1) weights (VAR's init makes the blocks nearly the identity, and the logits
    nearly independent of the class), so the class, the guidance and every earlier scale move the logits."""
    torch.manual_seed(0)
    model = VAR(vocab_size=VOCAB, token_dim=Z, scales=SCALES, num_classes=CLASSES, depth=2, embed_dim=32, num_heads=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "emb" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            else:
                p.normal_(0, 0.5)
        model.head.weight.mul_(2.0)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(1)
    tok = MultiScaleVQTokenizer(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=Z, norm_groups=8,
                                codebook_size=VOCAB, scales=SCALES).eval()
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()  # code vectors of order 1: the next scale's input depends on the ids
    return tok


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------- filtering

def official_filter(logits, top_k, top_p):
    """VAR's sample_with_top_k_top_p_ filtering, row by row: top-k keeps the ids whose logit is at least the
    k-th largest; top-p then sorts the (renormalised) probabilities ascending and removes the ids whose
    cumulative probability is <= 1 - top_p, never the most likely one."""
    out = logits.clone().reshape(-1, logits.shape[-1])
    V = out.shape[-1]
    for row in out:
        if top_k > 0:
            kth = sorted(row.tolist(), reverse=True)[min(top_k, V) - 1]
            row[row < kth] = -math.inf
        if top_p > 0:
            probs = torch.softmax(row.double(), dim=0)
            order = sorted(range(V), key=lambda i: probs[i].item())  # ascending
            total = 0.0
            for position, i in enumerate(order):
                total += probs[i].item()
                if total <= 1 - top_p and position != V - 1:
                    row[i] = -math.inf
    return out.reshape(logits.shape)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.8), (5, 0.8), (12, 0.5), (1, 0.9), (0, 1e-4),
                                         (0, 1.0), (50, 0.0), (57, 0.0), (49, 0.3)])
def test_filter_logits_is_vars_top_k_then_top_p(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 1000))
    logits = 2.0 * torch.randn(3, 4, 50, generator=g)  # continuous: no ties
    got = filter_logits(logits, top_k, top_p)
    expected = official_filter(logits, top_k, top_p)
    assert got.shape == logits.shape
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])  # kept logits unchanged
    kept = (~torch.isinf(got)).sum(-1)
    if top_k == 0 and top_p in (0.0, 1.0) or top_k >= 50 and top_p == 0.0:
        assert torch.equal(got, logits)  # off, or top_k >= V: a no-op
    if 0 < top_k < 50 and top_p == 0.0:
        assert (kept == top_k).all()
    if top_p == 1e-4 or top_k == 1:
        assert (kept == 1).all() and torch.equal(got.argmax(-1), logits.argmax(-1))  # the most likely id stays
    assert not torch.equal(logits, got) or (top_k in (0, 50, 57) and top_p in (0.0, 1.0))
    # 2-D input, and the input is not modified
    flat = logits.reshape(12, 50)
    before = flat.clone()
    assert torch.equal(filter_logits(flat, top_k, top_p), got.reshape(12, 50))
    assert torch.equal(flat, before)


def test_ties_at_the_top_p_cutoff_all_stay():
    """Probabilities (0.4, 0.2, 0.2, 0.2) with top-p 0.7: ascending cumulative 0.2, 0.4, 0.6, 1.0, of which only
    the first is <= 0.3, so VAR removes one of the three tied ids (which one depends on its sort); genvis keeps all
    three. A cutoff that passes all the tied ones removes them all: (0.7, 0.1, 0.1, 0.1) with top-p 0.5."""
    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]]))
    assert torch.isinf(filter_logits(logits, top_p=0.7)).sum() == 0
    got = filter_logits(torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]])), top_p=0.5)  # 0.1, 0.2, 0.3 <= 0.5
    assert torch.equal(torch.isinf(got), torch.tensor([[False, True, True, True]]))


@pytest.mark.parametrize("top_p,kept", [(0.7, [True, True, False, False, False, False]),
                                        (0.8, [True, True, True, True, True, False]),
                                        (0.5, [True, False, False, False, False, False])])
def test_ids_tied_with_the_kth_count_in_top_p(top_p, kept):
    """Logits (3, 2, 1, 1, 1, 0), top-k 3: the k-th is 1, so all three 1s stay (VAR keeps every logit >= the k-th)
    and top-p renormalises over five ids: e^1, e^2, e^3 of Z = 3e + e^2 + e^3, ascending cumulative 0.076, 0.153,
    0.229 (the 1s), 0.436, 1. top-p 0.7 (remove <= 0.3) removes the three 1s; 0.8 (<= 0.2) would remove two of the
    tied 1s, so all stay; 0.5 (<= 0.5) removes the 2 as well."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 1.0, 1.0, 0.0]])
    z = 3 * math.e + math.e ** 2 + math.e ** 3
    assert round(3 * math.e / z, 3) == 0.229 and round((3 * math.e + math.e ** 2) / z, 3) == 0.436
    got = filter_logits(logits, top_k=3, top_p=top_p)
    assert torch.equal(~torch.isinf(got[0]), torch.tensor(kept))
    # the same as top-k, then top-p over the whole sorted vocabulary
    assert torch.equal(got, filter_logits(filter_logits(logits, top_k=3), top_p=top_p))


def test_top_p_is_taken_after_top_k():
    # top-p over the probabilities renormalised on the top-k ids: top-k 3 of logits (4, 3, 2, 1, 0 x 12) leaves
    # probabilities (0.665, 0.245, 0.090), and top-p 0.9 removes the third (0.090 <= 0.1); on the full softmax
    # the third has 0.076 but the twelve zeros come first (cumulative 0.124 > 0.1 by then), so it would stay
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0] + [0.0] * 12])
    got = filter_logits(logits, top_k=3, top_p=0.9)
    assert torch.equal(torch.isinf(got), torch.isinf(official_filter(logits, 3, 0.9)))
    assert torch.equal(~torch.isinf(got[0]), torch.tensor([True, True] + [False] * 14))


def test_the_gumbel_max_draw_has_the_softmax_distribution():
    """var_pick's ids over 40,000 draws from fixed filtered logits: each id's frequency within 4.5 standard errors
    of its softmax probability, and the filtered ids never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    n = 40_000
    cond = logits.expand(1, n, 8)
    u = torch.rand(1, n, 8, generator=torch.Generator().manual_seed(0))
    one = torch.tensor(1.0)
    ids, filtered = tokens.var_pick(cond, None, u, one, one - 1, one, top_k=6, top_p=0.0)
    probs = torch.softmax(filter_logits(logits, top_k=6), dim=-1).double()
    freq = torch.bincount(ids[0], minlength=8).double() / n
    assert freq[5] == 0 and freq[4] == 0  # the two below the 6th largest
    assert ((freq - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt() + 1e-12).all(), (freq, probs)


def test_guidance_scale():
    assert [guidance_scale(3.0, k, 3) for k in range(3)] == [1.0, 2.0, 3.0]
    assert guidance_scale(2.5, 9, 10) == 2.5 and guidance_scale(2.5, 0, 10) == 1.0
    # VAR's t = c * k / (S - 1) with (1 + t) cond - t uncond: genvis cfg = 1 + c
    assert math.isclose(guidance_scale(1 + 1.5, 4, 10), 1 + 1.5 * 4 / 9)


# ----------------------------------------------------------------------------- the reference loop

def reference_decode(model, quantizer, labels, generators, cfg=1.0, top_k=0, top_p=0.0, temperature=1.0,
                     smooth=False):
    """Unguided / guided VAR sampling without a KV cache: at every scale k the full teacher-forcing forward
    (inputs of the scales not drawn yet are zeros, which the block-causal mask hides) from the f_hat
    accumulated so far; scale k's logits s_k cond - (s_k - 1) uncond; sample i's ids drawn by Gumbel-max,
    argmax(logits_i - log(-log U_i)) with U_i = torch.rand(l, V, generator=g_i) (each log's argument clamped at
    1e-20, TiTok's form). Returns (ids [B, L], f_hat, logits per scale)."""
    B, S, side = len(labels), len(SCALES), SCALES[-1]
    null = torch.full_like(labels, model.config.num_classes)
    ranges, start = [], 0
    for p in SCALES:
        ranges.append((start, start + p * p))
        start += p * p
    f_hat = torch.zeros(B, Z, side, side)
    inputs = [torch.zeros(B, p * p, Z) for p in SCALES[1:]]
    ids, seen = [], []
    vectors = quantizer.vectors().detach().float()
    for k, p in enumerate(SCALES):
        x = torch.cat(inputs, dim=1)
        begin, end = ranges[k]
        with torch.no_grad():
            logits = model(labels, x)[:, begin:end]
            if cfg != 1.0:
                s = 1 + (cfg - 1) * k / (S - 1)
                logits = s * logits - (s - 1) * model(null, x)[:, begin:end]
        logits = official_filter(logits / temperature, top_k, top_p)
        seen.append(logits)
        u = torch.stack([torch.rand(p * p, VOCAB, generator=g) for g in generators])
        drawn = (logits - torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))).argmax(dim=-1)
        ids.append(drawn)
        if smooth:
            ratio = k / (S - 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            noise = torch.stack([-torch.empty(p * p, VOCAB).exponential_(generator=g).log() for g in generators])
            codes = torch.softmax((logits * (1 + ratio) + noise) / tau, dim=-1) @ vectors  # [B, l, Z]
        else:
            codes = vectors[drawn]
        codes = codes.transpose(1, 2).reshape(B, Z, p, p)
        if k < S - 1:
            codes = F.interpolate(codes, size=(side, side), mode="bicubic")
        with torch.no_grad():
            f_hat = f_hat + quantizer.phi(k, codes)
        if k < S - 1:
            nxt = SCALES[k + 1]
            inputs[k] = F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
    return torch.cat(ids, dim=1), f_hat, seen


@pytest.fixture
def spy(monkeypatch):
    """The logits decode_var draws from, one [B, l, V] per scale."""
    seen = []
    pick = tokens.var_pick

    def recording(*args, **kwargs):
        ids, logits = pick(*args, **kwargs)
        seen.append(logits.clone())
        return ids, logits

    monkeypatch.setattr(tokens, "var_pick", recording)
    return seen


LABELS = torch.tensor([3, 0, 4, 1])


@pytest.mark.parametrize("cfg,top_k,top_p,temperature", [(1.0, 0, 0.0, 1.0), (3.0, 0, 0.0, 1.0),
                                                         (2.5, 10, 0.9, 0.7)])
def test_decode_equals_the_plain_loop(var, tokenizer, spy, cfg, top_k, top_p, temperature):
    options = dict(cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature)
    got = decode_var(var, LABELS, quantizer=tokenizer.quantize, generators=gens(range(4)), **options)
    assert got.shape == (4, 30) and got.dtype == torch.int64
    assert 0 <= got.min() and got.max() < VOCAB
    expected, _, logits = reference_decode(var, tokenizer.quantize, LABELS, gens(range(4)), **options)
    assert torch.equal(got, expected)
    # the logits drawn from, scale by scale (the plain loop followed the same ids)
    assert len(spy) == len(SCALES)
    for k, (mine, theirs) in enumerate(zip(spy, logits)):
        assert mine.shape == theirs.shape == (4, SCALES[k] ** 2, VOCAB)
        assert torch.equal(torch.isinf(mine), torch.isinf(theirs)), k
        finite = ~torch.isinf(theirs)
        torch.testing.assert_close(mine[finite], theirs[finite], rtol=1e-5, atol=1e-5)


def test_guidance_changes_the_logits(var, tokenizer, spy):
    """cfg pushes the logits away from the unconditional ones from the second scale on (not at the first)."""
    decode_var(var, LABELS, quantizer=tokenizer.quantize, generators=gens(range(4)), cfg=1.0)
    decode_var(var, LABELS, quantizer=tokenizer.quantize, generators=gens(range(4)), cfg=3.0)
    plain, guided = spy[:4], spy[4:]
    torch.testing.assert_close(plain[0], guided[0], rtol=0, atol=1e-5)  # s_0 = 1
    assert (plain[1] - guided[1]).abs().max() > 0.1


def test_the_guided_path_at_scale_one_equals_unguided_decoding(var, tokenizer, monkeypatch):
    """cfg 1 skips the unconditional half; the guided path (doubled batch, null-class rows, combination) with
    s_k = 1 at every scale must draw the same ids."""
    plain = decode_var(var, LABELS, quantizer=tokenizer.quantize, generators=gens(range(4)), top_k=10)
    monkeypatch.setattr(tokens, "guidance_scale", lambda cfg, k, num: 1.0)
    guided = decode_var(var, LABELS, quantizer=tokenizer.quantize, generators=gens(range(4)), cfg=3.0, top_k=10)
    assert torch.equal(plain, guided)


def test_decoding_is_seeded_and_batch_independent(var, tokenizer):
    q = tokenizer.quantize
    for options in (dict(), dict(cfg=2.5, top_k=10, top_p=0.9)):
        together = decode_var(var, LABELS, quantizer=q, generators=gens(range(4)), **options)
        again = decode_var(var, LABELS, quantizer=q, generators=gens(range(4)), **options)
        assert torch.equal(together, again)
        alone = torch.cat([decode_var(var, LABELS[i:i + 1], quantizer=q, generators=gens([i]), **options) for i in range(4)])
        assert torch.equal(together, alone)
        # another seed, other ids; the same seed for all four: they differ only by their labels
        assert not torch.equal(decode_var(var, LABELS, quantizer=q, generators=gens(range(10, 14)), **options), together)
        # without the KV cache: the same ids
        assert torch.equal(decode_var(var, LABELS, quantizer=q, generators=gens(range(4)), kv_cache=False, **options), together)


def test_callback_reports_each_scale(var, tokenizer):
    seen = []
    ids = decode_var(var, LABELS[:2], quantizer=tokenizer.quantize, generators=gens([0, 1]), callback=seen.append)
    assert [info["scale"] for info in seen] == list(range(len(SCALES)))
    assert torch.equal(torch.cat([info["ids"] for info in seen], dim=1), ids)


def test_generate_does_not_depend_on_the_batch_size(var, tokenizer):
    # fp32: "auto" may mean bf16 autocast on this CPU, whose logits are not decode_var's float32 ones
    sampling = VARSampling(cfg=2.0, top_k=8)
    one = generate(var, tokenizer, LABELS, seed=7, sampling=sampling, batch_size=1, precision="fp32")
    four = generate(var, tokenizer, LABELS, seed=7, sampling=sampling, batch_size=4, precision="fp32")
    three = generate(var, tokenizer, LABELS, seed=7, sampling=sampling, batch_size=3, precision="fp32")
    assert one.shape == (4, 1, 8, 8)
    torch.testing.assert_close(one, four, rtol=0, atol=1e-5)
    torch.testing.assert_close(three, four, rtol=0, atol=1e-5)
    # sample i is decode_var with the generator of (seed, i)
    ids = decode_var(var, LABELS, quantizer=tokenizer.quantize, generators=sample_generators(7, range(4)), cfg=2.0, top_k=8)
    torch.testing.assert_close(four, tokenizer.decode(ids).float(), rtol=0, atol=1e-5)
    assert not torch.allclose(four, generate(var, tokenizer, LABELS, seed=8, sampling=sampling, batch_size=4,
                                             precision="fp32"))
    # the fields as keywords
    torch.testing.assert_close(generate(var, tokenizer, LABELS, seed=7, cfg=2.0, top_k=8, batch_size=2,
                                        precision="fp32"), four, rtol=0, atol=1e-5)


def test_a_tokenizer_that_does_not_fit_is_one_line(var):
    torch.manual_seed(0)
    other = MultiScaleVQTokenizer(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=Z, norm_groups=8,
                                  codebook_size=64, scales=SCALES).eval()
    with pytest.raises(GenvisError) as err:
        generate(var, other, LABELS, seed=0, sampling=VARSampling())
    message = str(err.value)
    assert "\n" not in message and "vocabulary" in message and "32" in message and "64" in message
    with pytest.raises(GenvisError) as err:
        generate(var, None, LABELS, seed=0, sampling=VARSampling())
    assert "tokenizer" in str(err.value)


# ----------------------------------------------------------------------------- smoothed features

def test_smooth_returns_features_the_tokenizer_decodes(var, tokenizer):
    q = tokenizer.quantize
    f_hat = decode_var(var, LABELS, quantizer=q, generators=gens(range(4)), smooth=True, cfg=2.0)
    assert f_hat.shape == (4, Z, 4, 4) and f_hat.dtype == torch.float32 and torch.isfinite(f_hat).all()
    _, expected, _ = reference_decode(var, q, LABELS, gens(range(4)), cfg=2.0, smooth=True)
    torch.testing.assert_close(f_hat, expected, rtol=1e-4, atol=1e-4)
    images = tokenizer.decode(f_hat)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    # seeded, and mixtures rather than the codes of the drawn ids
    assert torch.equal(decode_var(var, LABELS, quantizer=q, generators=gens(range(4)), smooth=True, cfg=2.0), f_hat)
    ids = decode_var(var, LABELS, quantizer=q, generators=gens(range(4)), cfg=2.0)
    assert not torch.allclose(q.f_hat(tokenizer.split(ids)), f_hat, atol=1e-3)
    # through generate: images
    out = generate(var, tokenizer, LABELS[:2], seed=0, sampling=VARSampling(smooth=True), batch_size=2,
                   precision="fp32")
    assert out.shape == (2, 1, 8, 8)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("field,value,needle", [("cfg", 0.5, ">= 1"), ("top_k", -1, ">= 0"), ("top_p", 1.5, "[0, 1]"),
                                                ("top_p", -0.1, "[0, 1]"), ("temperature", 0.0, "> 0"),
                                                ("temperature", -1.0, "> 0"), ("cfg", float("nan"), ">= 1"),
                                                ("num", 0, ">= 1")])
def test_var_sampling_rejects_bad_values(field, value, needle):
    with pytest.raises(OptionError) as err:
        VARSampling(**{field: value})
    assert err.value.key == field and needle in err.value.message and "\n" not in str(err.value)


def test_var_sampling_accepts_the_edges():
    VARSampling(cfg=1.0, top_k=0, top_p=0.0, temperature=1e-3)
    VARSampling(cfg=2.5, top_k=900, top_p=1.0, smooth=True, kv_cache=False)


def test_cli_sample_bad_flag_is_one_line(var, tokenizer, tmp_path, capsys):
    folder = tmp_path / "var"
    var.save_pretrained(str(folder))
    record_tokenizer(folder, tokenizer)
    out = tmp_path / "samples.png"
    for flags, needles in ((("--top-k", "-1"), ("--top-k", "-1", ">= 0")),
                           (("--top-p", "1.5"), ("--top-p", "1.5")),
                           (("--temperature", "0"), ("--temperature", "> 0")),
                           (("--cfg", "0.5"), ("--cfg", ">= 1")),
                           (("--steps", "10"), ("--steps", "does not apply"))):
        assert main(["sample", str(folder), "--out", str(out), "--num-samples", "2", *flags]) == 2, flags
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        for needle in needles:
            assert needle in lines[0], lines[0]
    assert not out.exists()
    assert main(["sample", str(folder), "--out", str(out), "--num-samples", "2", "--top-k", "8", "--cfg", "2"]) == 0
    assert out.is_file()
