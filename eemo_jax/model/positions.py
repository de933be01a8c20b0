"""Host-side (NumPy) index arrays for Qwen2.5-VL: M-RoPE text positions and the vision window layout.

Everything here is data-dependent (run-length grouping, per-image windows, ragged grids), so it runs on
the host once per batch and hands the jitted model static-shape int32 arrays. The algorithms follow
transformers 5.23 (`Qwen2_5_VLModel.get_rope_index`, `vision_utils.get_vision_window_index`,
`get_vision_cu_seqlens`, `get_vision_position_ids`); see the reference spec sections 3.2-3.5 and 4.3.

Notation: `m` = spatial_merge_size, `S` = valid patches over all images, `S_pad` = the static patch
budget, `M = S / m²` merged (LLM) tokens, `M_pad = S_pad / m²`.

No jax or torch import: this module must stay usable in data-loading workers.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2
_MODALITY_NAME = {IMAGE: "image", VIDEO: "video"}


# --------------------------------------------------------------------------------------------------
# Grid validation
# --------------------------------------------------------------------------------------------------


def _as_grid(grid_thw, spatial_merge_size: int, what: str) -> np.ndarray:
  """(n, 3) int64 grid with positive entries and h, w divisible by m, or a ValueError naming the row."""
  if spatial_merge_size < 1:
    raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
  grid = np.asarray([] if grid_thw is None else grid_thw)
  if grid.size == 0:
    return np.zeros((0, 3), np.int64)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"{what} must have shape (n, 3) (t, h, w per item), got {grid.shape}")
  if not np.issubdtype(grid.dtype, np.integer):
    if not np.all(grid == np.round(grid)):
      raise ValueError(f"{what} must hold integers, got {grid.tolist()}")
  grid = grid.astype(np.int64)
  m = spatial_merge_size
  for i, (t, h, w) in enumerate(grid.tolist()):
    if min(t, h, w) < 1:
      raise ValueError(f"{what}[{i}] = {(t, h, w)}: t, h and w must all be >= 1")
    if h % m or w % m:
      raise ValueError(
          f"{what}[{i}] = {(t, h, w)}: h and w must be divisible by spatial_merge_size={m} (patches are "
          f"merged in {m}x{m} blocks); resize the image with the processor's smart_resize, whose factor is "
          f"patch_size*spatial_merge_size")
  return grid


# --------------------------------------------------------------------------------------------------
# Text-side M-RoPE positions
# --------------------------------------------------------------------------------------------------


def mm_token_types(input_ids, *, image_token_id: int, video_token_id: int | None = None) -> np.ndarray:
  """Modality per token (0 text, 1 image, 2 video), as the HF processor's `create_mm_token_type_ids`."""
  ids = np.asarray(input_ids)
  types = np.zeros(ids.shape, np.int32)
  types[ids == image_token_id] = IMAGE
  if video_token_id is not None:
    types[ids == video_token_id] = VIDEO
  return types


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
  """Maximal runs of equal values in a 1-D array as (value, start, length) (itertools.groupby)."""
  if types.size == 0:
    return []
  starts = np.flatnonzero(np.r_[True, types[1:] != types[:-1]])  # (n_runs,)
  lengths = np.diff(np.r_[starts, types.size])
  return [(int(types[s]), int(s), int(n)) for s, n in zip(starts, lengths)]


