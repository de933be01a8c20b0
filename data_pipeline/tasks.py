"""Task prompts and answer formats of EmoVerse and EEmo-Logic, and the parsers that read model output back.

Every builder is a pure function from a record dict to HF chat messages (see `data_pipeline.prompts`): the
user turn holds the image(s) first, then the question; with `with_answer=True` (SFT) the assistant turn
holds the target, with `with_answer=False` (generation, GRPO prompts) it is left out. A record that cannot
make a prompt raises a `data_pipeline.errors.RecordError` naming the field, so builders can skip it.

Records are plain dicts: the released field names (EmoVerse `emotion`/`emotion_category`, `confidence`,
`attribute`, `subject`, `bbox`/`bounding_box`) or the stored features of `data_pipeline.records`
(`boxes`, `height`/`width`; EEmo `choice`, `emotion`, `option_set`, `ranking`, `scores`, `images`), numpy
values included. A structured label is preferred to the released answer text when both are present.

Sources (reference/papers.md): EmoVerse answers are the authors' Python-dict-like strings (§2.4); EEmo-Logic
prompts and `<think>…</think><answer>Key: value</answer>` answers follow the authors' inference scripts
(§3.3), with whitespace normalised (one space between sentences and after option letters, where the scripts
run them together; no indentation before the format line). The label sets live here and nowhere else.
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import functools
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence

from data_pipeline.errors import InvalidFieldError, MissingFieldError, UnknownLabelError

# --------------------------------------------------------------------------------------------------
# Label sets
# --------------------------------------------------------------------------------------------------

# EmoVerse CES classes (the 8 Mikels emotions), spelt as in its answers; the class index is the position.
MIKELS_8 = ("Amusement", "Anger", "Awe", "Contentment", "Disgust", "Excitement", "Fear", "Sadness")
# EEmo-Bench perception / ranking emotions (Ekman-6 + neutral).
EKMAN_7 = ("anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise")
# EEmo-Logic dominant-emotion option sets, in the order of the authors' reward matrices
# (train/Stage_2/vad_distance.py `option_str_list`): the rows of a reward matrix follow these tuples.
MIKELS_8_FI = ("disgust", "contentment", "sadness", "awe", "anger", "excitement", "amusement", "fear")
ARTPHOTO_8 = ("Anger", "Sad", "Fear", "Disgust", "Amusement", "Excitement", "Awe", "Content")
EMOTIC_26 = ("Pain", "Sadness", "Embarrassment", "Fatigue", "Excitement", "Engagement", "Confidence", "Aversion",
             "Happiness", "Yearning", "Affection", "Sensitivity", "Fear", "Sympathy", "Suffering", "Doubt/Confusion",
             "Disapproval", "Anticipation", "Anger", "Esteem", "Surprise", "Disquietment", "Pleasure",
             "Disconnection", "Peace", "Annoyance")
PLUTCHIK_24 = ("Trust", "Admiration", "Distraction", "Joy", "Boredom", "Terror", "Amazement", "Disgust", "Rage",
               "Vigilance", "Anticipation", "Anger", "Loathing", "Grief", "Acceptance", "Fear", "Pensiveness",
               "Serenity", "Surprise", "Interest", "Sadness", "Apprehension", "Annoyance", "Ecstasy")
EKMAN_7_EEMO = ("fear", "joy", "anger", "sadness", "surprise", "disgust", "neutral")
OPTION_SETS = {"mikels8": MIKELS_8_FI, "artphoto8": ARTPHOTO_8, "emotic26": EMOTIC_26, "plutchik24": PLUTCHIK_24,
               "ekman7": EKMAN_7_EEMO}
VAD_DIMENSIONS = ("valence", "arousal", "dominance")
YES_NO_OPTIONS = {"A": "No", "B": "Yes"}

# --------------------------------------------------------------------------------------------------
# EmoVerse: CES category and B-A-S attribution (+ DES slot)
# --------------------------------------------------------------------------------------------------

CES_QUESTION = ("Which emotion does this image evoke? Choose one of: "
                + ", ".join(e.lower() for e in MIKELS_8) + ". Answer with the emotion only.")
BAS_QUESTION = (
    "Analyse the emotion this image evokes. Answer with a Python dict with the keys description (what the "
    "image shows and why it evokes the emotion), emotion (one of " + ", ".join(MIKELS_8) + "), background, "
    "adjective and noun (the background, the subject's attribute and the subject that evoke it), intensity "
    "(0 to 10) and bbox (the subject's box as [{'x1': x1, 'y1': y1, 'x2': x2, 'y2': y2}] in pixels).")
# The DES head reads the hidden state of the last token of this marker, appended to the B-A-S answer.
# Plain text rather than a new special token: the vocabulary, the embedding matrix and the HF export stay
# those of Qwen2.5-VL, and transformers tokenises it identically. It is kept whole by Qwen2's pre-tokenizer:
# the "\n" ends the preceding pre-token, and "#DES" (one non-letter + letters) is always one pre-token, so
# its ids never depend on the text around it (one token with the offline tokenizer, which is trained on it).
DES_MARKER = "\n#DES"
DES_SLOT_TEXT = "#DES"
_EMOTION_RE = re.compile(r"'emotion':\s*'([^']+)'")  # the authors' classifier regex
_DICT_RE = re.compile(r"\{.*\}", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class BasAnswer:
  """An EmoVerse attribution answer. Boxes are (x1, y1, x2, y2) in pixels of the resized image."""
  emotion: str
  description: str | None = None
  background: str | None = None
  adjective: str | None = None
  noun: str | None = None
  intensity: float | None = None
  boxes: tuple[tuple[float, float, float, float], ...] = ()


def ces_messages(record: Mapping, *, with_answer: bool = True) -> list[dict]:
  """CES classification: the 8 Mikels classes; the answer is the class name (e.g. "Awe")."""
  messages = [_user(CES_QUESTION)]
  if with_answer:
    messages.append(_assistant(_mikels(record)))
  return messages


def bas_messages(record: Mapping, *, resized_hw: Sequence[int], image_hw: Sequence[int] | None = None,
                 with_answer: bool = True, des: bool = False) -> list[dict]:
  """B-A-S attribution with the subject box; `des=True` appends the DES marker (see `des_messages`).

  `image_hw` is the (height, width) of the record's image, in whose pixels its boxes are given (default: the
  record's `height` and `width`); `resized_hw` is the size the image processor resizes it to (`smart_resize`).
  The answer's boxes are in pixels of the resized image, because Qwen2.5-VL grounds in absolute coordinates
  of the image it actually sees: origin at the top-left corner, x along the width, y down the height,
  (x1, y1) the top-left and (x2, y2) the bottom-right pixel edge (the whole image is (0, 0, W, H)), rounded
  half up to integers.
  """
  messages = [_user(BAS_QUESTION)]
  if with_answer:
    answer = format_bas_answer(record, image_hw=image_hw, resized_hw=resized_hw)
    messages.append(_assistant(answer + DES_MARKER if des else answer))
  return messages


def des_messages(record: Mapping, *, resized_hw: Sequence[int], image_hw: Sequence[int] | None = None,
                 with_answer: bool = True) -> list[dict]:
  """The DES variant: the B-A-S answer followed by `DES_MARKER`, whose last token is the head's slot.

  Trained with the marker in the labels, the model emits it after its answer, so one generation yields the
  answer and the slot's hidden state (`des_slot` finds it in the ids).
  """
  return bas_messages(record, image_hw=image_hw, resized_hw=resized_hw, with_answer=with_answer, des=True)


def format_bas_answer(record: Mapping, *, resized_hw: Sequence[int], image_hw: Sequence[int] | None = None) -> str:
  """The authors' dict-like answer string (Python `repr`, read back with `ast.literal_eval`)."""
  intensity = _field(record, "confidence", "confidence_score", "intensity")
  if not _is_number(intensity) or not 0 <= intensity <= 10:
    raise InvalidFieldError(_id(record), "confidence", f"{intensity!r} is not a number in [0, 10]",
                            "give the emotion intensity on the EmoVerse 0-10 scale")
  intensity = intensity.item() if hasattr(intensity, "item") else intensity  # numpy scalar -> int / float
  if image_hw is None:
    image_hw = (int(_field(record, "height")), int(_field(record, "width")))
  boxes = [scale_box(b, image_hw, resized_hw) for b in _boxes(record)]
  answer = {
      "description": str(_field(record, "description")),
      "emotion": _mikels(record),
      "background": str(_field(record, "background")),
      "adjective": str(_field(record, "attribute", "adjective")),
      "noun": str(_field(record, "subject", "noun")),
      "intensity": intensity,
      "bbox": [dict(zip(("x1", "y1", "x2", "y2"), b)) for b in boxes],
  }
  return repr(answer)


