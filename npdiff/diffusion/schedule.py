"""Noise schedules: beta tables, alpha-bar tables and respacing.

Dimensions: T = number of steps of a schedule, T0 = number of steps of the base (training) process.

Index convention (see notes on the internal contract): arrays are 0-based, index i is the paper's
t = i + 1. "Previous" at i = 0 is the clean data, so alphas_cumprod_prev[0] = 1.

Every table is float64 and named after its formula, so that each formula in the rest of the package
fits on one line (the habit of openai/improved-diffusion's gaussian_diffusion.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("linspace", "leading", "trailing")


def make_betas(name: str, num_timesteps: int) -> np.ndarray:
    """Return the (T,) float64 betas of a named schedule with T = num_timesteps steps.

    linear        Ho et al. 2020: 1e-4 .. 0.02 at T = 1000; both ends scaled by 1000/T so that the
                  total noise added (sum of betas) does not depend on T (improved DDPM, Sec. 3.2).
    scaled_linear Stable Diffusion: linear in sqrt(beta) from sqrt(0.00085) to sqrt(0.012), not
                  rescaled with T (as diffusers defines it).
    cosine        Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
                  s = 0.008, and each beta clipped at 0.999 to avoid the singularity at t = T.
    sigmoid       GeoDiff (Xu et al. 2022) as in diffusers: sigmoid(linspace(-6, 6, T)) stretched between
                  the linear schedule's ends (with the same 1000/T scaling).
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {', '.join(BETA_SCHEDULES)}")
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    scale = 1000.0 / T
    beta_start, beta_end = scale * 1e-4, scale * 0.02
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "scaled_linear":
        betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T, dtype=np.float64) ** 2
    elif name == "cosine":
        s = 0.008
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    else:  # sigmoid
        z = np.linspace(-6.0, 6.0, T, dtype=np.float64)
        betas = beta_start + (beta_end - beta_start) / (1.0 + np.exp(-z))
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError(
            f"{name} schedule with T={T} gives betas outside (0, 1] (max {betas.max():.3g}); "
            f"use more timesteps")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", Algorithm 1.

    Shift and scale sqrt(abar) so that the last step has abar = 0 (SNR = 0, pure noise) while the
    first step keeps its value; the betas follow. The last beta becomes 1. Models trained on such a
    schedule must not predict eps (x0 cannot be recovered from eps at SNR 0): use v or x0.
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))  # (T,)
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _table(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete Gaussian diffusion process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    betas      (T,) the process's own betas (for a respaced schedule: beta'_i = 1 - abar_{t_i}/abar_{t_{i-1}}).
    timesteps  (T,) int64, the original 0-based index each step corresponds to; the network is always
               given these. Identity for a base schedule.
    base_alphas_cumprod (T0,) abar of the base process the network was trained on (samplers that pick
               their own noise levels, such as the Karras ones, look them up here).
    """

    betas: np.ndarray
    timesteps: np.ndarray | None = None
    base_alphas_cumprod: np.ndarray | None = None
    # Derived tables (filled in __post_init__), all (T,) float64.
    alphas: np.ndarray = field(init=False, repr=False)
    alphas_cumprod: np.ndarray = field(init=False, repr=False)
    alphas_cumprod_prev: np.ndarray = field(init=False, repr=False)
    sqrt_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    log_one_minus_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recip_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    sqrt_recipm1_alphas_cumprod: np.ndarray = field(init=False, repr=False)
    posterior_variance: np.ndarray = field(init=False, repr=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False)
    log_betas: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        betas = np.asarray(self.betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"betas must lie in (0, 1], got min {betas.min():.3g} max {betas.max():.3g}")
        T = len(betas)
        ts = np.arange(T, dtype=np.int64) if self.timesteps is None else np.asarray(self.timesteps)
        if ts.shape != (T,) or np.any(np.diff(ts) <= 0):
            raise ValueError(f"timesteps must be {T} strictly increasing integers, got {ts!r}")
        ts = ts.astype(np.int64)
        ts.setflags(write=False)
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        base = abar if self.base_alphas_cumprod is None else self.base_alphas_cumprod
        set_ = lambda name, value: object.__setattr__(self, name, _table(value))  # noqa: E731
        object.__setattr__(self, "timesteps", ts)
        set_("betas", betas)
        set_("base_alphas_cumprod", base)
        set_("alphas", alphas)
        set_("alphas_cumprod", abar)
        set_("alphas_cumprod_prev", abar_prev)
        with np.errstate(divide="ignore"):  # abar = 0 at the end of a zero-terminal-SNR schedule
            set_("sqrt_alphas_cumprod", np.sqrt(abar))
            set_("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - abar))
            set_("log_one_minus_alphas_cumprod", np.log(1.0 - abar))
            set_("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / abar))
            set_("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / abar - 1.0))
            set_("log_betas", np.log(betas))
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t) (Ho et al. 2020, eq. 6-7).
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        set_("posterior_variance", posterior_variance)
        # beta~ is 0 at the first step; its log is clipped to the next value (improved DDPM) so that
        # learned-range interpolation stays finite.
        first = posterior_variance[1] if T > 1 else betas[0]
        set_("posterior_log_variance_clipped", np.log(np.concatenate([[first], posterior_variance[1:]])))
        set_("posterior_mean_coef1", betas * np.sqrt(abar_prev) / (1.0 - abar))
        set_("posterior_mean_coef2", (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar))

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def num_train_timesteps(self) -> int:
        """T0, the number of steps of the base process the network was trained on."""
        return len(self.base_alphas_cumprod)

    @classmethod
    def from_name(cls, name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> "Schedule":
        betas = make_betas(name, num_timesteps)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)


def space_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace") -> np.ndarray:
    """Pick num_steps of the num_timesteps 0-based indices; returns them ascending, int64.

    linspace  round(linspace(0, T-1, n)): keeps both the first and the last step.
    leading   0, T//n, 2 T//n, ...: evenly strided from the start; does not reach t = T (DDIM's and
              Stable Diffusion's original choice).
    trailing  round(T - k T/n) - 1 for k = 0..n-1: evenly strided from the end, so sampling starts at
              t = T (Lin et al. 2023, Sec. 3.3).
    """
    T, n = int(num_timesteps), int(num_steps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    if not 1 <= n <= T:
        raise ValueError(f"cannot take {num_steps} steps from a {T}-step schedule; use 1..{T} steps")
    if spacing == "linspace":
        ts = np.round(np.linspace(0, T - 1, n))
    elif spacing == "leading":
        ts = np.arange(n) * (T // n)
    else:
        ts = np.round(np.arange(T, 0, -T / n))[:n] - 1
    ts = np.unique(ts.astype(np.int64))
    assert len(ts) == n, (T, n, spacing)
    return ts


def respace(schedule: Schedule, use_timesteps) -> Schedule:
    """The process that visits only the steps use_timesteps (indices into this schedule, any order).

    Skipping steps is a change of schedule (improved DDPM, Sec. 4): the kept steps keep their abar,
    so beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}, and every sampler runs unchanged on the result.
    The network still receives the original timesteps (schedule.timesteps[use_timesteps]).

    beta'_i is computed as 1 - prod(1 - beta_s) over the steps s in (t_{i-1}, t_i], written
    -expm1(sum log1p(-beta_s)): the ratio of abar values carries only absolute precision (about 1e-16),
    which for a beta of 4e-5 (the cosine schedule's first steps) is a relative error of several 1e-12;
    this form keeps every beta' to a few ulps relative, so keeping every step gives back the schedule.
    """
    use = np.unique(np.asarray(use_timesteps, dtype=np.int64))
    if len(use) == 0 or use[0] < 0 or use[-1] >= len(schedule):
        raise ValueError(f"use_timesteps must be non-empty indices in [0, {len(schedule)}), got {use_timesteps!r}")
    with np.errstate(divide="ignore"):  # beta = 1 (zero terminal SNR): log1p(-1) = -inf, beta' = 1
        log_alphas = np.log1p(-schedule.betas[:use[-1] + 1])  # (t_max + 1,)
    starts = np.concatenate([[0], use[:-1] + 1])  # segment i is the steps (t_{i-1}, t_i]
    betas = -np.expm1(np.add.reduceat(log_alphas, starts))  # (T',)
    return Schedule(betas, timesteps=schedule.timesteps[use], base_alphas_cumprod=schedule.base_alphas_cumprod)
