"""The algorithm interface: every federated method is four pure functions run by
the same round.

    run_round = make_round(algorithm, client_strategy)
    state', info = run_round(state, data, key)            # jit it once ('loop': call it as
                                                          # it is, it runs three programs)

    per_client, server_data = algorithm.split_data(data)
    r_key                   = fold_in(key, state.round)
    bcast, info_b           = algorithm.broadcast(state, server_data, b_key)
    upload_k, c_k', stats_k = algorithm.client_update(bcast, (data_k, c_k, down_k), key_k)
                                                          for every k (backends.for_each_client)
    agg, w, failed, info_a  = algorithm.aggregate(state, upload [K], stats [K], a_key)
    state', info_s          = algorithm.server_update(state, agg, failed, upload, c', w,
                                                      server_data, s_key, **round_options)

* ``state`` (:class:`ServerState`) holds the broadcast model(s) ``variables``, the
  round counter, the server optimiser's state, the **per-client state**
  ``clients`` (every leaf with a leading K axis: client k only ever sees row k;
  checkpointed with the rest) and the algorithm's own server state ``server``.
* ``down_k = algorithm.downlink(state)[k]``: a per-client message from the
  server besides the broadcast (FCL: the other clients' feature banks); ``()``
  for most methods.
* ``upload_k`` is a dict whose keys are **declared** in ``algorithm.uploads``
  ('model', 'bank', ...). Byte counters (:func:`comm_bytes`) and the privacy
  wrappers read them from there: DP-FedAvg and secure aggregation protect the
  'model' entry and are refused for an algorithm that uploads anything else.
* Keys: ``b_key``/``s_key`` and the K client keys come from ``r_key`` by the
  algorithm's ``key_scheme`` ('flat': client keys = split(r_key, K), as the
  supervised family and FCL; 'split3': (b, clients, s) = split(r_key, 3), as the
  semi-supervised methods); ``a_key = fold_in(r_key, 2³¹−1)`` for aggregators that
  draw noise or masks. Every key is a pure function of (key, round, k).

``info`` always has the per-client stats [K], 'weights' [K], 'failed' and
'included' [K] (weights > 0), 'sampled' [K], plus what broadcast/aggregate/server_update add.

Client sampling (``make_round(..., clients_per_round=m)``, config
``fl.clients_per_round``): each round m of the K clients are drawn without
replacement from ``fold_in(r_key, SAMPLE_KEY_SALT)`` (uniformly, or with
probabilities ``sample_probs`` [K]); only they run (their data, state, downlink
and keys are gathered to a fixed [m, ...] shape, so nothing recompiles), the
aggregator sees their m uploads, their per-client state rows are written back
and every other client's row is untouched. In ``info`` the unsampled clients
have weight 0, 'sampled' False and NaN statistics. Client k keeps its key
``split(r_key, K)[k]`` whether or not others are sampled.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg.fl import aggregators, backends, host_steps as hsteps

AGG_KEY_SALT = 0x7FFFFFFF
SAMPLE_KEY_SALT = 0x5A3C0FFE


@flax.struct.dataclass
class ServerState:
  """variables: broadcast global model(s); round: int32 []; server_opt_state: an
  optional server optimiser's state (() for plain averaging); clients: per-client
  state, every leaf [K, ...] (() when the algorithm keeps none); server: the
  algorithm's own server-side state (() when none)."""
  variables: Any
  round: jnp.ndarray
  server_opt_state: Any = ()
  clients: Any = ()
  server: Any = ()


def _default_broadcast(state, server_data, key):
  return state.variables, {}


def _default_downlink(state):
  return ()


def _default_split(data):
  return data, ()