def scale_box(box: Sequence[float], image_hw: Sequence[int], resized_hw: Sequence[int]) -> tuple[int, ...]:
  """(x1, y1, x2, y2) from pixels of an (h, w) image to pixels of its resized (h', w'), clipped to it."""
  (h, w), (rh, rw) = image_hw, resized_hw
  if min(h, w, rh, rw) <= 0:
    raise ValueError(f"image sizes must be positive, got image_hw={tuple(image_hw)}, resized_hw={tuple(resized_hw)}")
  x1, y1, x2, y2 = box
  sx, sy = rw / w, rh / h
  scaled = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
  limits = (rw, rh, rw, rh)
  return tuple(min(max(math.floor(v + 0.5), 0), hi) for v, hi in zip(scaled, limits))


def parse_emoverse_answer(text: str) -> BasAnswer | None:
  """Reads a B-A-S answer; None when no Mikels emotion can be recovered.

  The last `{...}` is read with `ast.literal_eval` (then as JSON), as the authors' scorer does; `bbox_2d` is
  accepted for `bbox`. If the dict does not parse, the emotion alone is recovered with the authors' regex
  `'emotion':\\s*'([^']+)'`.
  """
  payload = _literal_dict(text)
  if payload is None:
    match = _EMOTION_RE.search(text or "")
    emotion = match_emotion(match.group(1), MIKELS_8) if match else None
    return BasAnswer(emotion=emotion) if emotion else None
  emotion = match_emotion(str(payload.get("emotion", "")), MIKELS_8)
  if emotion is None:
    return None
  text_field = lambda key: None if payload.get(key) is None else str(payload[key])  # noqa: E731
  return BasAnswer(emotion=emotion, description=text_field("description"), background=text_field("background"),
                   adjective=text_field("adjective"), noun=text_field("noun"),
                   intensity=_number(payload.get("intensity")),
                   boxes=_parse_boxes(payload.get("bbox") or payload.get("bbox_2d") or []))


def parse_ces_answer(text: str) -> str | None:
  """The Mikels class a CES answer names (canonical spelling); None if it names none or several."""
  found = {e for e in MIKELS_8 if re.search(rf"\b{e}\b", text or "", re.IGNORECASE)}
  if len(found) == 1:
    return found.pop()
  parsed = parse_emoverse_answer(text) if not found else None
  return parsed.emotion if parsed else None


def des_slot(input_ids: Sequence[int], tokenizer) -> int:
  """Index of the DES slot: the last token of the last `DES_MARKER` in `input_ids`."""
  marker = tokenizer.encode(DES_SLOT_TEXT)
  ids = [int(i) for i in input_ids]
  for end in range(len(ids), len(marker) - 1, -1):
    if ids[end - len(marker):end] == marker:
      return end - 1
  raise ValueError(f"no {DES_SLOT_TEXT!r} marker in the sequence; build it with des_messages(...), whose answer "
                   "ends with the marker, or let the DES-trained model generate it")


# --------------------------------------------------------------------------------------------------
# EEmo-Logic: perception, dominant emotion, ranking, VAD, open-ended
# --------------------------------------------------------------------------------------------------

