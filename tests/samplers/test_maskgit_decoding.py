"""MaskGIT decoding (genvis.samplers.tokens.decode_maskgit): against a loop written here the way TiTok's
ImageBert.generate is (two forwards for guidance, cond + g (cond - uncond), `confidence <= cut_off` masking),
the unmasking invariants step by step, per-sample generators (batch-size independence), one forward per step
without guidance, the greedy (temperature 0) limit, the options' checks, the tokenizer check and the CLI."""
import math
from types import SimpleNamespace

import pytest
import torch

from genvis.cli import main
from genvis.errors import GenvisError, OptionError
from genvis.generate import generate, sample_generators
from genvis.models.maskgit import MaskGIT
from genvis.samplers.options import MaskGITSampling
from genvis.samplers.tokens import check_maskgit_tokenizer, decode_maskgit
from genvis.tokenizers import record_tokenizer
from genvis.tokenizers.vq import VQTokenizer

V, N, CLASSES, SHAPE = 16, 12, 10, (3, 4)
LABELS = torch.tensor([3, 0, 9, 5])


@pytest.fixture(scope="module")
def model():
    """A tiny MaskGIT with O(1) random weights, so the logits depend on the class and on the revealed ids."""
    torch.manual_seed(0)
    m = MaskGIT(vocab_size=V, num_tokens=N, token_shape=SHAPE, num_classes=CLASSES, hidden_size=32, depth=2,
                num_heads=4, intermediate_size=64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and "embeddings" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
            elif "LayerNorm" not in name:
                p.normal_(0, 0.5)
        m.model.lm_head.weight.mul_(2.0)
    return m.eval()


def ratio_of(r, schedule):
    return {"arccos": math.acos(r) * 2 / math.pi, "cosine": math.cos(math.pi * r / 2), "linear": 1 - r}[schedule]


# ----------------------------------------------------------------------------- the reference loop

def titok_gumbel(shape, generator):
    """ImageBert.generate's gumbel_noise: -log(-log U), U ~ Uniform[0, 1), each log's argument clamped at 1e-20."""
    def log(t, eps=1e-20):
        return torch.log(t.clamp(min=eps))
    return -log(-log(torch.zeros(shape).uniform_(0, 1, generator=generator)))


@torch.no_grad()
def official_decode(model, labels, generators, steps=8, schedule="arccos", temperature=1.0, cfg=1.0,
                    cfg_schedule="linear", anneal_softmax=False):
    """ImageBert.generate with genvis's conventions: guidance_scale g = cfg - 1 ("linear": g k / steps at step k,
    the unconditional forward skipped while it is 0), sample i's Gumbel noise from generators[i] (the [N, V] draw
    for the ids, then the [N] draw for the confidence; none when the annealed temperature is 0), mask_len
    per sample, and TiTok's `confidence <= cut_off` re-masking."""
    B = len(labels)
    ids = torch.full((B, N), V)
    g = cfg - 1.0
    scale = g if cfg_schedule == "constant" else 0.0
    for step in range(steps):
        ratio = (step + 1) / steps
        temp = temperature * (1.0 - ratio)
        is_mask = ids == V
        cond = model(ids, labels)
        if scale != 0:
            uncond = model(ids, torch.full_like(labels, CLASSES))
            logits = cond + (cond - uncond) * scale
        else:
            logits = cond
        if anneal_softmax:
            logits = logits / (0.5 + 0.8 * (1 - ratio))
        noise = torch.stack([titok_gumbel((N, V), gen) for gen in generators]) if temp > 0 else 0.0
        sampled = (logits + temp * noise).argmax(-1)
        sampled_logits = torch.gather(logits, -1, sampled[..., None])[..., 0]
        sampled = torch.where(is_mask, sampled, ids)
        sampled_logits = torch.where(is_mask, sampled_logits, math.inf)
        noise = torch.stack([titok_gumbel((N,), gen) for gen in generators]) if temp > 0 else 0.0
        confidence = sampled_logits + temp * noise
        if step == steps - 1:
            ids = sampled
        else:
            new = sampled.clone()
            for i in range(B):
                mask_len = max(1, min(int(is_mask[i].sum()) - 1, math.floor(N * ratio_of(ratio, schedule))))
                cut_off = torch.sort(confidence[i]).values[mask_len - 1]
                new[i][confidence[i] <= cut_off] = V
            ids = new
        if cfg_schedule == "linear":
            scale = ratio * g
    return ids


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


CASES = [dict(), dict(temperature=4.5, cfg=3.0), dict(temperature=9.5, cfg=5.5, anneal_softmax=True),
         dict(temperature=2.0, cfg=2.0, cfg_schedule="constant", schedule="cosine", steps=5),
         dict(temperature=1.0, schedule="linear", steps=16)]


@pytest.mark.parametrize("options", CASES)
def test_decode_equals_the_official_loop(model, options):
    got = decode_maskgit(model, LABELS, generators=gens(range(4)), **options)
    assert got.shape == (4, N) and got.dtype == torch.int64
    assert 0 <= got.min() and got.max() < V  # every id revealed, none is the mask id
    reference = dict(options)
    reference["schedule"] = reference.get("schedule", "arccos")
    assert torch.equal(got, official_decode(model, LABELS, gens(range(4)), **reference))


@pytest.mark.parametrize("schedule,steps", [("arccos", 8), ("cosine", 8), ("linear", 16), ("arccos", 1), ("arccos", 3)])
def test_unmasking_invariants(model, schedule, steps):
    seen = []
    ids = decode_maskgit(model, LABELS, generators=gens(range(4)), steps=steps, schedule=schedule, temperature=3.0,
                         cfg=2.0, callback=lambda info: seen.append((info["step"], info["ids"].clone())))
    assert [k for k, _ in seen] == list(range(steps))
    assert torch.equal(seen[-1][1], ids) and (ids != V).all()
    before = torch.full((4, N), V)
    for k, now in seen:
        masked_before = (before == V).sum(-1)
        revealed = before != V
        assert torch.equal(now[revealed], before[revealed]), k  # a revealed id is never changed or re-masked
        still = (now == V).sum(-1)
        if k == steps - 1:
            assert (still == 0).all()
        else:
            target = math.floor(N * ratio_of((k + 1) / steps, schedule))
            expected = torch.clamp(torch.clamp(masked_before - 1, max=target), min=1)
            assert torch.equal(still, expected), (k, still, expected)
        before = now
    if schedule == "linear" and steps == 16:  # more steps than ids: one id per step (masked - 1), then at least 1
        assert [int((s == V).sum()) // 4 for _, s in seen] == [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1, 0]


def test_seeded_and_batch_size_independent(model):
    for options in (dict(), dict(temperature=4.5, cfg=3.0, anneal_softmax=True)):
        together = decode_maskgit(model, LABELS, generators=sample_generators(7, range(4)), **options)
        again = decode_maskgit(model, LABELS, generators=sample_generators(7, range(4)), **options)
        assert torch.equal(together, again)
        alone = torch.cat([decode_maskgit(model, LABELS[i:i + 1], generators=sample_generators(7, [i]), **options)
                           for i in range(4)])
        assert torch.equal(together, alone)
        assert not torch.equal(decode_maskgit(model, LABELS, generators=sample_generators(8, range(4)), **options),
                               together)
    with pytest.raises(GenvisError, match="3 generators for 4 labels"):
        decode_maskgit(model, LABELS, generators=gens(range(3)))


class CountingModel:
    """The model, recording the batch size of each forward."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, labels):
        self.batches.append(len(ids))
        return self.model(ids, labels)


def test_forwards_per_step(model):
    spy = CountingModel(model)
    plain = decode_maskgit(spy, LABELS, generators=gens(range(4)), cfg=1.0, temperature=2.0)
    assert spy.batches == [4] * 8  # cfg 1: no unconditional pass
    spy.batches.clear()
    constant = decode_maskgit(spy, LABELS, generators=gens(range(4)), cfg=1.0, cfg_schedule="constant", temperature=2.0)
    assert spy.batches == [4] * 8 and torch.equal(constant, plain)
    spy.batches.clear()
    decode_maskgit(spy, LABELS, generators=gens(range(4)), cfg=3.0, temperature=2.0)  # linear: s_0 = 1
    assert spy.batches == [4] + [8] * 7
    spy.batches.clear()
    decode_maskgit(spy, LABELS, generators=gens(range(4)), cfg=3.0, cfg_schedule="constant", temperature=2.0)
    assert spy.batches == [8] * 8


def test_guidance_changes_the_ids(model):
    plain = decode_maskgit(model, LABELS, generators=gens(range(4)), temperature=2.0)
    guided = decode_maskgit(model, LABELS, generators=gens(range(4)), temperature=2.0, cfg=6.0, cfg_schedule="constant")
    assert not torch.equal(plain, guided)


@torch.no_grad()
def greedy_decode(model, labels, steps, schedule):
    """Temperature 0: every masked position takes its most likely id; the least likely of the new ones are
    masked again (floor(N ratio), clamped), one sample and one position at a time."""
    ids = torch.full((len(labels), N), V)
    for k in range(steps):
        r = (k + 1) / steps
        logits = model(ids, labels)
        new = ids.clone()
        for i in range(len(labels)):
            masked = [j for j in range(N) if ids[i, j] == V]
            for j in masked:
                new[i, j] = int(logits[i, j].argmax())
            if k < steps - 1:
                keep = max(1, min(len(masked) - 1, math.floor(N * ratio_of(r, schedule))))
                least = sorted(masked, key=lambda j: float(logits[i, j].max()))[:keep]
                for j in least:
                    new[i, j] = V
        ids = new
    return ids


@pytest.mark.parametrize("schedule,steps", [("arccos", 8), ("cosine", 4), ("linear", 6)])
def test_temperature_zero_is_greedy(model, schedule, steps):
    got = decode_maskgit(model, LABELS, generators=gens(range(4)), temperature=0.0, steps=steps, schedule=schedule)
    assert torch.equal(got, greedy_decode(model, LABELS, steps, schedule))
    assert torch.equal(decode_maskgit(model, LABELS, generators=gens(range(10, 14)), temperature=0.0, steps=steps,
                                      schedule=schedule), got)  # no randomness left


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("field,value,needle", [
    ("steps", 0, ">= 1"), ("temperature", -1.0, ">= 0"), ("temperature", float("nan"), ">= 0"),
    ("mask_schedule", "square", "arccos, cosine, linear"), ("cfg", 0.5, ">= 1"),
    ("cfg_schedule", "cosine", "constant, linear"), ("num", 0, ">= 1")])
def test_options_reject_bad_values(field, value, needle):
    with pytest.raises(OptionError) as err:
        MaskGITSampling(**{field: value})
    assert err.value.key == field and needle in err.value.message and "\n" not in str(err.value)


def test_options_defaults_and_edges():
    o = MaskGITSampling()
    assert (o.steps, o.mask_schedule, o.temperature, o.cfg, o.cfg_schedule, o.anneal_softmax) == \
        (8, "arccos", 1.0, 1.0, "linear", False)
    MaskGITSampling(steps=1, temperature=0.0, cfg=1.0, cfg_schedule="constant", mask_schedule="linear")
    MaskGITSampling(steps=8, temperature=9.5, cfg=5.5, anneal_softmax=True)  # TiTok-L-32


# ----------------------------------------------------------------------------- tokenizer check

def stand_in(**fields):
    return SimpleNamespace(**{"kind": "discrete", "token_layout": "sequence", "vocab_size": V, "num_tokens": N, **fields})


def test_tokenizer_check(model):
    check_maskgit_tokenizer(model, stand_in())
    check_maskgit_tokenizer(model, SimpleNamespace(kind="discrete", token_layout="grid", vocab_size=V))
    for tokenizer, needles in ((stand_in(vocab_size=32), ("vocabulary is 16", "tokenizer's is 32")),
                               (stand_in(num_tokens=64), ("12 tokens", "64")),
                               (stand_in(kind="continuous"), ("discrete",)),
                               (stand_in(token_layout="scales"), ("discrete",)),
                               (None, ("none", "--tokenizer"))):
        with pytest.raises(GenvisError) as err:
            check_maskgit_tokenizer(model, tokenizer)
        message = str(err.value)
        assert "\n" not in message and all(n in message for n in needles), message


# ----------------------------------------------------------------------------- generate and the CLI

@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(1)
    tok = VQTokenizer(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8,
                      codebook_size=V, codebook_dim=4).eval()
    with torch.no_grad():
        tok.quantize.embedding.weight.normal_()
    return tok


def test_generate_decodes_the_grid_and_is_batch_independent(model, tokenizer):
    sampling = MaskGITSampling(temperature=4.5, cfg=3.0, anneal_softmax=True)
    one = generate(model, tokenizer, LABELS, seed=7, sampling=sampling, batch_size=1, precision="fp32")
    four = generate(model, tokenizer, LABELS, seed=7, sampling=sampling, batch_size=4, precision="fp32")
    assert one.shape == (4, 1, 6, 8)  # the 3x4 grid, decoded
    torch.testing.assert_close(one, four, rtol=0, atol=1e-5)
    ids = decode_maskgit(model, LABELS, generators=sample_generators(7, range(4)), temperature=4.5, cfg=3.0,
                         anneal_softmax=True)
    torch.testing.assert_close(four, tokenizer.decode(ids.view(4, *SHAPE)).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(generate(model, tokenizer, LABELS, seed=7, temperature=4.5, cfg=3.0, anneal_softmax=True,
                                        precision="fp32"), four, rtol=0, atol=1e-5)


def test_cli_sample(model, tokenizer, tmp_path, capsys):
    folder = tmp_path / "maskgit"
    model.save_pretrained(str(folder))
    record_tokenizer(folder, tokenizer)
    out = tmp_path / "samples.png"
    for flags, needles in ((("--steps", "0"), ("--steps: 0: expected >= 1",)),
                           (("--mask-schedule", "square"), ("--mask-schedule", "arccos, cosine, linear")),
                           (("--temperature", "-1"), ("--temperature", ">= 0")),
                           (("--cfg-schedule", "cosine"), ("--cfg-schedule", "constant, linear")),
                           (("--top-k", "5"), ("--top-k: does not apply to maskgit models",)),
                           (("--sampler", "ddim"), ("--sampler: does not apply to maskgit models",))):
        assert main(["sample", str(folder), "--out", str(out), "--num-samples", "2", *flags]) == 2, flags
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert not out.exists()
    assert main(["sample", str(folder), "--out", str(out), "--num-samples", "2", "--steps", "4", "--temperature", "2",
                 "--cfg", "2", "--cfg-schedule", "constant", "--mask-schedule", "cosine", "--anneal-softmax",
                 "--precision", "fp32"]) == 0
    assert out.is_file()
