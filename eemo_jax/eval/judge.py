"""A local judge for open-ended answers, with EEmo-Bench's own judge prompt: no paid API.

The benchmark rates each open-ended response five times with an LLM (its README: DeepSeek-chat, the prompt
below, "Score: N" with N in 0, 1, 2) and scores the question sum(ratings) / 10. `ModelJudge` does the same
with any model this project loads (an HF folder: a Qwen2.5-VL export, or a text model in that format), the five
ratings being five samples of one prompt drawn together (the rollout loop's group of 5, temperature 1 as the
API's default). A reply that gives no rating in 0-2 counts as 0, as the benchmark's `int()` of an invalid
reply would fail the item.

    judge = ModelJudge(load_eval_model(hf_dir="/models/judge"))
    metrics, scored = eemo_bench.score(items, judge=judge)      # open-ended items without ratings get judged
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from eemo_jax.eval import prompting
from eemo_jax.eval.loading import EvalModel

JUDGE_SYSTEM = "You are a helpful assistant and emotional expert."
JUDGE_PROMPT = (
    "Given the question [{question}], evaluate whether the response [{response}] completely matches the correct "
    "answer [{answer}]. It should be noted that the emotions considered during the evaluation include anger, "
    "disgust, fear, joy, neutral, sadness, and surprise.The redundancy or absence of other emotional words is not "
    "used as a criterion for judging the accuracy of the answer.\n"
    "First, check the response and please rate score 0 if the response is not a valid answer.\n"
    "Please rate score 2 if the response completely or almost completely matches the correct answer on "
    "completeness, accuracy, and relevance.\n"
    "Please rate score 1 if the response partly matches the correct answer on completeness, accuracy, and "
    "relevance.\n"
    "Please rate score 0 if the response doesn't match the correct answer on completeness, accuracy, and "
    "relevance at all.\n"
    "Please only provide the result in the following format: Score:")
ROUNDS = 5
_RATING_RE = re.compile(r"(?:score\s*[:=]?\s*)?\b([0-2])\b", re.IGNORECASE)


def parse_rating(reply: str) -> int:
  """The rating a judge reply gives: the number after the last "Score:" (else the last 0, 1 or 2), 0 if none."""
  tail = reply.rsplit(":", 1)[-1] if ":" in reply else reply
  found = _RATING_RE.findall(tail) or _RATING_RE.findall(reply)
  return int(found[-1]) if found else 0


class ModelJudge:
  """(question, reference, response) -> five ratings in 0-2, from a local model."""

  def __init__(self, model: EvalModel, *, rounds: int = ROUNDS, temperature: float = 1.0, max_new_tokens: int = 16,
               seed: int = 0):
    from eemo_jax.rl.rollout import make_rollout_fn
    self.model, self.rounds, self.seed = model, rounds, seed
    graphdef, self.state = nnx.split(model.backbone)
    self.rollout = make_rollout_fn(graphdef, None, group_size=rounds, max_completion_length=max_new_tokens,
                                   temperature=temperature)
    pad = model.backbone.config.pad_token_id
    self.pad_id = int(pad if pad is not None else model.tokenizer.special.pad)
    self.calls = 0

  def replies(self, question: str, reference: str, response: str) -> list[str]:
    messages = [{"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_PROMPT.format(question=question, response=response, answer=reference)}]
    arch = self.model.backbone.config
    row = prompting.encode_prompt(messages, [], self.model.tokenizer, arch.vision, min_pixels=1, max_pixels=1)
    inputs, _ = prompting.collate([row], arch, batch_size=1, pad_id=self.pad_id, max_pixels=1)
    key = jax.random.fold_in(jax.random.key(self.seed), self.calls)
    self.calls += 1
    out = self.rollout(self.state, jax.tree.map(np.asarray, inputs), key,
                       eos_ids=tuple(self.model.tokenizer.special.stop_ids), pad_id=self.pad_id)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    return [self.model.tokenizer.decode([int(t) for t in r[m]], skip_special_tokens=True) for r, m in zip(tokens, mask)]

  def __call__(self, question: str, reference: str, response: str) -> tuple[int, ...]:
    return tuple(parse_rating(reply) for reply in self.replies(question, reference, response))