EEMO_SYSTEM_MESSAGE = "You are an emotion analysis expert."  # the Stage-2 (GRPO) system prompt
PERCEPTION_PROMPT = (
    "Assume you are an expert in emotional psychology. Analyze the following emotional psychology questions "
    "based on the image. The involved emotion categories include anger, disgust, fear, joy, neutral, sadness, "
    "and surprise. The question is as follows: {question} Choose between one of the following options: {options}")
DOMINANT_PROMPT = (
    "Assume you are an expert in emotional psychology. Based on the given image, carefully identify the dominant "
    "emotion evoked by the image. The emotions to consider include: [{options}] Please show your predicted "
    "dominant emotion directly as follows: ")
RANKING_PROMPT = (
    "Assume you are an expert in emotional psychology. Based on the given image, carefully identify the three "
    "main emotions evoked by the image, ranking them from the strongest to the weakest. The emotions to consider "
    "include: {emotions}. Show the all three main emotions and use comma to separate them.")
VAD_PROMPT = ("As an expert in emotional attribute assessment, please rate the level of {dimension} the image "
              "evokes in you on a scale from 0 to 1.")
# The authors' wrapper, verbatim but for whitespace ("through thinking" included: prompts are kept as trained).
ANSWER_FORMAT = (
    'Answer the question: "{question}" according to the content of the image. Firstly, give a through thinking '
    "on this and then output your thought and analysis process within the <think> </think> tags and provide "
    "your answer within the <answer> </answer> tags (formatted as {slot}). The final output should be with the "
    "following format:\n<think></think><answer>{slot}</answer>")
ANSWER_KEYS = {"yes_no": "Answer", "multiple_choice": "Answer", "dominant_emotion": "Dominant emotion",
               "emotion_ranking": "Emotion ranking", "valence": "Valence", "arousal": "Arousal",
               "dominance": "Dominance", "open_ended": "Description"}
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z ]*")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_LETTER_RE = re.compile(r"\(?([A-Z])\)?(?:\s*[:.)]\s*(.*))?", re.DOTALL)
# Separators of a ranking's emotions: commas as prompted, and what records.py reads in released rankings.
_RANKING_SEP_RE = re.compile(r"[,;>]")
_TASKS_BY_KEY = {key.lower(): tuple(t for t, k in ANSWER_KEYS.items() if k == key) for key in ANSWER_KEYS.values()}


def eemo_messages(record: Mapping, *, with_answer: bool = True, system: str | None = None) -> list[dict]:
  """Dispatches on `record["task"]`, one of `ANSWER_KEYS`."""
  task = _eemo_task(record)
  question, value = _EEMO_BUILDERS[task](record)
  slot = _slot(task)
  messages = [] if system is None else [{"role": "system", "content": system}]
  messages.append(_user(ANSWER_FORMAT.format(question=question, slot=slot), images=_num_images(record)))
  if with_answer:
    messages.append(_assistant(format_eemo_answer(task, value, think=str(record.get("think", "")))))
  return messages


def eemo_answer(record: Mapping):
  """The answer of an EEmo record as its prompt builder reads it: what SFT trains on and rewards compare with.

  The option letter (yes_no, multiple_choice), the emotion in the spelling of its option set, the three
  ranked emotions, the V/A/D score, or the text (open_ended). A record that cannot make a prompt raises a
  `RecordError` naming the field.
  """
  return _EEMO_BUILDERS[_eemo_task(record)](record)[1]


def _eemo_task(record: Mapping) -> str:
  task = record.get("task")
  if task not in ANSWER_KEYS:
    raise UnknownLabelError(_id(record), "task", f"{task!r} is not an EEmo-Logic task",
                            f"use one of {sorted(ANSWER_KEYS)}")
  return task


def format_eemo_answer(task: str, value, *, think: str = "") -> str:
  """`<think>{think}</think><answer>{Key}: {value}</answer>`; VAD scores get 4 decimals, rankings commas."""
  if task in VAD_DIMENSIONS:
    value = f"{float(value):.4f}"
  elif task == "emotion_ranking":
    value = ",".join(value)
  return f"<think>{think}</think><answer>{ANSWER_KEYS[task]}: {value}</answer>"


def is_well_formed(text: str) -> bool:
  """Whether `text` is exactly one `<think>…</think>` block followed by one `<answer>…</answer>` block.

  Each tag must occur once: a second answer (or a think block inside the answer) breaks the template even
  though the last answer would still be read.
  """
  text = text or ""
  # With each tag once, `re.fullmatch(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", text, re.DOTALL)`
  # reduces to the tags' order and whitespace around them: a few string scans instead of a lazy regex match.
  think, think_end = text.find("<think>"), text.find("</think>")
  answer, answer_end = text.find("<answer>"), text.find("</answer>")
  if not 0 <= think < think_end < answer < answer_end:
    return False
  if (text.rfind("<think>") != think or text.rfind("</think>") != think_end or text.rfind("<answer>") != answer
      or text.rfind("</answer>") != answer_end):
    return False  # a tag occurs twice
  between, after = text[think_end + len("</think>"):answer], text[answer_end + len("</answer>"):]
  return not (text[:think].strip() or between.strip() or after.strip())


def answer_content(text: str) -> str | None:
  """The content of the last `<answer>…</answer>` block (the authors' evaluation reads the last), or None."""
  matches = _TAG_RE.findall(text or "")
  return matches[-1] if matches else None


def parse_answer(text: str, task: str | None = None, *, options=None, partial: bool = False):
  """The value of the last `<answer>Key: value</answer>`, or None when it is missing or malformed.

  The key names the task (`ANSWER_KEYS`); with `task` given, another key gives None. The value is read by
  `read_answer_value` (see there for what each task gives, `options` and `partial`).
  """
  content = answer_content(text)
  if content is None:
    return None
  key, colon, value = content.partition(":")  # the key holds letters and spaces only, so the first colon
  key = key.strip()
  if not colon or _KEY_RE.fullmatch(key) is None:
    return None
  candidates = _TASKS_BY_KEY.get(key.lower())
  if candidates is None or (task is not None and task not in candidates):
    return None
  if task is None and len(candidates) > 1:  # "Answer": a choice; any letter unless `options` are given
    task = "multiple_choice"
  return read_answer_value(task or candidates[0], value.strip(), options=options, partial=partial)


