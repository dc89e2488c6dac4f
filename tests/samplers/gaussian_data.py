"""Gaussian data x0 ~ N(M, S^2) per dimension: the exact network and the exact PF-ODE solution.

The exact denoiser is D(x_t) = E[x0 | x_t] = M + alpha S^2 (x_t - alpha M) / (alpha^2 S^2 + sigma^2), and
the probability-flow ODE keeps xi = (x_t - alpha M) / sqrt(alpha^2 S^2 + sigma^2) constant, so
x_t = alpha M + sqrt(alpha^2 S^2 + sigma^2) xi. ODE solvers end with the x0 jump from their last
evaluation time t_1 (a fixed first-order error); convergence orders are measured at t_1 through the
exact denoiser, D(x_solver(t_1)) against D(x_exact(t_1)) = exact_x0_at(..., t_1).
"""
import math

import torch

from genvis.diffusion.predictions import target

M, S = 0.3, 0.5


def _alpha_sigma(schedule, t):
    return (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))


def exact_model(schedule, prediction):
    """The exact network output of type `prediction` for N(M, S^2) data; t in the network's units (schedule "sit":
    SiT's s = 1 - t, whose velocity is d x / ds = x0 - eps, the negative of d x / dt)."""
    sit = schedule.name == "sit"

    def fn(x, t, **_):
        view = (-1,) + (1,) * (x.ndim - 1)
        t = 1.0 - t.double() if sit else t.double()
        alpha, sigma = (v.float().view(view) for v in schedule.alpha_sigma(t))
        x0 = M + alpha * S**2 * (x - alpha * M) / (alpha**2 * S**2 + sigma**2)
        eps = (x - alpha * x0) / sigma
        if prediction == "velocity":
            da, ds = (v.float().view(view) for v in schedule.alpha_sigma_derivatives(t))
            if sit:
                da, ds = -da, -ds
            return target(prediction, x0, eps, alpha, sigma, da, ds)
        return target(prediction, x0, eps, alpha, sigma)

    return fn


def exact_ode(schedule, x_T, t_T: float, t: float):
    """The PF-ODE solution at t from x_T at t_T (float64)."""
    a_T, s_T = _alpha_sigma(schedule, t_T)
    a, s = _alpha_sigma(schedule, t)
    xi = (x_T.double() - a_T * M) / math.sqrt(a_T**2 * S**2 + s_T**2)
    return a * M + math.sqrt(a**2 * S**2 + s**2) * xi


def exact_solution(schedule, x_T, t_T: float = None):
    """The PF-ODE solution at the data end from x_T at t_T (default: the noise end)."""
    return exact_ode(schedule, x_T, schedule.noise_end if t_T is None else t_T, schedule.data_end)


def exact_denoiser(schedule, x, t: float):
    a, s = _alpha_sigma(schedule, t)
    return M + a * S**2 * (x - a * M) / (a**2 * S**2 + s**2)


def exact_x0_at(schedule, x_T, t_T: float, t: float):
    """D(exact PF-ODE solution at t, t) for the trajectory through x_T at t_T (float64)."""
    return exact_denoiser(schedule, exact_ode(schedule, x_T, t_T, t), t)
