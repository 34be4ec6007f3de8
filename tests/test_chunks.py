"""Clients streamed in chunks (fl/scale.py): the chunked round equals
the all-at-once round (models, weights, stats, failure flag) for every linear
aggregator, any chunk size, with excluded (NaN / empty) clients, a server
optimiser, and the real U-Net client update on host-resident data."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from _np_init import numpy_init
from fedjax_seg import models
from fedjax_seg.data import federated
from fedjax_seg.fl import aggregators, core, scale
import _helpers

K, N, F = 7, 5, 4


AGG_KW = {"fedavg": {}, "fedcostw": {"alpha": 0.3, "cost": "cost"}, "costw_ce": {"alpha": 0.6},
          "dcew": {"alpha": 0.5, "beta": 0.3, "gamma": 0.2}}


def toy_update(variables, data, key):
  """A cheap client update with per-client model and stats (compiles in ~1 s)."""
  p = variables["params"]
  s = jnp.sum(data.valid)
  mean = jnp.sum(data.x * data.valid[:, None], 0) / jnp.maximum(s, 1)
  # a per-client key-dependent shift without jax.random (threefry compiles slowly on CPU)
  w = p["w"] + 0.5 * (mean - p["w"]) + 1e-3 * (key[-1] % 97).astype(jnp.float32)
  new = {"params": {"w": w, "b": p["b"] + jnp.mean(data.y)}}
  pre = jnp.sum((p["w"] - mean) ** 2) + 0.1
  post = jnp.sum((w - mean) ** 2) + 0.05
  stats = {"num_samples": s, "train_loss": post, "cost_pre": pre, "cost_post": post,
           "ce_pre": 2 * pre, "ce_post": 2 * post, "dice_pre": 1 / (1 + pre),
           "dice_post": 1 / (1 + post)}
  return new, stats


def toy_data(nan_client=2, empty_client=4, all_bad=False):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(K, N, F)).astype(np.float32) + np.arange(K)[:, None, None]
  y = rng.integers(0, 3, size=(K, N)).astype(np.float32)
  valid = (np.arange(N)[None] < rng.integers(1, N + 1, size=(K, 1))).astype(np.float32)
  if all_bad:
    valid[:] = 0
  if nan_client is not None:
    x[nan_client, 0] = np.nan
  if empty_client is not None:
    valid[empty_client] = 0
  return federated.ClientData(x, y, valid)  # host NumPy arrays


VARS = {"params": {"w": jnp.linspace(-1.0, 1.0, F), "b": jnp.float32(0.5)}}
KEY = jax.random.PRNGKey(3)


_JIT = {}  # compiled programs shared across tests (compile time dominates on 2 cores)


def _memo(key, build):
  if key not in _JIT:
    _JIT[key] = jax.jit(build())
  return _JIT[key]


def _compare(name, chunk, data, server_update=None, state=None):
  state = state or core.ServerState(VARS, jnp.int32(2))
  su = server_update.__name__ if server_update else None
  ref_state, ref_info = _memo(("ref", name, su), lambda: core.make_run_round(
      toy_update, aggregators.get(name), "vmap", AGG_KW[name], server_update))(
          state, jax.tree.map(jnp.asarray, data), KEY)
  run = scale.make_chunked_round(toy_update, name, chunk, "vmap", AGG_KW[name], server_update,
                                 jit=lambda fn, build: _memo(
                                     (fn, name, su, chunk if fn == "chunk" else 0), build))
  new_state, info = run(state, data, KEY)
  chex.assert_trees_all_close(new_state.variables, ref_state.variables, rtol=1e-5, atol=1e-6)
  assert int(new_state.round) == int(ref_state.round)
  np.testing.assert_allclose(info["weights"], ref_info["weights"], rtol=1e-6, atol=1e-7)
  for key in ("num_samples", "cost_post", "dice_post", "train_loss"):
    np.testing.assert_array_equal(np.isnan(info[key]), np.isnan(ref_info[key]))
    np.testing.assert_allclose(info[key], ref_info[key], rtol=1e-6)
  np.testing.assert_array_equal(info["included"], ref_info["included"])
  assert bool(info["failed"]) == bool(ref_info["failed"])
  assert info["weights"].shape == (K,)
  return new_state, info


@pytest.mark.parametrize("name", ["fedavg", "fedcostw", "costw_ce", "dcew"])
@pytest.mark.parametrize("chunk", [2, 3])
def test_chunked_equals_all_at_once(name, chunk):
  _, info = _compare(name, chunk, toy_data())
  inc = np.asarray(info["included"])
  assert not inc[2] and not inc[4] and inc.sum() == K - 2  # NaN and empty clients excluded
  assert abs(float(np.sum(info["weights"])) - 1.0) < 1e-5


@pytest.mark.parametrize("chunk", [1, K, K + 3])
def test_chunk_sizes_one_all_and_more_than_k(chunk):
  _compare("dcew", chunk, toy_data())


def test_all_clients_excluded_keeps_global_model():
  new_state, info = _compare("fedavg", 3, toy_data(all_bad=True))
  assert bool(info["failed"])
  chex.assert_trees_all_close(new_state.variables, VARS)


def test_server_update_applied_after_the_streamed_aggregate():
  def server_update(state, agg, failed):  # over-relaxed step x + 2 (ω − x)
    return jax.tree.map(lambda g, a: g + 2.0 * (a - g), state.variables, agg), ()
  _compare("dcew", 3, toy_data(), server_update)


def test_linear_weights_match_each_aggregator():
  stacked = {"a": jnp.ones((K, 2))}
  rng = np.random.default_rng(1)
  stats = {k: jnp.asarray(rng.uniform(0.2, 2.0, K), jnp.float32)
           for k in ("num_samples", "cost_pre", "cost_post", "ce_pre", "ce_post", "dice_pre",
                     "dice_post")}
  stats["num_samples"] = stats["num_samples"].at[1].set(0.0)
  stats["dice_post"] = stats["dice_post"].at[3].set(jnp.nan)
  for name, kw in AGG_KW.items():
    ok, terms = aggregators.linear_terms(name, stacked, stats, **kw)
    _, w, _ = aggregators.get(name)(stacked, stacked, stats, **kw)
    np.testing.assert_allclose(aggregators.linear_weights(terms, ok), w, rtol=1e-7, atol=1e-8)
  with pytest.raises(ValueError, match="not a linear aggregator"):
    aggregators.linear_terms("median", stacked, stats)


def test_unet_round_streamed_equals_all_at_once():
  """The real client update (U-Net, Dice+CE, local Adam steps), DCEW, K=3 in
  chunks of 2 (the last one padded) from host memory."""
  h = 16
  fns = models.build({"name": "unet", "base": 4, "depth": 2, "dropout": 0.0}, 2)
  rng = np.random.default_rng(0)
  per = []
  for k in range(3):
    x = rng.normal(size=(6 - k, h, h, 3)).astype(np.float32)
    per.append((x, (x[..., 0] > 0.5).astype(np.int32)))
  data = federated.stack_clients(per, host=True)
  assert isinstance(data.x, np.ndarray)
  variables = numpy_init(fns, (1, h, h, 3))
  hp = _helpers.client_hp(local_steps=2, batch_size=4, stats_samples=4, step_strategy="scan")
  cu = core.make_client_update(fns, optax.adam(1e-2), "dice_ce", 2, hp)
  kw = AGG_KW["dcew"]
  state = core.ServerState(variables, jnp.int32(0))
  ref_state, ref_info = jax.jit(core.make_run_round(cu, aggregators.dcew, "map", kw))(
      state, jax.tree.map(jnp.asarray, data), KEY)
  new_state, info = scale.make_chunked_round(cu, "dcew", 2, "map", kw)(state, data, KEY)
  chex.assert_trees_all_close(new_state.variables, ref_state.variables, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info["weights"], ref_info["weights"], rtol=1e-5)
  np.testing.assert_allclose(info["dice_post"], ref_info["dice_post"], rtol=1e-5)


def test_chunked_config_validation(capsys):
  def cfg(**fl):
    c = ml_collections.ConfigDict({"algorithm": "dcew", "fl": {
        "clients_per_chunk": 2, "norm_k": 0.0, "secagg": False, "dp": {"enabled": False},
        "client_strategy": "auto"}})
    c.fl.update(fl)
    return c
  scale.check_chunked(cfg())
  scale.check_chunked(cfg(clients_per_chunk=0, norm_k=3.0))  # off: anything goes
  assert capsys.readouterr().out == ""
  scale.check_chunked(cfg(norm_k=10.0))  # the default divergence guard: skipped, said so
  assert "config.fl.norm_k=10.0 is not applied" in capsys.readouterr().out
  for bad, match in (({"clients_per_chunk": -1}, "clients_per_chunk"),
                     ({"secagg": True}, "secagg"),
                     ({"dp": {"enabled": True}}, "dp.enabled"),
                     ({"client_strategy": "loop"}, "client_strategy='loop'")):
    with pytest.raises(ValueError, match=match):
      scale.check_chunked(cfg(**bad))
  c = cfg()
  c.algorithm = "median"
  with pytest.raises(ValueError, match="linear aggregator"):
    scale.check_chunked(c)


@pytest.mark.slow
def test_trainer_streamed_equals_all_at_once(tiny, tmp_path):
  """config.fl.clients_per_chunk=2 through the federated trainer (K=3 by site,
  DCEW, 2 rounds): same metrics and final model as the all-at-once trainer."""
  import json
  from conftest import tiny_federated
  from fedjax_seg import runlog, train
  c = tiny_federated(tiny, "dcew", local_steps=2)
  train.run(c, str(tmp_path / "all"))
  c.fl.clients_per_chunk = 2
  train.run(c, str(tmp_path / "chunks"))
  rows = [[json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("all", "chunks")]
  for a, b in zip(*rows):
    if "weights" in a:
      np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-4)
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-4)
  a, b = runlog.Checkpointer(str(tmp_path / "all")), runlog.Checkpointer(str(tmp_path / "chunks"))
  sa, sb = a.manager.restore(2), b.manager.restore(2)
  a.close(); b.close()
  chex.assert_trees_all_close(sa, sb, rtol=1e-4, atol=1e-5)


def test_semi_trainer_streamed_equals_all_at_once(tiny, tmp_path):
  """FedWeP label-at-client through its trainer with config.fl.clients_per_chunk=2 (K=3:
  a full chunk, then a padded one; data on the host): same metrics and final models as
  the all-at-once round. DP / secure aggregation with chunks, and chunks for idle
  clients, are refused naming the key."""
  import json
  from test_semi import _semi_tiny
  from fedjax_seg import runlog, train
  c = _semi_tiny(tiny, "fedwep", rounds=2)
  c.fl.local_steps = 2
  c.fl.norm_k = 0.0  # the divergence guard needs every update at once
  train.run(c, str(tmp_path / "all"))
  c.fl.clients_per_chunk = 2
  train.run(c, str(tmp_path / "chunks"))
  rows = [[json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("all", "chunks")]
  assert len(rows[0]) == len(rows[1]) == 3
  for a, b in zip(*rows):
    for key in ("weights", "client_train_loss"):
      if key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4)
    if "seeds" in a:
      assert a["seeds"] == b["seeds"]
  a, b = runlog.Checkpointer(str(tmp_path / "all")), runlog.Checkpointer(str(tmp_path / "chunks"))
  sa, sb = a.manager.restore(2), b.manager.restore(2)
  a.close(); b.close()
  chex.assert_trees_all_close(sa, sb, rtol=1e-4, atol=1e-5)
  c.fl.secagg = True
  with pytest.raises(ValueError, match="clients_per_chunk=2 cannot be combined with config.fl.secagg"):
    train.run(c, str(tmp_path / "bad"))
  from configs import lgg_fedwep
  idle = lgg_fedwep.get_config("supervised_only,label_at_server")
  idle.fl.clients_per_chunk = 2
  with pytest.raises(ValueError, match="config.fl.clients_per_chunk with config.algorithm='supervised_only'"):
    train.run(idle, str(tmp_path / "idle"))
