"""Synthetic endoscopy-like photos with polyp masks: the 2D RGB sample shipped with samnnu.

Each photo is an RGB image of a pinkish, textured mucosa-like background with a gradient and
vignetting, holding one reddish elliptical "polyp" with soft shading. Its mask is 0/255 and both are
saved as JPEG, as many public polyp datasets store them (so the masks are noisy around 0 and 255).
Everything is generated from a seed: no real patient data, nothing to license beyond samnnu's own.

    python -m samnnu.dataset_conversion.synthetic_photos OUT_FOLDER [--cases 20] [--size 96] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_photo(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """One (photo (H, W, 3) uint8, mask (H, W) uint8 in {0, 255}) pair."""
    yy, xx = np.mgrid[:size, :size].astype(float) / size
    # background: pink mucosa with a lighting gradient, blotchy texture and a dark vignette
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.75 + 0.25 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))
    texture = np.zeros((size, size))
    for scale in (4, 8, 16):
        coarse = rng.random((scale, scale))
        texture += np.kron(coarse, np.ones((size // scale + 1, size // scale + 1)))[:size, :size] / scale
    vignette = 1 - 0.6 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    base = np.array([205.0, 120.0, 125.0]) + rng.normal(0, 8, 3)
    photo = base * (light * vignette)[..., None] * (0.85 + 0.3 * texture[..., None] / texture.max())
    # the polyp: a rotated ellipse, redder and shaded like a dome
    cy, cx = rng.uniform(0.3, 0.7, 2)
    ry, rx = rng.uniform(0.09, 0.2, 2)
    t = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / rx
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / ry
    r2 = u ** 2 + v ** 2
    inside = r2 <= 1
    dome = np.clip(1 - r2, 0, 1) ** 0.5
    polyp = np.array([185.0, 70.0, 65.0]) + rng.normal(0, 10, 3)
    shade = (0.8 + 0.35 * dome)[..., None] * polyp
    photo = np.where(inside[..., None], shade, photo) + rng.normal(0, 4, (size, size, 3))
    return np.clip(photo, 0, 255).astype(np.uint8), (inside * 255).astype(np.uint8)


def write_sample(out: str | Path, cases: int = 20, size: int = 96, seed: int = 0) -> Path:
    """Write ``out/images/photoNN.jpg`` and ``out/masks/photoNN.jpg``; returns ``out``."""
    from PIL import Image  # local: only the generator needs it

    out = Path(out)
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        photo, mask = make_photo(rng, size)
        Image.fromarray(photo).save(out / "images" / f"photo{i:02d}.jpg", quality=90)
        Image.fromarray(mask).save(out / "masks" / f"photo{i:02d}.jpg", quality=75)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m samnnu.dataset_conversion.synthetic_photos",
                                description="Write synthetic endoscopy-like photos with JPEG polyp masks.")
    p.add_argument("out")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_sample(args.out, args.cases, args.size, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
