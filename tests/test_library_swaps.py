"""Hand-written code replaced by library calls: the result is unchanged (to a stated tolerance).

Each test keeps the implementation from before the swap as the reference.
"""
import numpy as np
import pytest
from PIL import Image

from fedjax_seg import infer
from fedjax_seg.data import preprocess

# (in h, w) -> (out H, W): up, down (integer and non-integer ratios), anisotropic, tiny <-> large.
RESIZE_CASES = [((64, 64), (128, 128)), ((128, 128), (64, 64)), ((240, 240), (128, 128)),
                ((256, 256), (128, 128)), ((37, 53), (64, 64)), ((100, 90), (33, 47)),
                ((7, 5), (96, 96)), ((96, 96), (7, 5)), ((155, 240), (128, 128))]


def _pil_resize_slices(images, masks, size):
  """`preprocess.resize_slices` before the swap (Pillow, one slice and channel at a time)."""
  s, h, w, c = images.shape
  if (h, w) == (size, size):
    return images.astype(np.float32), masks.astype(np.uint8)
  out_i = np.empty((s, size, size, c), np.float32)
  out_m = np.empty((s, size, size), np.uint8)
  for i in range(s):
    for ch in range(c):
      im = Image.fromarray(images[i, :, :, ch].astype(np.float32), mode="F")
      out_i[i, :, :, ch] = np.asarray(im.resize((size, size), Image.BILINEAR))
    out_m[i] = np.asarray(Image.fromarray(masks[i].astype(np.uint8)).resize((size, size), Image.NEAREST))
  return out_i, out_m


def _pil_resize_probs(p, hw):
  """`infer._resize_probs` before the swap: Pillow bilinear per slice and class, the code
  `volumes._resize_inplane` still runs (kept on Pillow, see its docstring)."""
  from fedjax_seg.data import volumes
  return volumes._resize_inplane(p, hw)


# Bilinear: Pillow and jax.image.resize(linear, antialias=True) use the same triangle kernel
# (widened by the scale when shrinking) with the same edge renormalisation; they differ by float32
# rounding only. Measured max |new - old| <= 6e-7 * max|x| on these cases; bound 2e-6 * max|x|.
LINEAR_RTOL = 2e-6


@pytest.mark.parametrize("src,dst", [(a, b) for a, b in RESIZE_CASES if b[0] == b[1]])
def test_resize_slices_images_match_pillow(src, dst):
  rng = np.random.default_rng(src[0] * 1000 + dst[0])
  images = (rng.random((3,) + src + (2,)) * 1000.0).astype(np.float32)
  masks = rng.integers(0, 4, (3,) + src).astype(np.uint8)
  new_i, new_m = preprocess.resize_slices(images, masks, dst[0])
  old_i, old_m = _pil_resize_slices(images, masks, dst[0])
  assert new_i.dtype == np.float32 and new_i.shape == old_i.shape
  assert new_m.dtype == np.uint8 and new_m.shape == old_m.shape
  np.testing.assert_allclose(new_i, old_i, rtol=0, atol=LINEAR_RTOL * 1000.0)
  _check_nearest(masks, new_m, old_m)


@pytest.mark.parametrize("src,dst", RESIZE_CASES)
def test_resize_probs_match_pillow(src, dst):
  rng = np.random.default_rng(src[1] * 1000 + dst[1])
  logits = rng.standard_normal((2,) + src + (4,))
  p = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  new = infer._resize_probs(p, dst)
  old = _pil_resize_probs(p, dst)
  assert new.dtype == np.float32 and new.shape == old.shape
  np.testing.assert_allclose(new, old, rtol=0, atol=LINEAR_RTOL)
  np.testing.assert_allclose(new.sum(-1), 1.0, atol=1e-5)  # still a distribution


def _source_index(n_in, n_out):
  """The source row each output row of nearest `resize_stack` copies (resize an arange)."""
  ramp = np.arange(n_in, dtype=np.int32)[None, :, None, None]
  return preprocess.resize_stack(ramp, (n_out, 1), "nearest")[0, :, 0, 0]


