"""``for_each_client``: the one way every algorithm runs a function over its K clients.

    run = for_each_client(fn, backend)
    out = run(broadcast, per_client, keys)

      fn(broadcast, client_k, key_k) -> out_k        one client (pure, jittable)
      broadcast                                     the same for every client (the global
                                                    model, a round context, ...)
      per_client   any pytree, every leaf [K, ...]  client data AND per-client state
      keys         [K] PRNG keys (raw uint32 [K, 2])
      out          the pytree of out_k, every leaf stacked to [K, ...]

How "for every k" executes is the *backend* (config ``fl.client_strategy``),
chosen per platform because their speeds differ by an order of magnitude
(``benchmarks/round_speed.py``; measured on a 2-core XLA:CPU, K = 8 clients of a
U-Net: a vmapped round ran 2–7× slower than the unrolled one, because vmap over
per-client weights turns convolutions into grouped convolutions, which XLA:CPU
executes slowly; on accelerators vmap is the fast path):

  'vmap'      jax.vmap over the client axis (accelerators)
  'unrolled'  clients unrolled in Python inside the one jitted program (XLA:CPU)
  'map'       lax.map over clients: bounded memory, one client's program compiled once
  'sharded'   the client axis on the mesh axis 'clients' over all devices (shard_map),
              each device running its K/D clients with ``inner``; K is padded to a
              multiple of D with all-zero clients whose outputs are dropped
  'debug'     a Python loop over clients; an exception names the client index and the
              stage, and (outside jit) a non-finite output is reported the same way
  'loop'      a round-level strategy (``algorithm.make_round``): one compiled one-client
              program called K times from Python, between a broadcast program and an
              aggregation program; compile time no longer grows with K
  'auto'      'vmap' on gpu/tpu; on cpu 'loop' (:func:`round_strategy`) for two clients
              or more with host threads (the default on 2+ cores) or above
              AUTO_UNROLL_MAX client-steps (K × E), else 'unrolled'

Every backend computes the same function (tests/test_backends.py). Streaming
clients C at a time with running sums (config ``fl.clients_per_chunk``) is the
round-level variant in ``fl/scale.py``; it runs each chunk through this layer.

The E local optimiser steps have their own strategy (``fl.step_strategy``:
'scan' | 'unrolled' | 'auto' | 'host'), resolved by :func:`resolve_strategy` too and
used by ``fl/local.py``; 'host' (the 'loop' round only, :func:`host_steps`) calls each
local step as its own compiled program from Python (``fl/host_steps.py``).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

CLIENT_STRATEGIES = ("auto", "vmap", "unrolled", "map", "sharded", "debug", "loop")
# On XLA:CPU the one-program round unrolls every client's every local step, and its compile
# time grows with K × E (64×64 U-Net, base 16, 2-core CPU, 2026-12-04: K = 8, E = 1 about
# 16 s; one client at E = 8 about 12-21 s): 'auto' unrolls up to this many client-steps per
# round and runs the 'loop' round above it (docs/performance.md).
AUTO_UNROLL_MAX = 8
STEP_STRATEGIES = ("auto", "scan", "unrolled", "host")
# N models (one network, N weight sets) applied to one input inside a program: FedWeP's
# seed search over its N perturbed copies (config semi.fedwep.search_strategy).
MODELS_STRATEGIES = ("auto", "vmap", "unrolled")
CLIENT_AXIS = "clients"


class ClientError(RuntimeError):
  """Raised by the 'debug' backend: names the client index and the stage."""


def resolve_strategy(strategy: str, kind: str = "client", platform: Optional[str] = None) -> str:
  """Maps 'auto' to the measured default of the platform (``jax.default_backend()``).

  kind: 'client' (config.fl.client_strategy), 'step' (config.fl.step_strategy) or
  'models' (config.semi.fedwep.search_strategy: N weight sets applied to one input,
  vmapped on accelerators, unrolled on XLA:CPU, where a vmap over weights turns each
  convolution into a grouped one: the seed search of 8 perturbed demo U-Nets on 8 images
  took 1,193 ms vmapped and 209 ms unrolled on 2 cores, docs/performance.md).
  A step strategy 'host' resolves to the platform's in-program default: it is what steps
  use wherever they run inside a program (one-program rounds, server-side steps);
  :func:`host_steps` says where the 'loop' round calls them from Python instead.
  """
  allowed = {"client": CLIENT_STRATEGIES, "step": STEP_STRATEGIES,
             "models": MODELS_STRATEGIES}[kind]
  if strategy not in allowed:
    key = ("semi.fedwep.search_strategy" if kind == "models" else f"fl.{kind}_strategy")
    raise ValueError(f"config.{key}={strategy!r}: expected one of {allowed}")
  if strategy != "auto" and (kind != "step" or strategy != "host"):
    return strategy
  platform = platform or jax.default_backend()
  if kind in ("client", "models"):
    return "unrolled" if platform == "cpu" else "vmap"
  return "unrolled" if platform == "cpu" else "scan"


def round_strategy(strategy: str, clients: int, local_steps: int,
                   platform: Optional[str] = None, *, host_threads_setting: int) -> str:
  """The round's client strategy: ``strategy`` unless it is 'auto' on a CPU and either
  two or more clients train with more than one :func:`host_threads` (config
  ``fl.host_threads``; auto: 2 on a CPU with 2+ cores), or there are more than
  AUTO_UNROLL_MAX client-steps per round (clients × local_steps): then 'loop'.
  Measured at K = 8, E = 1 on 2 cores: the loop round with 2 host threads ran 1.19×
  [1.05, 1.36] (p = 0.03, 3 paired repeats) the speed of the unrolled round and compiled in 6 s instead of 17 s
  (docs/performance.md). clients: the clients that train each round (the sampled m,
  else K)."""
  resolve_strategy(strategy, "client", platform)  # refuses an unknown name
  platform = platform or jax.default_backend()
  if strategy != "auto" or platform != "cpu":
    return strategy
  threads = host_threads(host_threads_setting, "loop", platform)
  if clients * local_steps > AUTO_UNROLL_MAX or (threads > 1 and clients > 1):
    return "loop"
  return strategy


def clients_per_call(setting: int, clients: int, local_steps: int) -> int:
  """Clients unrolled in one call of the 'loop' round's client program
  (``config.fl.clients_per_call``): ``setting`` > 0 as given (at most ``clients``);
  0 = auto, as many clients as keep a call within AUTO_UNROLL_MAX client-steps
  (max(1, AUTO_UNROLL_MAX // local_steps), at most ``clients``): the same compile
  bound as the 'auto' choice of the unrolled round. Independent clients in one call
  run side by side on XLA:CPU's cores (docs/performance.md)."""
  setting, clients = int(setting), max(1, int(clients))
  if setting < 0:
    raise ValueError(f"config.fl.clients_per_call={setting} must be >= 0 (0 = auto)")
  if setting == 0:
    setting = max(1, AUTO_UNROLL_MAX // max(1, int(local_steps)))
  return min(setting, clients)


def host_steps(step_strategy: str, round_strategy: str, local_steps: int,
               platform: Optional[str] = None) -> bool:
  """Whether the 'loop' round calls every local step as its own program
  (``fl/host_steps.py``): under the 'loop' round (``round_strategy`` as
  :func:`round_strategy` resolved it), config ``fl.step_strategy='host'``, or 'auto' on a
  CPU with more than one local step; the one-program rounds run their steps inside the
  program."""
  resolve_strategy(step_strategy, "step", platform)  # refuses an unknown name
  if round_strategy != "loop":
    return False
  platform = platform or jax.default_backend()
  return step_strategy == "host" or (step_strategy == "auto" and platform == "cpu"
                                     and local_steps > 1)


# Host threads of the 'loop' round on a CPU under config fl.host_threads = 0 (auto), at most
# the machine's cores: one client call keeps about 1.6 of 2 cores busy, two calls issued
# side by side keep both (docs/performance.md "Host threads").
AUTO_HOST_THREADS_CPU = 2


def host_threads(setting: int, round_strategy: str, platform: Optional[str] = None,
                 cores: Optional[int] = None) -> int:
  """Host threads issuing the 'loop' round's client calls side by side
  (``config.fl.host_threads``): ``setting`` > 0 as given; 0 = auto, on a CPU
  min(AUTO_HOST_THREADS_CPU, cores), elsewhere 1 (an accelerator runs one program at a
  time). Rounds other than 'loop' have no client calls to spread: 1."""
  setting = int(setting)
  if setting < 0:
    raise ValueError(f"config.fl.host_threads={setting} must be >= 0 (0 = auto)")
  if round_strategy != "loop":
    return 1
  if setting:
    return setting
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return 1
  return max(1, min(AUTO_HOST_THREADS_CPU, int(cores or os.cpu_count() or 1)))


def loop_options(clients_per_call_setting: int, step_strategy: str, round_strategy: str,
                 clients: int, local_steps: int, platform: Optional[str] = None, *,
                 host_threads_setting: int):
  """``{'clients_per_call': c, 'host_steps': h, 'host_ops_per_call': b, 'host_threads': t}``
  for ``algorithm.jit_round``. Without host steps c is :func:`clients_per_call`. With host
  steps a program holds one local step of each of its c clients; config 0 (auto) gives
  c = 0: the loop round chooses c at its first round from the size of the local step (as
  many clients as fit in b = ``host_steps.HOST_OPS_PER_CALL`` operations). t: the
  :func:`host_threads` of ``host_threads_setting``; with t > 1, clients per call 0 (auto)
  is 1 in both cases: the threads run the calls side by side, which is what c > 1 clients
  in one call were for."""
  from fedjax_seg.fl import host_steps as hsteps  # host_steps imports local, not backends
  h = host_steps(step_strategy, round_strategy, local_steps, platform)
  t = host_threads(host_threads_setting, round_strategy, platform)
  if t > 1 and int(clients_per_call_setting) == 0:  # threads run the calls side by side:
    # one client per call was as fast as 2 or 4 and compiles fastest (docs/performance.md)
    return {"clients_per_call": 1, "host_steps": h, "host_ops_per_call": 0, "host_threads": t}
  if h and int(clients_per_call_setting) == 0:
    return {"clients_per_call": 0, "host_steps": True,
            "host_ops_per_call": hsteps.HOST_OPS_PER_CALL, "host_threads": t}
  return {"clients_per_call": clients_per_call(clients_per_call_setting, clients,
                                               1 if h else local_steps),
          "host_steps": h, "host_ops_per_call": 0, "host_threads": t}


def num_clients(per_client) -> int:
  """K: the leading dimension shared by every leaf of ``per_client``."""
  leaves = jax.tree.leaves(per_client)
  if not leaves:
    raise ValueError("for_each_client: per-client inputs have no arrays (K unknown)")
  ks = {int(np.shape(a)[0]) for a in leaves}
  if len(ks) != 1:
    raise ValueError(f"for_each_client: per-client leaves disagree on K: {sorted(ks)}")
  return ks.pop()


def padded_num_clients(k: int, d: int) -> int:
  """K_p = d·⌈k/d⌉."""
  return -(-k // d) * d


def pad_clients(per_client, k_pad: int):
  """Appends k_pad − K all-zero clients to every leaf of any pytree [K, ...].

  Zero clients of ClientData have valid = 0 (no samples), so every aggregator
  gives them weight 0; callers drop their outputs anyway. NumPy in → NumPy out
  (host streaming); jax arrays in → jax arrays out (inside jit).
  """
  k = num_clients(per_client)
  if k_pad < k:
    raise ValueError(f"pad_clients: k_pad={k_pad} < K={k}")
  if k_pad == k:
    return per_client

  def pad(a):
    xp = np if isinstance(a, np.ndarray) else jnp
    return xp.concatenate([a, xp.zeros((k_pad - k,) + a.shape[1:], a.dtype)])
  return jax.tree.map(pad, per_client)


def pad_keys(keys, k_pad: int):
  """[K] keys → [k_pad] (padding clients reuse real clients' keys; their outputs are dropped)."""
  k = keys.shape[0]
  return keys if k_pad == k else keys[jnp.arange(k_pad) % k]


def client_mesh(devices=None) -> Mesh:
  """1-D mesh with axis 'clients' over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (CLIENT_AXIS,))


def _take(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def _stack(outs):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def for_each_client(fn: Callable, backend: str, *, inner: str = "auto",
                    mesh: Optional[Mesh] = None, stage: str = "client update") -> Callable:
  """Returns ``run(broadcast, per_client [K, ...], keys [K]) -> out [K, ...]``.

  backend: one of CLIENT_STRATEGIES (module docstring). ``inner`` is the
  per-device backend of 'sharded'; ``mesh`` its device mesh (default: all
  devices, looked up at trace time). ``stage`` names what ``fn`` does in the
  'debug' backend's error messages.
  """
  backend = resolve_strategy(backend, "client")
  if backend == "loop":
    raise ValueError("client_strategy 'loop' runs a whole round (algorithm.make_round), "
                     "not a per-client backend inside a program")
  if backend == "sharded":
    return _sharded(fn, inner, mesh, stage)
  if backend == "vmap":
    return jax.vmap(fn, in_axes=(None, 0, 0))
  if backend == "map":
    return lambda b, pc, keys: jax.lax.map(lambda a: fn(b, a[0], a[1]), (pc, keys))
  if backend == "debug":
    return _debug(fn, stage)

  def unrolled(b, pc, keys):
    return _stack([fn(b, _take(pc, k), keys[k]) for k in range(keys.shape[0])])
  return unrolled


def _debug(fn: Callable, stage: str) -> Callable:
  def run(b, pc, keys):
    outs = []
    for k in range(keys.shape[0]):
      try:
        out = fn(b, _take(pc, k), keys[k])
      except Exception as e:  # annotate, keep the cause chained
        raise ClientError(f"client {k}: {stage}: {type(e).__name__}: {e}") from e
      for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(leaf.dtype, jnp.floating):
          continue
        if not bool(jnp.all(jnp.isfinite(leaf))):
          raise ClientError(f"client {k}: {stage}: non-finite output at "
                            f"{jax.tree_util.keystr(path)}")
      outs.append(out)
    return _stack(outs)
  return run


def _sharded(fn: Callable, inner: str, mesh: Optional[Mesh], stage: str) -> Callable:
  inner = resolve_strategy(inner, "client")
  if inner in ("sharded", "debug", "loop"):
    raise ValueError(f"for_each_client: the per-device backend of 'sharded' cannot be {inner!r}")
  per_device = for_each_client(fn, inner, stage=stage)

  def run(b, pc, keys):
    m = client_mesh() if mesh is None else mesh
    k = keys.shape[0]
    k_pad = padded_num_clients(k, m.shape[CLIENT_AXIS])
    pc, keys = pad_clients(pc, k_pad), pad_keys(keys, k_pad)
    # check_vma=False: the replicated broadcast becomes per-client inside the
    # local-step scan carry, which the varying-axis checker would reject.
    f = jax.shard_map(per_device, mesh=m, in_specs=(P(), P(CLIENT_AXIS), P(CLIENT_AXIS)),
                      out_specs=P(CLIENT_AXIS), check_vma=False)
    out = f(b, pc, keys)
    return out if k_pad == k else jax.tree.map(lambda a: a[:k], out)
  return run