def read_answer_value(task: str, value: str, *, options=None, partial: bool = False):
  """One task's answer value (the text after `Key:`), or None when it cannot be read.

    valence / arousal / dominance -> float in [0, 1];
    emotion_ranking -> three distinct emotions of `options` (default `EKMAN_7`), in its spelling; with
      `partial=True`, the first (up to) three distinct emotions of `options` among the items, skipping
      repeats and unknown words (None when there is none), for rewards that give partial credit;
    dominant_emotion -> the emotion, in the spelling of `options` when given (None if not among them);
    yes_no / multiple_choice -> the option letter, read strictly by `read_free_choice` when the options are
      known (letter -> text, or a list lettered A, B, ...; yes_no defaults to A: No, B: Yes), so the letter,
      the option's text or a sentence naming one option; without options, any letter ("D", "(D)", "D: ...");
    open_ended -> the text.
  Emotions are matched ignoring case, surrounding punctuation, a trailing "(...)" remark and a plural "s",
  and through the authors' synonyms (`EMOTION_SYNONYMS`) when the word itself is not an option.
  """
  return _VALUE_READERS[task](task, value, options, partial)


def _read_score(task, value, options, partial) -> float | None:
  score = float(value) if _NUMBER_RE.fullmatch(value) else None
  return score if score is not None and 0.0 <= score <= 1.0 else None


def _read_ranking(task, value, options, partial) -> tuple[str, ...] | None:
  emotions = EKMAN_7 if options is None else _option_names(options)
  items = _RANKING_SEP_RE.split(value)
  return _first3(items, emotions) if partial else _top3(items, emotions)


def _read_dominant(task, value, options, partial) -> str | None:
  return (value or None) if options is None else match_emotion(value, _option_names(options))


def _read_choice(task, value, options, partial) -> str | None:
  choices = YES_NO_OPTIONS if task == "yes_no" and options is None else _lettered(options)
  return _choice_letter(value, None) if choices is None else read_free_choice(value, choices, strict=True)


def _read_text(task, value, options, partial) -> str | None:
  return value or None


_VALUE_READERS = {"valence": _read_score, "arousal": _read_score, "dominance": _read_score,
                  "emotion_ranking": _read_ranking, "dominant_emotion": _read_dominant, "yes_no": _read_choice,
                  "multiple_choice": _read_choice, "open_ended": _read_text}


# --------------------------------------------------------------------------------------------------
# Free-text choices: what external models answer to a lettered question
# --------------------------------------------------------------------------------------------------

_MARKUP_RE = re.compile(r"[*_`#]+")  # Markdown emphasis and headings around "**B: Yes.**"
# Sentences end at ".", "!", "?" before a space, or at a line break. A line ending in ":" ends a sentence only
# when a list follows (a line opening with "-", "*", "1." or a short label such as "Image 1:", "Option A:");
# before prose it is a heading ("Analyzing the two images:"), part of the sentence it introduces.
_LIST_ITEM = r"(?:[-*+\u2022]|\d+[.)]|\([A-Za-z0-9]\)|(?:[^\W_]+[ \t]+){0,2}[^\W_]+[ \t]*[:\uff1a])"
_SENTENCE_BREAK_RE = re.compile(
    rf"(?<=[.!?])\s+|(?<![:\uff1a\s])[ \t]*\n\s*|(?<=[:\uff1a])[ \t]*\n\s*(?={_LIST_ITEM})")
# A letter marked as an option: "(B)"; "B:", "B)" or "B." not inside a word; a capital after "option",
# "choice" or "answer" (+ "is", ":") on the same line; a letter alone on a line.
_MARKED_LETTER_RE = re.compile(
    r"\((?P<paren>[A-Za-z])\)"
    r"|(?<![A-Za-z0-9])(?P<marked>[A-Z])(?=[ \t]*(?P<mark>[:.)\uff1a]))"
    r"|(?i:\b(?:option|choice|answer)s?\b)(?:[ \t]+is)?[ \t]*:?[ \t]*(?P<cued>[A-Z])(?![A-Za-z0-9])"
    r"|^[ \t]*(?P<alone>[A-Za-z])[ \t]*[.!]?[ \t]*$", re.MULTILINE)
_AFTER_LETTER_RE = re.compile(r"[ \t]*[:.)\uff1a]?[ \t]*[\"'\u201c]?")
# A copied option list: what may close a quoted option ("A: 'No.'," or "A: No;"), and separate two of them.
_AFTER_QUOTE_RE = re.compile(r"[.!?;:,]*[\"'\u201d]?[.!?;:,]*")
_BETWEEN_QUOTES_RE = re.compile(r"[\s,;|/-]*")
# The benchmark's options say "picture" or "Figure" where answers say "image": one word to the parser.
_PICTURE_WORD_RE = re.compile(r"\b(?:picture|image|figure|photograph|photo)(?P<plural>s?)\b", re.IGNORECASE)
# Rule 7: a yes/no question about every one of the images, or about at least one, and the image a sentence
# answers for ("Image 2:", "for the first image", after `_same_picture_word`).
_EVERY_IMAGE_RE = re.compile(r"\b(?:each|both|every|all)\b", re.IGNORECASE)
_SOME_IMAGE_RE = re.compile(r"\b(?:either|any|at least one)\b", re.IGNORECASE)
_IMAGE_NAMED_RE = re.compile(r"\bpicture[ \t]*#?[ \t]*(?P<number>[1-9])\b"
                             r"|\b(?P<ordinal>first|second|third|fourth|1st|2nd|3rd|4th|left|right)[ \t]+picture\b",
                             re.IGNORECASE)
