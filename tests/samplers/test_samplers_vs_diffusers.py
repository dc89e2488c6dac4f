"""genvis DDPM / DDIM against diffusers' schedulers on the same timesteps and the same noise."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from genvis.samplers import sample

SHAPE = (3, 2, 4, 4)


def fake_model(learned: bool):
    """A smooth deterministic 'network' of (x, t): eps-like output, plus variance values in [-1, 1]."""
    w = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1)

    def fn(x, t):
        tt = t.float().view(-1, 1, 1, 1) / 1000
        eps = torch.tanh(x * (0.8 + w) + tt)
        if not learned:
            return eps
        return torch.cat([eps, torch.sin(3 * x + tt).clamp(-1, 1)], dim=1)

    return fn


@pytest.mark.parametrize("learned, variance", [(False, "small"), (False, "large"), (True, "learned")])
def test_ddpm_matches_diffusers_ddpm_on_respaced_grid(learned, variance):
    steps = 25
    timesteps = list(range(999, -1, -40))[:steps]  # a respaced grid: 999, 959, ..., 39
    timesteps[-1] = 0
    model = fake_model(learned)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type={"small": "fixed_small", "large": "fixed_large", "learned": "learned_range"}[variance],
                          clip_sample=False)
    sched.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(1)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(len(x))), t, x, generator=g).prev_sample

    grid = torch.tensor(timesteps + [-1], dtype=torch.float64)
    options = {} if learned else {"variance": variance}
    ours = sample(model, x_T.clone(), sampler="ddpm", steps=steps, schedule="linear", prediction="eps", grid=grid,
                  learn_sigma=learned, generator=torch.Generator().manual_seed(1), **options)
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_ddim_leading(eta):
    """Deterministic and stochastic DDIM, noise for noise (the same generator draws in the same order)."""
    steps = 20
    model = fake_model(False)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(steps)
    x, g = x_T.clone(), torch.Generator().manual_seed(3)
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(len(x))), t, x, eta=eta, generator=g).prev_sample
    grid = torch.tensor(sched.timesteps.tolist() + [-1], dtype=torch.float64)  # 950, 900, ..., 0, clean
    ours = sample(model, x_T.clone(), sampler="ddim", steps=steps, schedule="linear", prediction="eps", grid=grid,
                  eta=eta, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()