def _check_nearest(masks, new_m, old_m):
  """Masks: every output pixel is a copy of a source pixel (no new label values).

  The source row/column of output i is floor((i + 0.5) * in / out). Where that
  coordinate is an exact integer (a tie, e.g. 90 -> 47 at i = 23: 45.0) the float
  rounding of each implementation decides: Pillow accumulates a double coordinate,
  XLA divides through a float32 reciprocal, and either may land just below the tie
  (copying row 44 instead of 45). Those whole rows/columns, taken from the adjacent
  source row/column, are the only differences; integer ratios (256 -> 128,
  64 -> 128) and 240 -> 128 have no ties and are bit-identical.
  """
  assert set(np.unique(new_m)) <= set(np.unique(masks))
  (h, w), (big_h, big_w) = masks.shape[1:], new_m.shape[1:]
  jy, jx = _source_index(h, big_h), _source_index(w, big_w)
  np.testing.assert_array_equal(new_m, masks[:, jy][:, :, jx])  # a gather of source pixels
  exact_y = (np.arange(big_h) + 0.5) * h / big_h
  exact_x = (np.arange(big_w) + 0.5) * w / big_w
  ties_y, ties_x = np.isclose(exact_y % 1, 0), np.isclose(exact_x % 1, 0)
  for j, exact, ties in ((jy, exact_y, ties_y), (jx, exact_x, ties_x)):
    np.testing.assert_array_equal(j[~ties], np.floor(exact[~ties]))
    assert np.all(np.isin(j[ties] - np.rint(exact[ties]), (-1, 0)))
  differ = new_m != old_m
  assert not differ[:, ~ties_y][:, :, ~ties_x].any()
  if not ties_y.any() and not ties_x.any():
    np.testing.assert_array_equal(new_m, old_m)


@pytest.mark.parametrize("src,dst", [((100, 90), (33, 47)), ((96, 96), (7, 5)), ((37, 53), (64, 64))])
def test_nearest_masks_differ_only_at_ties(src, dst):
  rng = np.random.default_rng(1)
  masks = rng.integers(0, 4, (2,) + src).astype(np.uint8)
  new = preprocess.resize_stack(masks[..., None], dst, "nearest")[..., 0]
  old = np.stack([np.asarray(Image.fromarray(m).resize((dst[1], dst[0]), Image.NEAREST)) for m in masks])
  assert new.dtype == np.uint8
  _check_nearest(masks, new, old)


def test_resize_handles_more_slices_than_one_chunk_and_no_op():
  rng = np.random.default_rng(2)
  n = preprocess._RESIZE_CHUNK * 2 + 3
  images = rng.random((n, 40, 40, 1)).astype(np.float32)
  masks = (images[..., 0] > 0.5).astype(np.uint8)
  new_i, new_m = preprocess.resize_slices(images, masks, 24)
  old_i, old_m = _pil_resize_slices(images, masks, 24)
  np.testing.assert_allclose(new_i, old_i, atol=LINEAR_RTOL)
  np.testing.assert_array_equal(new_m, old_m)  # 40 -> 24: no ties
  same_i, same_m = preprocess.resize_slices(images.astype(np.float64), masks.astype(np.int32), 40)
  assert same_i.dtype == np.float32 and same_m.dtype == np.uint8
  np.testing.assert_array_equal(same_i, images)


# ---------------------------------------------------------------------------
# sweep.apply_point -> ConfigDict.update_from_flattened_dict
# ---------------------------------------------------------------------------
def _old_apply_point(config, point):
  """`sweep.apply_point` before the swap (hand-written walk and type conversions)."""
  import copy

  import ml_collections

  from fedjax_seg import sweep
  c = copy.deepcopy(config)
  for key, value in point.items():
    parts = key.split(".")
    node = c
    for i, p in enumerate(parts[:-1]):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise sweep.SweepError(f"sweep key {key!r}: config has no {'.'.join(parts[:i + 1])!r}")
      node = node[p]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise sweep.SweepError(f"sweep key {key!r}: unknown config key (config.{key} does not exist)")
    old = node[leaf]
    if isinstance(old, str) and not isinstance(value, str) and value is not None:
      value = str(value)
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    elif isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise sweep.SweepError(f"sweep key {key!r}: cannot set {value!r} (type {type(value).__name__}) on a "
                             f"field of type {type(old).__name__}: {e}") from e
  return c


def _sweep_base():
  import ml_collections
  return ml_collections.ConfigDict({
      "seed": 0, "algorithm": "fedavg", "optimizer": {"lr": 1e-3, "name": "adam"},
      "data": {"root": "", "target_spacing": (1.0, 1.0, 1.0), "sizes": [1, 2], "fold": None,
               "phantom": {"size": 32}},
      "fl": {"eval_clients": True, "plain": {"a": 1}}, "flag": False})


SWEEP_POINTS = [
    {"seed": 3, "optimizer.lr": 1, "data.root": 123, "algorithm": "dcew"},
    {"data.target_spacing": [2.0, 2.0, 2.0], "data.sizes": (3, 4), "data.fold": 2},
    {"data.phantom.size": 64, "fl.eval_clients": False, "optimizer.lr": True, "flag": True},
    {"data.root": None, "optimizer.name": "sgd"},
    {"optimizer.nope": 1},                    # unknown leaf
    {"nope.lr": 1},                           # unknown section
    {"data.phantom.size.x": 1},               # through a non-ConfigDict
    {"seed.lr": 1},
    {"seed": 0.5},                            # type error
    {"flag": "yes"},
    {"data.target_spacing": "fine"},
    {"seed": 1, "optimizer.nope": 2},         # the error comes after a valid key
    {"data.sizes[0]": 7},                     # index syntax is not a sweep key
]