def _video_interval(tokens_per_second, second_per_grid_t):
  """Temporal step between video frames, in the arithmetic HF uses, so truncation matches bit for bit.

  HF computes `(arange(lt) * (tokens_per_second * second_per_grid_t)).long()` in torch. With a float
  tensor of `second_per_grid_ts` (what the processor returns) the product is done in that tensor's
  dtype (float32); with Python floats (a list) the product is a double that torch then rounds to its
  default float32. Integers stay exact. Returns a Python int or a NumPy float scalar of the compute dtype.
  """
  if isinstance(tokens_per_second, np.generic):
    tokens_per_second = tokens_per_second.item()
  if isinstance(second_per_grid_t, np.floating):  # came from a float array: compute in its dtype
    return second_per_grid_t.dtype.type(tokens_per_second) * second_per_grid_t
  if isinstance(second_per_grid_t, np.integer):
    second_per_grid_t = int(second_per_grid_t)
  product = tokens_per_second * second_per_grid_t
  if isinstance(product, numbers.Integral):
    return int(product)
  return np.float32(product)  # torch: int64 arange * Python float -> default dtype float32


def _temporal_ids(lt: int, interval) -> np.ndarray:
  """(lt,) frame positions: `(arange(lt) * interval)` truncated toward zero like torch `.long()`."""
  steps = np.arange(lt, dtype=np.int64)
  if isinstance(interval, int):
    return steps * interval
  return (steps.astype(interval.dtype) * interval).astype(np.int64)


def _media_positions(start: int, grid, spatial_merge_size: int, interval) -> np.ndarray:
  """(3, t*lh*lw) t/h/w positions of one image or video run, raster order over (t, h, w)."""
  t, h, w = (int(v) for v in grid)
  lh, lw = h // spatial_merge_size, w // spatial_merge_size
  tpos = _temporal_ids(t, interval)[:, None, None] + start  # (lt, 1, 1)
  hpos = np.arange(lh)[None, :, None] + start  # (1, lh, 1)
  wpos = np.arange(lw)[None, None, :] + start  # (1, 1, lw)
  return np.stack(np.broadcast_arrays(tpos, hpos, wpos)).reshape(3, -1)


def _check_placeholder_runs(row_runs, grids, modality: int, spatial_merge_size: int) -> None:
  """Raise a ValueError naming the row and item if placeholder runs and grids disagree.

  HF consumes one grid per maximal run (batch-major) and never checks run lengths, so a mismatch there
  either crashes later with an opaque shape error or, worse, silently misplaces positions.
  """
  name = _MODALITY_NAME[modality]
  token = "<|image_pad|>" if modality == IMAGE else "<|video_pad|>"
  found = [(b, start, n) for b, runs in enumerate(row_runs) for key, start, n in runs if key == modality]
  if len(found) != len(grids):
    per_row = {b: sum(1 for key, _, _ in runs if key == modality) for b, runs in enumerate(row_runs)}
    raise ValueError(
        f"found {len(found)} {name} placeholder run(s) (per row: {per_row}) but {name}_grid_thw has "
        f"{len(grids)} grid(s). Pass exactly one grid per {name}, in batch-major order of the {token} runs. "
        f"Two {name}s with no text between them form a single run; separate them with "
        f"<|vision_end|><|vision_start|> as the chat template does.")
  m2 = spatial_merge_size**2
  for k, ((b, start, n), (t, h, w)) in enumerate(zip(found, grids.tolist())):
    need = t * h * w // m2
    if n != need:
      raise ValueError(
          f"row {b}: {name} #{k} (batch order) is a run of {n} {token} tokens starting at valid token "
          f"{start}, but its grid (t, h, w) = {(t, h, w)} needs t*h*w/{m2} = {need}. Re-expand the "
          f"placeholders from the same grid (the processor's spatial_merge_size must be "
          f"{spatial_merge_size}), or fix the grid order.")