_IMAGE_ORDINALS = {"first": 1, "1st": 1, "left": 1, "second": 2, "2nd": 2, "right": 2, "third": 3, "3rd": 3,
                   "fourth": 4, "4th": 4}


def read_free_choice(text: str, options, *, strict: bool = False, question: str | None = None) -> str | None:
  """The option letter a free-text answer chooses, or None when it names no option or several.

  For external models, whose answers are free text ("B: Yes.", "(C) Sadness", "the closest option would be:
  A: Neutral", "Answer: B", an option's text alone, or reasoning that ends in a choice). `options` is
  letter -> text, or a list lettered A, B, ... The rules, in order:

  1. A response with `<answer>` tags is read from its last block's content only, strictly (see 4); so is
     any text with `strict=True` (`parse_answer` passes the block's content): this project's own format is
     read strictly so that a GRPO reward cannot be earned by an answer that names two options.
  2. Markdown emphasis is dropped; letters and option texts match ignoring case and trailing punctuation,
     and "picture", "image", "figure", "photo" and "photograph" are one word (the options say "the first
     picture" or "Figure 1" where answers say "the first image").
  3. A copy of the question's option list is no answer: two or more options, each its letter and its own
     text, one right after the other in the question's order (on one line or one per line, separated by
     nothing but spaces and punctuation), are dropped before reading ("Choose one of: A: No. B: Yes.").
  4. Mentions: a marked option letter ("(B)", "B:", "B)", "option B", "Answer: B", a letter alone on a
     line; "B." only before an option's text or at the very end, where it cannot end a sentence about
     something else). A letter followed by another option's text ("B: No" where B is "Yes"): in free text
     the letter is the choice (the convention of VLMEvalKit's and lmms-eval's choice extraction, and the
     EEmo-Bench judge's reading); read strictly, it names both, so it is ambiguous. Only when the response
     marks no letter at all are option texts read as mentions (whole words; a text inside a longer option's
     text counts as the longer one).
  5. The deciding sentence: the response's first sentence if it names an option (answer first, reasons
     after); otherwise the last sentence that names one (reasons first, conclusion last). Sentences end at
     a line break or at ".", "!", "?" before a space; a mention belongs to the sentence it starts in. A
     line ending in ":" before prose is a heading, part of the sentence after it ("Analyzing the images:",
     a blank line, "Option B seems most accurate." opens with B); before a list (a line opening with "-",
     "1." or a label such as "Option A:", "Image 1:") it stays a sentence of its own, so that the first item
     of a walk-through of the options is not taken for an answer given first.
  6. The deciding sentence must name exactly one letter; two different letters give None.
  7. One answer per image to a yes/no question about every image ("does each image contain joy?", "do both
     images ...") or about at least one ("does either image ..."): when the deciding sentence and the
     option-naming sentences next to it each name one image and one option ("- Image 1: B: No." /
     "- Image 2: A: Yes."), two images or more, the answer is what the question asks of them together: Yes
     only when every image's answer is Yes (or, for "either", when one is). Needs the `question`; without
     it, or in strict reading, rule 6 alone decides. A person grading the answer reads it so, and so does the
     benchmark's judge on most such items (the rule takes agreement on EEmo-Bench's GPT-4o pair file from
     2,004 to 2,006 of 2,012).
  """
  choices = _lettered(options)
  if not choices:
    raise ValueError(f"read_free_choice needs the options the question offered (letter -> text or a list), "
                     f"got {options!r}")
  content = answer_content(text) if "<answer>" in (text or "") else None
  strict = strict or content is not None
  text = _same_picture_word(_MARKUP_RE.sub("", text if content is None else content))
  texts = {letter: _same_picture_word(_option_key(value)) for letter, value in choices.items()}
  text = _without_option_lists(text, texts).strip()
  if not text:
    return None
  mentions = _letter_mentions(text, texts, strict) or _text_mentions(text.lower(), texts)
  if not mentions:
    return None
  breaks = [m.end() for m in _SENTENCE_BREAK_RE.finditer(text)]
  sentence = lambda start: bisect.bisect_right(breaks, start)  # noqa: E731
  deciding = 0 if sentence(mentions[0][0]) == 0 else sentence(mentions[-1][0])
  if question is not None and not strict:
    together = _answer_for_every_image(question, text, texts, mentions, breaks, deciding)
    if together is not None:
      return together
  letters = {letter for start, named in mentions if sentence(start) == deciding for letter in named}
  return letters.pop() if len(letters) == 1 else None


def _answer_for_every_image(question: str, text: str, texts: Mapping[str, str],
                            mentions: list[tuple[int, frozenset[str]]], breaks: list[int],
                            deciding: int) -> str | None:
  """Rule 7 of `read_free_choice`: the Yes or No letter that per-image answers give together, or None when
  the question is no yes/no question about every (or some) image, or the answer is not one per image."""
  yes = [letter for letter, key in texts.items() if key == "yes"]
  no = [letter for letter, key in texts.items() if key == "no"]
  if len(texts) != 2 or len(yes) != 1 or len(no) != 1:
    return None
  every = _EVERY_IMAGE_RE.search(question) is not None
  if not every and _SOME_IMAGE_RE.search(question) is None:
    return None
  named: dict[int, set[str]] = {}  # sentence -> letters it names
  for start, letters in mentions:
    named.setdefault(bisect.bisect_right(breaks, start), set()).update(letters)
  bounds = [0, *breaks, len(text)]

  def image_answer(index: int) -> tuple[int, str] | None:
    """(image, letter) when sentence `index` names one image and one option."""
    images = {int(m.group("number")) if m.group("number") else _IMAGE_ORDINALS[m.group("ordinal").lower()]
              for m in _IMAGE_NAMED_RE.finditer(text, bounds[index], bounds[index + 1])}
    return (images.pop(), *named[index]) if len(images) == 1 and len(named[index]) == 1 else None

  order = sorted(named)
  per_image = [image_answer(index) for index in order]  # in order of the option-naming sentences
  low = high = order.index(deciding)
  if per_image[low] is None:
    return None
  while low > 0 and per_image[low - 1] is not None:
    low -= 1
  while high + 1 < len(order) and per_image[high + 1] is not None:
    high += 1
  answers: dict[int, str] = {}
  for image, letter in per_image[low:high + 1]:
    if answers.setdefault(image, letter) != letter:
      return None  # two answers for one image
  if len(answers) < 2:
    return None
  said_yes = [letter == yes[0] for letter in answers.values()]
  return yes[0] if (all(said_yes) if every else any(said_yes)) else no[0]


