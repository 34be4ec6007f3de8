"""Model variables filled from NumPy, for tests (shared by several test files).

Tracing ``init_fn`` with ``jax.eval_shape`` and filling the leaves on the host
avoids compiling the random initialisers: jitted threefry / truncated normal
cost ~25 s of XLA:CPU compile for a U-Net ``init`` on 2 cores.
"""
import jax
import jax.numpy as jnp
import numpy as np


def np_init(init_fn, *args, seed=0, std=None):
  """Variables with the structure, shapes and dtypes of ``init_fn(*args)``.

  std=None: kernels ~ N(0, 1/fan_in) (LeCun), biases 0, norm scales and
  batch-norm running variances 1. std=s: every leaf ~ N(0, s²) (leaves drawn
  in tree order from one ``default_rng(seed)``).
  """
  shapes = jax.eval_shape(init_fn, *args)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if std is not None:
      return jnp.asarray((std * rng.standard_normal(s.shape)).astype(s.dtype))
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("kernel", "embedding"):
      fan_in = int(np.prod(s.shape[:-1])) or 1
      return jnp.asarray(rng.normal(0, fan_in ** -0.5, s.shape), s.dtype)
    if name in ("scale", "var"):
      return jnp.ones(s.shape, s.dtype)
    return jnp.zeros(s.shape, s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def numpy_init(fns, shape, seed=0, std=0.3):
  """``np_init`` of ``fns.init(PRNGKey(0), zeros(shape))`` with every leaf ~ N(0, std²)."""
  return np_init(fns.init, jax.random.PRNGKey(0), jnp.zeros(shape), seed=seed, std=std)
