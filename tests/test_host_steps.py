"""Host-called local steps (fl/host_steps.py, LoopedRound.host_steps, config
fl.step_strategy='host'): a client update cut at its run_steps loops into stage programs
and a one-step program called E times from Python.

The golden rounds of every algorithm family under 'host' are in tests/test_backends.py;
the NumPy rounds (per-client state, FedBN, SCAFFOLD, Ditto with two step loops, client
sampling) in tests/test_algorithm.py, tests/test_fedbn_scaffold_ditto.py and
tests/test_sampling.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg.fl import aggregators, algorithm, backends, ditto, host_steps, local

E, LR = 3, 0.1


def _client(bcast, data, key):
  """w0 = 2·bcast; E SGD steps on ½‖w − a‖² + noise·w (noise from the step key, so every
  step's input matters); returns (w_E + Σ losses, the mean loss)."""
  a, scale = data["a"], data["scale"]  # closed over by the step body

  def loss_fn(p, s, k):
    noise = jax.random.normal(k, a.shape)
    return 0.5 * jnp.sum((p - a) ** 2) + scale * jnp.sum(noise * p), (p, ())

  w0 = 2.0 * bcast
  w, _, (losses, _) = local.local_train(loss_fn, optax.sgd(LR), w0, jax.random.split(key, E),
                                        strategy="unrolled", params=lambda s: s,
                                        merge=lambda s, new, p: p)
  return w + jnp.sum(losses), jnp.mean(losses)


def _numpy_client(bcast, a, scale, key):
  w = 2.0 * np.asarray(bcast, np.float64)
  losses = []
  for k in jax.random.split(key, E):
    noise = np.asarray(jax.random.normal(k, a.shape), np.float64)
    losses.append(0.5 * np.sum((w - a) ** 2) + scale * np.sum(noise * w))
    w = w - LR * ((w - a) + scale * noise)
  return w + sum(losses), np.mean(losses), losses


def test_a_staged_client_equals_numpy():
  """stage 0 stops at the step loop with the body's closed-over values; the one-step
  program run E times from Python, then stage 1 answered with its results, give the
  NumPy client."""
  bcast = jnp.asarray([0.5, -1.0], jnp.float32)
  a = np.asarray([1.0, 3.0], np.float32)
  data, key = {"a": jnp.asarray(a), "scale": jnp.float32(0.3)}, jax.random.PRNGKey(7)

  @jax.jit
  def stage0(b, d, k):
    seg, body = host_steps.stage(_client, [], (b, d, k))
    holder["body"] = body
    return seg
  holder = {}
  consts, carry, xs, outs = stage0(bcast, data, key)
  body = holder["body"]
  assert jax.tree.leaves(xs)[0].shape[0] == E and len(consts) == len(body.const_avals)
  step = jax.jit(host_steps.make_step(body, 1))
  carry, outs = (carry,), (outs,)
  for e in range(E):
    carry, outs = step((consts,), carry, (xs,), outs, jnp.int32(e))

  @jax.jit
  def stage1(b, d, k, given):
    out, none = host_steps.stage(_client, [given], (b, d, k))
    assert none is None  # the client ran to its end
    return out
  w, mean_loss = stage1(bcast, data, key, (carry[0], outs[0]))
  w_ref, loss_ref, step_losses = _numpy_client(bcast, a, 0.3, key)
  np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-5)
  np.testing.assert_allclose(float(mean_loss), loss_ref, rtol=1e-5)
  # the step program wrote each step's (loss, aux) at its row of the output buffers
  np.testing.assert_allclose(np.asarray(outs[0][0]), step_losses, rtol=1e-5)


def _counting_jit(calls):
  """A LoopedRound jit hook: ``jax.jit`` programs that count their calls by name."""
  def counting_jit(name, build, **kw):
    f = jax.jit(build(), **kw)

    def run(*args):
      calls[name] = calls.get(name, 0) + 1
      return f(*args)
    return run
  return counting_jit


def _quad(prox=0.0):
  def cu(variables, data, key, anchor=None):
    a = data["a"]
    anc = variables["params"] if anchor is None else anchor

    def loss_fn(p, v, k):
      value = 0.5 * jnp.sum((p["w"] - a) ** 2)
      if prox:
        value = value + 0.5 * prox * jnp.sum((p["w"] - anc["w"]) ** 2)
      return value, (v, ())
    new, _, (losses, _) = local.local_train(loss_fn, optax.sgd(LR), variables,
                                            jax.random.split(key, E), strategy="unrolled")
    return new, {"num_samples": jnp.sum(data["valid"]), "train_loss": jnp.mean(losses),
                 "dice_post": jnp.float32(0.0)}  # what Ditto reads of the personal update
  return cu


def _ditto_toy(k, seed):
  """(data of k quadratic clients, initial variables, Ditto over them: two step loops)."""
  rng = np.random.default_rng(seed)
  data = {"a": jnp.asarray(rng.normal(size=(k, 2)), jnp.float32),
          "valid": jnp.ones((k, 4), jnp.float32)}
  v0 = {"params": {"w": jnp.zeros((2,))}}
  return data, v0, ditto.make_algorithm(_quad(), _quad(prox=0.5), aggregators.fedavg)