def _option_key(text: str) -> str:
  """An option's text as answers quote it: no markup, lower case, no trailing punctuation ("Yes." -> "yes")."""
  return _MARKUP_RE.sub("", str(text)).strip().rstrip(".!?;:").strip().lower()


def _same_picture_word(text: str) -> str:
  """`text` with each of picture / image / figure / photo(graph) as "picture", keeping its case and plural."""
  def replace(match: re.Match) -> str:
    word = "picture" + match.group("plural")
    return word.capitalize() if match.group(0)[0].isupper() else word
  return _PICTURE_WORD_RE.sub(replace, text)


def _without_option_lists(text: str, texts: Mapping[str, str]) -> str:
  """`text` with each copy of the option list (rule 3 of `read_free_choice`) replaced by a line break."""
  order = list(texts)
  quotes = _own_text_quotes(text, texts)  # (start, end, letter), in order of appearance
  runs, run = [], quotes[:1]
  for quote in quotes[1:]:
    last = run[-1]
    follows = order.index(quote[2]) == order.index(last[2]) + 1
    if follows and last[1] <= quote[0] and _BETWEEN_QUOTES_RE.fullmatch(text, last[1], quote[0]):
      run.append(quote)
    else:
      runs.append(run)
      run = [quote]
  runs.append(run)
  for run in reversed([r for r in runs if len(r) >= 2]):
    text = text[:run[0][0]] + "\n" + text[run[-1][1]:]
  return text


def _own_text_quotes(text: str, texts: Mapping[str, str]) -> list[tuple[int, int, str]]:
  """(start, end, letter) of each option letter followed by its own text ("B: Yes.", "(B) Yes"), in order."""
  lower = text.lower()
  quotes = []
  for match in _MARKED_LETTER_RE.finditer(text):
    letter = next(g for g in match.group("paren", "marked", "cued", "alone") if g is not None).upper()
    key = texts.get(letter)
    after = _AFTER_LETTER_RE.match(text, match.end()).end()
    if key and _option_at(lower, after, {letter: key}) == letter:
      quotes.append((match.start(), _AFTER_QUOTE_RE.match(text, after + len(key)).end(), letter))
  return quotes


def _letter_mentions(text: str, texts: Mapping[str, str], strict: bool) -> list[tuple[int, frozenset[str]]]:
  """(start, letters named) of each marked option letter, in order of appearance."""
  lower = text.lower()
  mentions = []
  for match in _MARKED_LETTER_RE.finditer(text):
    letter = next(g for g in match.group("paren", "marked", "cued", "alone") if g is not None).upper()
    if letter not in texts:
      continue
    after = _AFTER_LETTER_RE.match(text, match.end()).end()
    named = _option_at(lower, after, texts)
    if match.group("mark") == "." and named is None and text[after:].strip():
      continue  # "B." followed by anything but an option's text ends a sentence ("plan B. Then ...")
    mentions.append((match.start(), frozenset({letter} if named is None or not strict else {letter, named})))
  return mentions


def _option_at(lower: str, start: int, texts: Mapping[str, str]) -> str | None:
  """The letter of the longest option text at `start` of `lower`, ending at a word boundary; None if none."""
  best = None
  for letter, key in texts.items():
    end = start + len(key)
    if key and lower.startswith(key, start) and not (end < len(lower) and lower[end].isalnum()):
      best = letter if best is None or len(key) > len(texts[best]) else best
  return best


def _text_mentions(lower: str, texts: Mapping[str, str]) -> list[tuple[int, frozenset[str]]]:
  """(start, letters) of each whole-word occurrence of an option's text, left to right.

  One alternation, longest text first, scanned without overlaps: a text inside a longer option's text
  ("Figure 1" in "Figure 1 and Figure 2") counts as the longer one, in linear time.
  """
  letters: dict[str, set[str]] = {}
  for letter, key in texts.items():
    if key:
      letters.setdefault(key, set()).add(letter)
  if not letters:
    return []
  pattern = _options_pattern(tuple(sorted(letters, key=len, reverse=True)))
  return [(m.start(), frozenset(letters[m.group(0)])) for m in pattern.finditer(lower)]


@functools.lru_cache(maxsize=256)
def _options_pattern(keys: tuple[str, ...]) -> re.Pattern:
  """Whole-word occurrences of any of `keys` (longest first), compiled once per option set."""
  return re.compile(rf"(?<![a-z0-9])(?:{'|'.join(re.escape(key) for key in keys)})(?![a-z0-9])")


def answer_options(record: Mapping):
  """The options a task's prompt offers, as its builder shows them and its answer parser reads them.

  letter -> text for yes_no (default A: No, B: Yes) and multiple_choice; the emotion names for
  dominant_emotion (from `options` or `option_set`) and emotion_ranking (default `EKMAN_7`); None for the
  other tasks. A record whose options cannot make a prompt raises a `RecordError` naming the field.
  """
  task = record.get("task")
  if task == "yes_no":
    given = _lettered(record.get("options")) if _given(record.get("options")) else None
    return given if given and len(given) == 2 else YES_NO_OPTIONS
  if task == "multiple_choice":
    return _options(record)
  if task == "dominant_emotion":
    return _option_names(_field(record, "options", "option_set"))
  if task == "emotion_ranking":
    named = next((record.get(k) for k in ("options", "option_set") if _given(record.get(k))), None)
    return _option_names(named) if named is not None else EKMAN_7
  return None


