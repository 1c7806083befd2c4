"""Teaching views: pictures of what diffusion does, drawn with PIL alone.

    noising_view      one image noised by q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) at chosen t,
                      one row per beta schedule, the same noise everywhere, so the rows compare schedules
    schedule_curves   abar_t and log10 SNR_t = log10(abar_t / (1 - abar_t)) against t for every schedule
    trajectory_strip  a sampler's walk: x_t (top row) and the network's x_0 estimate (bottom row) at
                      evenly spaced steps, from pure noise on the left to the image on the right

t is the paper's t = 1..T (DESIGN.md's convention: array index t - 1); "t = 0" is the clean image.

Dimension letters: N batch, C channels, H height, W width.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from npdiff.diffusion.forward import q_sample
from npdiff.diffusion.schedule import BETA_SCHEDULES, Schedule
from npdiff.imaging import from_uint8, to_uint8

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
CURVE_COLORS = {"linear": (214, 39, 40), "scaled_linear": (255, 127, 14), "cosine": (31, 119, 180),
                "sigmoid": (44, 160, 44)}
DEFAULT_TIMES = (0, 50, 100, 250, 500, 750, 1000)


def _font():
    return ImageFont.load_default()


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    """(H, W, 3) -> (H*scale, W*scale, 3) by repeating pixels: a small image stays crisp."""
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=_font())
    return right - left


# ----------------------------------------------------------------------------
# the forward process, pictured

def noising_view(image: np.ndarray, times=DEFAULT_TIMES, num_timesteps: int = 1000, seed: int = 0,
                 schedules=BETA_SCHEDULES) -> np.ndarray:
    """(H, W, 3) uint8 -> a (rows, columns) sheet of the image noised at each t by each schedule."""
    x0 = from_uint8(image, np.float64)[None]                       # (1, C, H, W) in [-1, 1]
    noise = np.random.default_rng(seed).standard_normal(x0.shape)  # the same eps for every tile
    scale = max(1, 96 // max(image.shape[:2]))
    th, tw = image.shape[0] * scale, image.shape[1] * scale
    label_w, head_h, foot_h, pad = 96, 18, 26, 6
    width = label_w + len(times) * (tw + pad)
    height = head_h + len(schedules) * (th + foot_h + pad)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, t in enumerate(times):
        draw.text((label_w + c * (tw + pad), 2), f"t = {t}", fill=INK, font=_font())
    for r, name in enumerate(schedules):
        sched = Schedule.from_name(name, num_timesteps)
        y = head_h + r * (th + foot_h + pad)
        draw.text((4, y + th // 2 - 6), name, fill=CURVE_COLORS.get(name, INK), font=_font())
        for c, t in enumerate(times):
            if t == 0:
                x_t, abar = x0, 1.0
            else:
                i = min(int(t), num_timesteps) - 1                  # paper t -> array index
                x_t, abar = q_sample(sched, x0, np.array([i]), noise), float(sched.alphas_cumprod[i])
            x = label_w + c * (tw + pad)
            sheet.paste(Image.fromarray(_upscale(to_uint8(x_t[0]), scale)), (x, y))
            snr = abar / (1.0 - abar) if abar < 1.0 else float("inf")
            draw.text((x, y + th + 1), f"abar {abar:.3f}", fill=INK, font=_font())
            draw.text((x, y + th + 12), f"SNR {snr:.3g}", fill=INK, font=_font())
    return np.asarray(sheet)


# ----------------------------------------------------------------------------
# schedules, plotted

def schedule_curves(num_timesteps: int = 1000, schedules=BETA_SCHEDULES) -> np.ndarray:
    """Two panels side by side: abar_t (linear axis) and log10 SNR_t, for each schedule."""
    tables = {name: Schedule.from_name(name, num_timesteps).alphas_cumprod for name in schedules}
    with np.errstate(divide="ignore"):
        log_snr = {k: np.log10(a) - np.log10(1.0 - a) for k, a in tables.items()}
    lo = max(-8.0, np.floor(min(np.min(v[np.isfinite(v)]) for v in log_snr.values())))
    hi = min(6.0, np.ceil(max(np.max(v[np.isfinite(v)]) for v in log_snr.values())))
    left = _panel(tables, (0.0, 1.0), "alpha-bar (signal kept)", [0.0, 0.25, 0.5, 0.75, 1.0], num_timesteps)
    right = _panel(log_snr, (lo, hi), "log10 SNR = log10(abar / (1 - abar))",
                   list(np.arange(lo, hi + 1, 2.0 if hi - lo > 6 else 1.0)), num_timesteps)
    return np.concatenate([left, right], axis=1)


def _panel(curves: dict, y_range, title: str, y_ticks, T: int, size=(420, 300)) -> np.ndarray:
    w, h = size
    x0, y0, x1, y1 = 48, 24, w - 28, h - 56                         # plot area
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    lo, hi = y_range

    def px(t, v):                                                    # data -> pixel coordinates
        v = min(max(v, lo), hi)
        return x0 + (x1 - x0) * (t - 1) / max(T - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo)

    for v in y_ticks:
        _, y = px(1, v)
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((4, y - 6), f"{v:g}", fill=INK, font=_font())
    for t in np.linspace(0, T, 5):
        x, _ = px(max(t, 1), lo)
        draw.line([(x, y0), (x, y1)], fill=GRID)
        draw.text((x - _text_width(draw, str(int(t))) // 2, y1 + 4), f"{int(t)}", fill=INK, font=_font())
    draw.rectangle([x0, y0, x1, y1], outline=INK)
    draw.text((x0, 6), title, fill=INK, font=_font())
    draw.text(((x0 + x1) // 2 - 4, y1 + 18), "t", fill=INK, font=_font())
    for k, (name, values) in enumerate(curves.items()):
        t = np.arange(1, T + 1)
        ok = np.isfinite(values)
        points = [px(tt, vv) for tt, vv in zip(t[ok], values[ok])]
        color = CURVE_COLORS.get(name, INK)
        draw.line(points, fill=color, width=2)
        lx = x0 + k * ((x1 - x0) // max(len(curves), 1))
        draw.line([(lx, h - 14), (lx + 14, h - 14)], fill=color, width=3)
        draw.text((lx + 18, h - 20), name, fill=INK, font=_font())
    return np.asarray(img)


# ----------------------------------------------------------------------------
# a denoising trajectory

def record_trajectory(pipe, prompt: str, *, seed: int, steps: int, sampler: str, guidance_scale: float,
                      negative_prompt: str = ""):
    """Sample one image and keep every step -> list of (t, x_t (C, H, W), x0_pred (C, H, W)), t the paper's t."""
    from npdiff.pipeline import initial_noise
    from npdiff.samplers import get_sampler
    cfg = pipe.model.config
    x_T = initial_noise([seed], (cfg.unet.in_channels, cfg.resolution, cfg.resolution), pipe.dtype)
    guided = pipe.model_fn([prompt], negative_prompt, guidance_scale)
    last_t = [0]

    def model_fn(x, t):                     # remembers the timestep the sampler asked about
        last_t[0] = int(t[0]) + 1
        return guided(x, t)

    frames = []
    get_sampler(sampler)(model_fn, pipe.schedule, x_T, np.random.default_rng([seed, 1]), steps=steps,
                         prediction=cfg.prediction_type, clip_x0=True,
                         callback=lambda i, x_t, x0: frames.append((last_t[0], x_t[0].copy(), x0[0].copy())))
    return frames


def trajectory_strip(frames, columns: int = 8) -> np.ndarray:
    """Frames from record_trajectory -> a 2-row strip: x_t above, predicted x_0 below, t over each column."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    tile = to_uint8(frames[0][1]).shape
    scale = max(1, 96 // max(tile[:2]))
    th, tw, pad, head, label_w = tile[0] * scale, tile[1] * scale, 6, 18, 64
    sheet = Image.new("RGB", (label_w + len(picks) * (tw + pad), head + 2 * (th + pad)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((4, head + th // 2 - 6), "x_t", fill=INK, font=_font())
    draw.text((4, head + th + pad + th // 2 - 6), "pred x_0", fill=INK, font=_font())
    for c, k in enumerate(picks):
        t, x_t, x0 = frames[k]
        x = label_w + c * (tw + pad)
        draw.text((x, 2), f"t = {t}", fill=INK, font=_font())
        sheet.paste(Image.fromarray(_upscale(to_uint8(x_t), scale)), (x, head))
        sheet.paste(Image.fromarray(_upscale(to_uint8(x0), scale)), (x, head + th + pad))
    return np.asarray(sheet)
