"""Metrics against hand counts and NumPy references (SPEC §3)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import metrics

# Whole functions are jitted (one compile per shape) to keep the file fast.
j_counts = jax.jit(metrics.confusion_counts, static_argnums=2)
j_psd = jax.jit(metrics.per_sample_dice, static_argnums=2)
j_region = jax.jit(metrics.brats_region_counts)

# Hand-counted 4x4 example, C = 3 (rows = truth, cols = pred):
#   M = [[7, 1, 1], [1, 3, 0], [1, 0, 2]]
LABELS_4x4 = np.array([[0, 0, 1, 1],
                       [0, 0, 1, 1],
                       [2, 2, 0, 0],
                       [2, 0, 0, 0]], np.int32)
PRED_4x4 = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 0],
                     [2, 0, 0, 0],
                     [2, 2, 0, 0]], np.int32)
#                  tp fp fn tn
COUNTS_4x4 = np.array([[7, 2, 2, 5],
                       [3, 1, 1, 11],
                       [2, 1, 1, 12]], np.float32)


def np_counts(pred, labels, c, mask=None):
    w = np.ones(labels.shape) if mask is None else np.broadcast_to(
        np.asarray(mask, np.float64).reshape(
            np.shape(mask) + (1,) * (labels.ndim - np.ndim(mask))),
        labels.shape)
    ok = (pred >= 0) & (pred < c) & (labels >= 0) & (labels < c)
    w = w * ok
    out = np.zeros((c, 4))
    for k in range(c):
        p, g = pred == k, labels == k
        out[k] = [(w * (p & g)).sum(), (w * (p & ~g)).sum(),
                  (w * (~p & g)).sum(), (w * (~p & ~g)).sum()]
    return out


def test_confusion_counts_hand_4x4():
    counts = j_counts(PRED_4x4[None], LABELS_4x4[None], 3)
    chex.assert_shape(counts, (3, 4))
    assert counts.dtype == jnp.float32
    np.testing.assert_array_equal(counts, COUNTS_4x4)
    np.testing.assert_array_equal(
        jax.jit(metrics.confusion_matrix, static_argnums=2)(PRED_4x4,
                                                            LABELS_4x4, 3),
        [[7, 1, 1], [1, 3, 0], [1, 0, 2]])


def test_metrics_hand_4x4_background_flag():
    m = metrics.metrics_from_counts(COUNTS_4x4,
                                    class_names=("bg", "a", "b"))
    assert m["background_in_means"] is False
    exp = {
        "dice/bg": 7 / 9, "dice/a": 3 / 4, "dice/b": 2 / 3,
        "iou/bg": 7 / 11, "iou/a": 3 / 5, "iou/b": 1 / 2,
        "precision/a": 3 / 4, "precision/b": 2 / 3, "precision/bg": 7 / 9,
        "sensitivity/a": 3 / 4, "sensitivity/b": 2 / 3,
        "specificity/bg": 5 / 7, "specificity/a": 11 / 12,
        "specificity/b": 12 / 13,
        "dice_mean": (3 / 4 + 2 / 3) / 2, "iou_mean": (3 / 5 + 1 / 2) / 2,
        "precision_mean": (3 / 4 + 2 / 3) / 2,
        "sensitivity_mean": (3 / 4 + 2 / 3) / 2,
        "specificity_mean": (11 / 12 + 12 / 13) / 2,
        "pixel_accuracy": 12 / 16, "num_pixels": 16.0,
    }
    for k, v in exp.items():
        assert m[k] == pytest.approx(v), k
    mb = metrics.metrics_from_counts(COUNTS_4x4, include_background=True)
    assert mb["background_in_means"] is True
    assert mb["dice_mean"] == pytest.approx((7 / 9 + 3 / 4 + 2 / 3) / 3)
    assert mb["iou_mean"] == pytest.approx((7 / 11 + 3 / 5 + 1 / 2) / 3)
    assert mb["dice_mean"] != pytest.approx(m["dice_mean"])
    assert mb["pixel_accuracy"] == m["pixel_accuracy"]     # all classes always
    assert "dice/0" in mb and "dice/2" in mb               # default names


def test_background_dominance_trap():
    # 1000 background pixels all right, 10 tumour pixels, 4 found: accuracy
    # ~99.4 % beside a mediocre foreground Dice (seed 001's trap).
    labels = np.zeros((1010,), np.int32)
    labels[:10] = 1
    pred = np.zeros_like(labels)
    pred[:4] = 1
    m = metrics.metrics_from_counts(np_counts(pred, labels, 2))
    assert m["pixel_accuracy"] == pytest.approx(1004 / 1010)
    assert m["dice_mean"] == pytest.approx(8 / 14)
    assert metrics.metrics_from_counts(
        np_counts(pred, labels, 2), include_background=True)["dice_mean"] > 0.78


def test_confusion_counts_random_masked_and_summable():
    rng = np.random.default_rng(0)
    c = 5
    labels = rng.integers(0, c, (4, 6, 7)).astype(np.int32)
    pred = rng.integers(0, c, (4, 6, 7)).astype(np.int32)
    labels[0, 0, :3] = 255                     # ignored (out of range)
    mask = np.array([1, 1, 0, 1], np.float32)
    got = j_counts(pred, labels, c, mask)
    np.testing.assert_allclose(got, np_counts(pred, labels, c, mask))
    # per-pixel boolean mask
    pm = rng.random((4, 6, 7)) > 0.3
    np.testing.assert_allclose(j_counts(pred, labels, c, pm),
                               np_counts(pred, labels, c, pm))
    # summable: two half batches add up to the whole
    whole = j_counts(pred, labels, c)
    halves = (j_counts(pred, labels, c, np.array([1, 1, 0, 0], np.float32))
              + j_counts(pred, labels, c, np.array([0, 0, 1, 1], np.float32)))
    np.testing.assert_array_equal(whole, halves)
    np.testing.assert_allclose(whole, np_counts(pred, labels, c))


def test_empty_classes_never_nan():
    # class 2 absent from both pred and labels; class 1 present, never
    # predicted; nothing at all in the all-zero counts.
    labels = np.array([[0, 1, 1, 0]], np.int32)
    pred = np.array([[0, 0, 0, 0]], np.int32)
    m = metrics.metrics_from_counts(np_counts(pred, labels, 3))
    assert m["dice/2"] == m["iou/2"] == 1.0
    assert m["precision/2"] == m["sensitivity/2"] == m["specificity/2"] == 1.0
    assert m["dice/1"] == 0.0 and m["precision/1"] == 0.0
    assert m["sensitivity/1"] == 0.0
    z = metrics.metrics_from_counts(np.zeros((3, 4)))
    assert all(not (isinstance(v, float) and math.isnan(v))
               for v in z.values())
    assert z["dice_mean"] == 1.0 and z["pixel_accuracy"] == 1.0


def test_per_sample_dice():
    rng = np.random.default_rng(1)
    c = 3
    labels = rng.integers(0, c, (3, 5, 6)).astype(np.int32)
    pred = rng.integers(0, c, (3, 5, 6)).astype(np.int32)
    labels[1] = 0                              # sample 1: only background
    pred[1] = 0
    mask = np.array([1, 1, 0], np.float32)     # sample 2 padded
    d = j_psd(pred, labels, c, mask)
    chex.assert_shape(d, (3, c))
    for b in range(2):
        cnt = np_counts(pred[b], labels[b], c)
        den = 2 * cnt[:, 0] + cnt[:, 1] + cnt[:, 2]
        ref = np.where(den > 0, 2 * cnt[:, 0] / np.maximum(den, 1), 1.0)
        np.testing.assert_allclose(d[b], ref, rtol=1e-6)
    np.testing.assert_array_equal(d[1], [1.0, 1.0, 1.0])   # empty vs empty
    np.testing.assert_array_equal(d[2], [1.0, 1.0, 1.0])   # masked sample
    # the same under vmap over clients
    dk = jax.jit(jax.vmap(lambda p, l, m: metrics.per_sample_dice(p, l, c, m)))(
        pred[None], labels[None], mask[None])
    np.testing.assert_allclose(dk[0], d)


def test_brats_regions_hand_and_random():
    labels = np.array([[0, 1, 2, 3, 3, 0]], np.int32)
    pred = np.array([[0, 1, 1, 3, 2, 2]], np.int32)
    r = metrics.brats_region_dice(pred, labels)
    assert r == pytest.approx({"WT": 8 / 9, "TC": 4 / 6, "ET": 2 / 3})
    counts = j_region(pred, labels)
    chex.assert_shape(counts, (3, 4))
    np.testing.assert_array_equal(counts, [[4, 1, 0, 1], [2, 1, 1, 2],
                                           [1, 0, 1, 4]])
    assert metrics.region_dice_from_counts(counts) == pytest.approx(r)
    # ET empty in both -> 1
    assert metrics.brats_region_dice(np.array([0, 1, 2]),
                                     np.array([0, 2, 1]))["ET"] == 1.0
    # random, masked: jitted counts == NumPy version
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 4, (2, 4, 5, 6)).astype(np.int32)
    prd = rng.integers(0, 4, (2, 4, 5, 6)).astype(np.int32)
    mask = np.array([1, 0], np.float32)
    got = metrics.region_dice_from_counts(j_region(prd, lab, mask))
    assert got == pytest.approx(metrics.brats_region_dice(prd, lab, mask))
    ref = {}
    for name, cls in (("WT", [1, 2, 3]), ("TC", [1, 3]), ("ET", [3])):
        p, g = np.isin(prd[0], cls), np.isin(lab[0], cls)
        ref[name] = 2 * (p & g).sum() / (p.sum() + g.sum())
    assert got == pytest.approx(ref)


# --------------------------------------------------------------------- hd95
def _squares(shift, axis, shape=(20, 20)):
    a = np.zeros(shape, bool)
    a[5:10, 5:10] = True
    b = np.roll(a, shift, axis=axis)
    return a, b


def test_hd95_hand_2d_anisotropic():
    # Two 5x5 squares (16 surface pixels each) offset by 2 rows, spacing
    # (2, 1) mm.  Per direction, e.g. A -> B: A's top row 5 x 4.0 mm (2 rows);
    # A's bottom row (0, 1, 2, 1, 0) mm (to B's side columns); A's side
    # columns (2, 0, 0) mm each.  Pooled (32 values): 10 x 4.0, 6 x 2.0,
    # 4 x 1.0, 12 x 0.0 -> 95th percentile (index 29.45) = 4.0.
    a, b = _squares(2, axis=0)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(4.0)
    assert metrics.hd95(a, b) == pytest.approx(2.0)
    # median of the pooled distances: sorted[15] = 1.0, sorted[16] = 2.0
    assert metrics.hd95(a, b, (2.0, 1.0), percentile=50) == pytest.approx(1.5)
    assert metrics.hd95(a, b, (2.0, 1.0), percentile=100) == pytest.approx(4.0)
    # the same offset along the other axis uses spacing[1]
    a, b = _squares(2, axis=1)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(2.0)
    assert metrics.hd95(a, a, spacing=(2.0, 1.0)) == 0.0


def test_hd95_3d_cube_shift():
    a = np.zeros((12, 12, 12), bool)
    a[4:8, 4:8, 4:8] = True
    b = np.roll(a, 1, axis=2)
    assert metrics.hd95(a, b, spacing=(1.0, 1.0, 3.0)) == pytest.approx(3.0)
    b0 = np.roll(a, 1, axis=0)
    assert metrics.hd95(a, b0, spacing=(0.5, 1.0, 3.0)) == pytest.approx(0.5)


def test_hd95_empty_conventions():
    z = np.zeros((20, 10), bool)
    assert metrics.hd95(z, z) == 0.0
    a = z.copy()
    a[3:5, 3:5] = True
    diag = math.hypot(20 * 2.0, 10 * 1.0)
    assert metrics.hd95(a, z, (2.0, 1.0)) == pytest.approx(diag)
    assert metrics.hd95(z, a, (2.0, 1.0)) == pytest.approx(diag)
    with pytest.raises(ValueError):
        metrics.hd95(a, a[:, :5])


def test_hd95_matches_scipy_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    for shape, sp in (((24, 30), (0.7, 1.3)), ((10, 14, 12), (2.5, 1.0, 0.8))):
        x = ndimage.binary_opening(rng.random(shape) > 0.55)
        y = ndimage.binary_opening(rng.random(shape) > 0.55)
        sx = x & ~ndimage.binary_erosion(x, border_value=0)
        sy = y & ~ndimage.binary_erosion(y, border_value=0)
        d_xy = ndimage.distance_transform_edt(~sy, sampling=sp)[sx]
        d_yx = ndimage.distance_transform_edt(~sx, sampling=sp)[sy]
        ref = np.percentile(np.concatenate([d_xy, d_yx]), 95)
        assert metrics.hd95(x, y, sp) == pytest.approx(ref, rel=1e-5)


def _brute_force_directed(a, b, spacing):
    """Reference surface distances without distance transforms: surfaces by
    scipy's binary erosion (outside = background, as medpy), all pairwise
    Euclidean distances between surface voxel centres in mm."""
    from scipy import ndimage
    from scipy.spatial.distance import cdist
    sa = a & ~ndimage.binary_erosion(a, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, border_value=0)
    d = cdist(np.argwhere(sa) * np.asarray(spacing),
              np.argwhere(sb) * np.asarray(spacing))
    return d.min(axis=1), d.min(axis=0)


def _square_with_spur():
    # A: a 5x5 square (16 surface pixels).  B: the same square plus a
    # 1-pixel-wide spur of 6 pixels leaving its right side at row 5.
    a = np.zeros((12, 18), bool)
    a[3:8, 3:8] = True
    b = a.copy()
    b[5, 8:14] = True
    return a, b


def test_hd95_conventions_hand_computed():
    # A -> B (16 values): A's (5, 7) is interior in B, nearest B surface 1 px
    # away; the other 15 lie on B's surface -> 15 x 0, 1 x 1.
    # B -> A (21 values): 15 shared surface pixels at 0, the spur at 1..6.
    # pooled (37 values: 30 x 0, 1, 1, 2, 3, 4, 5, 6): index 36 * .95 = 34.2
    #   -> 4 + 0.2 * (5 - 4) = 4.2 px.
    # max_directed: A -> B index 15 * .95 = 14.25 -> 0.25; B -> A index
    #   20 * .95 = 19 -> 5.0; max = 5.0 px.
    a, b = _square_with_spur()
    assert metrics.hd95(a, b) == pytest.approx(4.2)
    assert metrics.hd95(a, b, convention="pooled") == pytest.approx(4.2)
    assert metrics.hd95(a, b, convention="max_directed") == pytest.approx(5.0)
    assert metrics.hd95(b, a, convention="max_directed") == pytest.approx(5.0)
    # spacing (2, 0.5) mm: the spur runs along axis 1 -> every distance x 0.5
    assert metrics.hd95(a, b, (2.0, 0.5)) == pytest.approx(2.1)
    assert metrics.hd95(a, b, (2.0, 0.5), convention="max_directed") == pytest.approx(2.5)
    d_ab, d_ba = metrics.surface_distances(a, b)
    assert sorted(d_ab) == [0.0] * 15 + [1.0]
    assert sorted(d_ba) == [0.0] * 15 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # percentile 100: both conventions are the classic Hausdorff distance
    for conv in metrics.HD95_CONVENTIONS:
        assert metrics.hd95(a, b, percentile=100, convention=conv) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="convention"):
        metrics.hd95(a, b, convention="mean")


def test_hd95_conventions_match_brute_force_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(7)
    cases = [((16, 20), (0.7, 1.3)), ((9, 12, 11), (2.5, 1.0, 0.8))]
    # a small lesion far from the border of a large volume (exercises the crop)
    big_a = np.zeros((30, 40, 40), bool)
    big_a[10:14, 20:26, 5:9] = True
    big_b = np.zeros_like(big_a)
    big_b[11:15, 21:25, 6:12] = True
    for shape, sp in cases:
        x = ndimage.binary_opening(rng.random(shape) > 0.5)
        y = ndimage.binary_opening(rng.random(shape) > 0.5)
        d_xy, d_yx = _brute_force_directed(x, y, sp)
        assert metrics.hd95(x, y, sp, convention="pooled") == pytest.approx(
            np.percentile(np.concatenate([d_xy, d_yx]), 95), rel=1e-6)
        assert metrics.hd95(x, y, sp, convention="max_directed") == pytest.approx(
            max(np.percentile(d_xy, 95), np.percentile(d_yx, 95)), rel=1e-6)
    sp = (3.0, 1.0, 1.0)
    d_ab, d_ba = _brute_force_directed(big_a, big_b, sp)
    got_ab, got_ba = metrics.surface_distances(big_a, big_b, sp)
    np.testing.assert_allclose(np.sort(got_ab), np.sort(d_ab), rtol=1e-6)
    np.testing.assert_allclose(np.sort(got_ba), np.sort(d_ba), rtol=1e-6)
    assert metrics.hd95(big_a, big_b, sp, convention="max_directed") == pytest.approx(
        max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-6)
    # the empty conventions do not depend on the convention
    z = np.zeros_like(big_a)
    for conv in metrics.HD95_CONVENTIONS:
        assert metrics.hd95(z, z, sp, convention=conv) == 0.0
        assert metrics.hd95(big_a, z, sp, convention=conv) == pytest.approx(
            math.sqrt(90.0 ** 2 + 40.0 ** 2 + 40.0 ** 2))


def test_metric_table_keys_exist():
    c = len(metrics.BRATS_CLASS_NAMES)
    m = metrics.metrics_from_counts(np.ones((c, 4)),
                                    class_names=metrics.BRATS_CLASS_NAMES)
    for row, key in metrics.METRIC_TABLE_KEYS.items():
        assert key == "loss" or key in m, row
