"""Local steps called from the host: the 'loop' round with ``fl.step_strategy='host'``.

A client update is ``prepare → E local steps (fl/local.run_steps) → finish``. Compiled
as one program, XLA inlines all E steps, and on XLA:CPU both its compile time and the
time to read it back from the persistent cache grow faster than E (docs/performance.md).
Here the client update is cut at its ``run_steps`` calls without changing any
algorithm's code:

    stage 0   (program) runs client_update until its first run_steps call, and returns
              what the steps need: the initial carry, the per-step inputs [E, ...], the
              values the step body closes over (its jaxpr's consts: the client's data,
              the anchor, ...) and zero buffers for the per-step outputs [E, ...]
    step 0    (program) one local step: body(carry, inputs[e]), its output written at
              row e; called E times from Python
    stage 1   (program) runs client_update again with run_steps answered by the steps'
              final carry and stacked outputs, up to the next run_steps call (then
              step 1, stage 2, ...) or to its end: the client's (upload, state, stats)

A later stage recomputes whatever of the client update before the cut it needs (XLA
drops the rest); keys are pure functions of the client's key, so the recomputation is
exact. The step program is the step body's jaxpr evaluated again: the same operations as
a step inside the one-program client, so the round is the same function up to float
summation order (tests/test_host_steps.py). Nothing leaves the device between calls.

Requirement: ``run_steps`` is called at the top level of the client update's trace (not
inside a ``jax.jit``/``lax.cond``/``vmap`` of its own), which holds for every algorithm
here (they all step through ``fl/local.local_train``).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp

from fedjax_seg.fl import local

# The auto clients per call of host steps (config fl.clients_per_call=0): as many clients
# as keep one call's step program within this many jaxpr operations (:func:`num_ops` of the
# step body, nested jaxprs counted), rounded down to a divisor of the clients where that
# costs at most half of them (no remainder program to compile). A local step of the
# demo U-Net (base 16, depth 4) has 1,203 operations under FedAvg/DCEW, 942 SCAFFOLD,
# 1,995 FedWeP-Real, 2,000 Mean Teacher and FixMatch-style PS, 2,579 FedWeP, 3,539 CPS
# (2026-12-07): 2 clients per call for the supervised family, 1 for the semi-supervised
# methods. Measured at K = 8, E = 8 on the 2-core CPU (docs/performance.md): at 5,000
# (4 supervised clients per call) the supervised family's round compiled in 15-31 s cold
# and 4.4-5.9 s cached (each stage program traces its c clients); at 2, about 12.6 / 3.1 s
# (FedAvg). A heuristic: operations do not price every op alike (one FedWeP step compiles
# 3x slower than FedAvg's, CPS's, with more operations, 1.8x).
HOST_OPS_PER_CALL = 2500


@flax.struct.dataclass
class Segment:
  """What a stage program returns for c clients stopped at their s-th run_steps call
  (each field a tuple over the c clients): consts (the step body's closed-over values),
  carry (the initial carry), xs (per-step inputs, leaves [E, ...]), outs (zero per-step
  output buffers, leaves [E, ...])."""
  consts: Any
  carry: Any
  xs: Any
  outs: Any


@flax.struct.dataclass
class Body:
  """One step body as a jaxpr (no consts: they are arguments) and its output tree."""
  jaxpr: Any = flax.struct.field(pytree_node=False)
  out_tree: Any = flax.struct.field(pytree_node=False)
  const_avals: Tuple = flax.struct.field(pytree_node=False)


class _Stop(Exception):
  """Unwinds a stage's trace at the run_steps call it stops at."""

  def __init__(self, segment, body):
    super().__init__("host_steps stage stop")
    self.segment, self.body = segment, body


def _aval(x):
  return (tuple(jnp.shape(x)), jnp.result_type(x))


def stage(client_fn: Callable, given: Sequence[Tuple[Any, Any]], args: Tuple):
  """Traces ``client_fn(*args)`` with its first ``len(given)`` run_steps calls answered by
  ``given[t] = (final carry, outputs stacked [E, ...])`` and stops at the next one.

  Returns ``(client_fn's outputs, None)`` when it ran to its end, else
  ``((consts, carry, xs, zero outs), Body)`` for the call it stopped at.
  """
  calls = [0]

  def hook(body, carry, xs):
    t = calls[0]
    calls[0] += 1
    if t < len(given):
      return given[t]
    n = jax.tree.leaves(xs)[0].shape[0]
    x0 = jax.tree.map(lambda a: a[0], xs)
    closed, shape = jax.make_jaxpr(body, return_shape=True)(carry, x0)
    outs = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), shape[1])
    consts = list(closed.consts)
    raise _Stop((consts, carry, xs, outs),
                Body(closed.jaxpr, jax.tree.structure(shape), tuple(map(_aval, consts))))

  try:
    with local.steps_hook(hook):
      out = client_fn(*args)
  except _Stop as stop:
    return stop.segment, stop.body
  if calls[0] < len(given):
    raise RuntimeError(f"host steps: the client update made {calls[0]} run_steps calls, "
                       f"{len(given)} were answered (it must make the same calls every trace)")
  return out, None


