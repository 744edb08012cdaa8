""""shapes": a procedural captioned data set for text-to-image work that fits a CPU.

Scenes of one or two objects, each a colour x shape x size, two objects side by side or one above
the other, with captions such as "a small red circle left of a large blue square". Every scene
follows from its seed alone (no files), its caption names exactly what was drawn, and its
attributes are kept as ground truth for the oracle (distill/oracle.py). Some colour-shape pairs never
appear in training scenes, only in test prompts: compositional generalisation, as T2I-CompBench asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 60, 200), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# colour-shape pairs kept out of every training scene: they appear only in test prompts
HELD_OUT = (("purple", "triangle"), ("green", "circle"), ("white", "square"))
BACKGROUND = (30, 30, 30)
SUPERSAMPLE = 4  # draw at 4x and average down: smooth edges, as a camera (or a decoder) would give


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What a caption says: one object, or two with the first's relation to the second."""

    things: tuple[Thing, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        first = f"a {self.things[0].words()}"
        return first if self.relation is None else f"{first} {self.relation} a {self.things[1].words()}"

    def slots(self) -> tuple[str, tuple[Thing, ...]]:
        """(arrangement, objects in reading order): "single", "horizontal" (left, right) or "vertical"
        (top, bottom): what the oracle predicts from pixels, whatever the caption's word order."""
        if self.relation is None:
            return "single", self.things
        first, second = self.things
        arrangement = "horizontal" if self.relation in ("left of", "right of") else "vertical"
        return arrangement, (first, second) if self.relation in ("left of", "above") else (second, first)


@dataclass(frozen=True)
class ShapesConfig:
    size: int = 32  # image side in pixels
    two_object_fraction: float = 0.6  # of scenes with two objects
    held_out: tuple[tuple[str, str], ...] = field(default=HELD_OUT)


def held_out(scene: Scene, config: ShapesConfig) -> bool:
    return any((thing.colour, thing.shape) in config.held_out for thing in scene.things)


def random_scene(rng: np.random.Generator, config: ShapesConfig, split: str = "train") -> Scene:
    """A scene of `split`: train scenes never hold a held-out colour-shape pair, test scenes always do."""
    while True:
        count = 2 if rng.random() < config.two_object_fraction else 1
        things = tuple(Thing(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(SIZES)))
                       for _ in range(count))
        if count == 2 and things[0] == things[1]:  # "a red circle left of a red circle" has no right answer
            continue
        scene = Scene(things, str(rng.choice(RELATIONS)) if count == 2 else None)
        if held_out(scene, config) == (split == "test"):
            return scene


def _mask(shape: str, cx: float, cy: float, radius: float, side: int) -> np.ndarray:
    """Boolean [side, side] coverage of one shape centred at (cx, cy) with half-size `radius`."""
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    if shape == "square":
        half = radius * 0.85
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    top, bottom = cy - radius, cy + radius * 0.8  # an upright isosceles triangle
    inside_height = (ys >= top) & (ys <= bottom)
    half_width = (ys - top) / (bottom - top) * radius
    return inside_height & (np.abs(xs - cx) <= half_width)


def render(scene: Scene, rng: np.random.Generator, config: ShapesConfig) -> np.ndarray:
    """The scene as [3, size, size] float32 in [-1, 1]; positions jitter within each object's half."""
    side = config.size * SUPERSAMPLE
    canvas = np.empty((side, side, 3), np.float32)
    canvas[:] = BACKGROUND
    arrangement, ordered = scene.slots()
    for index, thing in enumerate(ordered):
        radius = side * (0.13 if thing.size == "small" else 0.21)
        along = rng.uniform(0.25, 0.75) * side if arrangement == "single" else (
            (0.25 + 0.5 * index + rng.uniform(-0.04, 0.04)) * side)
        across = rng.uniform(0.3, 0.7) * side
        cx, cy = (along, across) if arrangement in ("single", "horizontal") else (across, along)
        canvas[_mask(thing.shape, cx, cy, radius, side)] = COLOURS[thing.colour]
    image = canvas.reshape(config.size, SUPERSAMPLE, config.size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (image.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def sample(seed: int, config: ShapesConfig | None = None, split: str = "train") -> tuple[np.ndarray, Scene]:
    """One scene and its image, from its seed alone."""
    config = config or ShapesConfig()
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    scene = random_scene(rng, config, split)
    return render(scene, rng, config), scene


def batch(seeds, config: ShapesConfig | None = None, split: str = "train") -> tuple[np.ndarray, list[Scene]]:
    """Images [N, 3, size, size] and scenes for the given seeds."""
    pairs = [sample(int(seed), config, split) for seed in seeds]
    return np.stack([image for image, _ in pairs]), [scene for _, scene in pairs]


def vocabulary() -> list[str]:
    """Every word a caption can hold."""
    words = {"a", *COLOURS, *SHAPES, *SIZES}
    for relation in RELATIONS:
        words.update(relation.split())
    return sorted(words)


def word_tokenizer(max_length: int = 16):
    """A word-level tokenizer of the captions (HF `tokenizers`), padding and truncating to `max_length`,
    with <pad> = 0 and an <eos> after the words (a CLIP-style text tower pools there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(vocabulary())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="<pad>")
    return tokenizer
