"""A SYNTHETIC emotion data set: drawn images whose Mikels-8 emotion can be learned from the pixels.

Nothing here is real emotion data. Every image is drawn from a seed, and its labels are *defined* by the
class that drew it. The data set exists so that the whole pipeline (builders, Grain, SFT, GRPO, eval)
runs end to end offline, and so that a model trained on it must actually look at the image to do well.

Each Mikels class has a visual style: a palette, a brightness, a family of shapes and a composition.
For example, awe is a large dark-blue field with a mountain and a small bright moon high up; anger is
red jagged spikes on a dark-red ground; sadness is dim blue-grey with rain and a drooping flower.
Colours, sizes, positions, counts and pixel noise are jittered, so no two images are alike and cheap
image statistics separate the classes well but not perfectly. One shape is the *subject*: its box is
recorded, and the Background–Attribute–Subject words and the description name what was drawn.
Valence, arousal and dominance (0–1) come from a per-class prototype plus jitter. The top-3 ranking
is the class followed by the two classes whose prototypes are nearest in VAD. The question–answer
records of every EEmo task type are written from those labels.

`synthetic_sample(seed, index)` is deterministic: the same (seed, index) gives identical JPEG bytes (with
one Pillow/libjpeg version; the pinned Pillow keeps builds reproducible).
Classes are balanced by construction (`index % 8`).
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from data_pipeline.records import MIKELS_8, OPTION_SETS, EEmoRecord, EmoVerseRecord

SYNTHETIC_NOTICE = ("SYNTHETIC DATA: these images are drawn shapes and their emotion labels, descriptions, "
                    "VAD scores and answers are generated from the drawing class. They are not human "
                    "judgements and say nothing about real images.")

SIZE_RANGE = (64, 160)  # image width and height, each drawn independently (varied aspect ratios)
JPEG_QUALITY = 90
MIKELS_OPTION_SET = OPTION_SETS[0]
PAIR_OFFSET = 1_000_000_003  # partner images of pair questions: never in a split, another class (offset % 8 == 3)
VAD_WEIGHTS = np.array([0.5, 0.3, 0.2])  # the EEmo-Logic reward's V/A/D weights (vad_distance.py)


@dataclasses.dataclass(frozen=True)
class ClassStyle:
  """How one emotion is drawn and described."""

  top: tuple[int, int, int]  # background gradient, top row (RGB)
  bottom: tuple[int, int, int]  # background gradient, bottom row
  noise: float  # pixel noise standard deviation
  vad: tuple[float, float, float]  # valence, arousal, dominance prototype on 0–1
  backgrounds: tuple[str, ...]
  attributes: tuple[str, ...]
  subjects: tuple[str, ...]
  look: str  # colours and shapes, for the description


STYLES = {
    "amusement": ClassStyle((255, 222, 90), (255, 150, 190), 6, (0.85, 0.65, 0.65),
                            ("sunny fairground", "colourful party"), ("playful", "cheerful"),
                            ("big balloon", "bright balloon"), "bright candy colours and round bouncing shapes"),
    "anger": ClassStyle((70, 0, 0), (160, 15, 5), 8, (0.15, 0.85, 0.60),
                        ("burning street", "blood-red wall"), ("furious", "aggressive"),
                        ("jagged red shape", "spiked red shape"), "hot reds and sharp jagged spikes"),
    "awe": ClassStyle((5, 10, 55), (25, 45, 120), 4, (0.75, 0.55, 0.25),
                      ("vast night sky", "starlit mountains"), ("majestic", "immense"),
                      ("bright moon", "shining star"), "deep blue expanse and tiny bright light high above"),
    "contentment": ClassStyle((170, 210, 240), (120, 190, 110), 4, (0.80, 0.25, 0.60),
                              ("quiet meadow", "calm garden"), ("peaceful", "gentle"),
                              ("warm sun", "soft sun"), "soft greens and blues and gentle waves"),
    "disgust": ClassStyle((95, 90, 35), (60, 50, 25), 14, (0.15, 0.55, 0.45),
                          ("murky swamp", "rotting heap"), ("rotten", "slimy"),
                          ("slimy blob", "mouldy lump"), "murky olive browns and shapeless blotches"),
    "excitement": ClassStyle((255, 60, 140), (255, 150, 0), 6, (0.85, 0.90, 0.60),
                             ("festival stage", "neon arena"), ("thrilling", "energetic"),
                             ("burst of light", "starburst"), "blazing colours and rays bursting outward"),
    "fear": ClassStyle((8, 8, 14), (30, 36, 30), 5, (0.10, 0.80, 0.15),
                       ("dark forest", "shadowy woods"), ("ominous", "eerie"),
                       ("pale figure", "ghostly figure"), "near-black darkness and thin bare trees"),
    "sadness": ClassStyle((85, 95, 115), (50, 60, 80), 6, (0.15, 0.20, 0.25),
                          ("rainy street", "grey drizzle"), ("gloomy", "melancholy"),
                          ("wilted flower", "drooping flower"), "dim blue-greys, falling rain and drooping shapes"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSample:
  """One drawn image and every label derived from it."""

  seed: int
  index: int
  image_bytes: bytes  # JPEG
  width: int
  height: int
  emotion: str
  box: tuple[int, int, int, int]  # the subject, x1, y1, x2, y2 in pixels
  background: str
  attribute: str
  subject: str
  description: str
  vad: tuple[float, float, float]  # 0–1, 4 decimals
  ranking: tuple[str, str, str]  # strongest first; ranking[0] == emotion
  confidence: float  # 0–10, the EmoVerse scale
  des: np.ndarray  # (1024,) float32: class prototype + noise, a stand-in for the learned DES

  @property
  def id(self) -> str:
    return f"synthetic-s{self.seed}-{self.index:06d}"

  def image(self) -> Image.Image:
    return Image.open(io.BytesIO(self.image_bytes))


def emotion_of(index: int) -> str:
  return MIKELS_8[index % len(MIKELS_8)]


def synthetic_sample(seed: int, index: int) -> SyntheticSample:
  """The deterministic sample (seed, index)."""
  emotion = emotion_of(index)
  style = STYLES[emotion]
  rng = np.random.default_rng([seed, index])
  width, height = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
  canvas = _gradient(width, height, _jitter(rng, style.top, 30), _jitter(rng, style.bottom, 30))
  draw = ImageDraw.Draw(canvas)
  box = _DRAW[emotion](draw, rng, width, height)
  box = _clip_box(box, width, height)
  pixels = np.asarray(canvas, np.float32) * rng.uniform(0.75, 1.25) * rng.uniform(0.85, 1.15, 3)  # (h, w, 3)
  if emotion == "fear":
    pixels *= _vignette(width, height)[..., None]
  pixels += rng.normal(0.0, style.noise * rng.uniform(0.7, 1.3), pixels.shape)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=JPEG_QUALITY)

  background, attribute, subject = (str(rng.choice(words)) for words in
                                    (style.backgrounds, style.attributes, style.subjects))
  vad = tuple(round(float(v), 4) for v in np.clip(np.array(style.vad) + rng.normal(0, 0.04, 3), 0.0, 1.0))
  description = (f"{_article(attribute).capitalize()} {attribute} image of a {subject} in the "
                 f"{_where(box, width, height)} of a {background}. The {style.look} evoke {emotion}.")
  return SyntheticSample(
      seed=seed, index=index, image_bytes=buffer.getvalue(), width=width, height=height, emotion=emotion,
      box=box, background=background, attribute=attribute, subject=subject, description=description, vad=vad,
      ranking=_ranking(emotion, np.array(vad)), confidence=float(rng.integers(5, 10)),
      des=_des_prototype(emotion) + rng.normal(0, 0.5, 1024).astype(np.float32))


def synthetic_emoverse_record(seed: int, index: int, split: str = "") -> EmoVerseRecord:
  s = synthetic_sample(seed, index)
  return EmoVerseRecord(
      id=s.id, image=s.image_bytes, width=s.width, height=s.height, emotion=s.emotion, description=s.description,
      background=s.background, attribute=s.attribute, subject=s.subject, confidence=s.confidence, des=s.des,
      boxes=np.array([s.box], np.int32), source="synthetic", split=split)


def synthetic_eemo_records(seed: int, index: int, split: str = "") -> list[EEmoRecord]:
  """One question of every EEmo task type about sample `index`, plus one image-pair question: which of
  it and the partner image `index + PAIR_OFFSET` (an index no split uses) has the higher valence."""
  s = synthetic_sample(seed, index)
  rng = np.random.default_rng([seed, index, 1])
  common = dict(images=(s.image_bytes,), widths=(s.width,), heights=(s.height,), source="synthetic", split=split)

  def record(task, question, answer, **fields):
    return EEmoRecord(id=f"{s.id}-{task}", task=task, question=question, answer=answer, **common, **fields)

  asked = s.emotion if rng.random() < 0.5 else str(rng.choice([e for e in MIKELS_8 if e != s.emotion]))
  yes_no = ("No", "Yes") if rng.random() < 0.5 else ("Yes", "No")
  yes_letter = "AB"[yes_no.index("Yes" if asked == s.emotion else "No")]
  distractors = [str(e) for e in rng.choice([e for e in MIKELS_8 if e != s.emotion], int(rng.integers(2, 4)),
                                            replace=False)]
  choices = tuple(rng.permutation([s.emotion, *distractors]).tolist())
  records = [
      record("yes_no", f"Do you think {asked} is the dominant emotion this image evokes?"
             f"{_option_text(yes_no)}", yes_letter, options=yes_no, choice=yes_letter),
      record("multiple_choice", f"Which emotion does this image evoke most strongly?{_option_text(choices)}",
             "ABCD"[choices.index(s.emotion)], options=choices, choice="ABCD"[choices.index(s.emotion)]),
      record("dominant_emotion", f"What is the dominant emotion this image evokes? Choose from: "
             f"{MIKELS_OPTION_SET}.", f"Dominant emotion: {s.emotion}", emotion=s.emotion,
             option_set=MIKELS_OPTION_SET),
      record("emotion_ranking", "Identify the three main emotions evoked by the image, ranking them from the "
             f"strongest to the weakest. The emotions are: {MIKELS_OPTION_SET}.",
             f"Emotion ranking: {', '.join(s.ranking)}", ranking=s.ranking, option_set=MIKELS_OPTION_SET),
      record("open_ended", "Which elements of the image (colours, scene, objects) most strongly evoke your "
             "emotional response? Please explain.", s.description),
  ]
  for dim, task in enumerate(("valence", "arousal", "dominance")):
    scores = np.full((3,), np.nan, np.float32)
    scores[dim] = s.vad[dim]
    records.append(record(task, "As an expert in emotional attribute assessment, please rate the level of "
                          f"{task} the image evokes in you on a scale from 0 to 1.",
                          f"{task.capitalize()}: {s.vad[dim]:.4f}", scores=scores))
  other = synthetic_sample(seed, index + PAIR_OFFSET)
  pair_letter = "A" if s.vad[0] >= other.vad[0] else "B"
  pair_options = ("The first image", "The second image")
  records.append(EEmoRecord(
      id=f"{s.id}-pair_valence", images=(s.image_bytes, other.image_bytes), widths=(s.width, other.width),
      heights=(s.height, other.height), task="multiple_choice",
      question=f"Which of the two images evokes a more positive feeling?{_option_text(pair_options)}",
      answer=pair_letter, options=pair_options, choice=pair_letter, source="synthetic", split=split))
  return records


# -------------------------------------------------------------------------------------------- drawing


def _amusement(draw, rng, w, h):
  s = min(w, h)
  for _ in range(int(rng.integers(10, 26))):  # confetti
    x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 3)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=_bright(rng))
  for _ in range(int(rng.integers(2, 5))):  # small balloons on strings
    x, y, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.15, 0.7) * h, rng.uniform(0.07, 0.12) * s
    draw.line([x, y + r, x + rng.uniform(-4, 4), min(h, y + 3 * r)], fill=(90, 90, 90), width=1)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=_bright(rng))
  r = rng.uniform(0.17, 0.24) * s
  x, y = rng.uniform(r, w - r), rng.uniform(r, h - r)
  draw.ellipse([x - r, y - r, x + r, y + r], fill=_bright(rng))
  return x - r, y - r, x + r, y + r


def _anger(draw, rng, w, h):
  s = min(w, h)
  for _ in range(int(rng.integers(3, 7))):
    colour = [(230, 40, 10), (255, 110, 0), (20, 0, 0)][int(rng.integers(3))]
    draw.polygon(_star(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.1, 0.2) * s, 0.35), fill=colour)
  r = rng.uniform(0.25, 0.34) * s
  points = _star(rng, rng.uniform(r, w - r), rng.uniform(r, h - r), r, 0.4, int(rng.integers(6, 10)))
  draw.polygon(points, fill=_jitter(rng, (220, 20, 15)))
  return _bounds(points)


def _awe(draw, rng, w, h):
  s = min(w, h)
  for _ in range(int(rng.integers(10, 30))):  # faint stars
    x, y = rng.uniform(0, w), rng.uniform(0, 0.6 * h)
    draw.point((x, y), fill=(200, 200, 230))
  peak = rng.uniform(0.45, 0.7) * h
  draw.polygon([(0, h), (rng.uniform(0.2, 0.8) * w, peak), (w, h)], fill=_jitter(rng, (8, 12, 30)))
  r = rng.uniform(0.05, 0.09) * s
  x, y = rng.uniform(r, w - r), rng.uniform(r, 0.3 * h)
  draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 250, 215))
  return x - r, y - r, x + r, y + r


def _contentment(draw, rng, w, h):
  s = min(w, h)
  horizon = rng.uniform(0.5, 0.65) * h
  draw.rectangle([0, horizon, w, h], fill=_jitter(rng, (115, 185, 105)))
  for _ in range(int(rng.integers(2, 5))):  # gentle waves in the grass
    y0, amp, freq = rng.uniform(horizon + 4, h - 4), rng.uniform(1, 3), rng.uniform(0.05, 0.12)
    draw.line([(x, y0 + amp * math.sin(freq * x)) for x in range(0, w + 1, 2)], fill=(150, 210, 130), width=2)
  r = rng.uniform(0.10, 0.16) * s
  x, y = rng.uniform(r, w - r), rng.uniform(r, max(r + 1, horizon - r))
  draw.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, (255, 222, 125)))
  return x - r, y - r, x + r, y + r


def _disgust(draw, rng, w, h):
  s = min(w, h)
  for _ in range(int(rng.integers(6, 13))):
    colour = [(130, 150, 40), (100, 70, 30), (170, 160, 60)][int(rng.integers(3))]
    draw.polygon(_blob(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.06, 0.14) * s), fill=colour)
  r = rng.uniform(0.2, 0.3) * s
  points = _blob(rng, rng.uniform(r, w - r), rng.uniform(r, h - r), r)
  draw.polygon(points, fill=_jitter(rng, (120, 140, 30)))
  return _bounds(points)


def _excitement(draw, rng, w, h):
  s = min(w, h)
  cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
  for angle in np.linspace(0, 2 * math.pi, int(rng.integers(12, 25)), endpoint=False) + rng.uniform(0, 1):
    draw.line([cx, cy, cx + 2 * s * math.cos(angle), cy + 2 * s * math.sin(angle)], fill=_bright(rng),
              width=int(rng.integers(2, 4)))
  r = rng.uniform(0.15, 0.22) * s
  points = _star(rng, cx, cy, r, 0.6, int(rng.integers(12, 17)))
  draw.polygon(points, fill=_jitter(rng, (255, 245, 120)))
  return _bounds(points)


def _fear(draw, rng, w, h):
  for _ in range(int(rng.integers(4, 10))):  # bare trees
    x = rng.uniform(0, w)
    draw.line([x, h, x + rng.uniform(-3, 3), rng.uniform(0, 0.4) * h], fill=(60, 62, 60), width=1)
    for _ in range(int(rng.integers(1, 4))):
      y = rng.uniform(0.1, 0.6) * h
      draw.line([x, y, x + rng.uniform(-12, 12), y - rng.uniform(3, 10)], fill=(55, 58, 55), width=1)
  fig_h = rng.uniform(0.15, 0.25) * h
  fig_w = fig_h * 0.45
  x, bottom = rng.uniform(fig_w, w - fig_w), rng.uniform(0.7, 0.95) * h
  colour = _jitter(rng, (205, 205, 195))
  draw.ellipse([x - fig_w / 2, bottom - 0.7 * fig_h, x + fig_w / 2, bottom], fill=colour)
  head = 0.18 * fig_h
  draw.ellipse([x - head, bottom - fig_h, x + head, bottom - fig_h + 2 * head], fill=colour)
  return x - fig_w / 2, bottom - fig_h, x + fig_w / 2, bottom


def _sadness(draw, rng, w, h):
  slant = rng.uniform(-3, 3)
  for _ in range(int(rng.integers(20, 50))):  # rain
    x, y, length = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 12)
    draw.line([x, y, x + slant, y + length], fill=(150, 160, 172), width=1)
  base_x, top = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.45) * h
  bend = rng.choice([-1.0, 1.0]) * rng.uniform(0.12, 0.2) * w
  stem = [(base_x + bend * math.sin(t * math.pi / 2) ** 2, h - (h - top) * math.sin(t * math.pi * 0.8))
          for t in np.linspace(0, 1, 12)]
  draw.line(stem, fill=(70, 90, 75), width=2)
  r = rng.uniform(0.06, 0.1) * min(w, h)
  hx, hy = stem[-1][0], stem[-1][1] + r
  draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=_jitter(rng, (120, 110, 140)))
  xs = [p[0] for p in stem] + [hx - r, hx + r]
  ys = [p[1] for p in stem] + [hy - r, hy + r]
  return min(xs), min(ys), max(xs), max(ys)


_DRAW = {"amusement": _amusement, "anger": _anger, "awe": _awe, "contentment": _contentment,
         "disgust": _disgust, "excitement": _excitement, "fear": _fear, "sadness": _sadness}


# -------------------------------------------------------------------------------------------- helpers


def _gradient(w, h, top, bottom) -> Image.Image:
  t = np.linspace(0.0, 1.0, h)[:, None, None]
  rows = (1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32)  # (h, 1, 3)
  return Image.fromarray(np.broadcast_to(rows, (h, w, 3)).astype(np.uint8))


def _vignette(w, h) -> np.ndarray:
  y, x = np.mgrid[0:h, 0:w]
  d = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
  return np.clip(1.1 - 0.5 * d, 0.35, 1.0).astype(np.float32)  # (h, w)


def _jitter(rng, colour, amount=14.0) -> tuple[int, int, int]:
  return tuple(int(v) for v in np.clip(np.array(colour) + rng.normal(0, amount, 3), 0, 255))


def _bright(rng) -> tuple[int, int, int]:
  r, g, b = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.85, 1.0))
  return int(255 * r), int(255 * g), int(255 * b)


def _star(rng, cx, cy, r, inner, points=7):
  turn = rng.uniform(0, 2 * math.pi)
  angles = turn + np.linspace(0, 2 * math.pi, 2 * points, endpoint=False)
  radii = np.where(np.arange(2 * points) % 2 == 0, r, r * inner) * rng.uniform(0.8, 1.0, 2 * points)
  return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in zip(angles, radii)]


def _blob(rng, cx, cy, r):
  angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(8, 13))))
  radii = r * rng.uniform(0.6, 1.0, angles.size)
  return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in zip(angles, radii)]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _bounds(points):
  xs, ys = zip(*points)
  return min(xs), min(ys), max(xs), max(ys)


def _clip_box(box, w, h) -> tuple[int, int, int, int]:
  x1, y1, x2, y2 = box
  x1, x2 = sorted((int(np.clip(math.floor(x1), 0, w - 1)), int(np.clip(math.ceil(x2), 1, w))))
  y1, y2 = sorted((int(np.clip(math.floor(y1), 0, h - 1)), int(np.clip(math.ceil(y2), 1, h))))
  return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def _where(box, w, h) -> str:
  cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
  row = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
  col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
  return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def _ranking(emotion: str, vad: np.ndarray) -> tuple[str, str, str]:
  """The class, then the two other classes whose VAD prototypes are nearest (the reward's weights)."""
  others = [e for e in MIKELS_8 if e != emotion]
  distance = [float(np.sqrt(np.sum(VAD_WEIGHTS * (np.array(STYLES[e].vad) - vad) ** 2))) for e in others]
  nearest = [others[i] for i in np.argsort(distance, kind="stable")[:2]]
  return emotion, nearest[0], nearest[1]


def _des_prototype(emotion: str) -> np.ndarray:
  rng = np.random.default_rng([20260101, MIKELS_8.index(emotion)])
  return (3.0 * rng.standard_normal(1024)).astype(np.float32)


def _option_text(options) -> str:
  return " Choose between one of the following options: " + " ".join(
      f"{'ABCDEFGH'[i]}: {o}" for i, o in enumerate(options))


__all__ = ["MIKELS_OPTION_SET", "PAIR_OFFSET", "STYLES", "SYNTHETIC_NOTICE", "SyntheticSample", "emotion_of",
           "synthetic_eemo_records", "synthetic_sample", "synthetic_emoverse_record"]