def _yes_no(record: Mapping) -> tuple[str, str]:
  """Released questions put No/Yes in either order; the record's options say which (default A: No, B: Yes)."""
  options = answer_options(record)
  return _perception(record, options), _answer_letter(record, options, "answer a yes/no question with an "
                                                      "option's letter or text")


def _multiple_choice(record: Mapping) -> tuple[str, str]:
  options = answer_options(record)
  return _perception(record, options), _answer_letter(record, options, "give the correct option's letter or text")


def _answer_letter(record: Mapping, options: Mapping[str, str], fix: str) -> str:
  """The letter of the record's answer among `options`; a boolean answer picks the Yes / No option."""
  value = _field(record, "choice", "answer")
  if isinstance(value, bool):
    wanted = "yes" if value else "no"
    answer = next((k for k, v in options.items() if v.strip().lower() == wanted), None)
  else:
    answer = _choice_letter(str(value), options)
  if answer is None:
    raise InvalidFieldError(_id(record), "answer", f"{value!r} is none of the options {options}", fix)
  return answer


def _dominant(record: Mapping) -> tuple[str, str]:
  names = answer_options(record)
  value = _field(record, "emotion", "answer")
  answer = match_emotion(str(value), names)
  if answer is None:
    raise UnknownLabelError(_id(record), "answer", f"{value!r} is not among the options {names}",
                            "give the dominant emotion from the record's option set")
  return DOMINANT_PROMPT.format(options=", ".join(names)), answer


def _ranking(record: Mapping) -> tuple[str, tuple[str, ...]]:
  """Top-3 of the record's option set; EEmo-Bench's 7 emotions (`EKMAN_7`) when it names none."""
  emotions = answer_options(record)
  value = _field(record, "ranking", "answer")
  ranking = _top3(value.split(",") if isinstance(value, str) else list(value), emotions)
  if ranking is None:
    raise InvalidFieldError(_id(record), "answer", f"{value!r} is not three distinct emotions of {emotions}",
                            "rank the three strongest emotions, strongest first")
  listed = ", ".join(emotions[:-1]) + ", and " + emotions[-1]
  return RANKING_PROMPT.format(emotions=listed), ranking


def _vad(dimension: str):
  def build(record: Mapping) -> tuple[str, float]:
    scores = record.get("scores")
    score = scores[VAD_DIMENSIONS.index(dimension)] if _given(scores) else None
    score = score if _given(score) else _field(record, "answer")
    if not _is_number(score) or not 0.0 <= score <= 1.0:
      raise InvalidFieldError(_id(record), "answer", f"{score!r} is not a {dimension} score in [0, 1]",
                              "rescale the rating to [0, 1] first (for the SAM 1-9 scale, (x - 1) / 8)")
    return VAD_PROMPT.format(dimension=dimension), float(score)
  return build


def _open_ended(record: Mapping) -> tuple[str, str]:
  return str(_field(record, "question")), str(_field(record, "answer")).strip()


_EEMO_BUILDERS = {"yes_no": _yes_no, "multiple_choice": _multiple_choice, "dominant_emotion": _dominant,
                  "emotion_ranking": _ranking, "valence": _vad("valence"), "arousal": _vad("arousal"),
                  "dominance": _vad("dominance"), "open_ended": _open_ended}


def _slot(task: str) -> str:
  """What the prompt shows inside <answer>: the key, and for VAD the number's shape (authors' prompts)."""
  return f"{ANSWER_KEYS[task]}: x.xxxx" if task in VAD_DIMENSIONS else f"{ANSWER_KEYS[task]}: "


def _perception(record: Mapping, options: Mapping[str, str]) -> str:
  listed = " ".join(f"{letter}: {text}" for letter, text in options.items())
  return PERCEPTION_PROMPT.format(question=str(_field(record, "question")).strip(), options=listed)


def _options(record: Mapping) -> dict[str, str]:
  options = _field(record, "options")
  pairs = _lettered(options) or {}
  if len(pairs) < 2 or not all(re.fullmatch(r"[A-Z]", k) for k in pairs):
    raise InvalidFieldError(_id(record), "options", f"{options!r} is not a set of lettered options",
                            "give at least two options as {'A': ..., 'B': ...} or a list")
  return pairs


def _lettered(options) -> dict[str, str] | None:
  """Options as letter -> text: a mapping as given, a list lettered A, B, C..."""
  if isinstance(options, Mapping):
    return {str(k).strip().upper(): str(v) for k, v in options.items()}
  if isinstance(options, Sequence) and not isinstance(options, str):
    return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}
  return None


def _option_names(options) -> tuple[str, ...]:
  """An option set: a name of `OPTION_SETS`, a comma-separated string, or a sequence of emotions."""
  if isinstance(options, (str, tuple)):  # read once: answers are read against the same sets again and again
    try:
      return _hashable_option_names(options)
    except TypeError:  # a tuple holding unhashable values
      pass
  return tuple(str(o) for o in options)


@functools.lru_cache(maxsize=256)
def _hashable_option_names(options) -> tuple[str, ...]:
  if isinstance(options, str):
    return OPTION_SETS.get(options) or tuple(o.strip() for o in options.split(",") if o.strip())
  return tuple(str(o) for o in options)


def _choice_letter(value: str, options: Mapping[str, str] | None) -> str | None:
  """The option letter of an answer: "B", "(B)", "B: Yes", "B. Yes", or the option's text."""
  value = value.strip()
  match = _LETTER_RE.fullmatch(value)
  if match and (options is None or match.group(1) in options):
    letter, text = match.group(1), match.group(2)
    if text is None or options is None or text.strip().lower() == options[letter].strip().lower():
      return letter
    return None
  for letter, text in (options or {}).items():
    if value.lower().rstrip(".") == text.strip().lower():
      return letter
  return None


