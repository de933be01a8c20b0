"""`tasks.read_free_choice` on hand-made free-text answers: the forms external models write, the deciding
sentence, and the ambiguous answers that must read as None. The authors' judged files check it at scale
(tests/eval/test_eemo_bench_scoring.py)."""

import pytest

from data_pipeline import tasks

YES_NO = {"A": "No.", "B": "Yes."}
EMOTIONS = {"A": "Neutral", "B": "Joy", "C": "Sadness", "D": "Fear"}
FIGURES = {"A": "Figure 1", "B": "Figure 2", "C": "Figure 1 and Figure 2"}
PICTURES = {"A": "The first picture.", "B": "The second picture."}


@pytest.mark.parametrize("text,options,letter", [
    ("B: Yes.", YES_NO, "B"),
    ("B:Yes.", YES_NO, "B"),
    ("B. Yes", YES_NO, "B"),
    ("b", YES_NO, "B"),
    ("(A)", YES_NO, "A"),
    ("yes", YES_NO, "B"),
    ("NO!", YES_NO, "A"),
    ("**B: Yes.** Both images evoke joy.", YES_NO, "B"),
    ("(C) Sadness", EMOTIONS, "C"),
    ("the closest option would be: A: Neutral", EMOTIONS, "A"),
    ("Answer: B", EMOTIONS, "B"),
    ("The answer is D.", EMOTIONS, "D"),
    ("Option: A (Neutral).", EMOTIONS, "A"),
    ("sadness.", EMOTIONS, "C"),
    ("SADNESS", EMOTIONS, "C"),
    ("Both images evoke a sense of fear.", EMOTIONS, "D"),
    ('In these two images, "D: Fear" is the shared emotion.', EMOTIONS, "D"),
    ("<think>Maybe A: Neutral, maybe D.</think><answer>Answer: C</answer>", EMOTIONS, "C"),
    ("<answer>(D)</answer>", EMOTIONS, "D"),
    ("Figure 1 and Figure 2", FIGURES, "C"),  # a text inside a longer option's text counts as the longer one
    ("figure 2.", FIGURES, "B"),
    ("(B)", ["x", "y"], "B"),  # a list of options is lettered A, B, ...
    # Picture, image, figure, photo(graph): one word ("The first picture." is what "the first image" chooses).
    ("The first image, which shows a woman eating, evokes a stronger response.", PICTURES, "A"),
    ("The second photograph.", PICTURES, "B"),
    ("Image 2", FIGURES, "B"),
    ("Both: images 1 and 2.", {"A": "Pictures 1 and 2.", "B": "Figure 1"}, "A"),
    # A copy of the option list is dropped before reading; the answer after it decides.
    ("A: No. B: Yes.\nThe girl looks happy, so the answer is B.", YES_NO, "B"),
    ("A: Neutral\nB: Joy\nC: Sadness\nD: Fear\n\nThe shadows and the empty street point to D: Fear.", EMOTIONS, "D"),
    ("Options: (A) Neutral (B) Joy (C) Sadness (D) Fear. I would pick neutral.", EMOTIONS, "A"),
    # Out of the question's order, or with words between, options are no copied list but the answer's own.
    ("B: Yes. A: No would ignore the smile.", YES_NO, "B"),
])
def test_reads_the_forms_models_write(text, options, letter):
  assert tasks.read_free_choice(text, options) == letter