def get_rope_index(
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    *,
    image_token_id: int,
    video_token_id: int | None = None,
    spatial_merge_size: int,
    mm_token_type_ids=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    tokens_per_second=2,
) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE position ids `(3, B, L)` and deltas `(B, 1)`, both int32, with transformers 5.23 semantics.

  Per row, over the tokens with `attention_mask == 1` only, maximal runs of equal modality are walked
  in order with a running start `cur` (0 at the first valid token):

  * text run of n tokens: `cur + arange(n)` on all three axes; `cur += n`.
  * image/video run (one item, the next grid of that modality in batch-major order): t axis
    `cur + trunc(arange(t) * interval)`, h axis `cur + arange(h/m)`, w axis `cur + arange(w/m)`,
    raster over (t, h, w). `interval` is 1 for images and `tokens_per_second * second_per_grid_ts[k]`
    for videos (HF arithmetic, see `_video_interval`). Then `cur += max(h, w) // m` — the temporal
    extent is ignored (5.x behaviour; a long video's t positions can exceed the following text).

  Padding slots are 0. `delta[b] = max(valid positions) + 1 - n_valid`, so decode step k of row b sits
  at `n_valid + delta + k` = `max + 1 + k` on all axes. A row with no valid token gets zeros and delta 0
  (HF would crash on it).

  Text-only batches (no grids, no placeholders) get `cumsum(mask) - 1` on the valid tokens, pads 0.
  This is what HF `generate()` uses and what our sampler needs, but it differs from a direct HF
  `model(...)` call on a left-padded text-only batch, where 5.23 skips `get_rope_index` and uses
  `arange(L)` regardless of padding. The two agree when there is no left padding.

  Args:
    input_ids: (B, L) token ids.
    attention_mask: (B, L), 1 for real tokens; default all ones.
    image_grid_thw: (n_images, 3) patch grids in batch-major placeholder order.
    image_token_id, video_token_id: placeholder ids, used only to derive `mm_token_type_ids`.
    spatial_merge_size: m (2 for the released checkpoints).
    mm_token_type_ids: (B, L) 0 text / 1 image / 2 video; derived from `input_ids` when None.
    video_grid_thw: (n_videos, 3).
    second_per_grid_ts: (n_videos,) seconds per temporal grid step; None means 1 per video (as HF).
      Float arrays are multiplied in their own dtype, Python floats as torch would (float32).
    tokens_per_second: vision_config.tokens_per_second (2 for the checkpoints; the HF class default is 4).

  Raises:
    ValueError: shapes disagree, unknown modality ids, or placeholder runs do not match the grids
      (count per modality, or a run whose length is not t*h*w/m²).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, seq), got shape {ids.shape}")
  batch, length = ids.shape
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if mm_token_type_ids is None:
    types = mm_token_types(ids, image_token_id=image_token_id, video_token_id=video_token_id)
  else:
    types = np.asarray(mm_token_type_ids).astype(np.int32)
  for name, arr in (("attention_mask", mask), ("mm_token_type_ids", types)):
    if arr.shape != ids.shape:
      raise ValueError(f"{name} has shape {arr.shape} but input_ids has {ids.shape}")
  unknown = np.setdiff1d(np.unique(types[mask]), [TEXT, IMAGE, VIDEO])
  if unknown.size:
    raise ValueError(f"mm_token_type_ids holds {unknown.tolist()}; Qwen2.5-VL knows 0 text, 1 image, 2 video")

  grids = {IMAGE: _as_grid(image_grid_thw, spatial_merge_size, "image_grid_thw"),
           VIDEO: _as_grid(video_grid_thw, spatial_merge_size, "video_grid_thw")}
  row_runs = [_runs(types[b][mask[b]]) for b in range(batch)]
  for modality in (IMAGE, VIDEO):
    _check_placeholder_runs(row_runs, grids[modality], modality, spatial_merge_size)

  n_videos = len(grids[VIDEO])
  if second_per_grid_ts is None:
    seconds = [1] * n_videos  # HF: iter([1] * seq_len)
  else:
    seconds = second_per_grid_ts if isinstance(second_per_grid_ts, (list, tuple)) else list(
        np.asarray(second_per_grid_ts).reshape(-1))
    if len(seconds) != n_videos:
      raise ValueError(f"second_per_grid_ts has {len(seconds)} entries but there are {n_videos} videos")

  position_ids = np.zeros((3, batch, length), np.int64)  # (3, B, L)
  deltas = np.zeros((batch, 1), np.int64)  # (B, 1)
  next_item = {IMAGE: 0, VIDEO: 0}
  for b, runs in enumerate(row_runs):
    if not runs:
      continue
    cur, pieces = 0, []
    for key, _, n in runs:
      if key == TEXT:
        pieces.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
        cur += n
        continue
      k = next_item[key]
      next_item[key] += 1
      grid = grids[key][k]
      interval = 1 if key == IMAGE else _video_interval(tokens_per_second, seconds[k])
      pieces.append(_media_positions(cur, grid, spatial_merge_size, interval))
      cur += int(max(grid[1], grid[2])) // spatial_merge_size
    row = np.concatenate(pieces, axis=1)  # (3, n_valid)
    position_ids[:, b, mask[b]] = row
    deltas[b, 0] = row.max() + 1 - row.shape[1]
  if position_ids.size and np.abs(position_ids).max() >= 2**31:
    raise ValueError("M-RoPE positions overflow int32")
  return position_ids.astype(np.int32), deltas.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Vision tower layout
