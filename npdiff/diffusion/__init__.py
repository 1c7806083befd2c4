"""The mathematics of Gaussian diffusion, with no neural network: schedules, the forward process,
the reverse step, the variational bound, training losses and exact denoisers for Gaussian data."""

from .forward import (Prediction, Variance, as_prediction, as_variance, extract, predict_eps_from_v,
                      predict_eps_from_x0, predict_x0_eps, predict_x0_from_eps, predict_x0_from_v,
                      prediction_target, q_mean_variance, q_posterior_mean_variance, q_sample, score_from_eps,
                      snr, v_from_eps_x0, x0_eps_from_prediction)
from .gaussian import (calc_bpd, discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl,
                       prior_bpd, vlb_term_bpd)
from .losses import min_snr_weight, training_loss
from .oracle import GaussianMixture, make_denoiser, posterior_mean_cov
from .reverse import model_variance, p_mean_variance, split_model_output
from .schedule import (BETA_SCHEDULES, SPACINGS, Schedule, make_betas, respace, rescale_zero_terminal_snr,
                       space_timesteps)

__all__ = [
    "BETA_SCHEDULES", "SPACINGS", "Schedule", "make_betas", "respace", "rescale_zero_terminal_snr",
    "space_timesteps", "Prediction", "Variance", "as_prediction", "as_variance", "extract", "q_sample",
    "q_mean_variance", "q_posterior_mean_variance", "predict_x0_eps", "x0_eps_from_prediction",
    "predict_x0_from_eps", "predict_eps_from_x0", "predict_x0_from_v", "predict_eps_from_v", "v_from_eps_x0",
    "prediction_target", "score_from_eps", "snr", "normal_kl", "gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood", "prior_bpd", "vlb_term_bpd", "calc_bpd", "min_snr_weight",
    "training_loss", "GaussianMixture", "make_denoiser", "posterior_mean_cov", "model_variance",
    "p_mean_variance", "split_model_output",
]