def default_server_update(state: ServerState, agg, failed, upload, clients, weights,
                          server_data, key, **_) -> Tuple[ServerState, Dict]:
  """The aggregate is the next global model; per-client state as the clients left it."""
  return state.replace(variables=agg, round=state.round + 1, clients=clients), {}


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One federated method. Every function is pure and traced inside the round.

  name: for messages. uploads: the keys of each client's upload dict.
  client_update: (bcast, (data_k, client_state_k, down_k), key_k) -> (upload_k,
    client_state_k', stats_k) with stats_k a dict of float32 scalars including
    'num_samples'.
  aggregate: (state, upload [K], stats [K], a_key) -> (agg, weights [K], failed, extra).
  broadcast: (state, server_data, b_key) -> (bcast, info). Default: state.variables.
  server_update: (state, agg, failed, upload, client_states', weights, server_data,
    s_key, **round_options) -> (state', info). Default: :func:`default_server_update`.
  downlink: state -> per-client messages [K] (default ()).
  split_data: round data -> (per-client data [K], server data). Default (data, ()).
  key_scheme: 'flat' | 'split3' (module docstring).
  fedavg_model: True declares that ``aggregate`` is FedAvg of upload['model'] weighted by
    stats['num_samples'] over the finite clients with samples (a divergence guard aside),
    and that ``server_update`` reads no upload['model']: then clients can be streamed in
    chunks (fl/scale.make_chunked_algorithm_round).
  """
  name: str
  uploads: Tuple[str, ...]
  client_update: Callable
  aggregate: Callable
  broadcast: Callable = _default_broadcast
  server_update: Callable = default_server_update
  downlink: Callable = _default_downlink
  split_data: Callable = _default_split
  key_scheme: str = "flat"
  fedavg_model: bool = False

  def __post_init__(self):
    if self.key_scheme not in ("flat", "split3"):
      raise ValueError(f"Algorithm {self.name}: key_scheme {self.key_scheme!r} "
                       f"is not 'flat' or 'split3'")
    if not self.uploads:
      raise ValueError(f"Algorithm {self.name}: declare what clients upload (uploads=...)")


def round_keys(scheme: str, r_key, k: int):
  """(b_key, client keys [K], s_key, a_key) of one round from r_key = fold_in(key, round)."""
  a_key = jax.random.fold_in(r_key, AGG_KEY_SALT)
  if scheme == "flat":
    return r_key, jax.random.split(r_key, k), r_key, a_key
  kb, kc, ks = jax.random.split(r_key, 3)
  return kb, jax.random.split(kc, k), ks, a_key


def sample_clients(key, k: int, m: int, probs=None) -> jnp.ndarray:
  """int32 [m]: m distinct client indices in increasing order, drawn without
  replacement (uniformly, or with probabilities ``probs`` [K])."""
  idx = jax.random.choice(key, k, (m,), replace=False,
                          p=None if probs is None else jnp.asarray(probs, jnp.float32))
  return jnp.sort(idx).astype(jnp.int32)


def _take(tree, idx):
  return jax.tree.map(lambda a: a[idx], tree)


def _scatter_rows(full, idx, rows):
  """full [K, ...] with rows [m, ...] written at idx (every other row untouched)."""
  return jax.tree.map(lambda f, r: f.at[idx].set(r.astype(f.dtype)), full, rows)


def _spread(values, idx, k: int, fill):
  """[m, ...] values → [K, ...] with ``fill`` where a client was not sampled."""
  def one(v):
    v = jnp.asarray(v)
    if v.ndim == 0 or v.shape[0] != idx.shape[0]:
      return v
    f = fill if jnp.issubdtype(v.dtype, jnp.inexact) else jnp.zeros((), v.dtype)
    return jnp.full((k,) + v.shape[1:], f, v.dtype).at[idx].set(v)
  return jax.tree.map(one, values)


def _round_parts(alg: Algorithm, clients_per_round: int, sample_probs):
  """The round cut around its client updates: ``begin`` (keys, broadcast, downlink, the
  sampled clients), ``client_inputs`` (what the client updates run on) and ``post``
  (aggregate, server update, info). :func:`make_round` runs them in one program, the
  'loop' round (:class:`LoopedRound`) in three."""

  def split(state: ServerState, data):
    per_client, server_data = alg.split_data(data)
    return per_client, server_data, backends.num_clients(per_client)

  def begin(state: ServerState, data, key):
    per_client, server_data, k = split(state, data)
    r_key = jax.random.fold_in(key, state.round)
    b_key, c_keys, s_key, a_key = round_keys(alg.key_scheme, r_key, k)
    bcast, info_b = alg.broadcast(state, server_data, b_key)
    down = alg.downlink(state)
    idx = None
    if 0 < clients_per_round < k:
      idx = sample_clients(jax.random.fold_in(r_key, SAMPLE_KEY_SALT), k, clients_per_round,
                           sample_probs)
      c_keys = c_keys[idx]
    return bcast, info_b, down, c_keys, s_key, a_key, idx

  def client_inputs(state: ServerState, data, down, idx, i=None):
    """Every training client's inputs [n, ...]; with ``i`` (a traced int32 scalar), only
    the i-th training client's (its row, ``idx[i]`` when sampling)."""
    per_client = alg.split_data(data)[0]
    inputs = (per_client, state.clients, down)
    if i is None:
      return inputs if idx is None else _take(inputs, idx)
    return _take(inputs, i if idx is None else idx[i])

  def post(state: ServerState, data, info_b, upload, new_rows, stats, s_key, a_key, idx,
           round_options):
    _, server_data, k = split(state, data)
    if set(upload) != set(alg.uploads):
      raise ValueError(f"Algorithm {alg.name}: client upload keys {sorted(upload)} differ "
                       f"from the declared uploads {list(alg.uploads)}")
    new_clients = new_rows if idx is None else _scatter_rows(state.clients, idx, new_rows)
    agg, weights, failed, info_a = alg.aggregate(state, upload, stats, a_key)
    new_state, info_s = alg.server_update(state, agg, failed, upload, new_clients, weights,
                                          server_data, s_key, **round_options)
    is_sampled = jnp.ones((k,), bool)
    if idx is not None:
      stats, info_a = _spread(stats, idx, k, jnp.nan), _spread(info_a, idx, k, jnp.nan)
      weights = jnp.zeros((k,), weights.dtype).at[idx].set(weights)
      is_sampled = jnp.zeros((k,), bool).at[idx].set(True)
    info = {**stats, **info_b, **info_a, **info_s, "weights": weights, "failed": failed,
            "included": weights > 0, "sampled": is_sampled}
    return new_state, info
  return begin, client_inputs, post


def make_round(alg: Algorithm, client_strategy: str = "auto", *, clients_per_round: int = 0,
               sample_probs=None, **for_each_kwargs) -> Callable:
  """``run_round(state, data, key, **round_options) -> (state', info)``; jit it once.

  client_strategy: a backend of ``backends.for_each_client`` (any backend runs any
  algorithm: per-client data, state and downlink are one pytree padded as needed), or
  'loop': a :class:`LoopedRound` (call it as it is, do not jit it: it runs three
  compiled programs, the one-client program K times).
  clients_per_round: m > 0 samples m clients per round (module docstring); 0 (or
  m ≥ K) runs every client. sample_probs: optional [K] sampling probabilities.
  round_options: traced values forwarded to ``server_update`` (e.g. FCL's exchange switch).
  """
  if client_strategy == "loop":
    if for_each_kwargs:
      raise ValueError(f"client_strategy 'loop' takes no backend options, got {sorted(for_each_kwargs)}")
    return LoopedRound(alg, clients_per_round, sample_probs)
  begin, client_inputs, post = _round_parts(alg, clients_per_round, sample_probs)
  clients = backends.for_each_client(alg.client_update, client_strategy,
                                     stage=f"{alg.name} client update", **for_each_kwargs)

  def run_round(state: ServerState, data, key, **round_options):
    bcast, info_b, down, c_keys, s_key, a_key, idx = begin(state, data, key)
    upload, new_rows, stats = clients(bcast, client_inputs(state, data, down, idx), c_keys)
    return post(state, data, info_b, upload, new_rows, stats, s_key, a_key, idx, round_options)
  return run_round


def _default_jit(name: str, build: Callable, **kw) -> Callable:
  return jax.jit(build(), **kw)


@dataclasses.dataclass
class LoopedRound:
  """The round of ``make_round(alg, 'loop')``: the same function as the one-program
  round, run as compiled programs called from Python so that the client update is
  compiled once for c clients, however many clients there are (the one-program round
  inlines K copies of it, and XLA:CPU's compile time grows with K × local steps):

    begin   (state, data, key) -> broadcast, downlink, keys, sampled clients
    client  (broadcast, state, data, downlink, keys, idx, i) -> clients i .. i+c−1's
            (upload, new state row, stats), leaves [c, ...]; called for i = 0, c, 2c, …
            from Python (c = ``clients_per_call``; a second program of n mod c clients
            runs the last call when c does not divide the n training clients)
    post    (state, data, ..., rows) -> (state', info): the calls' rows concatenated in
            client order, then aggregation and server update over all n uploads at once
            (so every aggregator, the divergence guard, DP and secure aggregation see
            exactly what the one-program round gives them)

  ``clients_per_call`` c > 1 unrolls c client updates in one call: they are
  independent, so XLA:CPU runs them side by side on several cores (a single U-Net
  step does not keep two cores busy), at c times the client program's compile time.
  Every c gives the same round up to float summation order (tested).

  ``host_steps`` (config ``fl.step_strategy='host'``) cuts each client call further at
  the local steps (fl/host_steps.py): ``stage0`` (up to the steps), ``step0`` (one local
  step of the c clients) called E times, ``stage1`` (the rest, returning the c clients'
  outputs), so the largest program is c client-steps whatever E is; ``post`` is staged
  the same way when the server update has a step loop
  (label-at-server: ``post``, ``post_step0`` called E times, ``post_stage1``); under host
  steps the state is not donated to post. ``begin`` is staged the same way, host steps
  or not, when the broadcast has a step loop (FedWeP's seed search under
  ``semi.fedwep.search_strategy='unrolled'``: ``begin``, ``begin_step0`` called once per
  candidate seed, ``begin_stage1``); without one it is the one ``begin`` program.

  ``host_threads`` T > 1 (config ``fl.host_threads``) issues the client calls of every
  round after the first from T Python threads, each call's programs dispatched and waited
  for by one thread, so XLA:CPU runs T calls side by side (one call of a small U-Net keeps
  about 1.6 of 2 cores busy; asynchronous dispatch from one thread does not overlap them).
  The first round runs its calls in order on the calling thread, compiling the
  programs; every round is bitwise the one-thread round (tests/test_host_steps.py).

  Nothing leaves the device between the programs (the data, the state and the
  outputs stay device arrays; the client indices are device scalars made once); each
  call is dispatched asynchronously. Call it
  un-jitted: ``run(state, data, key, *options, **round_options)``; positional extra
  arguments are named by ``option_names`` (FCL's ``exchange_on``). ``jit(name, build,
  **jit_kwargs)`` compiles one program (default ``jax.jit(build(), ...)``; the trainers
  pass ``runlog.cached_jit`` to time and reuse them)."""
  alg: Algorithm
  clients_per_round: int = 0
  sample_probs: Any = None
  clients_per_call: int = 1
  host_steps: bool = False
  host_ops_per_call: int = 0
  host_threads: int = 1
  report: Optional[Callable[[str], None]] = None
  record: Optional[Callable[[str, float], None]] = None
  jit: Callable = _default_jit
  option_names: Tuple[str, ...] = ()
  _programs: Dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)
  _bodies: Dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    if int(self.clients_per_call) < 1 and not (self.host_steps and self.clients_per_call == 0):
      raise ValueError(f"config.fl.clients_per_call={self.clients_per_call} must be >= 1 "
                       f"(0 = chosen from the step's size: host steps only)")

  def with_jit(self, jit: Callable) -> "LoopedRound":
    return dataclasses.replace(self, jit=jit, _programs={}, _bodies={})

  def with_option_names(self, names: Tuple[str, ...]) -> "LoopedRound":
    return dataclasses.replace(self, option_names=tuple(names), _programs={}, _bodies={})

  def _build(self):
    begin, client_inputs, post = _round_parts(self.alg, self.clients_per_round, self.sample_probs)
    alg = self.alg
    self._client_inputs = client_inputs

    def post_calls(state, data, info_b, rows, s_key, a_key, idx, round_options):
      """post over the calls' outputs (each leaf [c, ...]), concatenated in client order;
      coordinate-wise aggregators on a few vectors per client (aggregators.flat_view)."""
      upload, new_rows, stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *rows)
      with aggregators.flat_aggregation():
        return post(state, data, info_b, upload, new_rows, stats, s_key, a_key, idx,
                    round_options)

    self._post_calls = post_calls
    self._begin = begin  # staged like post (:meth:`_run_stages`), host steps or not
    if not self.host_steps:
      self._programs["post"] = self.jit("post", lambda: post_calls, donate_argnums=(0,))

  def _client_program(self, c: int):
    """The program of c consecutive clients (compiled on first use): c independent client
    updates, unrolled, their outputs stacked (leaves [c, ...])."""
    if ("client", c) not in self._programs:
      alg, client_inputs = self.alg, self._client_inputs

      def many(bcast, state, data, down, keys, idx, i):
        outs = [alg.client_update(bcast, client_inputs(state, data, down, idx, i + j),
                                  keys[i + j]) for j in range(c)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
      name = "client" if c == 1 else f"client{c}"  # the jit hook's cache key and label
      self._programs["client", c] = self.jit(name, lambda: many)
    return self._programs["client", c]

  def _map_calls(self, fn: Callable, calls, threaded: bool):
    """[fn(call) for call in calls], on ``host_threads`` threads when ``threaded``: each
    call's programs are dispatched and waited for by one thread, so XLA runs the calls
    of different threads side by side (one call alone keeps about 1.6 of 2 CPU cores
    busy). Every call is the same pure function of its inputs in either case."""
    if not threaded:
      return [fn(call) for call in calls]
    if self._programs.get("pool") is None:
      self._programs["pool"] = concurrent.futures.ThreadPoolExecutor(
          self.host_threads, thread_name_prefix="fedjax_seg_client")
    return list(self._programs["pool"].map(lambda call: jax.block_until_ready(fn(call)), calls))

  def _stage_program(self, part: str, s: int, c: int):
    """Stage s of a host-step call (fl/host_steps.py): part 'client' (c clients from start
    index i: their updates with the first s step loops answered by ``given``), 'post'
    (c = 1: aggregation + server update, whose label-at-server server steps are a step
    loop too) or 'begin' (c = 1: keys and broadcast, where FedWeP's seed search runs its
    N perturbed models as a step loop), up to the next step loop (a
    :class:`host_steps.Segment`) or to the end (the clients' outputs stacked to [c, ...];
    post's (state', info); begin's outputs)."""
    if ("stage", part, s, c) not in self._programs:
      name = f"stage{s}" + ("" if c == 1 else f"x{c}")
      if part in ("post", "begin"):
        name = part if s == 0 else f"{part}_stage{s}"
      self._programs["stage", part, s, c] = self.jit(name, lambda: self._stage_fn(part, s, c))
    return self._programs["stage", part, s, c]

  def _stage_fn(self, part: str, s: int, c: int):
    """The traced function of :meth:`_stage_program` (its trace records the step body)."""
    if ("stage_fn", part, s, c) not in self._programs:
      alg, client_inputs = self.alg, self._client_inputs

      if part == "post":
        def lanes(state, data, info_b, rows, s_key, a_key, idx, round_options):
          return [(self._post_calls, (state, data, info_b, rows, s_key, a_key, idx,
                                      round_options))]
      elif part == "begin":
        def lanes(state, data, key):
          return [(self._begin, (state, data, key))]
      else:
        def lanes(bcast, state, data, down, keys, idx, i):
          return [(alg.client_update,
                   (bcast, client_inputs(state, data, down, idx, i + j), keys[i + j]))
                  for j in range(c)]

      def run(*args):
        *args, given = args
        res, body = hsteps.stage_lanes(lanes(*args), given, alg.name)
        if body is None:  # every lane ran to its end
          return res[0] if part in ("post", "begin") else jax.tree.map(
              lambda *xs: jnp.stack(xs), *res)
        self._bodies[part, s, c] = body
        return res
      self._programs["stage_fn", part, s, c] = run
    return self._programs["stage_fn", part, s, c]

  def _step_program(self, part: str, s: int, c: int, stage_args):
    """One local step of the c lanes at step loop s (compiled on first use; its body is
    the jaxpr the stage program's trace found, traced again here if that program was
    reused from an earlier round object)."""
    if ("step", part, s, c) not in self._programs:
      def build():
        if (part, s, c) not in self._bodies:  # the stage program came from runlog's memo
          jax.eval_shape(self._stage_fn(part, s, c), *stage_args)
        return hsteps.make_step(self._bodies[part, s, c], c)
      name = f"step{s}" + ("" if c == 1 else f"x{c}")
      self._programs["step", part, s, c] = self.jit(
          f"{part}_{name}" if part in ("post", "begin") else name, build, donate_argnums=(1, 3))
    return self._programs["step", part, s, c]

  def _run_stages(self, part: str, c: int, args: Tuple):
    """Stage programs and E calls of each step program (fl/host_steps.py) until a stage
    runs to the end; returns its outputs. For part 'client', ``args`` = (bcast, state,
    data, down, keys, idx, i): the call of c clients from start index i returns their
    (upload, new state row, stats), leaves [c, ...]."""
    given, s = (), 0
    while True:
      res = self._stage_program(part, s, c)(*args, given)
      if not isinstance(res, hsteps.Segment):
        return res
      step = self._step_program(part, s, c, args + (given,))
      carry, outs = res.carry, res.outs
      n = jax.tree.leaves(res.xs)[0].shape[0]
      if ("steps", n) not in self._programs:  # the step indices as device scalars, made once
        self._programs["steps", n] = [jnp.int32(e) for e in range(n)]
      for e in self._programs["steps", n]:
        carry, outs = step(res.consts, carry, res.xs, outs, e)
      given, s = given + (tuple(zip(carry, outs)),), s + 1

  def _auto_clients(self, n: int, stage_args) -> int:
    """Host steps with clients_per_call 0: trace the one-client stage 0 (abstractly; JAX
    reuses that trace if the one-client program is compiled later) and fit as many clients
    per call as keep a step program within ``host_ops_per_call`` operations."""
    if ("auto_c", n) not in self._programs:
      t0 = time.perf_counter()
      jax.eval_shape(self._stage_fn("client", 0, 1), *stage_args)
      if self.record is not None:  # compile time: a trace a one-client program would reuse
        self.record("host_probe", time.perf_counter() - t0)
      body = self._bodies.get(("client", 0, 1))
      c = hsteps.auto_clients_per_call(body, n, self.host_ops_per_call)
      self._programs["auto_c", n] = c
      if self.report is not None:
        size = "no local-step loop" if body is None else \
            f"a local step of {hsteps.num_ops(body.jaxpr):,} operations"
        self.report(f"[compile] host steps: {self.alg.name}: {size}; {c} client"
                    f"{'s' if c > 1 else ''} per call (at most {self.host_ops_per_call:,} "
                    f"operations per call)")
    return self._programs["auto_c", n]

  def calls(self, n: int, c: Optional[int] = None):
    """[(start index, clients in the call)] covering the n training clients, c (default
    ``clients_per_call``) per call."""
    c = min(int(self.clients_per_call if c is None else c), n)
    return [(i, min(c, n - i)) for i in range(0, n, c)]

  def __call__(self, state, data, key, *options, **round_options):
    if len(options) > len(self.option_names):
      raise TypeError(f"LoopedRound({self.alg.name}): {len(options)} positional options, "
                      f"names {self.option_names}")
    round_options = {**dict(zip(self.option_names, options)), **round_options}
    if not self._programs:
      self._build()
    p = self._programs
    bcast, info_b, down, keys, s_key, a_key, idx = self._run_stages("begin", 1,
                                                                    (state, data, key))
    n = keys.shape[0]
    if ("calls", n) not in p:  # the start indices as device scalars, made once
      c = None
      if self.host_steps and self.clients_per_call == 0:
        c = self._auto_clients(n, (bcast, state, data, down, keys, idx, jnp.int32(0), ()))
      p["calls", n] = [(jnp.int32(i), c) for i, c in self.calls(n, c)]
    # programs are compiled (and cached in self._programs) by a round's calls in order,
    # so threads only issue the calls of a round whose programs all exist
    threaded = (self.host_threads > 1 and len(p["calls", n]) > 1
                and p.get(("warm", n), False))
    if self.host_steps:
      rows = self._map_calls(lambda ic: self._run_stages(
          "client", ic[1], (bcast, state, data, down, keys, idx, ic[0])), p["calls", n], threaded)
      res = self._run_stages("post", 1, (state, data, info_b, rows, s_key, a_key, idx,
                                         round_options))
    else:
      rows = self._map_calls(lambda ic: self._client_program(ic[1])(
          bcast, state, data, down, keys, idx, ic[0]), p["calls", n], threaded)
      res = p["post"](state, data, info_b, rows, s_key, a_key, idx, round_options)
    p["warm", n] = True
    return res


def jit_round(key: str, build: Callable[[], Callable], client_strategy: str,
              clients_per_call: int = 1, host_steps: bool = False, host_ops_per_call: int = 0,
              host_threads: int = 1, **jit_kwargs) -> Callable:
  """A trainer's round program: ``runlog.cached_jit(key, build, donate_argnums=(0,))``
  (one program, the state donated); for client_strategy 'loop', the
  :class:`LoopedRound` ``build()`` gives with ``clients_per_call`` clients per client
  call (``backends.clients_per_call`` resolves the config's value), its programs cached
  as ``key`` + '/begin', '/client' (c = 1; '/client<c>' for c clients per call), '/post'
  (compile times recorded under ``<name>_begin``, ...); with ``host_steps`` the client
  programs are '/stage<s>' and '/step<s>' ('x<c>' appended for c clients per call), and
  clients_per_call 0 chooses c from the step's size (``host_ops_per_call``, reported; the
  trace that sizes it is recorded as ``<name>_host_probe``); a broadcast with a step loop
  adds '/begin_step0' and '/begin_stage1' (FedWeP's seed search); ``host_threads`` > 1 issues
  the client calls from that many threads;
  for 'debug', ``build()`` itself, run eagerly, so that a client's error and its
  non-finite outputs surface with the client index (backends' 'debug')."""
  from fedjax_seg import runlog  # runlog imports nothing of fl/
  if client_strategy == "debug":
    return build()
  if client_strategy != "loop":
    return runlog.cached_jit(key, build, donate_argnums=(0,), **jit_kwargs)
  name = runlog.program_name(key)
  run = build()
  run = dataclasses.replace(run, clients_per_call=int(clients_per_call),
                            host_steps=bool(host_steps), host_ops_per_call=int(host_ops_per_call),
                            host_threads=int(host_threads),
                            report=lambda line: print(line, flush=True),
                            record=lambda part, s: runlog.add_compile_time(f"{name}_{part}", s, trace=True),
                            _programs={}, _bodies={})
  return run.with_jit(  # the programs are memoised by runlog (a new process: the disk cache)
      lambda part, b, **kw: runlog.cached_jit(f"{key}/{part}", b, name=f"{name}_{part}",
                                              **kw, **jit_kwargs))


def nbytes(tree) -> int:
  """Bytes of a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def comm_bytes(alg: Algorithm, state: ServerState, data) -> Dict[str, Any]:
  """Bytes per client per round, read from what the algorithm declares it sends.

  up: one client's upload (every declared entry; also per entry in 'up_by_entry');
  down: the broadcast plus that client's downlink message. Computed from shapes only
  (``jax.eval_shape``), nothing runs.
  """
  per_client, server_data = alg.split_data(data)
  k = backends.num_clients(per_client)
  take0 = lambda t: jax.tree.map(lambda a: a[0], t)
  key = jax.random.PRNGKey(0)
  bcast, _ = jax.eval_shape(lambda s, d: alg.broadcast(s, d, key), state, server_data)
  down_k = jax.eval_shape(lambda s: take0(alg.downlink(s)), state)
  upload, _, _ = jax.eval_shape(
      lambda b, pc, ck: alg.client_update(
          b, (take0(pc), take0(ck), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), down_k)),
          key),
      bcast, per_client, state.clients)
  by_entry = {name: nbytes(upload[name]) for name in alg.uploads}
  return {"up": sum(by_entry.values()), "down": nbytes(bcast) + nbytes(down_k),
          "up_by_entry": by_entry, "clients": k}


def model_only(alg_name: str, uploads: Tuple[str, ...], what: str) -> None:
  """Refuses a model-only wrapper (DP, secure aggregation, ...) for an algorithm that
  uploads more than one model."""
  if tuple(uploads) != ("model",):
    raise ValueError(f"{what} protects one uploaded model; {alg_name} uploads "
                     f"{list(uploads)}")
