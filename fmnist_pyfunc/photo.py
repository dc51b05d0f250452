"""From a photo or a product shot to what the network was trained on: a light garment on black, trimmed to
the garment, its longer side scaled to 28 pixels, centred on a 28x28 canvas (Zalando's own steps).

A phone photo's background is not one grey: light falls off across it, the garment casts a shadow, the
sensor adds noise and JPEG its blocks. So the background is modelled as what it is, a smooth surface:
a quadratic in x and y fitted, robustly, to the frame's border (garments may touch the border; the fit
drops what does not look like surface). On a light surface the garment is what is darker than the surface
*relative to it* (1 - photo / surface: the same for a garment in full light and in a dim corner); on a dark
one, what is brighter. The garment's extent is where that contrast rises above both the noise (measured on
the border) and a share of the garment's own contrast (a soft shadow stays below it). Transparent cut-outs
need no model: they are placed on black or white, the one their fringe shows they were cut from.

numpy and Pillow only; a few milliseconds per image at WORK_SIDE (contract.py): docs/benchmarks.md, Photos as
people take them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from fmnist_pyfunc.data import IMAGE_SIZE

PIXEL_MAX = 255.0
UINT16_MAX = 65535.0
BORDER_FRACTION = 0.03    # of the shorter side: the band of the frame that samples the surface
MIN_BORDER_PIXELS = 2
MAX_FIT_SAMPLES = 4000    # border pixels used for the fit: more changes nothing but the time
FIT_ROUNDS = 3            # robust refits, each dropping pixels far from the last surface
OUTLIER_SIGMAS = 3.0      # "far": beyond this many noise sigmas (garment, shadow, a stray object)
CURVE_SLACK = 0.04        # plus this share of the surface's level: light falls off in curves, not planes
MIN_INLIERS = 50          # border pixels on the surface needed to fit its 6 terms with confidence
RIDGE = 1e-3              # keeps the 6x6 normal equations solvable when the inliers lie on one edge
MIN_SIGMA = 1.0           # grey levels: a synthetic, noiseless background still has quantisation
MAD_TO_SIGMA = 1.4826     # median absolute deviation -> standard deviation for Gaussian noise
NOISE_SIGMAS = 4.0        # garment contrast must beat the noise by this much
SHADOW_SHARE = 0.3        # and reach this share of the garment's strongest contrast: soft shadows
                          # (25-45 % darker at their core, blurred) mostly stay below it
MASK_BLUR = 0.01          # of the shorter side: smooths noise out of the garment mask
MASK_GROW = 5             # pixels the mask grows by before the rest is set to black: keeps soft edges
CONTRAST_PERCENTILE = 99  # of the garment's pixels, mapped to white (the dataset's garments reach 255)
MIN_FOREGROUND = 12       # grey levels: below this nothing is garment (JPEG noise on clean shots ~5)
CUTOUT_OPAQUE = 250       # alpha at or above this everywhere: the image has an alpha channel, not a cut-out
FRINGE_FRACTION = 0.03    # of the shorter side: the band inside a cut-out's outline that shows its old background
HALF_OPAQUE = 0.5         # alpha: more garment than background (soft matte edges count to the nearer side)
FRINGE_TIE = 2.0          # grey levels: fringe and inside closer than this say nothing (a flat cut-out)


def _cutout(image: Image.Image) -> np.ndarray | None:
    """A transparent cut-out as contrast (garment > 0, background 0), or None when nothing is transparent.

    A cut-out's fringe keeps the tone of the background it was shot or drawn on (anti-aliasing, matting),
    and that is the background against which the garment has its contrast: a fringe darker than the
    garment's inside means a light garment, placed on black; a lighter one, a dark garment, placed on white
    and negated. (The mean tone decided it before: right for 2 cut-outs in 3, against ~97 % for the fringe.)
    """
    if not (image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)):
        return None
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba, dtype=np.float32)[..., 3] / PIXEL_MAX
    if alpha.min() * PIXEL_MAX >= CUTOUT_OPAQUE:
        return None
    grey = np.asarray(rgba.convert("L"), dtype=np.float32)
    opaque = alpha > HALF_OPAQUE
    fringe = opaque & _grow(~opaque, max(1, round(FRINGE_FRACTION * min(grey.shape))))
    inside = opaque & ~fringe
    lift = float(grey[inside].mean() - grey[fringe].mean()) if inside.any() and fringe.any() else 0.0
    own_tone = (alpha * grey).sum() / max(alpha.sum(), 1e-6)  # decides for a flat cut-out
    light = lift > 0 if abs(lift) > FRINGE_TIE else own_tone > PIXEL_MAX / 2
    return alpha * (grey if light else PIXEL_MAX - grey)


def _grey(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit grey: Pillow's convert("L") clips
        values = np.asarray(image, dtype=np.float32)
        peak = UINT16_MAX if image.mode.startswith("I;16") else max(float(values.max()), PIXEL_MAX)
        return values * (PIXEL_MAX / peak)
    return np.asarray(image.convert("L"), dtype=np.float32)


def _terms(ys: np.ndarray, xs: np.ndarray) -> list[np.ndarray]:
    """The quadratic surface's terms at normalised coordinates (-1..1)."""
    return [np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys]


def _corners(grey: np.ndarray, band: int) -> tuple[np.ndarray, float]:
    """Median of each corner square (top-left, top-right, bottom-left, bottom-right) and the noise sigma in
    them: the frame's corners are background far more often than any other part of it."""
    squares = [grey[:band, :band], grey[:band, -band:], grey[-band:, :band], grey[-band:, -band:]]
    medians = np.array([np.median(q) for q in squares])
    spread = np.concatenate([np.abs(q - m).ravel() for q, m in zip(squares, medians, strict=True)])
    return medians, max(MIN_SIGMA, MAD_TO_SIGMA * float(np.median(spread)))


