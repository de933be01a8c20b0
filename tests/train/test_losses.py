"""SFT objectives against torch: cross-entropy with ignore_index=-100, accuracy, the chunked LM loss
and its gradients, CES / DES terms, and the accumulation-window denominator (TRL num_items_in_batch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from eemo_jax.train import losses  # noqa: E402
from eemo_jax.train.losses import IGNORE_INDEX, Denominators, LossConfig, LossSums  # noqa: E402

RTOL = 1e-6


def random_labels(rs, shape, vocab, ignored=0.3):
  labels = rs.randint(0, vocab, size=shape)
  labels[rs.rand(*shape) < ignored] = IGNORE_INDEX
  return labels


def test_cross_entropy_and_accuracy_match_torch():
  rs = np.random.RandomState(0)
  logits = rs.randn(3, 11, 50).astype(np.float32) * 3
  labels = random_labels(rs, (3, 11), 50)
  labels[0, :4] = logits[0, :4].argmax(-1)  # some correct predictions, so accuracy is not trivially 0
  nll, correct, count = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(labels))

  t_logits, t_labels = torch.tensor(logits), torch.tensor(labels)
  expected = F.cross_entropy(t_logits.reshape(-1, 50), t_labels.reshape(-1), ignore_index=IGNORE_INDEX)
  valid = t_labels != IGNORE_INDEX
  expected_acc = (t_logits.argmax(-1) == t_labels)[valid].float().mean()
  assert count == valid.sum().item()
  np.testing.assert_allclose(nll / count, expected.item(), rtol=RTOL)
  np.testing.assert_allclose(correct / count, expected_acc.item(), rtol=RTOL)
  assert correct >= 4


def test_accuracy_breaks_ties_as_argmax_does():
  """Tied maxima count as correct only for the first of them (torch's and numpy's argmax)."""
  rs = np.random.RandomState(1)
  logits = rs.randint(0, 3, size=(4, 9, 6)).astype(np.float32)  # many tied maxima per row
  logits[0, :2] = -np.inf  # rows with every logit -inf: argmax is 0
  labels = rs.randint(0, 6, size=(4, 9))
  labels[0, :2] = 0, 3
  labels[1] = torch.tensor(logits[1]).argmax(-1).numpy()  # every row of this one correct
  labels[2, 0] = IGNORE_INDEX
  _, correct, count = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(labels))
  t_labels = torch.tensor(labels)
  expected = ((torch.tensor(logits).argmax(-1) == t_labels) & (t_labels != IGNORE_INDEX)).sum().item()
  assert count == 35
  assert correct == expected
  assert expected > 9  # the forced rows and some chance hits among the ties


def test_bf16_logits_are_upcast_before_the_softmax():
  """HF casts logits to fp32 before the loss; so does cross_entropy_sums, whatever the compute dtype."""
  rs = np.random.RandomState(1)
  logits = jnp.asarray(rs.randn(2, 5, 300) * 8, jnp.bfloat16)
  labels = random_labels(rs, (2, 5), 300, ignored=0.0)
  nll, _, count = losses.cross_entropy_sums(logits, jnp.asarray(labels))
  expected = F.cross_entropy(torch.tensor(np.asarray(logits.astype(jnp.float32))).reshape(-1, 300),
                             torch.tensor(labels).reshape(-1))
  np.testing.assert_allclose(nll / count, expected.item(), rtol=RTOL)


def torch_lm_loss(hidden, kernel, labels):
  """transformers' ForCausalLMLoss: fp32 logits, labels shifted left, mean over non-ignored tokens."""
  logits = (hidden @ kernel).float()
  shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 4, 7, 13, 64])