@pytest.mark.parametrize("text,letter", [
    # Answer first: the first sentence names the option, the reasons after it may name others.
    ("B: Joy. Unlike option D, the scene is bright and nobody looks afraid.", "B"),
    ("D: Fear.\n\nThe first image could seem neutral (A), but the shadows dominate.", "D"),
    # Reasons first: the last sentence that names an option is the conclusion.
    ("Image 1 shows a calm lake. Image 2 shows rain.\n\nTherefore, the answer is C: Sadness.", "C"),
    ("Both images are quiet. A: Neutral might fit the first, while B: Joy fits the second.\nSo the best choice "
     "is (B).", "B"),
    # One answer per image in separate sentences: the rule picks a sentence, it does not weigh them.
    ("Image 1: B: Joy.\nImage 2: C: Sadness.", "B"),
    ("Looking at each image:\nImage 1: B: Joy.\nImage 2: C: Sadness.", "C"),
    # Letters outrank texts: with a marked letter, option words in the reasons are not read.
    ("The girl shows no fear and no joy.\nAnswer: A", "A"),
    # "B." followed by other text ends a sentence: "plan B." is no option; then the text "fear" decides.
    ("They had a plan B. It makes the viewer feel fear.", "D"),
    # A heading line ending in ":" before prose is part of the first sentence: the answer still comes first.
    ("Analyzing the emotional factors in the images:\n\n**Option B** seems most accurate. It is bright.\n\n"
     "**Option A** doesn't align with the scene.\n\n**Option C** suggests sadness, but it is calm.", "B"),
    # Before a list (bullets, numbers, labels) it stays a sentence of its own: the list's first item does not
    # open the answer, the conclusion does.
    ("For the given options:\n\n- **Option A:** dull.\n- **Option B:** bright.\n\nTherefore, the correct "
     "choice is **Option C: Sadness.**", "C"),
    ("Let's analyze each option:\n\nA: Neutral.\n- The room is dark.\n\nD: Fear.\n- Nothing threatens.\n\n"
     "So the answer is C.", "C"),
])
def test_the_deciding_sentence(text, letter):
  assert tasks.read_free_choice(text, EMOTIONS) == letter


@pytest.mark.parametrize("text,options", [
    ("A: Neutral or C: Sadness", EMOTIONS),  # two letters in the deciding sentence
    ("(A) and (C)", EMOTIONS),
    # The first sentence names options, so it decides (answer first), and it names two.
    ("A: Neutral might fit the first image, while B: Joy fits the second.\nSo the best choice is (B).", EMOTIONS),
    ("Neutral or sadness, hard to say.", EMOTIONS),  # two options' texts
    ("Image 1: B: Joy; image 2: C: Sadness.", EMOTIONS),  # one answer per image, in one sentence
    ("I cannot tell which emotion these images evoke.", EMOTIONS),  # no option at all
    # A copy of the option list is no answer, whatever surrounds it.
    ("The image, due to its abstraction, resulted in emotional neutrality. Choose between one of the following "
     "options: A:Figure 1 and Figure 2 B:Figure 2 C:Figure 1", {"A": "Figure 1 and Figure 2", "B": "Figure 2",
                                                                "C": "Figure 1"}),
    ("A: Neutral\nB: Joy\nC: Sadness\nD: Fear\n\nThe two images contrast.", EMOTIONS),
    ("B: Joy, C: Sadness", EMOTIONS),
    ("E: Anger", EMOTIONS),  # not an option's letter
    ("", EMOTIONS),
    ("<answer></answer>", EMOTIONS),
])
def test_ambiguous_or_empty_answers_give_none(text, options):
  assert tasks.read_free_choice(text, options) is None


@pytest.mark.parametrize("text,options,letter", [
    ("B: No.", YES_NO, "B"),
    ("The answer is B: No.", YES_NO, "B"),
    ("the second image (B: The second picture) has the higher arousal.", {"A": "The second picture.",
                                                                         "B": "The first picture."}, "B"),
    ("A: Joy", EMOTIONS, "A"),
])
def test_a_letter_with_another_options_text(text, options, letter):
  """Free text: the letter is the choice (as VLMEvalKit, lmms-eval and the EEmo-Bench judge read it). Read
  strictly (an `<answer>` block, or `strict=True` as `parse_answer` reads one) it names both: ambiguous."""
  assert tasks.read_free_choice(text, options) == letter
  assert tasks.read_free_choice(text, options, strict=True) is None
  assert tasks.read_free_choice(f"<think>Let me see.</think><answer>{text}</answer>", options) is None


def test_needs_the_options():
  with pytest.raises(ValueError, match="options"):
    tasks.read_free_choice("B", None)