@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("point", SWEEP_POINTS, ids=[",".join(p) for p in SWEEP_POINTS])
def test_apply_point_unchanged(point, locked):
  from fedjax_seg import sweep
  base = _sweep_base()
  if locked:
    base.lock()
  before = base.to_json()

  def outcome(fn):
    try:
      c = fn(base, point)
    except sweep.SweepError as e:
      return "error", str(e)
    return "ok", (c.to_json(), {k: type(v).__name__ for k, v in _flat(c).items()}, c.is_locked)

  new, old = outcome(sweep.apply_point), outcome(_old_apply_point)
  if new[0] == "error":
    assert any(new[1].startswith(f"sweep key {k!r}: ") for k in point), new[1]
    if "config has no" in new[1] or "unknown config key" in new[1]:
      assert "\n" not in new[1]
  assert new == old
  assert base.to_json() == before  # the base config is untouched


def _flat(c, prefix=""):
  import ml_collections
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def test_apply_point_never_adds_fields_to_an_unlocked_config():
  from fedjax_seg import sweep
  base = _sweep_base()
  with pytest.raises(sweep.SweepError, match=r"^sweep key 'optimizer.nope': unknown config key "
                     r"\(config.optimizer.nope does not exist\)$"):
    sweep.apply_point(base, {"optimizer.nope": 1})
  with pytest.raises(sweep.SweepError, match=r"^sweep key 'nope.lr': config has no 'nope'$"):
    sweep.apply_point(base, {"nope.lr": 1})
  assert "nope" not in base.optimizer and "nope" not in base


# ---------------------------------------------------------------------------
# Progress: rich bars on a terminal, today's plain lines always
# ---------------------------------------------------------------------------
def test_no_bar_when_stdout_is_not_a_terminal(capsys):
  from fedjax_seg import progress, runlog
  assert not progress.interactive()  # pytest captures stdout
  p = runlog.Progress(3, 0, what="round", bar=True, tag="[fl]")
  assert not p.bar.shown
  p.step(1, "train_loss 0.5")
  p.close()
  out = capsys.readouterr().out
  assert out.startswith("[train] round 1/3  train_loss 0.5  (") and "eta " in out
  assert out.count("\n") == 1


def test_bars_share_one_display_and_go_away(monkeypatch):
  import gc

  from fedjax_seg import progress
  outer = progress.Bar(2, "[sweep] points", enabled=True)
  inner = progress.Bar(5, "[fl] rounds", completed=1, enabled=True)
  assert outer.shown and inner.shown and progress._OPEN == 2
  live = progress._LIVE
  inner.update(3, "x")
  assert live.tasks[1].completed == 3
  inner.close()
  inner.close()  # idempotent
  assert progress._LIVE is live and progress._OPEN == 1
  del outer  # dropped without close (a loop left by an exception): removed too
  gc.collect()
  assert progress._LIVE is None and progress._OPEN == 0
  monkeypatch.setenv("FEDJAX_SEG_PROGRESS", "plain")
  assert not progress.interactive()


def test_bar_and_plain_lines_on_a_terminal():
  import os
  import pty
  import subprocess
  import sys
  import time
  code = ("import time\nfrom fedjax_seg import runlog\n"
          "p = runlog.Progress(3, 0, what='epoch', bar=True)\n"
          "for i in range(1, 4):\n  time.sleep(0.3)\n  p.step(i, f'loss {i}')\n"
          "p.close()\nprint('done')\n")
  master, slave = pty.openpty()
  env = dict(os.environ, TERM="xterm", COLUMNS="120")
  env.pop("FEDJAX_SEG_PROGRESS", None)
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=slave, stderr=slave, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  os.close(slave)
  buf = b""
  t_end = time.time() + 60
  while time.time() < t_end:
    try:
      chunk = os.read(master, 4096)
    except OSError:  # the child closed the terminal
      break
    if not chunk:
      break
    buf += chunk
  proc.wait(timeout=60)
  os.close(master)
  text = buf.decode("utf-8", "replace")
  assert proc.returncode == 0, text
  for i in (1, 2, 3):  # the plain lines are still there, above the bar
    assert f"[train] epoch {i}/3  loss {i}" in text
  assert "[train] epochs" in text and "eta" in text  # the rich bar (description, ETA column)
  assert text.rstrip().endswith("done")
