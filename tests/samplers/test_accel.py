"""T-Stitch and DiT step caching (genvis.samplers.accel).

T-Stitch is checked with two different closed-form Gaussian-data models, so every call's model
and time can be read off exactly. Step caching is checked on a tiny DiT with random weights
(the official init zeroes adaLN and the output layer, which would make every output zero)
against the plain model, a hand-written cached forward, and forward hooks counting block calls.
"""
import pytest
import torch

from genvis.diffusion.predictions import target
from genvis.diffusion.schedules import make_schedule
from genvis.models.dit import DiT
from genvis.samplers import make_grid, sample
from genvis.samplers.accel import DiTStepCache, TStitch, tstitch
from genvis.samplers.guidance import CFG

LINEAR = make_schedule("linear")


def gaussian_eps_model(mean, std, schedule=LINEAR):
    """The exact eps prediction for N(mean, std^2) data."""

    def fn(x, t, **_):
        alpha, sigma = (v.float().view(-1, 1) for v in schedule.alpha_sigma(t.double()))
        x0 = mean + alpha * std**2 * (x - alpha * mean) / (alpha**2 * std**2 + sigma**2)
        return target("eps", x0, (x - alpha * x0) / sigma, alpha, sigma)

    return fn


class Recorder:
    """Wraps a model function and logs (name, t) for every call."""

    def __init__(self, name, fn, log):
        self.name, self.fn, self.log = name, fn, log

    def __call__(self, x, t, **cond):
        self.log.append((self.name, float(t[0])))
        return self.fn(x, t, **cond)


#################################################################################
#                                  T-Stitch                                     #
#################################################################################


def test_tstitch_calls_small_model_on_first_fraction_of_grid():
    grid = make_grid("default", LINEAR, 10)  # 999, 888, ..., 111, 0, -1
    log = []
    small = Recorder("small", gaussian_eps_model(0.3, 0.5), log)
    large = Recorder("large", gaussian_eps_model(-0.2, 0.8), log)
    stitched = tstitch(small, large, grid, fraction=0.4)
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    sample(stitched, noise, sampler="ddim", steps=10, schedule=LINEAR, prediction="eps", grid=grid)
    times = grid[:-1].tolist()
    expected = [("small", t) for t in times[:4]] + [("large", t) for t in times[4:]]
    assert [name for name, _ in log] == [name for name, _ in expected]
    assert [t for _, t in log] == pytest.approx([t for _, t in expected], abs=1e-3)
    assert (stitched.small_calls, stitched.large_calls) == (4, 6)
    assert stitched.switch_time == times[4]


def test_tstitch_intermediate_times_follow_their_step():
    """A multi-stage solver's evaluations inside step i (between grid[i+1] and grid[i]) use the
    model of step i; the switch time grid[n] itself belongs to the large model."""
    grid = make_grid("karras", LINEAR, 5)  # fractional times
    stitched = tstitch(lambda x, t: "small", lambda x, t: "large", grid, fraction=0.5)  # 2.5 -> 3 small steps
    t3, t2 = float(grid[3]), float(grid[2])
    x = torch.zeros(2, 1)
    for t, want in [(t2, "small"), (0.5 * (t2 + t3), "small"), (t3 + 1e-2, "small"),
                    (t3, "large"), (0.5 * (t3 + float(grid[4])), "large"), (float(grid[4]), "large")]:
        assert stitched(x, torch.full((2,), t, dtype=torch.float32)) == want, t
    with pytest.raises(ValueError, match="both sides"):
        stitched(x, torch.tensor([t2, float(grid[4])], dtype=torch.float32))
    with pytest.raises(ValueError, match="fraction"):
        tstitch(lambda x, t: x, lambda x, t: x, grid, fraction=1.5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_tstitch_fraction_zero_and_one_reproduce_single_models(sampler):
    small, large = gaussian_eps_model(0.3, 0.5), gaussian_eps_model(-0.2, 0.8)
    grid = make_grid("default", LINEAR, 8)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))

    def run(fn):
        return sample(fn, noise, sampler=sampler, steps=8, schedule=LINEAR, prediction="eps", grid=grid,
                      generator=torch.Generator().manual_seed(2))

    only_small, only_large = run(small), run(large)
    assert torch.equal(run(tstitch(small, large, grid, fraction=0.0)), only_large)
    assert torch.equal(run(tstitch(small, large, grid, fraction=1.0)), only_small)
    mixed = run(tstitch(small, large, grid, fraction=0.5))
    # the two models give clearly different samples; the stitched one is neither
    assert (only_small - only_large).abs().mean() > 0.1
    assert (mixed - only_small).abs().mean() > 1e-3 and (mixed - only_large).abs().mean() > 1e-3


