"""FedBN / SiloBN, SCAFFOLD and Ditto rounds (fl/fedbn.py, fl/scaffold.py, fl/ditto.py)
against hand-computed NumPy rounds on quadratic toy clients, then end to end on a
tiny U-Net with batch norm."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg.fl import aggregators, algorithm, ditto, fedbn, local, scaffold
from _helpers import jit_round, make_round, run_worker

K, LR, E = 3, 0.1, 3


def _targets():
  rng = np.random.default_rng(0)
  return rng.normal(size=(K, 2)).astype(np.float32) * 3


def _data(targets, n=(4, 2, 6)):
  valid = np.zeros((K, 6), np.float32)
  for k, nk in enumerate(n):
    valid[k, :nk] = 1
  return {"a": jnp.asarray(targets), "valid": jnp.asarray(valid)}, np.asarray(n, np.float64)


def _stats(data):
  return {"num_samples": jnp.sum(data["valid"])}


# --- FedBN / SiloBN --------------------------------------------------------------------


def _bn_variables():
  return {"params": {"Conv_0": {"kernel": jnp.zeros((2,))},
                     "BatchNorm_0": {"scale": jnp.ones((2,)), "bias": jnp.zeros((2,))}},
          "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros((2,)), "var": jnp.ones((2,))}}}


def _bn_client(variables, data, key):
  """Every parameter leaf moves E steps towards the client's target a_k; the running
  mean becomes 0.5·mean + 0.5·a_k, the running var stays (a toy BN forward pass)."""
  a = data["a"]
  p = jax.tree.map(lambda x: x, variables["params"])
  for _ in range(E):
    p = jax.tree.map(lambda x: x - LR * (x - a), p)
  bs = {"BatchNorm_0": {"mean": 0.5 * variables["batch_stats"]["BatchNorm_0"]["mean"] + 0.5 * a,
                        "var": variables["batch_stats"]["BatchNorm_0"]["var"]}}
  return {"params": p, "batch_stats": bs}, _stats(data)


def _np_fedbn(targets, n, rounds, mode):
  shared = {"kernel": np.zeros(2)}
  if mode == "silobn":
    shared.update(scale=np.ones(2), bias=np.zeros(2))
  local_k = [{"mean": np.zeros(2), "var": np.ones(2)} for _ in range(K)]
  if mode == "fedbn":
    for lk in local_k:
      lk.update(scale=np.ones(2), bias=np.zeros(2))
  step = lambda x, a: x - LR * (x - a)
  for _ in range(rounds):
    ups = []
    for k in range(K):
      a = targets[k]
      p = {**shared, **{q: local_k[k][q] for q in ("scale", "bias") if q in local_k[k]}}
      for _ in range(E):
        p = {q: step(v, a) for q, v in p.items()}
      local_k[k] = {"mean": 0.5 * local_k[k]["mean"] + 0.5 * a, "var": local_k[k]["var"],
                    **({q: p[q] for q in ("scale", "bias")} if mode == "fedbn" else {})}
      ups.append({q: p[q] for q in shared})
    shared = {q: sum(n[k] * ups[k][q] for k in range(K)) / n.sum() for q in shared}
  return shared, local_k


@pytest.mark.parametrize("backend", ["vmap", "unrolled", "map", "debug", "loop", "host"])
@pytest.mark.parametrize("mode", ["fedbn", "silobn"])
def test_fedbn_round_matches_numpy_and_keeps_k_distinct_statistics(mode, backend):
  targets = _targets()
  data, n = _data(targets)
  v0 = _bn_variables()
  alg = fedbn.make_algorithm(_bn_client, aggregators.fedavg, mode)
  state = algorithm.ServerState(v0, jnp.int32(0), clients=fedbn.init_clients(v0, K, mode))
  run = make_round(alg, backend)
  run = jit_round(run, backend)
  for _ in range(3):
    state, info = run(state, data, jax.random.PRNGKey(0))
  shared_ref, local_ref = _np_fedbn(targets, n, 3, mode)
  np.testing.assert_allclose(state.variables["params"]["Conv_0"]["kernel"], shared_ref["kernel"],
                             rtol=1e-5)
  means = np.asarray(state.clients["batch_stats"]["BatchNorm_0"]["mean"])
  np.testing.assert_allclose(means, np.stack([l["mean"] for l in local_ref]), rtol=1e-5)
  assert len({tuple(np.round(m, 5)) for m in means}) == K            # K distinct statistics
  # the global model's statistics: uniform average of the clients' (held-out-site rule)
  np.testing.assert_allclose(state.variables["batch_stats"]["BatchNorm_0"]["mean"],
                             means.mean(0), rtol=1e-5)
  if mode == "fedbn":
    scales = np.asarray(state.clients["params"]["BatchNorm_0"]["scale"])
    np.testing.assert_allclose(scales, np.stack([l["scale"] for l in local_ref]), rtol=1e-5)
  else:
    np.testing.assert_allclose(state.variables["params"]["BatchNorm_0"]["scale"],
                               shared_ref["scale"], rtol=1e-5)
    assert "params" not in state.clients
  # personal models: shared part + own local part
  pm = fedbn.personal_models(state, mode)
  np.testing.assert_allclose(pm["batch_stats"]["BatchNorm_0"]["mean"], means, rtol=1e-6)
  # only the shared part crosses the wire
  up = algorithm.comm_bytes(alg, state, data)["up"]
  assert up == (2 if mode == "fedbn" else 6) * 4


def test_fedbn_split_paths_and_refusals():
  v = _bn_variables()
  shared, loc = fedbn.split(v, "fedbn")
  assert set(shared["params"]) == {"Conv_0"} and set(loc) == {"params", "batch_stats"}
  shared, loc = fedbn.split(v, "silobn")
  assert set(loc) == {"batch_stats"} and "BatchNorm_0" in shared["params"]
  back = fedbn.merge(*fedbn.split(v, "fedbn"))
  assert jax.tree.structure(back) == jax.tree.structure(v)
  with pytest.raises(ValueError, match="config.model.norm='none'"):
    fedbn.check_model({"params": {"Conv_0": {"kernel": jnp.zeros(2)}}}, "fedbn", "none")


# --- SCAFFOLD --------------------------------------------------------------------------


def _quad_client(penalty=None, prox=0.0):
  """E SGD steps on ½‖w − a_k‖² (+ penalty, + prox (μ/2)‖w − anchor‖²)."""
  tx = optax.sgd(LR)

  def cu(variables, data, key, anchor=None, penalty_args=None):
    anc = variables["params"] if anchor is None else anchor

    def loss_fn(p, s, k):
      v = 0.5 * jnp.sum(jnp.square(p["w"] - data["a"]))
      if prox:
        v = v + 0.5 * prox * jnp.sum(jnp.square(p["w"] - anc["w"]))
      if penalty is not None:
        v = v + penalty(p, penalty_args)
      return v, ({"params": p}, ())
    new, _, (losses, _) = local.local_train(loss_fn, tx, variables,
                                            jax.random.split(key, E), strategy="scan")
    return new, {**_stats(data), "train_loss": jnp.mean(losses),
                 "dice_post": jnp.float32(0.0)}
  return cu


def _scaffold():
  """(SCAFFOLD over the quadratic toy clients, its round-0 state)."""
  v0 = {"params": {"w": jnp.zeros((2,))}}
  alg = scaffold.make_algorithm(_quad_client(scaffold.correction_penalty), aggregators.fedavg,
                                LR, E, K)
  return alg, algorithm.ServerState(v0, jnp.int32(0), clients=scaffold.init_clients(v0, K),
                                    server=scaffold.zeros_like_params(v0))


@pytest.mark.parametrize("backend", ["vmap", "unrolled", "map", "loop", "host2", "host1t2"])
def test_scaffold_controls_follow_the_paper(backend):
  targets = _targets()
  data, n = _data(targets)
  alg, state = _scaffold()
  run = jit_round(make_round(alg, backend))
  x, c, ck = np.zeros(2), np.zeros(2), np.zeros((K, 2))
  for _ in range(3):
    state, _ = run(state, data, jax.random.PRNGKey(0))
    ys, dcs = [], []
    for k in range(K):
      y = x.copy()
      for _ in range(E):
        y = y - LR * ((y - targets[k]) + c - ck[k])
      ck_new = ck[k] - c + (x - y) / (E * LR)
      dcs.append(ck_new - ck[k])
      ck[k] = ck_new
      ys.append(y)
    x = sum(n[k] * ys[k] for k in range(K)) / n.sum()
    c = c + sum(dcs) / K
    np.testing.assert_allclose(state.variables["params"]["w"], x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.server["w"], c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.clients["w"], ck, rtol=1e-5, atol=1e-6)
  assert np.abs(c).sum() > 0
  cb = algorithm.comm_bytes(alg, state, data)
  assert cb["up"] == 2 * 2 * 4 and cb["down"] == 2 * 2 * 4       # model + control each way


def test_scaffold_with_sampling_divides_by_all_clients():
  data, _ = _data(_targets())
  alg, state = _scaffold()
  state, info = jax.jit(algorithm.make_round(alg, "vmap", clients_per_round=1))(
      state, data, jax.random.PRNGKey(2))
  j = int(np.flatnonzero(np.asarray(info["sampled"]))[0])
  ck = np.asarray(state.clients["w"])
  assert np.all(ck[np.arange(K) != j] == 0)                         # untouched
  np.testing.assert_allclose(state.server["w"], ck[j] / K, rtol=1e-6)


# --- Ditto -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["vmap", "unrolled", "map", "loop", "host2", "host1t2"])
def test_ditto_personal_models_follow_the_proximal_update(backend):
  lam = 0.5
  targets = _targets()
  data, n = _data(targets)
  v0 = {"params": {"w": jnp.zeros((2,))}}
  alg = ditto.make_algorithm(_quad_client(), _quad_client(prox=lam), aggregators.fedavg)
  state = algorithm.ServerState(v0, jnp.int32(0), clients=ditto.init_clients(v0, K))
  run = jit_round(make_round(alg, backend))
  w, v = np.zeros(2), np.zeros((K, 2))
  for _ in range(3):
    state, info = run(state, data, jax.random.PRNGKey(0))
    ws = []
    for k in range(K):
      y = w.copy()
      for _ in range(E):
        y = y - LR * (y - targets[k])
      ws.append(y)
      p = v[k].copy()
      for _ in range(E):
        p = p - LR * ((p - targets[k]) + lam * (p - w))
      v[k] = p
    w = sum(n[k] * ws[k] for k in range(K)) / n.sum()
  np.testing.assert_allclose(state.variables["params"]["w"], w, rtol=1e-5)
  np.testing.assert_allclose(state.clients["params"]["w"], v, rtol=1e-5)
  assert np.abs(v - w).max() > 0.1                                   # personal ≠ global
  assert algorithm.comm_bytes(alg, state, data)["up"] == 2 * 4        # only w_k is uploaded
  assert "personal_train_loss" in info


def test_sharded_on_4_cpu_devices_equals_vmap():
  """FedBN, SCAFFOLD, Ditto, with and without client sampling (subprocess: the device count
  must be forced before jax is imported)."""
  p = run_worker("personal_sharding_worker.py", timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr[-4000:]
  assert p.stdout.count("OK ") == 6, p.stdout


# --- end to end: tiny U-Net with batch norm, K = 3 phantom hospitals --------------------


def _e2e_config(tiny, **fl):
  from conftest import tiny_federated
  c = tiny_federated(tiny, **{"local_steps": 2, **fl})
  c.model.norm = "batch"
  c.model.base = 4
  c.data.image_size = 16
  return c


@pytest.mark.parametrize("fl,kind", [({"local_norm": "fedbn"}, "fedbn"),
                                     ({"ditto_lambda": 0.1, "clients_per_round": 2}, "ditto")])
def test_personalised_methods_end_to_end(tiny, tmp_path, fl, kind):
  from fedjax_seg import train
  c = _e2e_config(tiny, **fl)
  res = train.run(c, str(tmp_path))
  assert res["method"] == kind
  pers = res["personalised"]
  assert np.isfinite(pers["metrics"]["test"]["dice_mean"])
  assert set(pers["per_site"]["test"]["sites"]) <= set(res["clients"])
  assert res["per_site"]["test"]["worst_site"] in res["clients"]
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  if kind == "fedbn":  # headline = personalised, the single model kept beside it
    assert res["evaluated"] == "personalised" and "global" in res
    assert res["metrics"] == pers["metrics"]
    assert rows[1]["bytes_up_per_client"] < rows[1]["bytes_down_per_client"]  # BN stays home
    # per-client state is checkpointed: an interrupted run resumes to the same result
    cut = str(tmp_path / "cut")
    with pytest.raises(train.Interrupted):
      train.run(c, cut, stop_after=1)
    res2 = train.run(c, cut)
    assert res2["metrics"] == res["metrics"]
    assert res2["per_patient"] == res["per_patient"]
  else:
    assert len(rows[1]["sampled"]) == 2 and "global" not in res


@pytest.mark.slow
def test_scaffold_end_to_end_counts_the_controls(tiny, tmp_path):
  from fedjax_seg import train
  c = _e2e_config(tiny, scaffold=True)
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.05
  res = train.run(c, str(tmp_path))
  assert res["method"] == "scaffold"
  b = res["bytes_per_client_round"]
  # up: the model (params + batch_stats) and the control (shaped like params, float32)
  with open(os.path.join(tmp_path, "final_model.msgpack"), "rb") as f:
    import flax
    model = flax.serialization.msgpack_restore(f.read())
  model_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(model))
  assert b["up"] == b["down"] == model_bytes + 4 * res["num_params"]
  assert np.isfinite(res["metrics"]["test"]["dice_mean"])


def test_method_combinations_are_refused():
  from configs import lgg_fedavg
  from fedjax_seg.fl import train as fl_train
  c = lgg_fedavg.get_config()
  c.fl.local_norm, c.fl.scaffold = "fedbn", True
  with pytest.raises(ValueError, match="one at a time"):
    fl_train.check_fl_config(c)
  c = lgg_fedavg.get_config()
  c.fl.local_norm = "batchy"
  with pytest.raises(ValueError, match="local_norm='batchy'"):
    fl_train.check_fl_config(c)
  c = lgg_fedavg.get_config()
  c.fl.scaffold, c.fl.secagg = True, True
  with pytest.raises(ValueError, match="SCAFFOLD also uploads"):
    fl_train.check_fl_config(c)


def test_unequal_work_fednova_and_cost_ratio_rounds_end_to_end(tiny, tmp_path):
  from fedjax_seg import train
  c = _e2e_config(tiny, local_work="list", local_steps_per_client=(2, 1, 2), fednova=True,
                  cost_ratio="rounds")
  c.algorithm = "fedcostw"
  res = train.run(c, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert rows[1]["client_local_steps"] == [2.0, 1.0, 2.0]
  assert np.isfinite(res["metrics"]["test"]["dice_mean"]) and not rows[-1]["failed"]