def test_parse_answer_reads_choices_with_the_same_rules():
  """The reward parser's choice values go through `read_free_choice`: one parser for rewards and evaluation."""
  assert tasks.parse_answer("<answer>Answer: C: Sadness</answer>", "multiple_choice", options=EMOTIONS) == "C"
  assert tasks.parse_answer("<answer>Answer: the closest is (D) Fear</answer>", "multiple_choice",
                            options=EMOTIONS) == "D"
  assert tasks.parse_answer("<answer>Answer: A: Neutral or B: Joy</answer>", "multiple_choice",
                            options=EMOTIONS) is None
  assert tasks.parse_answer("<answer>Answer: B: No</answer>", "yes_no") is None  # default A: No, B: Yes
  assert tasks.parse_answer("<answer>Answer: D</answer>") == "D"  # no options: any letter, as before


EACH = "Among the three main emotions evoked by each of these two images, does each image contain joy?"
BOTH = "Do both of these images have a high level of arousal?"
EITHER = "Does either image evoke fear?"
PER_IMAGE_NO_YES = "Considering these observations:\n\n- Image 1: B: No.\n- Image 2: A: Yes."
YES_FIRST = {"A": "Yes.", "B": "No."}


@pytest.mark.parametrize("text,question,letter", [
    # One answer per image, mixed: not every image does, so "No"; at least one does, so "Yes".
    (PER_IMAGE_NO_YES, EACH, "B"),
    (PER_IMAGE_NO_YES, BOTH, "B"),
    (PER_IMAGE_NO_YES, EITHER, "A"),
    ("- Image 1: A: Yes.\n- Image 2: A: Yes.", EACH, "A"),
    ("Image 1: B: No.\nImage 2: B: No.", EITHER, "B"),
    # Answers inside the sentences, reasons around them; "the first picture", "(for Image 2)" name images too.
    ("For Image 1, the child picking its nose evokes joy (A: Yes), as children do.\n\nFor Image 2, the kids "
     "look surprised, but not joyful (B: No).", EACH, "B"),
    ("Thus, the answer is: A: Yes (for Image 2). B: No (for Image 1).", EACH, "B"),
    ("The first picture: (B) No. The second picture: (A) Yes.", EACH, "B"),
])
def test_one_answer_per_image_to_a_question_about_every_image(text, question, letter):
  """Rule 7: per-image answers to "does each / do both / does either image ..." are read together, as a person
  grading the answer reads them (EEmo-Bench GPT-4o pair items 611, 1413, 1436, 1711 are of this form)."""
  assert tasks.read_free_choice(text, YES_FIRST, question=question) == letter


@pytest.mark.parametrize("text,question,options", [
    (PER_IMAGE_NO_YES, None, YES_FIRST),  # no question: rule 6 reads the answer given first
    (PER_IMAGE_NO_YES, "Is the dominant emotion joy?", YES_FIRST),  # about the pair, not each image
    ("- Image 1: B: Joy.\n- Image 2: A: Neutral.", EACH, EMOTIONS),  # not a yes/no question
    ("- Image 1: B: No.\n- Image 1: A: Yes.", EACH, YES_FIRST),  # two answers for one image
    ("- Image 1 and Image 2: B: No.\n- Image 2: A: Yes.", EACH, YES_FIRST),  # a sentence about both images
    ("- Image 2: B: No.", EACH, YES_FIRST),  # one image only
])
def test_per_image_answers_the_rule_leaves_to_the_deciding_sentence(text, question, options):
  assert tasks.read_free_choice(text, options, question=question) == tasks.read_free_choice(text, options)


def test_per_image_answers_read_strictly_are_not_combined():
  """GRPO rewards read an `<answer>` block strictly: rule 7 is for external models' free text, so the question
  changes nothing there (the block's deciding sentence, its last, is read as without it)."""
  block = f"<think>Each image.</think><answer>{PER_IMAGE_NO_YES}</answer>"
  assert tasks.read_free_choice(block, YES_FIRST, question=EACH) == tasks.read_free_choice(block, YES_FIRST) == "A"
  assert tasks.read_free_choice(PER_IMAGE_NO_YES, YES_FIRST, question=EACH, strict=True) == "A"
