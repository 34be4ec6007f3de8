"""Model registry: config.model.name -> Flax module; and pure init/apply.

Every algorithm uses models only through :func:`build` and :class:`ModelFns`,
so any registered model works with any federated algorithm.

Variables are a dict ``{'params': ..., ['batch_stats': ...]}``; the optimiser
only touches ``params``; every other collection is model state carried along
(and averaged by the aggregators like params).
"""
from __future__ import annotations

import dataclasses
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
    mutable = [c for c in variables if c != "params"] if train else False
    rngs = {"dropout": key} if (train and key is not None) else None
    if train and key is None:
      raise ValueError("apply(train=True) needs a PRNG key for dropout")
    if mutable:
      logits, updates = self.module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
      return logits, {**variables, **updates}
    logits = self.module.apply(variables, x, train=train, rngs=rngs)
    return logits, variables


def build(model_config, num_classes: int) -> ModelFns:
  """Builds ModelFns from a ``config.model`` ConfigDict (name + kwargs)."""
  kwargs = dict(model_config)
  name = kwargs.pop("name")
  return ModelFns(get_model(name, num_classes=num_classes, **kwargs))
