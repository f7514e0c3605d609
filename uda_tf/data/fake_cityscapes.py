r"""Writes a small synthetic dataset in the official Cityscapes folder layout.

    python -m uda_tf.data.fake_cityscapes --output_dir=/tmp/fake_cityscapes

gives, with real Cityscapes labelIds (void ids included: ego vehicle at the
bottom, unlabeled borders and patches, static objects):

    leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
    gtFine/{train,val}/{city}/{city}_{seq:06d}_000019_gtFine_labelIds.png
    leftImg8bit_trainextra/leftImg8bit/train_extra/{city}/..._leftImg8bit.png

Scenes are street-like (sky over buildings over road and sidewalk; cars,
people, poles with signs or lights, trees, terrain), with class-consistent
colours plus texture, lighting and colour noise, and a new layout per image,
so that a small network learns them in a few hundred steps. This is a data
generator tool, not part of the training pipeline: it draws with numpy's
seeded generator, one per image, so the same seed writes the same bytes.
"""

import os

import numpy as np
from absl import app, flags, logging
from PIL import Image

CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "train_extra": ("augsburg", "bad-honnef", "bamberg"),
}
_SPLIT_INDEX = {"train": 0, "val": 1, "train_extra": 2}

# Base colour (RGB) of each labelId drawn here.
_COLOURS = {
    0: (10, 10, 12),  # unlabeled
    1: (35, 35, 40),  # ego vehicle
    4: (115, 90, 60),  # static
    7: (84, 80, 96),  # road
    8: (170, 150, 155),  # sidewalk
    11: (150, 120, 98),  # building
    17: (150, 150, 140),  # pole
    19: (40, 40, 35),  # traffic light
    20: (225, 200, 30),  # traffic sign
    21: (60, 115, 40),  # vegetation
    22: (150, 175, 95),  # terrain
    23: (105, 155, 215),  # sky
    24: (190, 40, 70),  # person
    26: (30, 45, 140),  # car
}
_CAR_COLOURS = ((30, 45, 140), (25, 30, 90), (40, 60, 170))