# --------------------------------------------------------------------------------------------------


def segment_ids_from_cu_seqlens(cu_seqlens, total: int) -> np.ndarray:
  """(total,) int32 segment id per position from cumulative boundaries `[0, c1, ..., cK]`.

  Empty segments (repeated boundaries) are dropped first, as HF's `unique_consecutive` does, so ids are
  dense `0..K'-1`. Positions at or beyond the last boundary (padding) share one extra id `K'`, which
  gives every pad query at least one visible key (a fully masked softmax row would be NaN).
  """
  raw = np.asarray(cu_seqlens, np.int64).reshape(-1)
  if np.any(np.diff(raw) < 0):
    raise ValueError(f"cu_seqlens must be non-decreasing, got {raw.tolist()}")
  cu = np.unique(raw)  # deduplicated; equals unique_consecutive since raw is sorted
  if cu.size == 0 or cu[0] != 0:
    raise ValueError(f"cu_seqlens must start at 0, got {np.asarray(cu_seqlens).tolist()}")
  if cu[-1] > total:
    raise ValueError(f"cu_seqlens ends at {cu[-1]} > total {total}")
  return np.searchsorted(cu[1:], np.arange(total), side="right").astype(np.int32)


def cu_seqlens_from_segment_ids(segment_ids) -> np.ndarray:
  """Inverse of `segment_ids_from_cu_seqlens` for contiguous segments: `[0, ends..., len]`, int32.

  Useful for varlen (flash-attention style) kernels and for comparing against HF's cu_seqlens.
  """
  seg = np.asarray(segment_ids)
  change = np.flatnonzero(seg[1:] != seg[:-1]) + 1
  return np.concatenate([[0], change, [seg.size]]).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
  """Static-shape slot layout for one vision-tower call over all images of a batch.

  The tower runs on `S_pad` *slots* rather than on the raw patch sequence, so that both attention
  kinds are plain batched attention with little wasted work:

  * every attention window gets exactly `window_slots` = (merged window side)² · m² slots; a window
    cut by the image edge fills its first slots (HF's order inside the window) and pads the rest;
  * frames (one per image, or per temporal patch of a video) are packed in order into attention bins
    of `frame_budget` slots (a whole number of windows); a frame never straddles two bins.

  Window blocks then attend within `(S_pad / window_slots, window_slots)` and full-attention blocks
  within `(S_pad / frame_budget, frame_budget)`, masked by segment ids: about HF's FLOPs, where one
  masked S x S attention over the whole batch would cost (number of images) times more. Read in slot
  order, the valid slots are exactly HF's window-permuted patch sequence (`get_vision_window_index`),
  and the window and frame segments are HF's `cu_window_seqlens` and `cu_seqlens`. Arrays are read-only.
  """

  slot_patch: np.ndarray  # (S_pad,) int32: raster patch index (pixel_values row) in each slot, -1 padding
  raster_slot: np.ndarray  # (S_pad,) int32: slot of raster patch i for i < S, then the padding slots in order
  window_segment_ids: np.ndarray  # (S_pad / window_slots, window_slots) int32: window id, -1 padding
  full_segment_ids: np.ndarray  # (S_pad / frame_budget, frame_budget) int32: frame id, -1 padding
  rope_positions: np.ndarray  # (S_pad, 2) int32 (h, w) patch-unit rotary ids per slot; padding 0
  num_patches: int  # S, valid patches
  num_merged: int  # M = S / m², valid merged tokens
  merge_unit: int  # m²
  grid_thw: np.ndarray  # (n, 3) int32

  @property
  def patch_budget(self) -> int:
    """S_pad, the static slot count the tower is compiled for."""
    return int(self.slot_patch.shape[0])

  @property
  def merged_budget(self) -> int:
    """M_pad = S_pad / m²: the tower's output rows, valid merged tokens first in raster order."""
    return self.patch_budget // self.merge_unit

  @property
  def window_slots(self) -> int:
    return int(self.window_segment_ids.shape[1])

  @property
  def frame_budget(self) -> int:
    return int(self.full_segment_ids.shape[1])


