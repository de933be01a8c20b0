"""Host-side index arrays (`eemo_jax.model.positions`) against transformers 5.23 itself.

Vision: `transformers.vision_utils` window index / cu_seqlens / rotary ids, permuted the way
`Qwen2_5_VisionTransformerPretrainedModel.forward` permutes them. Text: `Qwen2_5_VLModel.get_rope_index`
on a tiny model (it only reads the config). Offline and CPU-only; a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from eemo_jax.model import positions as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
vu = pytest.importorskip("transformers.vision_utils")

TXT, IMG, VID, VS, VE = 5, 120, 121, 122, 123  # token ids of the tiny config
M = 2  # spatial_merge_size
PATCH, WINDOW = 14, 112  # checkpoint values: 4 merged tokens per window side


@pytest.fixture(scope="module")
def hf_model():
  """Tiny `Qwen2_5_VLForConditionalGeneration` (spec §1.5 fast variant); only its config matters here."""
  cfg = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                       rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}),
      vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                         patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=M, window_size=WINDOW,
                         fullatt_block_indexes=[0], tokens_per_second=2),  # class default is 4
      image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
      tie_word_embeddings=False)
  return transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()


# --------------------------------------------------------------------------------------------------
# Vision layout
# --------------------------------------------------------------------------------------------------

VISION_GRIDS = {
    "spec_example": [(1, 10, 12), (1, 4, 4)],  # windows of 16, 8, 4, 2 merged tokens + a small image
    "exact_windows": [(1, 16, 16)],  # 8x8 merged = 2x2 full windows (HF pads a whole empty window)
    "thin": [(1, 2, 40)],  # 1x20 merged: 5 windows of 1x4
    "video_t2": [(2, 10, 6)],  # windows never cross frames
    "several": [(1, 4, 6), (2, 10, 12), (1, 2, 2), (1, 16, 8), (3, 6, 10)],
}


def _hf_vision(grid, *, m=M, patch=PATCH, window=WINDOW):
  """HF window_index, cu_window_seqlens, cu_seqlens and window-permuted (h, w) rotary ids."""
  g = torch.tensor(grid, dtype=torch.int64)
  widx, cu_win = vu.get_vision_window_index(g, spatial_merge_size=m, window_size=window, patch_size=patch)
  cu_full = vu.get_vision_cu_seqlens(g)
  pos = vu.get_vision_position_ids(g, m)  # (S, 2) in pixel_values order
  s = pos.shape[0]
  pos = pos.reshape(s // m**2, m**2, 2)[widx].reshape(s, 2)  # as permute_input_for_window_attn
  return widx.numpy(), cu_win.numpy(), cu_full.numpy(), pos.numpy()


def _check_layout_against_hf(layout, grid, budget, *, m=M, patch=PATCH, window=WINDOW):
  """The valid slots, read in slot order, are HF's window-permuted sequence; groups hold whole segments."""
  unit = m * m
  widx, cu_win, cu_full, pos = _hf_vision(grid, m=m, patch=patch, window=window)
  s = int(np.prod(np.asarray(grid), axis=1).sum())
  vw = window // m // patch
  w_slots = vw * vw * unit
  assert (layout.num_patches, layout.num_merged) == (s, s // unit)
  if budget is not None:
    assert layout.patch_budget == budget
  s_pad = layout.patch_budget
  assert layout.merged_budget == s_pad // unit and layout.window_slots == w_slots
  for name in ("slot_patch", "raster_slot", "window_segment_ids", "full_segment_ids", "rope_positions", "grid_thw"):
    assert getattr(layout, name).dtype == np.int32, name
  assert layout.window_segment_ids.shape == (s_pad // w_slots, w_slots)
  assert layout.full_segment_ids.shape == (s_pad // layout.frame_budget, layout.frame_budget)
  assert layout.frame_budget % w_slots == 0 and layout.rope_positions.shape == (s_pad, 2)
  np.testing.assert_array_equal(layout.grid_thw, np.asarray(grid))

  valid = layout.slot_patch >= 0
  hf_patches = (widx[:, None] * unit + np.arange(unit)).reshape(-1)  # HF's window-ordered patch rows
  np.testing.assert_array_equal(layout.slot_patch[valid], hf_patches)
  np.testing.assert_array_equal(layout.slot_patch[layout.raster_slot[:s]], np.arange(s))
  np.testing.assert_array_equal(layout.raster_slot[s:], np.flatnonzero(~valid))

  for ids, cu in ((layout.window_segment_ids, cu_win), (layout.full_segment_ids, cu_full)):
    flat = ids.reshape(-1)
    assert ((flat >= 0) == valid).all()
    np.testing.assert_array_equal(P.cu_seqlens_from_segment_ids(flat[valid]), cu)
    for row in ids:  # a group (window or bin) never cuts a segment
      for seg in np.unique(row[row >= 0]):
        assert (flat == seg).sum() == (row == seg).sum()
  for row in layout.window_segment_ids:  # one window per group, valid slots first
    kept = row[row >= 0]
    assert len(np.unique(kept)) <= 1 and (row[: kept.size] >= 0).all()

  np.testing.assert_array_equal(layout.rope_positions[valid], pos)
  assert (layout.rope_positions[~valid] == 0).all()


@pytest.mark.parametrize("pad", [0, 2], ids=["default", "padded"])
@pytest.mark.parametrize("name", list(VISION_GRIDS))
def test_vision_layout_matches_hf(name, pad):
  grid = VISION_GRIDS[name]
  kw = dict(patch_size=PATCH, spatial_merge_size=M, window_size=WINDOW)
  budget = None if pad == 0 else P.required_slots(grid, **kw) * pad
  layout = P.vision_layout(np.asarray(grid), patch_budget=budget, **kw)
  _check_layout_against_hf(layout, grid, budget)


def test_spec_worked_example_values():
  layout = P.vision_layout([(1, 10, 12), (1, 4, 4)], patch_size=14, spatial_merge_size=2, window_size=112)
  ids = layout.window_segment_ids
  assert P.cu_seqlens_from_segment_ids(ids[ids >= 0]).tolist() == [0, 64, 96, 112, 120, 136]
  assert (ids >= 0).sum(axis=1).tolist() == [64, 32, 16, 8, 16, 0, 0, 0]  # 64-slot windows, two bins of 256
  assert layout.slot_patch[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # merged tokens 0, 1 of the first window
  assert layout.slot_patch[64:72].tolist() == [16, 17, 18, 19, 20, 21, 22, 23]  # merged 4, 5: the 2nd window
  assert layout.frame_budget == 256 and (layout.full_segment_ids >= 0).sum(axis=1).tolist() == [120, 16]


@pytest.mark.parametrize("m,patch,window,grid", [
    (2, 2, 8, [(2, 4, 6), (1, 6, 10)]),  # spec's fast variant: 2 merged tokens per window side
    (3, 14, 168, [(1, 9, 12), (2, 15, 6)]),  # merge 3: groups of 9 patches
    (1, 14, 28, [(1, 3, 5)]),  # merge 1: every patch is a merged token
])
def test_vision_layout_other_configs(m, patch, window, grid):
  kw = dict(patch_size=patch, spatial_merge_size=m, window_size=window)
  budget = 4 * P.required_slots(grid, **kw)
  layout = P.vision_layout(grid, patch_budget=budget, **kw)
  _check_layout_against_hf(layout, grid, budget, m=m, patch=patch, window=window)


def test_frames_pack_into_bins_in_order():
  """Small frames share a bin (masked apart); a fixed frame_budget gives the same shapes for other images."""
  kw = dict(patch_size=PATCH, spatial_merge_size=M, window_size=WINDOW)
  grid = [(1, 8, 8), (1, 8, 8), (1, 16, 16), (1, 8, 8)]  # 64, 64, 256, 64 slots
  layout = P.vision_layout(grid, patch_budget=1024, frame_budget=256, **kw)
  _check_layout_against_hf(layout, grid, 1024)
  bins = [sorted(set(row[row >= 0].tolist())) for row in layout.full_segment_ids]
  assert bins == [[0, 1], [2], [3], []]
  other = P.vision_layout([(1, 4, 6)] * 3, patch_budget=1024, frame_budget=256, **kw)
  assert other.full_segment_ids.shape == layout.full_segment_ids.shape


def test_vision_layout_roundtrip_and_readonly():
  """Place raster patches in slots, 'merge' groups of m², read back by raster_slot: raster order again."""
  grid = VISION_GRIDS["several"]
  layout = P.vision_layout(grid, patch_size=PATCH, spatial_merge_size=M, window_size=WINDOW)
  s = layout.num_patches
  x = np.arange(s * 3).reshape(s, 3)  # (S, D) raster rows
  slots = np.zeros((layout.patch_budget, 3), x.dtype)
  slots[layout.slot_patch >= 0] = x[layout.slot_patch[layout.slot_patch >= 0]]
  merged = slots.reshape(layout.merged_budget, -1)  # stand-in for the merger
  merged_slot = layout.raster_slot.reshape(-1, M * M)[:, 0] // (M * M)
  np.testing.assert_array_equal(merged[merged_slot][: s // (M * M)], x.reshape(s // (M * M), -1))
  with pytest.raises(ValueError):
    layout.slot_patch[0] = 1


def test_vision_layout_empty_grid_is_all_padding():
  layout = P.vision_layout(np.zeros((0, 3), np.int64), patch_size=PATCH, spatial_merge_size=M,
                           window_size=WINDOW, patch_budget=128)
  assert (layout.num_patches, layout.num_merged, layout.patch_budget) == (0, 0, 128)
  assert (layout.slot_patch == -1).all() and (layout.window_segment_ids == -1).all()
  np.testing.assert_array_equal(layout.raster_slot, np.arange(128))


def test_segment_id_helpers():
  ids = P.segment_ids_from_cu_seqlens([0, 2, 2, 5], 7)  # empty segment dropped, 2 pads
  assert ids.tolist() == [0, 0, 1, 1, 1, 2, 2]
  assert P.cu_seqlens_from_segment_ids(ids).tolist() == [0, 2, 5, 7]
  with pytest.raises(ValueError, match="start at 0"):
    P.segment_ids_from_cu_seqlens([1, 4], 4)
  with pytest.raises(ValueError, match="non-decreasing"):
    P.segment_ids_from_cu_seqlens([0, 4, 2], 4)
  with pytest.raises(ValueError, match="> total"):
    P.segment_ids_from_cu_seqlens([0, 9], 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid_thw=[(1, 5, 4)]), r"grid_thw\[0\] = \(1, 5, 4\).*divisible by spatial_merge_size=2"),
    (dict(grid_thw=[(1, 4, 4), (0, 4, 4)]), r"grid_thw\[1\].*>= 1"),
    (dict(grid_thw=[(1, 4, 4, 1)]), r"shape \(n, 3\)"),
    (dict(grid_thw=[(1, 16, 16), (1, 4, 8)], patch_budget=256), r"need 320 slots.*default layout takes 512"),
    (dict(grid_thw=[(1, 4, 8)], patch_budget=96), r"patch_budget 96 must be a positive multiple of 64"),
    (dict(grid_thw=[(1, 16, 16)], frame_budget=128), r"largest frame"),
    (dict(grid_thw=[(1, 4, 8)], frame_budget=96), r"frame_budget 96 must be a positive multiple of the window's 64"),
    (dict(grid_thw=[(1, 4, 8)], window_size=27), r"window_size 27 // spatial_merge_size 2 // patch_size 14 = 0"),
])
def test_vision_layout_errors(kwargs, match):
  args = dict(patch_size=PATCH, spatial_merge_size=M, window_size=WINDOW) | kwargs
  with pytest.raises(ValueError, match=match):
    P.vision_layout(args.pop("grid_thw"), **args)


def test_bucket_patch_budget():
  assert [P.bucket_patch_budget(n) for n in (0, 1, 256, 257, 600, 1025)] == [256, 256, 256, 512, 1024, 2048]
  assert [P.bucket_patch_budget(n, policy="multiple") for n in (1, 256, 257, 600)] == [256, 256, 512, 768]
  assert P.bucket_patch_budget(100, multiple=36, spatial_merge_size=3) == 144
  with pytest.raises(ValueError, match="multiple of spatial_merge_size"):
    P.bucket_patch_budget(10, multiple=6)
  with pytest.raises(ValueError, match="unknown policy"):
    P.bucket_patch_budget(10, policy="exp")


# --------------------------------------------------------------------------------------------------
# M-RoPE text positions
# --------------------------------------------------------------------------------------------------


def _row(*items):
  """Token list from ("t", n) text runs, ("i", grid) images and ("v", grid) videos (VS pads VE)."""
  out = []
  for kind, arg in items:
    if kind == "t":
      out += [TXT] * arg
    else:
      t, h, w = arg
      out += [VS] + [IMG if kind == "i" else VID] * (t * h * w // M**2) + [VE]
  return out


def _batch(rows, side="left"):
  """Pad rows to one length; returns (input_ids, attention_mask) int64."""
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for b, r in enumerate(rows):
    sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
    ids[b, sl], mask[b, sl] = r, 1
  return ids, mask


def _hf_rope(model, ids, mask=None, image_grid=None, video_grid=None, seconds=None):
  ids_t = torch.tensor(ids)
  types = P.mm_token_types(ids, image_token_id=IMG, video_token_id=VID)
  as_t = lambda g: None if g is None else torch.tensor(g, dtype=torch.int64)
  pos, delta = model.model.get_rope_index(
      ids_t, torch.tensor(types, dtype=torch.int64), image_grid_thw=as_t(image_grid),
      video_grid_thw=as_t(video_grid), second_per_grid_ts=seconds,
      attention_mask=None if mask is None else torch.tensor(mask))
  return pos.numpy(), delta.numpy()


def _ours(ids, mask=None, image_grid=None, video_grid=None, seconds=None, tokens_per_second=2):
  return P.get_rope_index(ids, mask, image_grid, image_token_id=IMG, video_token_id=VID, spatial_merge_size=M,
                          video_grid_thw=video_grid, second_per_grid_ts=seconds,
                          tokens_per_second=tokens_per_second)


def _assert_same(ours, hf, mask=None):
  (pos, delta), (hpos, hdelta) = ours, hf
  assert pos.dtype == np.int32 and delta.dtype == np.int32
  assert pos.shape == hpos.shape and delta.shape == hdelta.shape == (pos.shape[1], 1)
  valid = np.ones(pos.shape[1:], bool) if mask is None else mask.astype(bool)
  np.testing.assert_array_equal(pos[:, valid], hpos[:, valid])
  np.testing.assert_array_equal(delta, hdelta)
  assert (pos[:, ~valid] == 0).all() and (hpos[:, ~valid] == 0).all()  # 5.23 pads with 0


ROPE_CASES = {
    "text_only": ([_row(("t", 7))], None),
    "one_image": ([_row(("t", 4), ("i", (1, 4, 6)), ("t", 3))], [(1, 4, 6)]),
    "two_images_one_row": ([_row(("t", 2), ("i", (1, 10, 4)), ("t", 1), ("i", (1, 2, 8)), ("t", 5))],
                           [(1, 10, 4), (1, 2, 8)]),
    "image_first": ([_row(("i", (1, 6, 6)), ("t", 3))], [(1, 6, 6)]),
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_index_matches_hf_single_row(hf_model, name):
  rows, grids = ROPE_CASES[name]
  ids, _ = _batch(rows)
  _assert_same(_ours(ids, None, grids), _hf_rope(hf_model, ids, None, grids))
  _assert_same(_ours(ids, np.ones_like(ids), grids), _hf_rope(hf_model, ids, np.ones_like(ids), grids))


@pytest.mark.parametrize("side", ["left", "right"])
def test_rope_index_matches_hf_padded_batch(hf_model, side):
  rows = [_row(("t", 3), ("i", (1, 4, 6)), ("t", 2)),
          _row(("t", 1), ("i", (1, 2, 2)), ("t", 2), ("i", (1, 8, 4)), ("t", 9))]
  grids = [(1, 4, 6), (1, 2, 2), (1, 8, 4)]  # batch-major order
  ids, mask = _batch(rows, side)
  assert (mask == 0).any()
  ours = _ours(ids, mask, grids)
  _assert_same(ours, _hf_rope(hf_model, ids, mask, grids), mask)
  # decode continues at max + 1 = n_valid + delta on every row
  pos, delta = ours
  for b in range(len(rows)):
    assert pos[:, b][:, mask[b] == 1].max() + 1 == mask[b].sum() + delta[b, 0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_rope_index_text_only_padded_is_mask_cumsum(hf_model, side):
  """Text-only: cumsum(mask) - 1 on valid tokens (what generate() uses); a direct HF forward would use arange."""
  ids, mask = _batch([_row(("t", 3)), _row(("t", 6))], side)
  pos, delta = _ours(ids, mask)
  expected = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
  for axis in range(3):
    np.testing.assert_array_equal(pos[axis], expected)
  assert (delta == 0).all()
  _assert_same((pos, delta), _hf_rope(hf_model, ids, mask), mask)


def test_rope_index_spec_worked_example(hf_model):
  ids = np.array([_row(("t", 3), ("i", (1, 4, 6)), ("t", 2), ("i", (1, 2, 2)), ("t", 4))])
  pos, delta = _ours(ids, None, [(1, 4, 6), (1, 2, 2)])
  tail = list(range(7, 17))
  assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4] + tail
  assert pos[1, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5] + tail
  assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6] + tail
  assert delta.tolist() == [[-3]]
  _assert_same((pos, delta), _hf_rope(hf_model, ids, None, [(1, 4, 6), (1, 2, 2)]))


def test_rope_index_random_batches_match_hf(hf_model):
  rng = np.random.default_rng(0)
  for _ in range(25):
    rows, grids = [], []
    for _ in range(rng.integers(1, 4)):
      items = [("t", int(rng.integers(1, 4)))]
      for _ in range(rng.integers(0, 3)):
        g = (1, 2 * int(rng.integers(1, 6)), 2 * int(rng.integers(1, 6)))
        grids.append(g)
        items += [("i", g), ("t", int(rng.integers(1, 4)))]
      rows.append(_row(*items))
    ids, mask = _batch(rows, side=str(rng.choice(["left", "right"])))
    grids = grids or None
    _assert_same(_ours(ids, mask, grids), _hf_rope(hf_model, ids, mask, grids), mask)


def test_rope_index_explicit_mm_token_type_ids():
  ids, mask = _batch([_row(("t", 2), ("i", (1, 4, 4)), ("t", 1))])
  types = P.mm_token_types(ids, image_token_id=IMG, video_token_id=VID)
  a = _ours(ids, mask, [(1, 4, 4)])
  b = P.get_rope_index(ids, mask, [(1, 4, 4)], image_token_id=999, spatial_merge_size=M, mm_token_type_ids=types)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("seconds", [
    None,  # HF default: 1 second per grid step
    np.array([2.0, 0.5], np.float32),  # (2,4,4) with 2 s: video t positions overrun the next text (5.x)
    [2.0, 0.5],  # Python floats
    np.array([2, 1], np.int64),
], ids=["none", "float32", "list", "int"])
def test_rope_index_video_matches_hf(hf_model, seconds):
  rows = [_row(("t", 2), ("v", (2, 4, 4)), ("t", 3)),
          _row(("t", 1), ("i", (1, 2, 4)), ("t", 1), ("v", (3, 2, 6)), ("t", 2))]
  ids, mask = _batch(rows, "left")
  videos, images = [(2, 4, 4), (3, 2, 6)], [(1, 2, 4)]
  hf_seconds = torch.tensor(seconds) if isinstance(seconds, np.ndarray) else seconds
  ours = _ours(ids, mask, images, videos, seconds)
  _assert_same(ours, _hf_rope(hf_model, ids, mask, images, videos, hf_seconds), mask)


def test_rope_index_video_truncation_follows_dtype(hf_model):
  """tokens_per_second * 2.1 = 4.2: frame 15 is 62.999996 in float32 (-> 62) but 63.0000 in float64 (-> 63)."""
  ids, mask = _batch([_row(("t", 1), ("v", (16, 2, 2)), ("t", 1))])
  videos = [(16, 2, 2)]
  results = {}
  for dtype in (np.float32, np.float64):
    sec = np.array([2.1], dtype)
    ours = _ours(ids, mask, None, videos, sec)
    _assert_same(ours, _hf_rope(hf_model, ids, mask, None, videos, torch.tensor(sec)), mask)
    results[dtype] = ours[0][0, 0, 2:18]  # t axis of the 16 frames (text, VS, then the video from 2)
  assert results[np.float32][-1] == 2 + 62 and results[np.float64][-1] == 2 + 63


def test_rope_index_tokens_per_second(hf_model):
  ids, mask = _batch([_row(("t", 1), ("v", (3, 2, 2)), ("t", 1))])
  vc = hf_model.config.vision_config
  old, vc.tokens_per_second = vc.tokens_per_second, 4
  try:
    hf = _hf_rope(hf_model, ids, mask, None, [(3, 2, 2)], torch.tensor([0.75]))
  finally:
    vc.tokens_per_second = old
  ours = _ours(ids, mask, None, [(3, 2, 2)], np.array([0.75], np.float32), tokens_per_second=4)
  _assert_same(ours, hf, mask)
  assert ours[0][0, 0, 2:5].tolist() == [2, 5, 8]  # video starts at 2 (text, VS); 2 + trunc(k * 3.0)


def test_rope_index_all_padding_row():
  ids, mask = _batch([_row(("t", 3)), [TXT]])
  mask[1] = 0
  pos, delta = _ours(ids, mask)
  assert (pos[:, 1] == 0).all() and delta[1, 0] == 0


@pytest.mark.parametrize("rows,grids,match", [
    ([_row(("t", 1), ("i", (1, 4, 4)), ("t", 1), ("i", (1, 2, 2)))], [(1, 4, 4)],
     r"found 2 image placeholder run\(s\) \(per row: \{0: 2\}\) but image_grid_thw has 1 grid"),
    ([_row(("t", 1), ("i", (1, 4, 4)))], None, r"found 1 image placeholder run.*has 0 grid"),
    ([_row(("t", 1))], [(1, 4, 4)], r"found 0 image placeholder run.*has 1 grid"),
    ([_row(("t", 3)), _row(("t", 1), ("i", (1, 4, 4)))], [(1, 4, 8)],
     r"row 1: image #0 .* run of 4 <\|image_pad\|> tokens starting at valid token 2, but its grid \(t, h, w\) "
     r"= \(1, 4, 8\) needs t\*h\*w/4 = 8"),
    # two images with nothing in between form one run of 4+1 tokens
    ([[TXT, VS] + [IMG] * 5 + [VE]], [(1, 4, 4), (1, 2, 2)], r"found 1 image .* single run"),
    ([_row(("t", 1), ("i", (1, 4, 4)))], [(1, 3, 4)], r"image_grid_thw\[0\] = \(1, 3, 4\).*divisible"),
    ([_row(("t", 1), ("v", (2, 2, 2)))], None, r"found 1 video placeholder run.*video_grid_thw has 0"),
])
def test_rope_index_placeholder_errors(rows, grids, match):
  ids, mask = _batch(rows)
  with pytest.raises(ValueError, match=match):
    _ours(ids, mask, grids)


def test_rope_index_other_errors():
  ids, mask = _batch([_row(("t", 1), ("v", (2, 2, 2)))])
  with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries but there are 1 videos"):
    _ours(ids, mask, None, [(2, 2, 2)], [1.0, 2.0])
  with pytest.raises(ValueError, match="mm_token_type_ids holds \\[3\\]"):
    P.get_rope_index(ids, mask, image_token_id=IMG, spatial_merge_size=M, mm_token_type_ids=np.full_like(ids, 3))
  with pytest.raises(ValueError, match="attention_mask has shape"):
    _ours(ids, mask[:, 1:])
  with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
    _ours(ids[0])
