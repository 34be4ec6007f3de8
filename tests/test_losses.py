"""Losses against hand-written NumPy references (SPEC §3)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import losses


# ---------------------------------------------------------------- references
def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_onehot(labels, c):
    return np.eye(c, dtype=np.float64)[labels]


def np_weights(mask, shape):
    if mask is None:
        return np.ones(shape)
    m = np.asarray(mask, np.float64)
    return np.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - m.ndim)),
                           shape)


def np_ce(logits, labels, mask=None):
    c = logits.shape[-1]
    per = -(np_onehot(labels, c) * np_log_softmax(logits)).sum(-1)
    w = np_weights(mask, labels.shape)
    return 0.0 if w.sum() == 0 else float((per * w).sum() / w.sum())


def np_dice_loss(logits, labels, c, mask=None, eps=1.0, include_bg=True):
    p = np.exp(np_log_softmax(logits))
    g = np_onehot(labels, c)
    w = np_weights(mask, labels.shape)[..., None]
    axes = tuple(range(labels.ndim))
    inter = (p * g * w).sum(axes)
    den = (p * w).sum(axes) + (g * w).sum(axes) + eps
    dice = (2 * inter + eps) / den
    if not include_bg:
        dice = dice[1:]
    return float(1 - dice.mean())


def rand(shape, c, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape + (c,)).astype(np.float32) * scale
    labels = rng.integers(0, c, size=shape).astype(np.int32)
    return logits, labels


# Tests jit whole functions (one compile per shape) rather than running eagerly
# (one compile per primitive): keeps the file well under 10 s on a CPU.
C = 4
SHAPE = (3, 6, 7)          # [B, H, W]


@functools.lru_cache(maxsize=None)
def jloss(name, **kw):
    return jax.jit(losses.get_loss(name, **kw), static_argnums=2)


@functools.lru_cache(maxsize=None)
def jgrad(name):
    return jax.jit(jax.grad(losses.get_loss(name)), static_argnums=2)


# --------------------------------------------------------------------- tests
@pytest.mark.parametrize("c,shape", [(2, (2, 5, 6)), (16, (2, 3, 4, 5))])
def test_ce_equals_sparse_ce_and_reference(c, shape):
    logits, labels = rand(shape, c, seed=c)
    onehot = jax.nn.one_hot(labels, c)
    chex.assert_shape(onehot, shape + (c,))
    ce = jax.jit(losses.categorical_cross_entropy)(logits, onehot)
    sce = jax.jit(losses.sparse_cross_entropy)(logits, labels)
    chex.assert_shape(ce, ())
    np.testing.assert_allclose(ce, sce, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sce, np_ce(logits, labels), rtol=1e-5)


def test_ce_hand_value():
    # one pixel, logits (0, 0): -log(1/2); logits (log 3, 0), label 1: log 4
    logits = np.array([[[0.0, 0.0], [np.log(3.0), 0.0]]], np.float32)
    labels = np.array([[0, 1]], np.int32)
    np.testing.assert_allclose(jloss("sparse_ce")(logits, labels, 2),
                               (np.log(2.0) + np.log(4.0)) / 2, rtol=1e-6)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_masking_padded_garbage_and_all_masked(name):
    logits, labels = rand(SHAPE, C, seed=1)
    fn, gfn = jloss(name), jgrad(name)
    mask = np.array([1.0, 1.0, 0.0], np.float32)
    clean = logits.copy()
    clean[2] = 0.0
    ref = fn(clean, labels, C, mask)
    # the masked loss equals the NumPy loss of the two valid samples
    if name in ("ce", "sparse_ce"):
        expect = np_ce(logits[:2], labels[:2])
    elif name == "dice":
        expect = np_dice_loss(logits[:2], labels[:2], C)
    else:
        expect = np_ce(logits[:2], labels[:2]) + np_dice_loss(
            logits[:2], labels[:2], C)
    np.testing.assert_allclose(ref, expect, rtol=1e-5)
    g_ref = gfn(jnp.asarray(clean), labels, C, mask)
    for garbage in (1e4, np.nan, np.inf):
        lg = logits.copy()
        lg[2] = garbage
        lb = labels.copy()
        lb[2] = 255                             # out-of-range label too
        np.testing.assert_allclose(fn(lg, lb, C, mask), ref, rtol=1e-6)
        g = gfn(jnp.asarray(lg), lb, C, mask)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(g[2], 0.0)
    # all masked -> exactly 0, zero (finite) gradient
    zero = np.zeros((3,), np.float32)
    assert float(fn(logits, labels, C, zero)) == 0.0
    g = gfn(jnp.asarray(logits), labels, C, zero)
    assert np.all(g == 0)


def test_per_pixel_and_bool_masks_match_reference():
    logits, labels = rand(SHAPE, C, seed=3)
    pixel_mask = np.random.default_rng(0).random(SHAPE) > 0.5
    np.testing.assert_allclose(
        jloss("sparse_ce")(logits, labels, C, pixel_mask),
        np_ce(logits, labels, pixel_mask), rtol=1e-5)
    np.testing.assert_allclose(
        jloss("dice")(logits, labels, C, pixel_mask),
        np_dice_loss(logits, labels, C, pixel_mask), rtol=1e-5)


@pytest.mark.parametrize("include_bg,eps", [(True, 1.0), (False, 1e-5)])
def test_soft_dice_matches_reference_3d(include_bg, eps):
    logits, labels = rand((2, 3, 4, 5), C, seed=5, scale=1.0)
    val = jloss("dice", eps=eps, include_background=include_bg)(logits, labels,
                                                                 C)
    np.testing.assert_allclose(
        val, np_dice_loss(logits, labels, C, eps=eps, include_bg=include_bg),
        rtol=1e-5)


def test_soft_dice_hand_value():
    # 1x2 image, C=2, hard probabilities: both pixels -> class 0; labels
    # (0, 1).  class 0: (2*1+1)/(2+1+1) = 3/4, class 1: (0+1)/(0+1+1) = 1/2
    big = 50.0
    logits = np.array([[[big, -big], [big, -big]]], np.float32)
    labels = np.array([[0, 1]], np.int32)
    np.testing.assert_allclose(jloss("dice")(logits, labels, 2),
                               1 - (0.75 + 0.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(
        jloss("dice", include_background=False)(logits, labels, 2),
        0.5, rtol=1e-6)


def test_perfect_prediction_losses_are_zero():
    _, labels = rand(SHAPE, C, seed=7)
    logits = 30.0 * (2 * np.eye(C, dtype=np.float32)[labels] - 1)
    np.testing.assert_allclose(jloss("dice", eps=0.0)(logits, labels, C), 0.0,
                               atol=1e-6)
    assert float(jloss("sparse_ce")(logits, labels, C)) < 1e-6
    assert float(jloss("dice_ce")(logits, labels, C)) < 1e-5


def test_dice_empty_class_counts_as_one():
    # class 2 absent everywhere and never predicted (eps=0): Dice_2 = 1
    logits = np.zeros((1, 2, 2, 3), np.float32)
    logits[..., 2] = -1e4
    logits[..., 0] = np.array([[40, -40], [40, -40]])
    labels = np.array([[[0, 1], [0, 1]]], np.int32)
    val = jloss("dice", eps=0.0)(logits, labels, 3)
    assert np.isfinite(val)
    np.testing.assert_allclose(val, 0.0, atol=1e-6)


def test_dice_ce_is_weighted_sum():
    logits, labels = rand(SHAPE, C, seed=9)
    d = np_dice_loss(logits, labels, C)
    ce = np_ce(logits, labels)
    np.testing.assert_allclose(jloss("dice_ce")(logits, labels, C), d + ce,
                               rtol=1e-5)
    np.testing.assert_allclose(
        jloss("dice_ce", dice_weight=0.3, ce_weight=2.0)(logits, labels, C),
        0.3 * d + 2.0 * ce, rtol=1e-5)


def test_registry():
    assert set(losses.LOSS_NAMES) == {"ce", "sparse_ce", "dice", "dice_ce"}
    assert losses.get_loss("dice") is losses.soft_dice_loss
    with pytest.raises(ValueError):
        losses.get_loss("focal")
    logits, labels = rand((1, 2, 2), C)
    with pytest.raises(ValueError):
        losses.soft_dice_loss(logits, labels, C + 1)
    with pytest.raises(ValueError):
        losses.sparse_cross_entropy(logits, labels[0])


def test_vmap_over_clients_and_bf16():
    logits, labels = rand((3,) + SHAPE, C, seed=13)   # [K clients, B, H, W]
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    fn = losses.get_loss("dice_ce")
    per_client = jax.jit(jax.vmap(lambda l, y, m: fn(l, y, C, m)))(
        logits, labels, mask)
    chex.assert_shape(per_client, (3,))
    for k in range(2):
        np.testing.assert_allclose(
            per_client[k],
            np_ce(logits[k], labels[k], mask[k])
            + np_dice_loss(logits[k], labels[k], C, mask[k]), rtol=1e-5)
    assert float(per_client[2]) == 0.0
    # bfloat16 logits are upcast: float32 result
    out = jloss("sparse_ce")(jnp.asarray(logits[0], jnp.bfloat16), labels[0], C)
    assert out.dtype == jnp.float32


def test_expand_mask():
    m = losses._expand_mask(jnp.ones((4,)), 4)
    chex.assert_shape(m, (4, 1, 1, 1))
    chex.assert_shape(losses._expand_mask(jnp.ones((4, 3)), 3), (4, 3, 1))
    with pytest.raises(ValueError):
        losses._expand_mask(jnp.ones((2, 2, 2)), 2)