class _Canvas:
    """A labelId map and its base colours, painted together."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.h, self.w = height, width
        self.label = np.full([height, width], 23, np.uint8)
        self.colour = np.empty([height, width, 3], np.float32)
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        # Per-image colour jitter of each class, the same for all its pixels.
        self.jitter = {k: rng.uniform(0.88, 1.12, 3) for k in _COLOURS}

    def col(self, label_id: int, colour=None) -> np.ndarray:
        base = np.asarray(colour if colour is not None else _COLOURS[label_id], np.float32)
        return base * self.jitter[label_id]

    def paint(self, mask, label_id: int, colour=None) -> None:
        self.label[mask] = label_id
        self.colour[mask] = self.col(label_id, colour)

    def rect(self, y0, y1, x0, x1, label_id: int, colour=None) -> None:
        y0, y1 = int(max(0, y0)), int(min(self.h, y1))
        x0, x1 = int(max(0, x0)), int(min(self.w, x1))
        if y1 > y0 and x1 > x0:
            self.label[y0:y1, x0:x1] = label_id
            self.colour[y0:y1, x0:x1] = self.col(label_id, colour)

    def ellipse(self, cy, cx, ry, rx, label_id: int, colour=None) -> None:
        y0, y1 = int(max(0, cy - ry)), int(min(self.h, cy + ry + 1))
        x0, x1 = int(max(0, cx - rx)), int(min(self.w, cx + rx + 1))
        if y1 <= y0 or x1 <= x0:
            return
        yy, xx = self.yy[y0:y1, x0:x1], self.xx[y0:y1, x0:x1]
        inside = ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0
        self.label[y0:y1, x0:x1][inside] = label_id
        self.colour[y0:y1, x0:x1][inside] = self.col(label_id, colour)


def _background(c: _Canvas, horizon: int) -> tuple[float, np.ndarray]:
    """Sky, skyline, road, sidewalk and terrain; returns the road centre line."""
    rng, h, w = c.rng, c.h, c.w
    sky = c.col(23)
    fade = np.clip(c.yy[:horizon, :, None] / max(horizon, 1), 0, 1)
    c.colour[:horizon] = sky * (1 - 0.35 * fade) + np.float32([200, 210, 225]) * 0.35 * fade
    x = 0
    while x < w:  # Building blocks, each its own shade, with windows.
        bw = int(rng.uniform(0.06, 0.22) * w) + 1
        if rng.uniform() < 0.85:
            top = horizon - rng.uniform(0.12, 0.4) * h
            shade = np.float32(_COLOURS[11]) * rng.uniform(0.75, 1.2)
            c.rect(top, horizon, x, x + bw, 11, shade)
            step = max(3, int(h / 40))
            ys, xs = int(max(0, top)), x
            win = ((c.yy[ys:horizon, xs : xs + bw] % (2 * step)) < step) & (
                (c.xx[ys:horizon, xs : xs + bw] % (2 * step)) < step
            )
            c.colour[ys:horizon, xs : xs + bw][win] *= 0.6
        x += bw
    vx = rng.uniform(0.35, 0.65) * w
    spread = rng.uniform(0.35, 0.6) * w
    depth = np.clip((c.yy - horizon) / max(h - horizon, 1), 0, None)
    centre = vx + rng.uniform(-0.15, 0.15) * w * depth
    ground = c.yy >= horizon
    dist = np.abs(c.xx - centre)
    road = ground & (dist < spread * depth + 1)
    walk = ground & ~road & (dist < (spread + rng.uniform(0.1, 0.3) * w) * depth + 2)
    c.paint(ground, 22)
    c.paint(walk, 8)
    c.paint(road, 7)
    # Lane dashes: road labels, bright colour.
    dash = road & (np.abs(c.xx - centre) < 0.01 * w * depth + 0.5) & ((c.yy // 6) % 2 == 0)
    c.colour[dash] = np.float32([225, 225, 215])
    return vx, depth


def _objects(c: _Canvas, horizon: int) -> None:
    """Trees, poles with signs or lights, cars, people, static objects."""
    rng, h, w = c.rng, c.h, c.w
    for _ in range(rng.integers(1, 4)):  # Trees: crowns over the skyline.
        r = rng.uniform(0.05, 0.12) * h
        c.ellipse(horizon - rng.uniform(0.3, 1.2) * r, rng.uniform(0, w), r, r * 1.3, 21)
    for _ in range(rng.integers(0, 3)):  # Poles on the sidewalk.
        x, base = rng.uniform(0, w), horizon + rng.uniform(0.05, 0.3) * h
        ph, pw = (base - horizon) * 2.5 + 0.15 * h, max(1.0, w / 220)
        c.rect(base - ph, base, x, x + pw, 17)
        sign = 20 if rng.uniform() < 0.6 else 19
        sh = max(3.0, 0.05 * h)
        c.rect(base - ph, base - ph + sh, x - sh / 2, x + sh / 2 + pw, sign)
        if sign == 19:
            c.ellipse(base - ph + sh / 2, x + pw / 2, sh / 5, sh / 5, 19, (250, 170, 30))
    objs = [(horizon + rng.uniform(0.08, 0.45) * h, "car") for _ in range(rng.integers(0, 4))]
    objs += [(horizon + rng.uniform(0.05, 0.4) * h, "person") for _ in range(rng.integers(0, 4))]
    objs += [(horizon + rng.uniform(0.02, 0.2) * h, "static") for _ in range(rng.integers(0, 2))]
    for base, kind in sorted(objs):  # Far objects first, near ones on top.
        size = (base - horizon) / max(h - horizon, 1)
        x = rng.uniform(0.05, 0.95) * w
        if kind == "car":
            cw, ch = (0.25 + 0.55 * size) * w * 0.45, (0.25 + 0.55 * size) * w * 0.2
            colour = _CAR_COLOURS[rng.integers(len(_CAR_COLOURS))]
            c.rect(base - ch * 0.6, base, x - cw / 2, x + cw / 2, 26, colour)
            c.rect(base - ch, base - ch * 0.55, x - cw / 3, x + cw / 3, 26, (60, 80, 110))
            for wx in (x - cw / 3, x + cw / 3):
                c.ellipse(base - ch * 0.05, wx, ch * 0.18, ch * 0.18, 26, (15, 15, 15))
        elif kind == "person":
            ph = (0.08 + 0.4 * size) * h
            c.rect(base - ph * 0.8, base, x - ph / 8, x + ph / 8, 24)
            c.ellipse(base - ph * 0.88, x, ph * 0.1, ph * 0.08, 24, (225, 180, 150))
        else:
            sh = (0.05 + 0.2 * size) * h
            c.rect(base - sh, base, x - sh, x + sh, 4)


def _voids(c: _Canvas) -> None:
    """Ego vehicle at the bottom, unlabeled border and patch."""
    rng, h, w = c.rng, c.h, c.w
    ego = rng.uniform(0.06, 0.11) * h
    hood = h - ego + 0.5 * ego * ((c.xx - w / 2) / (w / 2)) ** 2
    c.paint(c.yy >= hood, 1)
    border = int(rng.integers(0, max(2, w // 64)))
    if border:
        c.rect(0, h, 0, border, 0)
    if rng.uniform() < 0.7:
        py, px = rng.uniform(0.2, 0.8) * h, rng.uniform(0, w)
        c.ellipse(py, px, 0.03 * h, 0.05 * w, 0)


def render_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic street scene.

    Args:
      rng: numpy generator; the scene is a function of its state.
      height, width: image size in pixels.

    Returns:
      (image uint8 [height, width, 3], label_ids uint8 [height, width]),
      labelIds from the official Cityscapes table.
    """
    c = _Canvas(rng, height, width)
    horizon = int(rng.uniform(0.38, 0.52) * height)
    _background(c, horizon)
    _objects(c, horizon)
    _voids(c)
    # Texture (smooth blotches), lighting (level and side gradient), noise.
    small = rng.standard_normal((height // 16 + 2, width // 16 + 2)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))
    light = rng.uniform(0.7, 1.2) * (1 + rng.uniform(-0.3, 0.3) * (c.xx / width - 0.5))
    image = c.colour * (light * (1 + 0.08 * blotch))[..., None] * rng.uniform(0.93, 1.07, 3)
    image += rng.standard_normal(image.shape, dtype=np.float32) * 6.0
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), c.label


def _stem(split: str, index: int) -> tuple[str, str]:
    cities = CITIES[split]
    city = cities[index % len(cities)]
    return city, f"{city}_{index // len(cities):06d}_000019"


def _write(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def generate(
    output_dir: str,
    *,
    num_train: int = 24,
    num_val: int = 8,
    num_extra: int = 24,
    height: int = 256,
    width: int = 512,
    seed: int = 0,
) -> dict[str, int]:
    """Writes the tree under `output_dir`; returns the number of images per split.

    Raises:
      ValueError: on a negative count or a size under 16x16.
    """
    counts = {"train": num_train, "val": num_val, "train_extra": num_extra}
    for flag, n in (("num_train", num_train), ("num_val", num_val), ("num_extra", num_extra)):
        if n < 0:
            raise ValueError(f"--{flag}={n} is invalid: expected >= 0.")
    if height < 16 or width < 16:
        raise ValueError(f"Images must be at least 16x16, got {height}x{width}.")
    for split, n in counts.items():
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLIT_INDEX[split], i])
            image, label_ids = render_scene(rng, height, width)
            city, stem = _stem(split, i)
            if split == "train_extra":
                root = os.path.join(output_dir, "leftImg8bit_trainextra", "leftImg8bit")
                _write(os.path.join(root, split, city, f"{stem}_leftImg8bit.png"), image)
                continue
            _write(
                os.path.join(output_dir, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"),
                image,
            )
            gt = os.path.join(output_dir, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
            _write(gt, label_ids)
    logging.info("Wrote %s images of %dx%d to %s.", counts, height, width, output_dir)
    return counts


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    generate(
        f.output_dir,
        num_train=f.num_train,
        num_val=f.num_val,
        num_extra=f.num_extra,
        height=f.height,
        width=f.width,
        seed=f.seed,
    )


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", None, "Where to write the tree.", required=True)
    flags.DEFINE_integer("num_train", 24, "Labeled train images (gtFine/train).")
    flags.DEFINE_integer("num_val", 8, "Labeled val images (gtFine/val).")
    flags.DEFINE_integer("num_extra", 24, "Unlabeled train_extra images.")
    flags.DEFINE_integer("height", 256, "Image height.")
    flags.DEFINE_integer("width", 512, "Image width.")
    flags.DEFINE_integer("seed", 0, "Same seed, same bytes.")
    app.run(main)