def stage_lanes(lanes: Sequence[Tuple[Callable, Tuple]], given, what: str):
  """:func:`stage` for independent lanes (a call's c clients; post is one lane), each
  ``(fn, args)`` answered by ``given[t][j]``. Returns ``(outputs, None)`` (a list, one per
  lane) when every lane ran to its end, else ``(Segment, Body)``: all lanes stopped at the
  same step body (:func:`check_same_body`), their initial carry copied (the step program
  donates it: its own buffers, never a stage input's)."""
  segs, bodies, outs = [], [], []
  for j, (fn, args) in enumerate(lanes):
    res, body = stage(fn, [g[j] for g in given], args)
    (outs if body is None else segs).append(res)
    if body is not None:
      bodies.append(body)
  if outs and bodies:
    raise ValueError(f"{what}: host steps: the clients of one call made different numbers "
                     f"of local-step loops")
  if outs:
    return outs, None
  consts, carry, xs, step_outs = (tuple(x) for x in zip(*segs))
  return (Segment(consts, jax.tree.map(jnp.copy, carry), xs, step_outs),
          check_same_body(bodies, what))


def check_same_body(bodies: List[Body], what: str) -> Body:
  """The c clients of one call must have stopped at the same step body (the same code on
  the same shapes): one step program serves them all."""
  first = bodies[0]
  for j, b in enumerate(bodies[1:], 1):
    if b.const_avals != first.const_avals or b.out_tree != first.out_tree:
      raise ValueError(f"{what}: client {j} of a call has a different local step than client 0 "
                       f"(closed-over values {b.const_avals} vs {first.const_avals}); "
                       f"run it with fl.clients_per_call=1")
  return first


def num_ops(jaxpr) -> int:
  """Operations of a jaxpr, counting those of nested jaxprs (pjit, custom_jvp, ...)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += num_ops(sub)
  return n


def auto_clients_per_call(body: Optional[Body], clients: int, budget: int) -> int:
  """Clients per call for a step body of ``num_ops(body.jaxpr)`` operations: as many as
  fit in ``budget`` operations (at least 1, at most ``clients``), rounded down to a
  divisor of ``clients`` when that keeps at least half of them; a client update without
  a step loop (``body`` None) runs all clients in one call."""
  if body is None:
    return max(1, clients)
  fit = max(1, min(clients, budget // max(1, num_ops(body.jaxpr))))
  divisor = max(d for d in range(1, fit + 1) if clients % d == 0)
  return divisor if 2 * divisor >= fit else fit


def make_step(body: Body, c: int) -> Callable:
  """``step(consts, carry, xs, outs, e) -> (carry', outs')`` for c clients (tuples): local
  step ``e`` (an int32 scalar) of each, its output written at row e of ``outs``."""
  def step(consts, carry, xs, outs, e):
    new_carry, new_outs = [], []
    for j in range(c):  # c independent clients, unrolled
      x_e = jax.tree.map(lambda a: a[e], xs[j])
      flat = jax.core.eval_jaxpr(body.jaxpr, consts[j], *jax.tree.leaves((carry[j], x_e)))
      cj, oj = jax.tree.unflatten(body.out_tree, flat)
      # the carry keeps its structure and dtypes from step to step (as under lax.scan)
      cj = jax.tree.map(lambda new, old: new.astype(jnp.result_type(old)), cj, carry[j])
      new_carry.append(cj)
      new_outs.append(jax.tree.map(lambda buf, v: buf.at[e].set(v.astype(buf.dtype)),
                                   outs[j], oj))
    return tuple(new_carry), tuple(new_outs)
  return step
