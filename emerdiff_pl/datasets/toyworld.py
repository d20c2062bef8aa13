"""A procedural world with known ground truth, for measuring unsupervised segmentation where no SD weights exist.

Each scene is drawn from its own seed: textured "stuff" (sky gradient above a horizon, striped water and noisy
grass below it) and 1-4 shapes (disc, square, triangle, ring) painted back to front. Every colour is random, so
only texture and shape tell the classes apart. ``emerdiff-pl convert toyworld`` writes scenes as WebDataset
shards (``<key>.png`` image, ``<key>.gt.png`` uint8 class ids) that the evaluation reads like any other dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("sky", "water", "grass", "disc", "square", "triangle", "ring")
STUFF_CLASSES: tuple[int, ...] = (0, 1, 2)
SHAPE_CLASSES: tuple[int, ...] = (3, 4, 5, 6)
NUM_CLASSES = len(CLASS_NAMES)
DEFAULT_SIZE = 128


@dataclass
class SceneObject:
    """One painted shape: its class, full (unoccluded) footprint and paint order (higher = in front)."""

    class_id: int
    mask: np.ndarray  # bool H×W, the whole shape before later shapes cover it
    color: tuple[int, int, int]


@dataclass
class Scene:
    image: np.ndarray  # uint8 H×W×3
    labels: np.ndarray  # uint8 H×W class ids in [0, NUM_CLASSES)
    objects: list[SceneObject] = field(default_factory=list)  # in paint order, back to front


def scene_seed(seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of the run seeded ``seed``: independent of how many scenes are drawn."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _distinct_color(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float = 0.35) -> np.ndarray:
    """A uniform random colour at least ``min_dist`` (RGB in [0, 1]) from the colours it must stand out from."""
    best, best_dist = _random_color(rng), -1.0
    for _ in range(20):
        c = _random_color(rng)
        d = min((float(np.linalg.norm(c - a)) for a in avoid), default=1.0)
        if d >= min_dist:
            return c
        if d > best_dist:
            best, best_dist = c, d
    return best


def _sky(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, hw: tuple[int, int]
) -> tuple[np.ndarray, list]:
    """Smooth vertical gradient between two random colours, slightly tilted."""
    top, bottom = _random_color(rng), _random_color(rng)
    tilt = rng.uniform(-0.3, 0.3)
    s = np.clip((yy + tilt * (xx - hw[1] / 2)) / hw[0], 0.0, 1.0)[..., None]
    return (1 - s) * top + s * bottom, [top, bottom]


def _water(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, hw: tuple[int, int]
) -> tuple[np.ndarray, list]:
    """Wavy horizontal stripes alternating between two random colours."""
    a = _random_color(rng)
    b = _distinct_color(rng, [a], 0.3)
    period = rng.uniform(5.0, 9.0)
    amp, wave = rng.uniform(0.5, 2.0), rng.uniform(12.0, 30.0)
    phase = rng.uniform(0, 2 * np.pi)
    s = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + amp * np.sin(2 * np.pi * xx / wave + phase)) / period)
    s = s[..., None]
    return (1 - s) * a + s * b, [a, b]


def _grass(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, hw: tuple[int, int]
) -> tuple[np.ndarray, list]:
    """A random base colour with strong per-pixel noise and short vertical streaks."""
    base = _random_color(rng)
    height, width = hw
    fine = rng.normal(0.0, 0.12, size=(height, width, 1))
    streak = rng.normal(0.0, 0.1, size=(height // 3 + 1, width, 1)).repeat(3, axis=0)[:height]
    tint = rng.normal(0.0, 0.05, size=(1, 1, 3))
    return base + tint + fine + streak, [base]


def _shape_mask(class_id: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, hw: tuple[int, int]):
    """The footprint of one shape of a random size (from the shorter side), position and rotation."""
    r = rng.uniform(0.09, 0.22) * min(hw)  # circumradius-ish, 11-28 px at 128²
    cy, cx = rng.uniform(r * 0.6, np.array(hw, dtype=np.float64) - r * 0.6, size=2)
    dy, dx = yy - cy, xx - cx
    if class_id == 3:  # disc
        return dy**2 + dx**2 <= r**2
    if class_id == 6:  # ring: annulus, the hole shows what lies behind
        d2 = dy**2 + dx**2
        inner = r * rng.uniform(0.45, 0.65)
        return (d2 <= r**2) & (d2 >= inner**2)
    theta = rng.uniform(0, 2 * np.pi)
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    if class_id == 4:  # square, rotated
        half = r / np.sqrt(2) * 1.1
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # triangle: equilateral, rotated; inside all three half-planes
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = 2 * np.pi * k / 3
        inside &= np.cos(a) * u + np.sin(a) * v <= r * 0.55
    return inside


def generate_scene(
    rng: np.random.Generator | int, size: int = DEFAULT_SIZE, width: int | None = None
) -> Scene:
    """Draw one scene: image uint8 size×width×3 and its class map uint8 size×width (``width`` None: square,
    the same scenes as before width existed). ``size`` is the height."""
    height, width = size, size if width is None else width
    if min(height, width) < 32:
        raise ValueError(f"toyworld sides must be at least 32 pixels, got {height}×{width}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    hw = (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)

    # Stuff: sky above a gently sloped horizon, water and grass split by a wavy shoreline below it.
    horizon = rng.uniform(0.3, 0.6) * height + rng.uniform(-0.15, 0.15) * (xx - width / 2)
    labels = np.where(yy < horizon, 0, 1).astype(np.uint8)
    below = rng.choice(["water", "grass", "both"], p=[0.25, 0.25, 0.5])
    if below == "grass":
        labels[labels == 1] = 2
    elif below == "both":
        # shoreline: a wavy line through the lower part, either side can be water
        slope = rng.uniform(-1.5, 1.5)
        x0 = rng.uniform(0.25, 0.75) * width
        wave = 4 * np.sin(2 * np.pi * yy / rng.uniform(20, 40) + rng.uniform(0, 2 * np.pi))
        left = xx + wave < x0 + slope * (yy - height)
        if rng.random() < 0.5:
            left = ~left
        labels[(labels == 1) & left] = 2

    image = np.zeros((height, width, 3))
    used: list[np.ndarray] = []
    for class_id, painter in ((0, _sky), (1, _water), (2, _grass)):
        texture, colors = painter(rng, yy, xx, hw)
        region = labels == class_id
        image[region] = texture[region]
        used += colors

    # Shapes, back to front: later shapes occlude earlier ones.
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(1, 5))):
        class_id = int(rng.choice(SHAPE_CLASSES))
        mask = _shape_mask(class_id, rng, yy, xx, hw)
        color = _distinct_color(rng, used[-4:])
        shade = 1.0 + rng.uniform(-0.15, 0.15) * (yy - yy[mask].mean()) / max(1.0, float(np.ptp(yy[mask])))
        image[mask] = color * shade[mask][:, None]
        labels[mask] = class_id
        used.append(color)
        rgb = tuple(int(c) for c in np.round(np.clip(color, 0, 1) * 255))
        objects.append(SceneObject(class_id=class_id, mask=mask, color=rgb))

    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return Scene(image=image, labels=labels, objects=objects)


def generate_scenes(
    num_images: int, seed: int, size: int = DEFAULT_SIZE, start: int = 0, width: int | None = None
) -> Iterator[Scene]:
    """Scenes ``start .. start+num_images-1`` of the run ``seed``; scene i is the same whatever the count.
    ``size`` is the height, ``width`` (None: ``size``) the width."""
    for i in range(start, start + num_images):
        yield generate_scene(scene_seed(seed, i), size, width)


def scene_key(seed: int, index: int) -> str:
    return f"toyworld-s{seed}-{index:07d}"


def write_shards(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int,
    size: int = DEFAULT_SIZE,
    shard_size: int = 1000,
    prefix: str = "toyworld",
    progress: bool = True,
    start: int = 0,
) -> list[str]:
    """Write ``num_images`` scenes (indices ``start`` …) as WebDataset shards ``<prefix>-NNNNNN.tar`` in ``out_dir``.

    Each sample holds ``<key>.png`` (RGB image), ``<key>.gt.png`` (uint8 class ids) and ``<key>.json``
    (seed, index, class names). Shards are written atomically by the shared shard writer
    (:class:`~emerdiff_pl.shardio.ShardSequenceWriter`).
    """
    from tqdm.auto import tqdm

    from emerdiff_pl.fields import GT_FIELD, JSON_FIELD
    from emerdiff_pl.shardio import ShardSequenceWriter

    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(os.fspath(out_dir), f"{prefix}-%06d.tar")
    with (
        tqdm(total=num_images, desc="toyworld scenes", disable=not progress) as bar,
        ShardSequenceWriter(pattern, maxcount=shard_size) as sink,
    ):
        for i, scene in enumerate(generate_scenes(num_images, seed, size, start=start), start=start):
            meta = {"seed": seed, "index": i, "size": size, "classes": list(CLASS_NAMES)}
            sink.write(
                {"__key__": scene_key(seed, i), "png": scene.image, GT_FIELD: scene.labels, JSON_FIELD: meta}
            )
            bar.update(1)
    return sink.written