def test_chunked_lm_loss_and_gradients_match_torch(chunk):
  """Any chunk size (dividing the sequence or not) gives HF's loss, and the same gradients for the
  hidden states and the LM head through the rematerialised scan."""
  rs = np.random.RandomState(2)
  hidden = rs.randn(2, 13, 16).astype(np.float32)
  kernel = (rs.randn(16, 40) * 0.5).astype(np.float32)
  labels = random_labels(rs, (2, 13), 40)

  def loss(h, k):
    nll, _, count = losses.lm_loss_sums(h, jnp.asarray(labels), lambda x: x @ k, chunk_size=chunk)
    return nll / count

  value, (g_hidden, g_kernel) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(kernel))
  t_hidden = torch.tensor(hidden, requires_grad=True)
  t_kernel = torch.tensor(kernel, requires_grad=True)
  expected = torch_lm_loss(t_hidden, t_kernel, torch.tensor(labels))
  expected.backward()
  np.testing.assert_allclose(value, expected.item(), rtol=RTOL)
  np.testing.assert_allclose(g_hidden, t_hidden.grad.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_kernel, t_kernel.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_shift_labels_drops_the_first_and_ignores_the_last():
  labels = jnp.asarray([[5, 6, 7, IGNORE_INDEX], [1, 2, 3, 4]])
  np.testing.assert_array_equal(losses.shift_labels(labels),
                                [[6, 7, IGNORE_INDEX, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]])


def test_accumulation_window_is_one_token_mean():
  """Microbatches with different label counts: each contributes Σnll / N_window, so the summed loss
  and gradient equal those of the whole window (torch, reduction='sum' / num_items_in_batch), not
  the mean of the microbatch means."""
  rs = np.random.RandomState(3)
  hidden = rs.randn(4, 9, 8).astype(np.float32)
  kernel = rs.randn(8, 20).astype(np.float32)
  labels = random_labels(rs, (4, 9), 20, ignored=0.1)
  labels[2:, :6] = IGNORE_INDEX  # the second microbatch has far fewer label tokens
  micro = [slice(0, 2), slice(2, 4)]
  config = LossConfig(ces_weight=0.0)
  shifted = np.asarray(losses.shift_labels(jnp.asarray(labels)))
  window = Denominators(lm_tokens=jnp.float32((shifted != IGNORE_INDEX).sum()), ces_count=jnp.float32(0),
                        des_count=jnp.float32(0))

  def micro_loss(k, part):
    nll, correct, count = losses.lm_loss_sums(jnp.asarray(hidden[part]), jnp.asarray(labels[part]), lambda x: x @ k)
    sums = LossSums.zeros().replace(lm_nll=nll, lm_correct=correct, lm_tokens=count)
    return losses.total_loss(sums, window, config)

  values, grads = zip(*(jax.value_and_grad(micro_loss)(jnp.asarray(kernel), part) for part in micro))
  t_kernel = torch.tensor(kernel, requires_grad=True)
  per_micro_sums = []
  for part in micro:
    logits = torch.tensor(hidden[part]) @ t_kernel
    t_shifted = torch.tensor(shifted[part]).long()
    per_micro_sums.append(F.cross_entropy(logits.reshape(-1, 20), t_shifted.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
  num_items_in_batch = int((shifted != IGNORE_INDEX).sum())
  expected = sum(per_micro_sums) / num_items_in_batch
  expected.backward()
  np.testing.assert_allclose(sum(values), expected.item(), rtol=RTOL)
  np.testing.assert_allclose(grads[0] + grads[1], t_kernel.grad.numpy(), rtol=1e-5, atol=1e-7)
  # The naive mean of per-microbatch means is a different number here.
  counts = [(shifted[p] != IGNORE_INDEX).sum() for p in micro]
  naive = np.mean([s.item() / c for s, c in zip(per_micro_sums, counts)])
  assert abs(naive - expected.item()) > 1e-2


def test_ces_cross_entropy_and_accuracy_match_torch():
  rs = np.random.RandomState(4)
  logits = rs.randn(6, 8).astype(np.float32)
  labels = rs.randint(0, 8, size=6)
  labels[[1, 4]] = IGNORE_INDEX  # records without an emotion label
  labels[0] = logits[0].argmax()
  nll, correct, count = losses.cross_entropy_sums(jnp.asarray(logits), jnp.asarray(labels))
  t_logits, t_labels = torch.tensor(logits), torch.tensor(labels)
  expected = F.cross_entropy(t_logits, t_labels, ignore_index=IGNORE_INDEX)
  valid = t_labels != IGNORE_INDEX
  assert count == 4
  np.testing.assert_allclose(nll / count, expected.item(), rtol=RTOL)
  np.testing.assert_allclose(correct / count, (t_logits.argmax(-1) == t_labels)[valid].float().mean().item())


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_des_objective_matches_torch_on_rows_with_a_target(kind):
  rs = np.random.RandomState(5)
  des, target = rs.randn(5, 32).astype(np.float32), rs.randn(5, 32).astype(np.float32)
  mask = np.array([True, False, True, True, False])
  total, count = losses.des_loss_sums(jnp.asarray(des), jnp.asarray(target), jnp.asarray(mask), kind)
  d, t = torch.tensor(des[mask]), torch.tensor(target[mask])
  expected = (1 - F.cosine_similarity(d, t, dim=-1)).mean() if kind == "cosine" else F.mse_loss(d, t)
  assert count == 3
  np.testing.assert_allclose(total / count, expected.item(), rtol=1e-5)


def test_total_is_the_weighted_sum_of_window_means():
  sums = LossSums.zeros().replace(lm_nll=jnp.float32(12.0), lm_tokens=jnp.float32(4.0), ces_nll=jnp.float32(3.0),
                                  ces_count=jnp.float32(2.0), des_loss=jnp.float32(1.0), des_count=jnp.float32(1.0))
  window = Denominators(lm_tokens=jnp.float32(6.0), ces_count=jnp.float32(3.0), des_count=jnp.float32(2.0))
  config = LossConfig(lm_weight=1.0, ces_weight=0.5, des_weight=0.25)
  np.testing.assert_allclose(losses.total_loss(sums, window, config), 12 / 6 + 0.5 * 3 / 3 + 0.25 * 1 / 2)
  # A term with no examples in the window contributes 0, not NaN.
  empty = Denominators(lm_tokens=jnp.float32(6.0), ces_count=jnp.float32(0.0), des_count=jnp.float32(0.0))
  no_heads = sums.replace(ces_nll=jnp.float32(0.0), des_loss=jnp.float32(0.0))
  np.testing.assert_allclose(losses.total_loss(no_heads, empty, config), 2.0)


def test_bad_loss_config_explains():
  with pytest.raises(ValueError, match="cosine"):
    LossConfig(des_kind="l1")
  with pytest.raises(ValueError, match="chunk_size"):
    LossConfig(chunk_size=0)