def test_each_step_loop_is_a_program_called_once_per_step():
  """Ditto (two step loops per client: global, then personal) with K = 3 clients, 2 per
  call: programs stage0, step0, stage1, step1, stage2 per call size, every step program
  called E times per call, and the round equals the one-program round."""
  k = 3
  data, v0, alg = _ditto_toy(k, seed=0)
  state = algorithm.ServerState(v0, jnp.int32(0), clients=ditto.init_clients(v0, k))
  calls = {}
  counting_jit = _counting_jit(calls)
  host = dataclasses.replace(algorithm.make_round(alg, "loop"), clients_per_call=2,
                             host_steps=True).with_jit(counting_jit)
  s_one, info_one = jax.jit(algorithm.make_round(alg, "unrolled"))(state, data,
                                                                   jax.random.PRNGKey(0))
  s_host, info_host = host(state, data, jax.random.PRNGKey(0))  # donates the state
  # one call of 2 clients and one of 1: each runs stage0, E × step0, stage1, E × step1, stage2
  assert calls == {"begin": 1, "post": 1,
                   "stage0x2": 1, "step0x2": E, "stage1x2": 1, "step1x2": E, "stage2x2": 1,
                   "stage0": 1, "step0": E, "stage1": 1, "step1": E, "stage2": 1}, calls
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               (s_host, info_host), (s_one, info_one))


def test_host_steps_under_the_loop_round_only():
  assert backends.host_steps("host", "loop", 8, "cpu")
  assert backends.host_steps("auto", "loop", 8, "cpu")             # auto on a CPU, E > 1
  assert not backends.host_steps("auto", "loop", 1, "cpu")         # one step: the client program
  assert not backends.host_steps("auto", "loop", 8, "gpu")
  assert not backends.host_steps("unrolled", "loop", 8, "cpu")     # an explicit choice stays
  assert not backends.host_steps("host", "unrolled", 8, "cpu")     # in-program steps there
  assert backends.resolve_strategy("host", "step", "cpu") == "unrolled"  # inside a program
  assert backends.resolve_strategy("host", "step", "gpu") == "scan"
  # auto clients per call: 0, chosen by the round from the step's size
  assert backends.loop_options(0, "auto", "loop", 32, 8, "cpu", host_threads_setting=1) == {
      "clients_per_call": 0, "host_steps": True,
      "host_ops_per_call": host_steps.HOST_OPS_PER_CALL, "host_threads": 1}
  assert backends.loop_options(2, "host", "loop", 32, 8, "cpu", host_threads_setting=3) == {
      "clients_per_call": 2, "host_steps": True, "host_ops_per_call": 0,   # as given
      "host_threads": 3}
  assert backends.loop_options(0, "unrolled", "loop", 32, 8, "cpu", host_threads_setting=1) == {
      "clients_per_call": 1, "host_steps": False, "host_ops_per_call": 0, "host_threads": 1}
  with pytest.raises(ValueError, match="config.fl.step_strategy='hots'"):
    backends.host_steps("hots", "loop", 8, "cpu")
  # host threads: auto is 2 on a CPU with 2 or more cores, 1 elsewhere and off the loop round
  assert backends.host_threads(0, "loop", "cpu", cores=2) == 2
  assert backends.host_threads(0, "loop", "cpu", cores=16) == backends.AUTO_HOST_THREADS_CPU
  assert backends.host_threads(0, "loop", "cpu", cores=1) == 1
  assert backends.host_threads(0, "loop", "gpu") == 1
  assert backends.host_threads(3, "loop", "gpu") == 3                  # as given
  assert backends.host_threads(3, "unrolled", "cpu") == 1              # one program per round
  with pytest.raises(ValueError, match="config.fl.host_threads=-1"):
    backends.host_threads(-1, "loop", "cpu")
  # with host threads, auto clients per call is one client, host steps or not
  for step, host in (("auto", True), ("unrolled", False)):
    assert backends.loop_options(0, step, "loop", 32, 8, "cpu", host_threads_setting=2) == {
        "clients_per_call": 1, "host_steps": host, "host_ops_per_call": 0, "host_threads": 2}
  assert backends.loop_options(4, "auto", "loop", 32, 8, "cpu", host_threads_setting=2)[
      "clients_per_call"] == 4                                           # as given


def test_auto_clients_per_call_fits_the_step_size_and_prefers_divisors():
  def body(n_ops):  # a jaxpr of n_ops operations (one of them a nested jit of 2)
    def f(x):
      for _ in range(n_ops - 3):
        x = x + 1.0
      return jax.jit(lambda y: y * 2.0 + 1.0)(x)
    return host_steps.Body(jax.make_jaxpr(f)(1.0).jaxpr, None, ())
  b = body(1000)
  assert host_steps.num_ops(b.jaxpr) == 1000
  assert host_steps.auto_clients_per_call(b, 8, 5000) == 4      # fits 5, divisor 4 of 8
  assert host_steps.auto_clients_per_call(b, 7, 5000) == 5      # divisor 1 < 5 / 2: keep 5
  assert host_steps.auto_clients_per_call(b, 3, 5000) == 3      # at most the clients
  assert host_steps.auto_clients_per_call(b, 8, 999) == 1       # at least one
  assert host_steps.auto_clients_per_call(None, 6, 5000) == 6   # no step loop: one call


