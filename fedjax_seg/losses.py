"""Segmentation losses (SPEC §3), pure ``jax.numpy``.

All functions are jittable and vmappable (``num_classes`` and the float
hyper-parameters must be static Python values under ``jax.jit``).

Shape conventions (channels last, 2D or 3D alike):

* ``logits``: float ``[..., C]``, e.g. ``[B, H, W, C]`` or ``[B, D, H, W, C]``.
* ``labels``: int ``[...]`` (the leading shape of ``logits``, no channel
  axis), values in ``[0, C)``.
* ``onehot``: float ``[..., C]`` (only for :func:`categorical_cross_entropy`).
* ``mask``: optional, float or bool, broadcastable to the leading shape after
  *appending* trailing axes (see :func:`_expand_mask`).  Typically the
  per-sample validity ``[B]`` of a padded client batch (padded samples = 0),
  but a per-pixel mask ``[B, H, W]`` works too.  ``None`` means every pixel
  counts.  Values are used as weights (0 / 1 in practice).

Means are taken over valid pixels only.  If no pixel is valid the loss is
``0.0`` (never NaN), and the gradient is 0.  Masked-out pixels are replaced by
neutral values *before* any computation, so garbage (even NaN/inf) in padded
samples changes neither the loss nor the gradient.

Computation is carried out in at least float32 (bfloat16 logits are upcast).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[..., Array]

__all__ = [
    "categorical_cross_entropy",
    "sparse_cross_entropy",
    "soft_dice_loss",
    "dice_ce_loss",
    "get_loss",
    "LOSS_NAMES",
]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _expand_mask(mask, ndim: int) -> Array:
    """Appends trailing singleton axes to ``mask`` until it has ``ndim`` axes.

    A per-sample mask ``[B]`` becomes ``[B, 1, ..., 1]`` and so broadcasts
    against a leading shape ``[B, H, W]`` (``ndim`` = 3) or ``[B, D, H, W]``.
    A mask that already has ``ndim`` axes is returned unchanged.
    """
    mask = jnp.asarray(mask)
    if mask.ndim > ndim:
        raise ValueError(f"mask has {mask.ndim} axes, more than the {ndim} "
                         "axes of the leading (pixel) shape")
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _weights(mask, lead_shape) -> Array:
    """Float32 per-pixel weights of shape ``lead_shape`` (all ones if None)."""
    if mask is None:
        return jnp.ones(lead_shape, jnp.float32)
    m = _expand_mask(mask, len(lead_shape))
    return jnp.broadcast_to(m.astype(jnp.float32), lead_shape)


def _float(x: Array) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean(per_pixel: Array, w: Array) -> Array:
    """Σ w·l / Σ w, or 0 when Σ w = 0 (no NaN in value or gradient)."""
    num = jnp.sum(per_pixel * w)
    den = jnp.sum(w)
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, 0.0)


def _check_classes(logits: Array, num_classes: int) -> None:
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits have {logits.shape[-1]} channels but "
                         f"num_classes={num_classes}")


# ----------------------------------------------------------------------------
# cross-entropy
# ----------------------------------------------------------------------------
def categorical_cross_entropy(logits: Array, onehot: Array,
                              mask: Optional[Array] = None) -> Array:
    """Categorical cross-entropy on one-hot (or soft) targets.

    SPEC §3:  ``CE = − Σ_i t_i log softmax(s)_i`` per pixel, averaged over the
    valid pixels.

    Args:
      logits: float ``[..., C]``.
      onehot: float ``[..., C]`` targets ``t`` (rows sum to 1).
      mask: optional, broadcastable to ``logits.shape[:-1]`` after appending
        trailing axes (e.g. per-sample ``[B]``).

    Returns:
      float32 scalar; 0 if no pixel is valid.
    """
    logits = _float(logits)
    onehot = _float(onehot)
    if onehot.shape != logits.shape:
        raise ValueError(f"onehot shape {onehot.shape} != logits shape "
                         f"{logits.shape}")
    w = _weights(mask, logits.shape[:-1])
    valid = (w > 0)[..., None]
    logits = jnp.where(valid, logits, 0.0)
    onehot = jnp.where(valid, onehot, 0.0)
    per_pixel = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return _masked_mean(per_pixel, w)


def sparse_cross_entropy(logits: Array, labels: Array,
                         mask: Optional[Array] = None) -> Array:
    """Sparse categorical cross-entropy on integer labels.

    Same value as :func:`categorical_cross_entropy` on ``one_hot(labels)``
    but the one-hot tensor is never materialised:
    ``CE = logsumexp(s) − s_label`` per pixel (``= −log softmax(s)_label``),
    averaged over the valid pixels.

    Args:
      logits: float ``[..., C]``.
      labels: int ``[...]`` = ``logits.shape[:-1]``, values in ``[0, C)``
        (values outside are clipped; mask them out instead).
      mask: optional, broadcastable to ``labels.shape`` after appending
        trailing axes (e.g. per-sample ``[B]``).

    Returns:
      float32 scalar; 0 if no pixel is valid.
    """
    logits = _float(logits)
    labels = jnp.asarray(labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} != logits leading shape "
                         f"{logits.shape[:-1]}")
    num_classes = logits.shape[-1]
    w = _weights(mask, labels.shape)
    valid = w > 0
    logits = jnp.where(valid[..., None], logits, 0.0)
    labels = jnp.clip(jnp.where(valid, labels, 0), 0, num_classes - 1)
    labels = labels.astype(jnp.int32)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    per_pixel = jax.nn.logsumexp(logits, axis=-1) - picked
    return _masked_mean(per_pixel, w)


# ----------------------------------------------------------------------------
# Dice
# ----------------------------------------------------------------------------
def soft_dice_loss(logits: Array, labels: Array, num_classes: int,
                   mask: Optional[Array] = None, eps: float = 1.0,
                   include_background: bool = True) -> Array:
    """Soft (batch-level) Dice loss.

    SPEC §3:  ``1 − mean_c (2 Σ p_c g_c + ε) / (Σ p_c + Σ g_c + ε)`` with
    ``p = softmax(logits)``, ``g = one_hot(labels)``; the sums run over all
    valid pixels of the whole batch (one Dice per class for the batch, not
    per sample).  The mean runs over classes ``0..C-1``, or ``1..C-1`` when
    ``include_background=False`` (needs ``C ≥ 2``).

    A class absent from both prediction and labels contributes Dice 1
    (also when ``eps = 0``), so an all-masked batch gives loss 0.

    Args:
      logits: float ``[..., C]``.
      labels: int ``[...]`` = ``logits.shape[:-1]``.
      num_classes: ``C`` (static Python int; must equal ``logits.shape[-1]``).
      mask: optional, broadcastable to ``labels.shape`` after appending
        trailing axes (e.g. per-sample ``[B]``).
      eps: smoothing ε (default 1.0).
      include_background: whether class 0 enters the class mean.

    Returns:
      float32 scalar in ``[0, 1]``.
    """
    logits = _float(logits)
    labels = jnp.asarray(labels)
    _check_classes(logits, num_classes)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} != logits leading shape "
                         f"{logits.shape[:-1]}")
    w = _weights(mask, labels.shape)
    valid = w > 0
    logits = jnp.where(valid[..., None], logits, 0.0)
    labels = jnp.where(valid, labels, 0)
    p = jax.nn.softmax(logits, axis=-1) * w[..., None]
    g = jax.nn.one_hot(labels, num_classes, dtype=p.dtype) * w[..., None]
    axes = tuple(range(p.ndim - 1))
    inter = jnp.sum(p * g, axis=axes)                      # [C]
    den = jnp.sum(p, axis=axes) + jnp.sum(g, axis=axes) + eps
    safe = jnp.where(den > 0, den, 1.0)
    dice = jnp.where(den > 0, (2.0 * inter + eps) / safe, 1.0)  # [C]
    if not include_background:
        if num_classes < 2:
            raise ValueError("include_background=False needs num_classes >= 2")
        dice = dice[1:]
    return 1.0 - jnp.mean(dice)


def dice_ce_loss(logits: Array, labels: Array, num_classes: int,
                 mask: Optional[Array] = None, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, eps: float = 1.0,
                 include_background: bool = True) -> Array:
    """Dice + cross-entropy, weighted 1:1 by default (seed 001, SPEC §3).

    ``dice_weight · soft_dice_loss + ce_weight · sparse_cross_entropy``, both
    masked by ``mask``.  Shapes as in :func:`soft_dice_loss`.
    """
    _check_classes(jnp.asarray(logits), num_classes)
    dice = soft_dice_loss(logits, labels, num_classes, mask, eps=eps,
                          include_background=include_background)
    ce = sparse_cross_entropy(logits, labels, mask)
    return dice_weight * dice + ce_weight * ce


# ----------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------
def _ce_uniform(logits, labels, num_classes, mask=None):
    _check_classes(jnp.asarray(logits), num_classes)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=_float(logits).dtype)
    return categorical_cross_entropy(logits, onehot, mask)


def _sparse_ce_uniform(logits, labels, num_classes, mask=None):
    _check_classes(jnp.asarray(logits), num_classes)
    return sparse_cross_entropy(logits, labels, mask)


_REGISTRY = {
    "ce": _ce_uniform,
    "sparse_ce": _sparse_ce_uniform,
    "dice": soft_dice_loss,
    "dice_ce": dice_ce_loss,
}

LOSS_NAMES = tuple(_REGISTRY)


def get_loss(name: str, **kwargs) -> LossFn:
    """Returns the loss called ``name`` with the uniform signature.

    ``fn(logits, labels, num_classes, mask=None) -> scalar``.

    Names: ``'ce'`` (categorical CE; builds the one-hot from ``labels``),
    ``'sparse_ce'``, ``'dice'`` (:func:`soft_dice_loss`), ``'dice_ce'``
    (:func:`dice_ce_loss`).  Extra ``kwargs`` (e.g. ``eps``,
    ``include_background``, ``dice_weight``, ``ce_weight``) are bound to the
    underlying function.
    """
    try:
        base = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose from {LOSS_NAMES}")
    if not kwargs:
        return base

    def fn(logits, labels, num_classes, mask=None):
        return base(logits, labels, num_classes, mask, **kwargs)

    fn.__name__ = f"{name}_loss"
    return fn