def _merged_window(window_size: int, patch_size: int, m: int) -> int:
  """vw, the side of an attention window in merged tokens (4 for the checkpoints)."""
  vw = window_size // m // patch_size if m >= 1 and patch_size >= 1 else 0
  if vw < 1:
    raise ValueError(f"window_size {window_size} // spatial_merge_size {m} // patch_size {patch_size} = {vw}; "
                     f"a window must span at least one merged token (HF fails with ZeroDivisionError)")
  return vw


def _frame_windows(t: int, lh: int, lw: int, vw: int) -> np.ndarray:
  """(t, windows per frame, vw²) item-local raster merged indices per window slot, -1 for padding.

  Windows are vw x vw merged tokens, row-major over windows, raster inside a window, with the valid
  tokens moved to the front of each window (HF concatenates the non-empty positions). HF pads each axis
  by `vw - n % vw` (a whole empty window when divisible) and drops empty windows; tiling with
  ceil(n / vw) windows gives the same non-empty windows directly.
  """
  nh, nw = -(-lh // vw), -(-lw // vw)
  padded = np.full((t, nh * vw, nw * vw), -1, np.int64)
  padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
  tiles = padded.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vw * vw)
  front = np.argsort(tiles < 0, axis=-1, kind="stable")  # valid first, order kept
  return np.take_along_axis(tiles, front, axis=-1)


def _patch_rope_ids(t: int, h: int, w: int, m: int) -> np.ndarray:
  """(t*h*w, 2) (h, w) patch ids in merge-block order (= pixel_values row order), frames repeated."""
  hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
  blocks = [p.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1) for p in (hpos, wpos)]
  return np.tile(np.stack(blocks, axis=-1), (t, 1))