def _bilinear(corners: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The surface through the four corner values (top-left, top-right, bottom-left, bottom-right) at
    normalised coordinates (-1..1)."""
    (tl, tr, bl, br), x, y = corners, (xs + 1) / 2, (ys + 1) / 2
    return tl * (1 - x) * (1 - y) + tr * x * (1 - y) + bl * (1 - x) * y + br * x * y


def _border_samples(height: int, width: int, band: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of about MAX_FIT_SAMPLES pixels spread evenly over the frame's border band."""
    step = max(1, -(-2 * band * (height + width) // MAX_FIT_SAMPLES))
    rows = np.r_[np.arange(band), np.arange(height - band, height)]
    cols = np.r_[np.arange(band), np.arange(width - band, width)]
    top_bottom = np.meshgrid(rows, np.arange(0, width, step), indexing="ij")
    left_right = np.meshgrid(np.arange(0, height, step), cols, indexing="ij")
    return (np.concatenate([top_bottom[0].ravel(), left_right[0].ravel()]),
            np.concatenate([top_bottom[1].ravel(), left_right[1].ravel()]))


def fit_surface(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """The background as a smooth surface over the whole frame, and the noise sigma on it (grey levels).

    Starts from the plane through the four corners' medians, keeps the border pixels that lie on it (a
    garment touching the border does not), and refits a quadratic to those, FIT_ROUNDS times."""
    height, width = grey.shape
    band = max(MIN_BORDER_PIXELS, round(BORDER_FRACTION * min(height, width)))
    band = max(1, min(band, height // 2, width // 2))  # a tiny or a sliver of an image is all border
    ys, xs = _border_samples(height, width, band)
    values = grey[ys, xs].astype(np.float64)
    ys, xs = ys / max(height - 1, 1) * 2 - 1, xs / max(width - 1, 1) * 2 - 1
    design = np.stack(_terms(ys, xs), axis=1).astype(np.float64)
    medians, sigma = _corners(grey, band)
    surface_at_border = _bilinear(medians, ys, xs)
    coefficients = None
    for _ in range(FIT_ROUNDS):
        inliers = np.abs(values - surface_at_border) <= OUTLIER_SIGMAS * sigma + CURVE_SLACK * medians.max()
        if inliers.sum() < MIN_INLIERS:
            break
        a = design[inliers]
        coefficients = np.linalg.solve(a.T @ a + RIDGE * np.eye(a.shape[1]), a.T @ values[inliers])
        surface_at_border = design @ coefficients
        sigma = max(MIN_SIGMA, MAD_TO_SIGMA * float(np.median(np.abs((values - surface_at_border)[inliers]))))
    grid_y = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    grid_x = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    if coefficients is None:  # too little of the border is background: the corners' plane
        return _bilinear(medians, grid_y, grid_x), sigma
    return sum(c * t for c, t in zip(coefficients.astype(np.float32), _terms(grid_y, grid_x), strict=True)), sigma


def contrast(image: Image.Image) -> tuple[np.ndarray, float, float]:
    """Garment contrast (0 = background, larger = more garment, 0-255 scale), the noise floor above which a
    pixel may be garment, and the share of the garment's peak contrast it must also reach (shadows)."""
    cutout = _cutout(image)
    if cutout is not None:
        return cutout, MIN_FOREGROUND, 0.0  # no surface, no shadow
    grey = _grey(image)
    surface, sigma = fit_surface(grey)
    level = float(np.median(surface))
    if level > PIXEL_MAX / 2:  # a light surface: the garment is what is darker than it, relative to it
        surface = np.maximum(surface, 1.0)
        garment, noise, shadow_share = PIXEL_MAX * (1 - grey / surface), PIXEL_MAX * sigma / level, SHADOW_SHARE
    else:  # a dark one (a scan, the dataset's own images): what is brighter; no shadow shows on it
        garment, noise, shadow_share = grey - surface, sigma, 0.0
    garment = np.clip(garment, 0, PIXEL_MAX)
    return garment, max(MIN_FOREGROUND, NOISE_SIGMAS * noise), shadow_share


def _smooth(values: np.ndarray, radius: float) -> np.ndarray:
    blurred = Image.fromarray(np.rint(values).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(blurred, dtype=np.float32)


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.BoxBlur(pixels))  # a fast dilation
    return np.asarray(grown) > 0


def to_pixels(image: Image.Image) -> np.ndarray:
    """Any decoded image -> float32 (28, 28), 0-255, light garment on black, trimmed, scaled and centred."""
    garment, floor, shadow_share = contrast(image)
    smoothed = _smooth(garment, max(1.0, MASK_BLUR * min(garment.shape)))
    mask = smoothed > max(floor, shadow_share * float(smoothed.max()))  # the garment's extent
    if mask.any():
        garment = np.where(_grow(smoothed > floor, MASK_GROW), garment, 0)  # noise off the garment to black
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        garment = garment[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        white = np.percentile(garment[mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]], CONTRAST_PERCENTILE)
        garment = np.clip(garment * (PIXEL_MAX / max(white, 1.0)), 0, PIXEL_MAX)
    return _centred(garment)


def _centred(garment: np.ndarray) -> np.ndarray:
    """Longer side to 28 pixels, on a black 28x28 canvas, centred."""
    height, width = garment.shape
    scale = IMAGE_SIZE / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = Image.fromarray(garment.astype(np.uint8)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    top, left = (IMAGE_SIZE - new_h) // 2, (IMAGE_SIZE - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = np.asarray(resized, dtype=np.float32)
    return canvas