def test_tstitch_accepts_explicit_switch_time():
    stitched = TStitch(lambda x, t: 1, lambda x, t: 2, switch_time=500.0)
    x = torch.zeros(1, 1)
    assert stitched(x, torch.tensor([500.5])) == 1 and stitched(x, torch.tensor([500.0])) == 2
    assert stitched(x, torch.tensor([501])) == 1  # integer times


#################################################################################
#                               DiT step cache                                  #
#################################################################################


def random_dit(depth=6, t_scale=0.5, seed=0, learn_sigma=False):
    """A tiny DiT whose zero-initialised layers (adaLN, output) get unit-gain random weights and whose
    timestep MLP gets weights of std t_scale / sqrt(fan_in), so the output moves smoothly with t."""
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=depth, num_heads=4, num_classes=10,
                learn_sigma=learn_sigma).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("adaLN_modulation" in name or "final_layer.linear" in name):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif p.ndim == 2 and "t_embedder" in name:
                p.copy_(torch.randn(p.shape, generator=g) * t_scale / p.shape[1] ** 0.5)
            elif p.ndim == 1 and "adaLN_modulation" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def dit_inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([0, 3, 5, 9, 1, 2, 4, 6])[:batch]


def hand_forward(model, x, t, y, keep, residual=None):
    """The DiT forward written out from its modules: (output, deep residual h_L - h_keep).
    With `residual`, the deep blocks are skipped and the given residual is added instead."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks[:keep]:
        h = block(h, c)
    if residual is None:
        deep = h
        for block in model.blocks[keep:]:
            deep = block(deep, c)
        residual = deep - h
    out = model.final_layer(h + residual, c)
    return model.unpatchify(out), residual


def test_dit_pieces_compose_to_forward():
    model = random_dit()
    x, y = dit_inputs()
    t = torch.tensor([999.0, 500.0, 3.5, 0.0])
    with torch.no_grad():
        h, c = model.embed(x, t, y)
        pieces = model.head(model.run_blocks(model.run_blocks(h, c, 0, 2), c, 2, None), c)
        assert torch.equal(pieces, model(x, t, y))
        assert (pieces - hand_forward(model, x, t, y, keep=2)[0]).abs().max() < 1e-5


def test_step_cache_refresh_one_is_the_plain_model():
    model = random_dit()
    cache = DiTStepCache(model, refresh=1, keep_blocks=2)
    x, y = dit_inputs()
    with torch.no_grad():
        for t in (999.0, 750.0, 500.0, 250.0):
            tt = torch.full((4,), t)
            assert torch.equal(cache(x, tt, y), model(x, tt, y))
    assert (cache.full_calls, cache.cached_calls, cache.block_fraction) == (4, 0, 1.0)


def test_step_cache_reuses_residual_and_halves_deep_block_calls():
    model = random_dit(depth=6)
    calls = {"first": 0, "deep": 0}
    model.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
    model.blocks[5].register_forward_hook(lambda *_: calls.__setitem__("deep", calls["deep"] + 1))
    cache = DiTStepCache(model, refresh=2, keep_blocks=2)
    x, y = dit_inputs()
    times = [999.0, 900.0, 800.0, 700.0, 600.0, 500.0]
    outs = [cache(x + 0.1 * i, torch.full((4,), t), y) for i, t in enumerate(times)]
    assert calls == {"first": 6, "deep": 3}
    assert (cache.full_calls, cache.cached_calls) == (3, 3)
    assert cache.block_fraction == pytest.approx((3 * 6 + 3 * 2) / (6 * 6))

    with torch.no_grad():
        # call 0 is full (exactly the model); call 1 reuses call 0's residual
        full0, residual0 = hand_forward(model, x, torch.full((4,), 999.0), y, keep=2)
        cached1, _ = hand_forward(model, x + 0.1, torch.full((4,), 900.0), y, keep=2, residual=residual0)
        plain1 = model(x + 0.1, torch.full((4,), 900.0), y)
    torch.testing.assert_close(outs[0], full0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], cached1, atol=1e-5, rtol=1e-5)
    assert (outs[1] - plain1).abs().max() > 1e-3  # a cached call is not the plain model

    cache.reset()
    assert (cache.full_calls, cache.cached_calls, cache.residual) == (0, 0, None)
    assert torch.equal(cache(x + 0.1, torch.full((4,), 900.0), y), plain1)  # the first call after reset is full


def test_step_cache_refreshes_when_the_batch_changes():
    """A guidance interval switches between one and two model batches: each switch is a full call."""
    model = random_dit()
    cache = DiTStepCache(model, refresh=2, keep_blocks=2)
    x, y = dit_inputs()
    grid = make_grid("default", LINEAR, 10)  # normalised times 1.0, 0.889, ..., 0.001
    # guided (batch 8) where 0 < u <= 0.5: 5 unguided calls (batch 4), then 5 guided (batch 8)
    batches = []
    model.blocks[0].register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    sample(cache, x, sampler="ddim", steps=10, schedule=LINEAR, prediction="v", grid=grid, cond={"y": y},
           cfg=CFG(2.0, interval=(0.0, 0.5)), null_label=10)
    assert batches == [4] * 5 + [8] * 5
    # batch 4: full, cached, full, cached, full; batch 8: full, cached, full, cached, full
    assert (cache.full_calls, cache.cached_calls) == (6, 4)


def test_step_cache_sampling_is_close_to_uncached():
    """DDIM on the random DiT (v prediction): the cached run stays close to the plain one, its error
    shrinks roughly in proportion to the step size, and it is far below reusing everything."""
    model = random_dit()
    x, y = dit_inputs()

    def run(fn, steps):
        return sample(fn, x, sampler="ddim", steps=steps, schedule=LINEAR, prediction="v", cond={"y": y})

    errors = {}
    again = DiTStepCache(model, refresh=2, keep_blocks=2)
    first = run(again, 20)
    assert torch.equal(run(again, 20), first)  # a second run refreshes at its first call, no reset needed
    for steps in (10, 20, 40):
        plain = run(model, steps)
        cache = DiTStepCache(model, refresh=2, keep_blocks=2)
        errors[steps] = ((run(cache, steps) - plain).norm() / plain.norm()).item()
        assert cache.full_calls == cache.cached_calls == steps // 2
    stale = DiTStepCache(model, refresh=20, keep_blocks=0)  # one full call, then only embed + head
    stale_error = ((run(stale, 20) - run(model, 20)).norm() / run(model, 20).norm()).item()
    assert 0 < errors[20] < 0.05, errors
    assert errors[20] < 0.25 * stale_error, (errors, stale_error)
    assert errors[10] / errors[40] > 2.5, errors  # ~4 for an error proportional to the step size


def test_cache_and_stitch_do_not_leak_between_batches(random_dit):
    """generate() builds a fresh wrapper per batch: with the large model running only the last step,
    its step cache would otherwise reuse the previous batch's residual at the same time."""
    from genvis.generate import class_labels, generate

    config = dict(depth=3, learn_sigma=False, prediction_type="v")
    large, small = random_dit(0, **config), random_dit(1, **config)
    labels = class_labels(4, 10)
    kw = dict(sampler="ddim", steps=5, precision="fp32", stitch_small=small, stitch_fraction=0.8, cache_refresh=2,
              cache_keep_blocks=1)
    together = generate(large, None, labels, batch_size=4, **kw)
    split = generate(large, None, labels, batch_size=2, **kw)
    assert torch.allclose(together, split, atol=1e-4)  # a stale residual moves samples by O(1)
    # and the acceleration is really applied: without it the samples differ
    plain = generate(large, None, labels, batch_size=4, sampler="ddim", steps=5, precision="fp32")
    assert (together - plain).abs().max() > 1e-2


def test_tstitch_switches_at_the_same_point_for_a_sit_time_network():
    """Schedule "sit": the network sees s = 1 - t, so the small model (the noisy first part, t > 0.6 on a 10-step
    grid with fraction 0.4) answers model times s < 0.4."""
    from genvis.diffusion.schedules import make_schedule

    calls = []
    small = lambda x, s: calls.append("small") or x  # noqa: E731
    large = lambda x, s: calls.append("large") or x  # noqa: E731
    grid = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    stitch = tstitch(small, large, grid, 0.4, schedule=make_schedule("sit"))
    x = torch.zeros(2, 1)
    for t in (0.95, 0.61, 0.6, 0.3):
        stitch(x, torch.full((2,), 1.0 - t))  # what the Denoiser passes a SiT-time network
    assert calls == ["small", "small", "large", "large"]
    assert tstitch(small, large, grid, 0.4, schedule=make_schedule("flow")).uses_small(torch.tensor([0.61]))