def _top3(items: Sequence, emotions: Sequence[str]) -> tuple[str, str, str] | None:
  """Three distinct emotions of `emotions`, in their spelling; None otherwise (empty items are ignored)."""
  names = tuple(match_emotion(str(v), emotions) for v in items if str(v).strip())
  return names if len(names) == 3 and None not in names and len(set(names)) == 3 else None


def _first3(items: Sequence, emotions: Sequence[str]) -> tuple[str, ...] | None:
  """The first (up to) three distinct emotions of `emotions` among `items`; None when there is none."""
  found: list[str] = []
  for item in items:
    name = match_emotion(str(item), emotions)
    if name is not None and name not in found:
      found.append(name)
      if len(found) == 3:
        break
  return tuple(found) or None


# Other words for an emotion, tried when the word itself is not an option: the replacements of the authors'
# ranking scorer (thinking_consistancy.py `exclude_emo`) and the spellings their dominant-emotion reward and
# option sets mix (grpo_emotion.py `get_reward`; ArtPhoto's "Sad"/"Content" against Mikels' "sadness"/...).
EMOTION_SYNONYMS = {"neutrality": ("neutral",), "joyful": ("joy",), "shock": ("surprise",), "pleasure": ("joy",),
                    "sad": ("sadness",), "sadness": ("sad",), "content": ("contentment",),
                    "contentment": ("content",)}


def match_emotion(value: str, names: Sequence[str]) -> str | None:
  """`value` in the spelling of `names`, ignoring case, surrounding space/punctuation and a trailing "(...)".

  The word itself wins; then its singular (a final "s" or "es" dropped); then its `EMOTION_SYNONYMS`.
  """
  key = value.strip().strip(".'\"[]").strip().lower()
  if "(" in key:  # "sadness (the rain)": the authors' handle_label keeps what precedes the remark
    key = key[:key.index("(")].strip()
  table = _name_table(tuple(names))
  found = table.get(key)
  if found is not None or not key:
    return found
  words = [key]
  if key.endswith("s"):
    words += [key[:-1], key[:-2]] if key.endswith("es") else [key[:-1]]
  for word in words[1:] + [s for w in words for s in EMOTION_SYNONYMS.get(w, ())]:
    if word in table:
      return table[word]
  return None


@functools.lru_cache(maxsize=64)
def _name_table(names: tuple[str, ...]) -> dict[str, str]:
  """Lower-case name -> name, built once per option set (the first spelling wins)."""
  table: dict[str, str] = {}
  for name in names:
    table.setdefault(name.lower(), name)
  return table


def _mikels(record: Mapping) -> str:
  value = _field(record, "emotion", "emotion_category")
  emotion = match_emotion(str(value), MIKELS_8)
  if emotion is None:
    raise UnknownLabelError(_id(record), "emotion", f"{value!r} is not a Mikels emotion",
                            f"use one of {', '.join(MIKELS_8)}")
  return emotion


def _boxes(record: Mapping) -> list[tuple[float, ...]]:
  raw = _field(record, "bbox", "bounding_box", "boxes")
  boxes = _parse_boxes(raw)
  if not boxes or any(x2 < x1 or y2 < y1 for x1, y1, x2, y2 in boxes):
    raise InvalidFieldError(_id(record), "bbox", f"{raw!r} holds no valid (x1, y1, x2, y2) box",
                            "give the subject box as [{'x1':..,'y1':..,'x2':..,'y2':..}] or [x1, y1, x2, y2] "
                            "with x1 <= x2 and y1 <= y2")
  return boxes


def _parse_boxes(raw) -> tuple[tuple[float, float, float, float], ...]:
  """Boxes from a list of {x1,y1,x2,y2} dicts, a list of 4-sequences, or one flat 4-sequence."""
  raw = raw.tolist() if hasattr(raw, "tolist") else raw  # numpy (N, 4) boxes
  if isinstance(raw, Mapping) or (isinstance(raw, Sequence) and len(raw) == 4
                                  and all(_number(v) is not None for v in raw)):
    raw = [raw]
  if isinstance(raw, str) or not isinstance(raw, Sequence):
    return ()
  boxes = []
  for box in raw:
    values = [box.get(k) for k in ("x1", "y1", "x2", "y2")] if isinstance(box, Mapping) else box
    if isinstance(values, Sequence) and len(values) == 4 and all(_number(v) is not None for v in values):
      boxes.append(tuple(_number(v) for v in values))
  return tuple(boxes)


def _literal_dict(text: str) -> dict | None:
  match = _DICT_RE.search(text or "")
  if match is None:
    return None
  for parse in (ast.literal_eval, lambda s: json.loads(s.replace("'", '"'))):
    try:
      value = parse(match.group(0))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
    if isinstance(value, dict):
      return value
  return None


def _number(value) -> float | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value) if math.isfinite(value) else None
  match = _NUMBER_RE.search(value) if isinstance(value, str) else None
  return float(match.group(0)) if match else None


def _num_images(record: Mapping) -> int:
  count = record.get("num_images", len(record["images"]) if _given(record.get("images")) else 1)
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise InvalidFieldError(_id(record), "num_images", f"{count!r} is not a positive integer",
                            "give the number of images the question is about (1, or 2 for image pairs)")
  return count


def _user(text: str, *, images: int = 1) -> dict:
  return {"role": "user", "content": [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
  return {"role": "assistant", "content": text}


def _field(record: Mapping, *names: str):
  """The first of `names` the record gives (see `_given`), or a MissingFieldError naming the first."""
  for name in names:
    if _given(record.get(name)):
      return record[name]
  raise MissingFieldError(_id(record), names[0], "missing" + (f" (also looked for {', '.join(names[1:])})"
                                                             if len(names) > 1 else ""),
                          "add the field to the annotation, or drop the record")


def _given(value) -> bool:
  """Whether a field holds something: not None, NaN, "" or an empty sequence (stored features use these)."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return False
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return not math.isnan(value)
  return not (hasattr(value, "__len__") and len(value) == 0)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _id(record: Mapping) -> str:
  return str(record.get("id", "?"))
