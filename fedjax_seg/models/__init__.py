"""Model registry: config.model.name -> Flax module; and pure init/apply.

Every algorithm uses models only through :func:`build` and :class:`ModelFns`,
so any registered model works with any federated algorithm.

Variables are a dict ``{'params': ..., ['batch_stats': ...]}``; the optimiser
only touches ``params``; every other collection is model state carried along
(and averaged by the aggregators like params).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_seg.models.unet import UNet

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  def deco(ctor):
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = ctor
    return ctor
  return deco


def names():
  return sorted(_REGISTRY)


@register("unet")
def _unet(num_classes, base=32, depth=4, dropout=0.5, norm="none", ndim=2, dtype="float32", **kw):
  if kw:
    raise ValueError(f"unknown config.model keys for 'unet': {sorted(kw)}")
  return UNet(num_classes=num_classes, base=base, depth=depth, dropout=dropout,
              norm=norm, ndim=ndim, dtype=jnp.dtype(dtype))


# --- SCAUnet / SCAUnet-A (fedjax_seg/models/scaunet.py) ---------------
from fedjax_seg.models.scaunet import SCAUnet, default_adaptive_scales  # noqa: E402


def _scaunet_ctor(name, num_classes, base, depth, scales, dropout, norm, ndim, dtype,
                  upsample, key_dim, depthwise, kw):
  if kw:
    raise ValueError(f"unknown config.model keys for {name!r}: {sorted(kw)}")
  if scales is None:
    scales = default_adaptive_scales(depth)
  elif not isinstance(scales, int):
    scales = tuple(int(s) for s in scales)
  return SCAUnet(num_classes=num_classes, base=base, depth=depth, scales=scales,
                 dropout=dropout, norm=norm, ndim=ndim, upsample=upsample, key_dim=key_dim,
                 depthwise=depthwise, dtype=jnp.dtype(dtype))


@register("scaunet")
def _scaunet(num_classes, base=16, depth=4, scales=4, dropout=0.5, norm="none", ndim=2,
             dtype="float32", upsample="transpose", key_dim=None, depthwise="shift", **kw):
  """SCAUnet: the same number of scales N (``scales``, an int) at every level."""
  return _scaunet_ctor("scaunet", num_classes, base, depth, scales, dropout, norm, ndim, dtype,
                       upsample, key_dim, depthwise, kw)


@register("scaunet_a")
def _scaunet_a(num_classes, base=16, depth=4, scales=None, dropout=0.5, norm="none", ndim=2,
               dtype="float32", upsample="transpose", key_dim=None, depthwise="shift", **kw):
  """SCAUnet-A: N per level, most at full resolution (default (4, 3, 2, 1) for depth 4)."""
  return _scaunet_ctor("scaunet_a", num_classes, base, depth, scales, dropout, norm, ndim,
                       dtype, upsample, key_dim, depthwise, kw)
# --- end SCAUnet ---------------------------------------------------------------


def get_model(name: str, **kwargs) -> nn.Module:
  if name not in _REGISTRY:
    raise ValueError(f"config.model.name={name!r} is not a registered model; "
                     f"available: {names()}")
  return _REGISTRY[name](**kwargs)


@dataclasses.dataclass(frozen=True)
class ModelFns:
  """Pure functions around a Flax module.

  init(key, x) -> variables
  apply(variables, x, train, key) -> (logits, new_variables)
    ``new_variables`` has updated non-param collections (e.g. batch_stats)
    when ``train`` is True; otherwise it is ``variables`` unchanged.
  """
  module: nn.Module

  def init(self, key: jax.Array, x: jnp.ndarray) -> Dict[str, Any]:
    pkey, dkey = jax.random.split(key)
    variables = self.module.init({"params": pkey, "dropout": dkey}, x, train=False)
    return dict(variables)

  def apply(self, variables, x, train: bool = False, key=None):
    mutable = tuple(c for c in variables if c != "params") if train else False
    if train and key is None:
      raise ValueError("apply(train=True) needs a PRNG key for dropout")
    if mutable:
      logits, updates = self._module_apply(variables, x, key, train=True, mutable=mutable)
      return logits, {**variables, **updates}
    logits = self._module_apply(variables, x, key if train else None, train=train, mutable=False)
    return logits, variables

  @functools.cached_property
  def _module_apply(self):
    """``module.apply`` as one jitted function: inside a round program it is a call
    that JAX traces once per argument signature (shapes, train, mutable) and process
    and reuses wherever the model is applied again (the statistics passes, every
    local step, FedWeP's perturbed passes, the server's steps, evaluation); XLA inlines
    the call, so the compiled program is the one of the traced-in-place module."""
    def module_apply(variables, x, key, train, mutable):
      rngs = {"dropout": key} if key is not None else None
      if mutable:
        return self.module.apply(variables, x, train=train, rngs=rngs, mutable=list(mutable))
      return self.module.apply(variables, x, train=train, rngs=rngs)
    return jax.jit(module_apply, static_argnames=("train", "mutable"))


def build(model_config, num_classes: int) -> ModelFns:
  """Builds ModelFns from a ``config.model`` ConfigDict (name + kwargs)."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  return ModelFns(get_model(name, num_classes=num_classes, **kwargs))


# --- U-Net encoder + projection head for FCL (fedjax_seg/models/encoder.py) ---
from fedjax_seg.models.encoder import UNetEncoder  # noqa: E402


@register("unet_encoder")
def _unet_encoder(num_classes=None, base=32, depth=4, norm="none", ndim=2, hidden_dim=256,
                  feature_dim=128, normalize=True, dtype="float32", dropout=None, **kw):
  """U-Net contracting path + global pool + 2-layer MLP (L2-normalised); num_classes and
  dropout are accepted (and ignored) so a U-Net's config.model can build it."""
  if kw:
    raise ValueError(f"unknown config.model keys for 'unet_encoder': {sorted(kw)}")
  return UNetEncoder(base=base, depth=depth, norm=norm, ndim=ndim, hidden_dim=hidden_dim,
                     feature_dim=feature_dim, normalize=normalize, dtype=jnp.dtype(dtype))
# --- end U-Net encoder -----------------------------------------------------------
