"""Scheduler parity with Hugging Face diffusers (skipped when torch or diffusers is not installed).

Both sides get the same schedule (npdiff's is built from diffusers' float32 alpha-bar table), the same
state x_t and the same model output at every step, and, for stochastic steps, the same noise (drawn
from a twin of the torch generator diffusers uses). Each step's result must agree within 1e-5; the
state then continues from diffusers' result, so no error accumulates across steps. Everything runs in
float64: diffusers builds its alpha-bar table in float32, and npdiff's schedule is made from those very
values; for DDPM and DDIM the table is then handed back to diffusers in float64, because in float32 its
beta'_t = 1 - abar_t / abar_prev loses about 1e-5 relative at the last steps (measured step differences
up to 8e-5 with the float32 table, 1e-7 and below with float64). DPM-Solver++ keeps its float32 sigmas
(diffusers casts them itself), which still agrees within 1e-5.

Known differences, avoided here on purpose and documented:
- diffusers' DDIMScheduler steps to t - T // n whatever the spacing, so its "linspace" grid is not
  followed by its own steps; parity is checked for "leading" and "trailing" with n dividing T.
- diffusers' DDPMScheduler adds noise at the last step whenever that step's original t > 0 (trailing
  spacing): with fixed-large or learned variance that noise is not zero. npdiff, like Ho et al.'s
  Algorithm 2, adds none at the last step; those combinations are not compared.
- with thresholding, diffusers' DDIM keeps the model's eps unless use_clipped_model_output=True;
  npdiff always re-derives eps from the processed x0 (as improved-diffusion does).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from npdiff.diffusion import Schedule, predict_x0_eps, q_sample, respace, space_timesteps  # noqa: E402
from npdiff.samplers import ddim_step, ddpm_step, dpmpp_2m_step, dynamic_threshold, sample_dpmpp_2m  # noqa: E402

TOL = 1e-5
PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (2, 3, 4, 4)


def model(x, t, prediction, abar_table, learned=False, scale=1.0):
    """A stand-in network: any smooth deterministic function of (x, t) serves as 'the same sequence of
    model outputs'. It is built as a bounded x0 guess, D = scale (0.8 tanh(x) + 0.2 cos(t/200 + x)),
    expressed as eps, x0 or v, so that every implied x0 stays O(1) (an arbitrary eps would imply x0 of
    order 1/alpha = 150 at the top step, where 1e-5 would test float32 round-off, not the method)."""
    abar = abar_table[int(t)]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    x0 = scale * (0.8 * np.tanh(x) + 0.2 * np.cos(t / 200.0 + x))
    eps = (x - alpha * x0) / sigma
    out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]
    if learned:
        out = np.concatenate([out, 0.9 * np.tanh(x - 0.5)], axis=1)
    return out


def npdiff_schedule(scheduler, float64=False) -> Schedule:
    """npdiff's schedule with diffusers' alpha-bar values; optionally give diffusers its table in float64."""
    abar = scheduler.alphas_cumprod.double().numpy()
    if float64:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    return Schedule(1.0 - abar / np.concatenate([[1.0], abar[:-1]]))


def t_(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 10, 50, 333, 1000])
def test_spacing_matches_diffusers(spacing, n):
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=0)
    s.set_timesteps(n)
    assert np.array_equal(s.timesteps.numpy()[::-1], space_timesteps(1000, n, spacing))


def test_q_sample_matches_add_noise():
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2,) + SHAPE)
    t = np.array([3, 777])
    ours = q_sample(npdiff_schedule(s), x0, t, noise)
    theirs = s.add_noise(t_(x0), t_(noise), t_(t)).numpy()
    print(f"q_sample vs add_noise: max |difference| {np.abs(ours - theirs).max():.1e}")
    assert np.abs(ours - theirs).max() < TOL


DDPM_CASES = [(p, v, sp) for p in PRED for v in ["fixed_small", "fixed_large", "learned_range"]
              for sp in ["leading", "linspace", "trailing"] if not (sp == "trailing" and v != "fixed_small")]


@pytest.mark.parametrize("prediction,variance,spacing", DDPM_CASES)
def test_ddpm_steps_match(prediction, variance, spacing):
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=PRED[prediction],
                                variance_type=variance, clip_sample=False, timestep_spacing=spacing, steps_offset=0)
    s.set_timesteps(20)
    ts = s.timesteps.numpy()
    sched = respace(npdiff_schedule(s, float64=True), ts[::-1])
    learned = variance == "learned_range"
    g_theirs, g_ours = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = np.random.default_rng(1).standard_normal(SHAPE)
    worst = 0.0
    for k, t in enumerate(ts):
        i = len(ts) - 1 - k
        out = model(x, t, prediction, sched.base_alphas_cumprod, learned)
        theirs = s.step(t_(out), int(t), t_(x), generator=g_theirs).prev_sample.numpy()
        noise = torch.randn(SHAPE, generator=g_ours, dtype=torch.float64).numpy() if t > 0 else None
        ours, _ = ddpm_step(sched, x, i, out, noise, prediction=prediction, variance=variance)
        worst = max(worst, np.abs(ours - theirs).max())
        x = theirs
    print(f"DDPM {prediction} {variance} {spacing}: max |step difference| {worst:.1e}")
    assert worst < TOL, worst


@pytest.mark.parametrize("prediction", list(PRED))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing,threshold", [("leading", False), ("trailing", False), ("trailing", True)])
def test_ddim_steps_match(prediction, eta, spacing, threshold):
    s = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                prediction_type=PRED[prediction], clip_sample=False, set_alpha_to_one=True,
                                steps_offset=0, timestep_spacing=spacing, thresholding=threshold,
                                dynamic_thresholding_ratio=0.9, sample_max_value=100.0)
    s.set_timesteps(20)
    ts = s.timesteps.numpy()
    sched = respace(npdiff_schedule(s, float64=True), ts[::-1])
    process = (lambda x0: dynamic_threshold(x0, 0.9)) if threshold else None
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPE)
    worst = 0.0
    for k, t in enumerate(ts):
        i = len(ts) - 1 - k
        out = model(x, t, prediction, sched.base_alphas_cumprod, scale=2.5)  # x0 beyond [-1, 1]: thresholding acts
        noise = rng.standard_normal(SHAPE)
        theirs = s.step(t_(out), int(t), t_(x), eta=eta, variance_noise=t_(noise),
                        use_clipped_model_output=threshold).prev_sample.numpy()
        ours, _ = ddim_step(sched, x, i, out, noise, eta=eta, prediction=prediction, process_x0=process)
        worst = max(worst, np.abs(ours - theirs).max())
        x = theirs
    print(f"DDIM {prediction} eta={eta} {spacing} threshold={threshold}: max |step difference| {worst:.1e}")
    assert worst < TOL, worst


@pytest.mark.parametrize("prediction", list(PRED))
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [8, 20])
def test_dpm_solver_pp_2m_steps_and_whole_run_match(prediction, spacing, n):
    kw = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type=PRED[prediction],
              algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True,
              timestep_spacing=spacing, steps_offset=0)
    s = diffusers.DPMSolverMultistepScheduler(**kw)
    s.set_timesteps(n)
    ts = s.timesteps.numpy()
    sched = respace(npdiff_schedule(s), ts[::-1])
    x_T = np.random.default_rng(3).standard_normal(SHAPE)
    x, last, worst = x_T, None, 0.0
    for k, t in enumerate(ts):
        i = len(ts) - 1 - k
        out = model(x, t, prediction, sched.base_alphas_cumprod)
        theirs = s.step(t_(out), int(t), t_(x)).prev_sample.numpy()
        x0, _ = predict_x0_eps(sched, x, i, out, prediction)
        ours = dpmpp_2m_step(sched, x, i, x0, *(last or (None, None)))
        worst = max(worst, np.abs(ours - theirs).max())
        last, x = (x0, i), theirs
    print(f"DPM-Solver++ 2M {prediction} {spacing} n={n}: max |step difference| {worst:.1e}", end="")
    assert worst < TOL, worst
    # the whole sampler, run on its own, against diffusers' whole loop
    s = diffusers.DPMSolverMultistepScheduler(**kw)
    s.set_timesteps(n)
    y = t_(x_T)
    for t in s.timesteps:
        y = s.step(t_(model(y.numpy(), int(t), prediction, sched.base_alphas_cumprod)), t, y).prev_sample
    ours = sample_dpmpp_2m(lambda x, t: model(x, t[0], prediction, sched.base_alphas_cumprod), sched, x_T, None,
                           steps=len(sched), prediction=prediction)
    print(f", whole run {np.abs(ours - y.numpy()).max():.1e}")
    assert np.abs(ours - y.numpy()).max() < TOL