def test_label_at_server_steps_and_the_seed_search_run_as_stages():
  """FedWeP-Real label-at-server: the server's 2 supervised steps in the server update are
  staged like a client's (post, post_step0 called twice, post_stage1), the seed search
  over the 4 candidate seeds (search_strategy 'unrolled') too (begin, begin_step0 called 4
  times, begin_stage1; also in a loop round without host steps), and the round equals
  the one-program round with the vmapped search (the same seed pair, the same model)."""
  import test_port_golden as golden
  from _helpers import client_hp, semi_hp
  from fedjax_seg.fl import core, semi
  fns = golden._unet()
  hp = lambda strategy: semi_hp(
      method="fedwep_real", scenario="label_at_server", unlabelled_batch_size=2,
      server_steps=2, server_batch_size=2, num_seeds=4, search_size=2, threshold=0.5,
      ema_decay=0.9, rampup_rounds=2, **{**golden.OLD_SEMI, "search_strategy": strategy})
  chp = client_hp(local_steps=2, batch_size=2, step_strategy="unrolled")
  v = semi.init_models(hp("vmap"), fns, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  data = golden._semi_data("label_at_server")
  make = lambda h, s: semi.make_run_round(h, fns, optax.adam(1e-2), 2, chp, s,
                                          optax.adam(2e-2))
  s_one, i_one = jax.jit(make(hp("vmap"), "unrolled"))(core.ServerState(v, jnp.int32(1)), data,
                                                       jax.random.PRNGKey(1))
  calls = {}
  counting_jit = _counting_jit(calls)
  host = dataclasses.replace(make(hp("unrolled"), "loop"), clients_per_call=2, host_steps=True)
  s_host, i_host = host.with_jit(counting_jit)(core.ServerState(v, jnp.int32(1)), data,
                                               jax.random.PRNGKey(1))
  assert {k: calls.get(k) for k in ("post", "post_step0", "post_stage1", "begin",
                                    "begin_step0", "begin_stage1")} == {
      "post": 1, "post_step0": 2, "post_stage1": 1, "begin": 1, "begin_step0": 4,
      "begin_stage1": 1}, calls
  np.testing.assert_array_equal(i_host["seeds"], i_one["seeds"])
  np.testing.assert_allclose(i_host["c_star"], i_one["c_star"], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               s_host.variables, s_one.variables)
  # the loop round without host steps stages the search as well
  calls.clear()
  loop = dataclasses.replace(make(hp("unrolled"), "loop"), clients_per_call=2)
  s_loop, i_loop = loop.with_jit(counting_jit)(core.ServerState(v, jnp.int32(1)), data,
                                               jax.random.PRNGKey(1))
  assert {k: calls.get(k) for k in ("begin", "begin_step0", "begin_stage1", "client2")} == {
      "begin": 1, "begin_step0": 4, "begin_stage1": 1, "client2": 1}, calls
  np.testing.assert_array_equal(i_loop["seeds"], i_one["seeds"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               s_loop.variables, s_one.variables)


@pytest.mark.parametrize("host", [False, True])
def test_host_threads_issue_the_calls_of_later_rounds_and_change_nothing(host):
  """host_threads = 2: the first round compiles its programs in call order on the calling
  thread; later rounds issue their client calls from the pool's threads, and every
  round is bitwise the round of one thread (Ditto, K = 5, one client per call)."""
  import threading
  k = 5
  data, v0, alg = _ditto_toy(k, seed=1)
  threads = {}

  def recording_jit(name, build, **kw):
    f = jax.jit(build(), **kw)

    def run(*args):
      threads.setdefault(name, set()).add(threading.current_thread().name.split("_")[0])
      return f(*args)
    return run

  results = []
  for t in (1, 2):
    run = dataclasses.replace(algorithm.make_round(alg, "loop"), clients_per_call=1,
                              host_steps=host, host_threads=t).with_jit(recording_jit)
    state = algorithm.ServerState(jax.tree.map(jnp.copy, v0), jnp.int32(0),
                                  clients=ditto.init_clients(v0, k))
    for r in range(3):
      state, info = run(state, data, jax.random.PRNGKey(r))
      if r == 0:
        first_round = {n: set(v) for n, v in threads.items()}
    results.append(jax.device_get((state, info)))
  client_programs = ("stage0", "step0", "stage1", "step1", "stage2") if host else ("client",)
  assert set(threads) == {"begin", "post", *client_programs}, threads
  assert all(v == {"MainThread"} for v in first_round.values()), first_round
  for name in client_programs:  # the t = 2 rounds after the first: the pool's threads
    assert "fedjax" in threads[name], (name, threads)
  assert threads["begin"] == {"MainThread"}
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