def _frames(grid: np.ndarray, m: int, vw: int) -> list[np.ndarray]:
  """Every frame of the batch as (windows, vw²) global raster merged indices, -1 for padding."""
  frames, offset = [], 0
  for t, h, w in grid.tolist():
    windows = _frame_windows(t, h // m, w // m, vw)
    frames.extend(np.where(windows >= 0, windows + offset, -1))
    offset += t * (h // m) * (w // m)
  return frames


def _pack(frame_slots: list[int], bin_slots: int) -> list[int] | None:
  """Next-fit packing, which keeps the frames in order (so slot order stays HF's order).

  Returns each frame's bin, or None when a frame is larger than a bin.
  """
  bins, current, used = [], -1, bin_slots
  for need in frame_slots:
    if need > bin_slots:
      return None
    if used + need > bin_slots:
      current, used = current + 1, 0
    bins.append(current)
    used += need
  return bins


def _choose_bins(frame_slots: list[int], window_slots: int, patch_budget: int | None, frame_budget: int | None):
  """(frame_budget, bin of each frame, S_pad): the smallest bin that packs every frame into the budget."""
  if frame_budget is not None:
    candidates = [int(frame_budget)]
  elif patch_budget is not None:  # the smallest bin size that divides the budget and fits
    candidates = [f for f in range(window_slots, patch_budget + 1, window_slots) if patch_budget % f == 0]
  else:
    candidates = [max(frame_slots, default=window_slots)]
  for f in candidates:
    if f < window_slots or f % window_slots:
      raise ValueError(f"frame_budget {f} must be a positive multiple of the window's {window_slots} slots")
    bins = _pack(frame_slots, f)
    if bins is None:
      continue
    s_pad = patch_budget if patch_budget is not None else max(len(set(bins)), 1) * f
    if s_pad % f == 0 and (bins[-1] + 1 if bins else 1) * f <= s_pad:
      return f, bins, s_pad
  smallest = _choose_bins(frame_slots, window_slots, None, None)[2]
  raise ValueError(
      f"patch_budget {patch_budget} with frame_budget {frame_budget} cannot hold these images: their frames "
      f"need {sum(frame_slots)} slots ({max(frame_slots, default=0)} in the largest frame; each attention window "
      f"is padded to {window_slots} patches; the default layout takes {smallest}); use a larger budget (e.g. "
      f"bucket_patch_budget(required_slots(grid_thw, ...))) or smaller images")


def required_slots(grid_thw, *, patch_size: int, spatial_merge_size: int, window_size: int) -> int:
  """The slot count of the default layout of these images: the smallest budget to bucket from.

  Use it to choose a static budget: `bucket_patch_budget(required_slots(...), multiple=...)`.
  """
  m = spatial_merge_size
  vw = _merged_window(window_size, patch_size, m)
  window_slots = vw * vw * m * m
  frames = _frames(_as_grid(grid_thw, m, "grid_thw"), m, vw)
  return _choose_bins([f.shape[0] * window_slots for f in frames], window_slots, None, None)[2]


def vision_layout(grid_thw, *, patch_size: int, spatial_merge_size: int, window_size: int,
                  patch_budget: int | None = None, frame_budget: int | None = None) -> VisionLayout:
  """The slot layout (see `VisionLayout`) of all images of a batch.

  Matches HF 5.23 `get_vision_window_index` (window order and windows), `get_vision_cu_seqlens` (one
  full-attention segment per frame per item) and `get_vision_position_ids` permuted the way the tower's
  forward permutes its rotary tables. `grid_thw` may be empty (S = 0): the layout is then all padding,
  which lets a text-only batch reuse the compiled tower.

  Args:
    grid_thw: (n, 3) patch grids, in `pixel_values` order.
    patch_size, spatial_merge_size, window_size: vision config values (14, 2, 112 for the checkpoints).
    patch_budget: S_pad, the static slot count (a multiple of `frame_budget`); default: as many as needed.
    frame_budget: slots per full-attention bin, a multiple of the window's slots. Fix it (with
      `patch_budget`) for static shapes across batches; default: the smallest that fits.
  """
  m = spatial_merge_size
  unit = m * m
  vw = _merged_window(window_size, patch_size, m)
  grid = _as_grid(grid_thw, m, "grid_thw")
  window_slots = vw * vw * unit
  if patch_budget is not None:
    if int(patch_budget) != patch_budget or patch_budget < window_slots or patch_budget % window_slots:
      raise ValueError(f"patch_budget {patch_budget!r} must be a positive multiple of {window_slots} (the slots of "
                       f"one attention window: ({vw}x{vw} merged tokens) x {unit} patches)")
    patch_budget = int(patch_budget)
  frames = _frames(grid, m, vw)  # [(windows, vw²)] per frame
  frame_slots = [f.shape[0] * window_slots for f in frames]
  bin_slots, bins, s_pad = _choose_bins(frame_slots, window_slots, patch_budget, frame_budget)

  merged_slots = np.full((s_pad // unit,), -1, np.int64)  # raster merged index per merged slot
  window_ids = np.full((s_pad // unit,), -1, np.int64)
  frame_ids = np.full((s_pad // unit,), -1, np.int64)
  start, window_count, last_bin = 0, 0, -1
  for frame_id, (windows, b) in enumerate(zip(frames, bins)):
    if b != last_bin:
      start, last_bin = b * bin_slots // unit, b
    n = windows.size
    merged_slots[start:start + n] = windows.reshape(-1)
    valid = windows.reshape(-1) >= 0
    window_ids[start:start + n] = np.where(valid, np.repeat(np.arange(windows.shape[0]) + window_count, vw * vw), -1)
    frame_ids[start:start + n] = np.where(valid, frame_id, -1)
    window_count += windows.shape[0]
    start += n

  valid = merged_slots >= 0
  slot_patch = np.where(valid[:, None], merged_slots[:, None] * unit + np.arange(unit), -1).reshape(-1)
  num_patches = int(np.prod(grid, axis=1).sum())
  raster_slot = np.empty(s_pad, np.int64)
  filled = np.flatnonzero(slot_patch >= 0)
  raster_slot[slot_patch[filled]] = filled
  raster_slot[num_patches:] = np.flatnonzero(slot_patch < 0)
  rope_positions = np.zeros((s_pad, 2), np.int64)
  if num_patches:
    raster_rope = np.concatenate([_patch_rope_ids(t, h, w, m) for t, h, w in grid.tolist()])  # (S, 2) raster
    rope_positions[filled] = raster_rope[slot_patch[filled]]

  def frozen(a, shape=None):
    a = np.ascontiguousarray(a, dtype=np.int32)
    a = a.reshape(shape) if shape is not None else a
    a.setflags(write=False)
    return a

  return VisionLayout(
      slot_patch=frozen(slot_patch), raster_slot=frozen(raster_slot),
      window_segment_ids=frozen(np.repeat(window_ids, unit), (-1, window_slots)),
      full_segment_ids=frozen(np.repeat(frame_ids, unit), (-1, bin_slots)),
      rope_positions=frozen(rope_positions), num_patches=num_patches, num_merged=num_patches // unit,
      merge_unit=unit, grid_thw=frozen(grid.reshape(-1, 3)))


def bucket_patch_budget(num_patches: int, *, policy: str = "pow2", multiple: int = 256,
                        spatial_merge_size: int = 2) -> int:
  """Round a patch count up to one of a few static sizes, so the jitted tower compiles few shapes.

  Policies:
    * "pow2" (default): the smallest `multiple * 2**k` >= num_patches. Few buckets (about log2 of the
      range), up to ~2x padding; the attention cost of padding is quadratic, so prefer it when the
      number of distinct image sizes is large (GRPO rollouts, mixed resolutions).
    * "multiple": the next multiple of `multiple`. At most `multiple - 1` padded patches, but one
      compiled shape per step of `multiple` (a 5120-patch image with 256 gives 20 buckets).

  `multiple` must be a multiple of spatial_merge_size**2. Zero patches gives the smallest bucket.
  """
  unit = spatial_merge_size**2
  if multiple < 1 or multiple % unit:
    raise ValueError(f"multiple {multiple} must be a positive multiple of spatial_merge_size**2 = {unit}")
  if num_patches < 0:
    raise ValueError(f"num_patches must be >= 0, got {num_patches}")
  steps = max(1, -(-int(num_patches) // multiple))  # ceil, at least one bucket
  if policy == "multiple":
    return steps * multiple
  if policy == "pow2":
    return multiple * (1 << (steps - 1).bit_length())
  raise ValueError(f"unknown policy {policy!r}; use 'pow2' or 'multiple'")
