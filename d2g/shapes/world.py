"""The procedural shapes world: 32x32 RGB images of coloured shapes with captions.

Everything is a pure function of (seed, split, index), so a dataset never needs to be stored or
downloaded. A held-out split of attribute *combinations* is never used for training: it is defined
by a fixed rule on the combination's value indices, so the two splits are disjoint by construction
and every single attribute value still occurs in training (only its pairing with the others is new).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # render at 4x and box-filter down, for anti-aliased edges

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = {"small": 4.5, "large": 8.0}  # half-extent in pixels
POSITIONS = {  # shape centre (x, y) in pixels
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
BACKGROUNDS = {"black": (20, 20, 20), "white": (235, 235, 235), "gray": (128, 128, 128)}

# The attribute axes, in a fixed order; the evaluator has one classification head per axis.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

PHRASINGS = (
    "a {size} {color} {shape} in the {position} on a {background} background",
    "{size} {color} {shape}, {position}, {background} background",
    "a {color} {shape} that is {size}, at the {position}, {background} background",
    "on a {background} background, a {size} {color} {shape} in the {position}",
)
SECOND_SHAPE = " and a {size} {color} {shape} in the {position}"

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Attributes:
    """One value per attribute axis: what a caption asks for and what the evaluator judges.

    Args:
        shape: one of SHAPES.
        color: a name in COLORS.
        size: a name in SIZES.
        position: a name in POSITIONS.
        background: a name in BACKGROUNDS.
    """

    shape: str
    color: str
    size: str
    position: str
    background: str

    def as_dict(self) -> dict[str, str]:
        """{axis: value}, the fields a caption phrasing is formatted with."""
        return asdict(self)

    def labels(self) -> tuple[int, ...]:
        """Value index per axis, in ATTRIBUTES order (the evaluator's targets)."""
        return tuple(ATTRIBUTES[axis].index(getattr(self, axis)) for axis in ATTRIBUTES)


def vocabulary() -> list[str]:
    """Every word any caption can contain (the tokenizer makes each a single token)."""
    words: set[str] = set()
    for text in PHRASINGS + (SECOND_SHAPE,):
        words.update(w.strip(",") for w in text.split() if not w.startswith("{"))
    for values in ATTRIBUTES.values():
        for value in values:
            words.update(value.split())
    return sorted(w for w in words if w)


def all_combinations() -> list[Attributes]:
    """Every attribute combination: the product of all axes, in ATTRIBUTES order."""
    return [Attributes(*values) for values in itertools.product(*ATTRIBUTES.values())]


def is_heldout(attrs: Attributes) -> bool:
    """Whether `attrs` is a held-out combination (1 in 10, by a fixed rule; never used for training)."""
    # A fixed linear rule over value indices holds out 1 in 10 combinations and spreads them so
    # that every value of every axis keeps most of its combinations in training.
    s, c, z, p, b = attrs.labels()
    return (s + 2 * c + z + 3 * p + b) % 10 == 0


def combinations(split: str) -> list[Attributes]:
    """The attribute combinations of a split; train and heldout partition all_combinations()."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    want_heldout = split == "heldout"
    return [a for a in all_combinations() if is_heldout(a) == want_heldout]


def caption(attrs: Attributes, phrasing: int = 0, second: Attributes | None = None) -> str:
    """The caption of `attrs` in phrasing number `phrasing` (0..len(PHRASINGS)-1)."""
    text = PHRASINGS[phrasing % len(PHRASINGS)].format(**attrs.as_dict())
    if second is not None:
        text += SECOND_SHAPE.format(**second.as_dict())
    return text


def _shape_mask(shape: str, cx: float, cy: float, half: float, angle: float) -> np.ndarray:
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if angle:
        cos, sin = np.cos(angle), np.sin(angle)
        dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        side = half * 0.85  # a square of the same "size" looks larger than a circle; even them out
        inside = (np.abs(dx) <= side) & (np.abs(dy) <= side)
    elif shape == "triangle":
        # Upward equilateral-ish triangle: apex at the top, base at the bottom.
        top, bottom = cy - half, cy + half * 0.8
        yy = dy + cy
        frac = np.clip((yy - top) / (bottom - top), 0, None)
        inside = (yy >= top) & (yy <= bottom) & (np.abs(dx) <= frac * half * 1.05)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render(attrs: Attributes, rng: np.random.Generator | None = None,
           second: Attributes | None = None) -> np.ndarray:
    """Render attributes to a uint8 HxWx3 image; `rng` adds small jitter (position, size, colour)."""
    jitter = rng is not None
    background = np.array(BACKGROUNDS[attrs.background], dtype=np.float32)
    if jitter:
        background = background + rng.uniform(-8, 8, 3)
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    for item in (attrs, second):
        if item is None:
            continue
        cx, cy = POSITIONS[item.position]
        half = SIZES[item.size]
        color = np.array(COLORS[item.color], dtype=np.float32)
        angle = 0.0
        if jitter:
            cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
            half *= rng.uniform(0.9, 1.1)
            color = color + rng.uniform(-12, 12, 3)
            angle = rng.uniform(-0.15, 0.15)
        mask = _shape_mask(item.shape, cx, cy, half, angle)[..., None]
        image = image * (1 - mask) + color * mask
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return SPLITS.index(split)


def sample_attributes(seed: int, index: int, split: str = "train") -> tuple[Attributes, int]:
    """(attributes, phrasing) of item `index`: uniform over the split's combinations."""
    rng = np.random.default_rng([seed, _split_id(split), index, 0])
    combos = _COMBOS[split]
    return combos[int(rng.integers(len(combos)))], int(rng.integers(len(PHRASINGS)))


def item(seed: int, index: int, split: str = "train", two_shapes: float = 0.0
         ) -> tuple[np.ndarray, str, Attributes]:
    """Item `index` of the world with `seed`: (uint8 32x32x3 image, caption, attributes).

    `two_shapes` is the probability of a second, distinct shape at another position; its
    attributes appear in the caption only (the evaluator judges the first shape).
    """
    attrs, phrasing = sample_attributes(seed, index, split)
    rng = np.random.default_rng([seed, _split_id(split), index, 1])
    second = None
    if two_shapes > 0 and rng.random() < two_shapes:
        others = [p for p in POSITIONS if p != attrs.position]
        second = Attributes(SHAPES[rng.integers(len(SHAPES))], tuple(COLORS)[rng.integers(len(COLORS))],
                            "small", others[rng.integers(len(others))], attrs.background)
    return render(attrs, rng, second), caption(attrs, phrasing, second), attrs


def batch(seed: int, start: int, count: int, split: str = "train"
          ) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """Items start..start+count-1 as (uint8 Nx32x32x3, captions, attributes)."""
    images, captions, attrs = [], [], []
    for index in range(start, start + count):
        image, text, a = item(seed, index, split)
        images.append(image)
        captions.append(text)
        attrs.append(a)
    return np.stack(images), captions, attrs


def to_tensor(images: np.ndarray):
    """uint8 NxHxWx3 -> float32 Nx3xHxW in [-1, 1] (the VAE's and the evaluator's input range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def labels_tensor(attrs: list[Attributes]):
    """The evaluator's targets for `attrs`: a long tensor [N, axes] of value indices."""
    import torch

    return torch.tensor([a.labels() for a in attrs], dtype=torch.long)


_COMBOS = {split: [a for a in all_combinations() if is_heldout(a) == (split == "heldout")] for split in SPLITS}
