"""Classifier-free guidance: interval, scale schedules, first-k channels, and the call count."""
import pytest
import torch

from genvis.diffusion.schedules import make_schedule
from genvis.samplers import sample
from genvis.samplers.guidance import CFG, ClassifierFreeGuidance

NULL = 10


def net(x, t, y):
    """Output depends on the label: cond = x + y, uncond (y = NULL) = x + 10; extra channel = y."""
    out = x + y.view(-1, 1, 1, 1).float()
    return torch.cat([out, y.view(-1, 1, 1, 1).float().expand_as(x)], dim=1)


def test_guided_output_and_first_k_channels():
    x = torch.zeros(2, 3, 1, 1)
    y = torch.tensor([2, 4])
    t = torch.tensor([500.0, 500.0])
    g = ClassifierFreeGuidance(net, CFG(1.5), NULL, pred_channels=3)
    out = g(x, t, y)
    # uncond + 1.5 (cond - uncond) = 10 + 1.5 (y - 10); the variance channels come unguided from cond
    assert torch.allclose(out[:, :3], (10 + 1.5 * (y - 10)).float().view(-1, 1, 1, 1).expand(2, 3, 1, 1))
    assert torch.equal(out[:, 3:], y.float().view(-1, 1, 1, 1).expand(2, 3, 1, 1))
    first2 = ClassifierFreeGuidance(net, CFG(1.5, channels=2), NULL, pred_channels=3)(x, t, y)
    assert torch.equal(first2[:, 2, 0, 0], y.float())  # channel 3 is the plain conditional output


def test_interval_skips_the_unconditional_call_and_linear_schedule():
    schedule = make_schedule("linear")  # normalised time u = (t + 1) / 1000
    batches = []

    def counting(x, t, y):
        batches.append(len(x))
        return net(x, t, y)

    g = ClassifierFreeGuidance(counting, CFG(3.0, interval=(0.2, 0.6)), NULL, pred_channels=3, schedule=schedule)
    x, y = torch.zeros(4, 3, 1, 1), torch.full((4,), 1)
    for t, guided in [(999.0, False), (599.0, True), (199.0, False), (200.0, True), (100.0, False)]:
        out = g(x, torch.full((4,), t), y)
        expected = 10 + 3.0 * (1 - 10) if guided else 1.0
        assert torch.allclose(out[:, :3], torch.full_like(out[:, :3], expected)), t
        assert batches[-1] == (8 if guided else 4)
    assert batches == [4, 8, 4, 8, 4]  # two guided steps cost two evaluations each, three cost one
    # linear: w - 1 ramps from 0 at the noise end to 2 (w - 1) at the data end
    lin = CFG(2.0, schedule="linear")
    assert torch.allclose(lin.scale_at(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)),
                          torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_interval_is_read_in_genvis_time_for_a_sit_time_network():
    """Schedule "sit": the network (and so the guidance wrapper) sees s = 1 - t; LightningDiT's "no guidance for
    s < 0.11" is the genvis interval [0, 0.89]."""
    g = ClassifierFreeGuidance(net, CFG(3.0, interval=(0.0, 0.89)), NULL, pred_channels=3, schedule=make_schedule("sit"))
    x, y = torch.zeros(4, 3, 1, 1), torch.full((4,), 1)
    for s, guided in [(0.05, False), (0.1, False), (0.12, True), (0.9, True)]:
        out = g(x, torch.full((4,), s), y)
        expected = 10 + 3.0 * (1 - 10) if guided else 1.0
        assert torch.allclose(out[:, :3], torch.full_like(out[:, :3], expected)), s


def test_sample_with_cfg_equals_sampling_the_guided_function():
    schedule = make_schedule("flow")

    def velocity(x, t, y):
        return x * (1 + 0.1 * y.view(-1, 1).float()) - t.view(-1, 1)

    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 3
    out = sample(velocity, noise, sampler="euler", steps=8, schedule=schedule, prediction="velocity", cfg=CFG(2.0),
                 cond={"y": y}, null_label=NULL)

    def guided(x, t):
        c, u = velocity(x, t, y), velocity(x, t, torch.full_like(y, NULL))
        return u + 2.0 * (c - u)

    ref = sample(guided, noise, sampler="euler", steps=8, schedule=schedule, prediction="velocity")
    assert torch.allclose(out, ref, atol=1e-6)


def test_bad_guidance_values():
    with pytest.raises(ValueError, match="t_lo < t_hi"):
        CFG(2.0, interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="constant, linear"):
        CFG(2.0, schedule="cosine")
    with pytest.raises(ValueError, match="null_label"):
        sample(lambda x, t: x, torch.zeros(2, 1), sampler="euler", steps=2, schedule="flow", prediction="velocity", cfg=2.0)
