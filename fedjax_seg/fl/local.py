"""The one optimiser-step loop: every client update, the label-at-server
server steps, FCL pre-training and centralised training step through it.

    state, opt_state, (losses [E], aux [E]) = local_train(loss_fn, tx, state, keys, ...)

    for e in range(E):                       # E = len(keys)
      (loss_e, (s', aux_e)), g = value_and_grad(loss_fn, has_aux=True)(params(s), s, keys[e])
      u, opt_state = tx.update(g, opt_state, params(s))
      s = after_step(merge(s, s', apply_updates(params(s), u)))

``loss_fn`` samples its own batch from its key (``data.federated.sample_batch``),
so the loop is the same whether data live in the client's arrays or arrive one
batch at a time (centralised: a closure over the batch, E = 1). ``s'`` carries
whatever the forward pass changed besides the parameters (batch statistics,
an FCL memory bank, ...); ``merge`` puts the stepped parameters back.
``after_step`` is the hook for updates that follow every optimiser step:
Mean Teacher's EMA teacher, FCL's momentum encoder.

Steps run as ``lax.scan`` ('scan') or unrolled inside the jitted program
('unrolled'): config ``fl.step_strategy``, 'auto' per platform
(``backends.resolve_strategy``); both compute the same function. The 'loop' round can
instead call each step as its own compiled program from Python ('host',
``fl/host_steps.py``): while it traces a client update it answers the client's
``run_steps`` calls through :func:`steps_hook` (a trace-time hook, scoped to that trace;
it never changes what a step computes).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from fedjax_seg.fl import backends


def flax_params(variables):
  """params(s) for flax variables {'params': ..., 'batch_stats': ...}."""
  return variables["params"]


def flax_merge(variables, new_variables, params):
  """merge(s, s', p) for flax variables: the forward pass's collections + stepped params."""
  return {**new_variables, "params": params}


# The hook of the trace in progress (None: steps run inside the program). A ContextVar,
# so it is scoped to the ``with steps_hook(...)`` block of one trace and its thread.
_STEPS_HOOK: contextvars.ContextVar = contextvars.ContextVar("fedjax_seg_steps_hook",
                                                              default=None)


@contextlib.contextmanager
def steps_hook(hook: Callable):
  """Within the block, ``run_steps(body, carry, keys, ...)`` returns ``hook(body, carry,
  keys)`` instead of running the steps (fl/host_steps.py stages a client update this
  way: the steps become programs of their own)."""
  token = _STEPS_HOOK.set(hook)
  try:
    yield
  finally:
    _STEPS_HOOK.reset(token)


def run_steps(body: Callable, carry, keys, strategy: str):
  """``lax.scan(body, carry, keys)`` or the same loop unrolled in Python.

  body(carry, key) -> (carry, out); returns (carry, out stacked to [len(keys), ...]).
  ``keys`` may be a pytree of arrays with a shared leading axis (each step gets its slice).
  Under :func:`steps_hook` the hook answers instead ('host' steps).
  """
  hook = _STEPS_HOOK.get()
  if hook is not None:
    return hook(body, carry, keys)
  if backends.resolve_strategy(strategy, "step") == "scan":
    return jax.lax.scan(body, carry, keys)
  n = jax.tree.leaves(keys)[0].shape[0]
  # One trace for all E steps: a jitted body is traced once and called E times (XLA
  # still inlines the E copies). Tracing the E copies one by one cost most of a
  # semi-supervised client program's compile time (FedWeP at E = 8: about 35 of 54 s).
  body = jax.jit(body) if n > 1 else body
  outs = []
  for e in range(n):
    carry, out = body(carry, jax.tree.map(lambda a: a[e], keys))
    outs.append(out)
  return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def local_train(loss_fn: Callable, tx: optax.GradientTransformation, state: Any, keys,
                *, strategy: str, params: Callable = flax_params, merge: Callable = flax_merge,
                after_step: Optional[Callable] = None,
                opt_state: Any = None,
                num_steps=None) -> Tuple[Any, Any, Tuple[jnp.ndarray, Any]]:
  """E = keys.shape[0] optimiser steps of ``tx`` on ``loss_fn`` (module docstring).

  Args:
    loss_fn: (params, state, key) -> (scalar loss, (state', aux)); aux any pytree.
    tx: the optimiser; a fresh ``tx.init(params(state))`` unless ``opt_state`` is given.
    state: what the steps carry (flax variables by default; any pytree with ``params``).
    keys: [E] PRNG keys, one per step.
    strategy: 'scan' | 'unrolled' | 'auto' | 'host' (config fl.step_strategy; 'host' is
      'auto' here unless the 'loop' round stages this client, see fl/host_steps.py).
    params / merge: how to read the trainable parameters out of ``state`` and put the
      stepped ones back (defaults: flax variables' 'params' collection).
    after_step: state -> state, applied after every optimiser step.
    num_steps: optional int32 scalar (traced) ≤ E: only steps e < num_steps change the
      state and optimiser state (unequal local work inside one program); the losses of
      the masked steps are NaN.
  Returns (state, opt_state, (losses float32 [E], aux stacked [E, ...])).
  """
  def body(carry, inp):
    (s, o), (key, e) = carry, inp
    p = params(s)
    (value, (new_s, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, key)
    updates, o2 = tx.update(grads, o, p)
    s2 = merge(s, new_s, optax.apply_updates(p, updates))
    if after_step is not None:
      s2 = after_step(s2)
    if num_steps is not None:
      on = e < num_steps
      keep = lambda n, old: jnp.where(on, n, old)
      s2, o2 = jax.tree.map(keep, s2, s), jax.tree.map(keep, o2, o)
      value = jnp.where(on, value, jnp.nan)
    return (s2, o2), (value, aux)

  o0 = tx.init(params(state)) if opt_state is None else opt_state
  steps_idx = jnp.arange(keys.shape[0], dtype=jnp.int32)
  (state, opt_state), hist = run_steps(body, (state, o0), (keys, steps_idx), strategy)
  return state, opt_state, hist
