"""Mixed precision: config.model.dtype='bfloat16' computes the U-Net's
convolutions in bf16 while parameters, logits, gradients, client models and
the aggregate stay float32."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from _np_init import numpy_init
from fedjax_seg import models
from fedjax_seg.fl import aggregators, backends, core
import _helpers

H = 16
CFG = {"name": "unet", "base": 4, "depth": 2, "dropout": 0.0}


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for p in e.params.values():
      subs = p if isinstance(p, (list, tuple)) else [p]
      for sub in subs:
        if hasattr(sub, "jaxpr"):
          yield from _eqns(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
        elif hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _conv_dtypes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return [tuple(str(v.aval.dtype) for v in e.invars) for e in _eqns(jaxpr)
          if e.primitive.name in ("conv_general_dilated", "dot_general")]


def test_unet_bf16_compute_f32_params_logits_grads():
  fns32 = models.build(CFG, 2)
  fns16 = models.build({**CFG, "dtype": "bfloat16"}, 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, H, H, 3))
  variables = numpy_init(fns16, x.shape)
  assert {str(a.dtype) for a in jax.tree.leaves(variables)} == {"float32"}

  apply16 = lambda v, x: fns16.apply(v, x, train=False)[0]
  convs = _conv_dtypes(apply16, variables, x)
  assert convs and all(d == ("bfloat16", "bfloat16") for d in convs), convs
  assert all(d == ("float32", "float32") for d in _conv_dtypes(
      lambda v, x: fns32.apply(v, x, train=False)[0], variables, x))

  # one compile of the forward passes (eager bf16 ops compile one by one: slow on CPU;
  # the bf16 backward pass compiles for ~15 s CPU, so its dtypes are checked abstractly)
  run = jax.jit(lambda v, x: (apply16(v, x), fns32.apply(v, x, train=False)[0]))
  logits16, logits32 = jax.device_get(run(variables, x))
  assert logits16.dtype == np.float32
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(np.abs(logits32).max()))
  grads = jax.eval_shape(jax.grad(lambda v: jnp.mean(apply16(v, x) ** 2)), variables)
  assert {str(g.dtype) for g in jax.tree.leaves(grads)} == {"float32"}


def test_bf16_round_keeps_f32_models_and_aggregate():
  fns = models.build({**CFG, "dtype": "bfloat16"}, 2)
  variables = numpy_init(fns, (1, H, H, 3))
  hp = _helpers.client_hp(local_steps=2, batch_size=4, stats_samples=4, step_strategy="scan")
  cu = core.make_client_update(fns, optax.adam(1e-2), "dice_ce", 2, hp)
  from fedjax_seg.data import federated
  rng = np.random.default_rng(0)
  data = federated.stack_clients([(rng.normal(size=(4, H, H, 3)).astype(np.float32),
                                   np.zeros((4, H, H), np.int32)) for _ in range(2)])
  rr = core.make_run_round(cu, aggregators.dcew, "vmap")
  state, info = jax.eval_shape(rr, core.ServerState(variables, jnp.int32(0)), data,
                               jax.random.PRNGKey(0))
  assert {str(a.dtype) for a in jax.tree.leaves(state.variables)} == {"float32"}
  assert info["weights"].dtype == jnp.float32 and info["dice_post"].dtype == jnp.float32
  # the weighted sum itself is an f32 contraction
  stacked, stats = jax.eval_shape(backends.for_each_client(cu, "vmap"), variables, data,
                                  jax.random.split(jax.random.PRNGKey(0), 2))
  assert {str(a.dtype) for a in jax.tree.leaves(stacked)} == {"float32"}
  sums = [d for d in _conv_dtypes(lambda s, st: aggregators.dcew(variables, s, st)[0],
                                  stacked, stats)]
  assert sums and all(d[0] == d[1] == "float32" for d in sums), sums
