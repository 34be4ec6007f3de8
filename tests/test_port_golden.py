"""Golden fingerprints of every round kind on fixed tiny cases.

The numbers in GOLDEN were produced by the round code *before* the rounds were
rebuilt on the shared ``for_each_client`` layer and the one local-training loop
(``python tests/test_port_golden.py`` prints them). A refactor of the round code
must reproduce them to float tolerance: same maths, same PRNG key use.

Fingerprint of a pytree: (Σ leaves, Σ leaves²) in float64 over the float leaves.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg import models, steps
from fedjax_seg.data import federated
from fedjax_seg.data.federated import ClientData
from fedjax_seg.fl import aggregators, core, fcl, scale, semi
import _helpers


def _fp(tree):
  leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)
            if np.issubdtype(np.asarray(a).dtype, np.floating)]
  return [float(sum(a.sum() for a in leaves)), float(sum((a * a).sum() for a in leaves))]


def _unet():
  return models.build({"name": "unet", "base": 2, "depth": 2, "dropout": 0.0, "norm": "none"}, 2)


def _toy(k=2, n=4, hw=8, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.random((k, n, hw, hw, 3), np.float32)
  y = (x[..., 0] > 0.6).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def case_core(client_strategy="vmap", step_strategy="scan"):
  fns = _unet()
  x, y = _toy()
  data = federated.stack_clients([(np.asarray(x[0]), np.asarray(y[0])),
                                  (np.asarray(x[1, :3]), np.asarray(y[1, :3]))])
  v = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  hp = _helpers.client_hp(local_steps=2, batch_size=2, stats_samples=2,
                          step_strategy=step_strategy, prox_mu=0.01)
  cu = core.make_client_update(fns, optax.adam(1e-2), "dice_ce", 2, hp)
  # 'loop<c>' / 'host<c>': c clients per call of the loop round, host-called steps
  rr = _helpers.jit_round(_helpers.build_round(
      lambda s: core.make_run_round(cu, aggregators.dcew, s,
                                    {"alpha": 0.5, "beta": 0.25, "gamma": 0.25}),
      client_strategy))
  state, info = rr(core.ServerState(v, jnp.int32(0)), data, jax.random.PRNGKey(1))
  return {"model": _fp(state.variables), "weights": [float(w) for w in info["weights"]],
          "train_loss": [float(t) for t in info["train_loss"]]}


def case_step():
  fns = _unet()
  x, y = _toy(k=1)
  v = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  tx = optax.adam(1e-2)
  step = jax.jit(steps.make_train_step(fns, tx, "dice_ce", 2))
  o = tx.init(v["params"])
  for i in range(2):
    v, o, loss = step(v, o, x[0], y[0], jnp.ones((4,)), jax.random.PRNGKey(i))
  return {"model": _fp(v), "loss": float(loss)}


def _semi_data(scenario):
  x, y = _toy()
  if scenario == "label_at_client":
    lab = ClientData(x, y, jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32))
  else:
    lab = ClientData(x, jnp.zeros_like(y), jnp.zeros((2, 4)))
  unl = ClientData(x, jnp.zeros_like(y), jnp.ones((2, 4)))
  server = ClientData(x[:1], y[:1], jnp.asarray([[1, 1, 1, 0]], jnp.float32))
  return semi.SemiData(semi.ClientPair(lab, unl), server)


# The pre-rebuild round had a constant Mean Teacher decay and CPS on unlabelled data only:
# the golden cases set those options explicitly; *_defaults cases check the defaults.
OLD_SEMI = {"mt_ema_warmup": False, "cps_on_labelled": False}


def case_semi(method, scenario="label_at_client", client_strategy="unrolled",
              step_strategy="unrolled", **options):
  fns = _unet()
  hp = _helpers.semi_hp(method=method, scenario=scenario, unlabelled_batch_size=2,
                        server_steps=2, server_batch_size=2, num_seeds=4, search_size=2,
                        threshold=0.5, ema_decay=0.9, rampup_rounds=2,
                        **{**OLD_SEMI, **options})
  chp = _helpers.client_hp(local_steps=2, batch_size=2, step_strategy=step_strategy)
  v = semi.init_models(hp, fns, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  if client_strategy == "chunked":  # one client at a time, streamed (fl/scale.py)
    rr = scale.make_chunked_algorithm_round(
        semi.make_algorithm(hp, fns, optax.adam(1e-2), 2, chp, optax.adam(2e-2)), 1, "unrolled")
  else:
    rr = _helpers.jit_round(_helpers.build_round(
        lambda s: semi.make_run_round(hp, fns, optax.adam(1e-2), 2, chp, s, optax.adam(2e-2)),
        client_strategy))
  state, info = rr(core.ServerState(v, jnp.int32(1)), _semi_data(scenario),
                   jax.random.PRNGKey(1))
  out = {"model": _fp(state.variables), "train_loss": [float(t) for t in info["train_loss"]]}
  if "server_loss" in info and np.isfinite(float(info["server_loss"])):
    out["server_loss"] = float(info["server_loss"])
  return out


def case_fcl(method, client_strategy="map", step_strategy="scan"):
  hw, dim = 8, 4
  hp = fcl.PretrainHParams(method=method, local_steps=2, volumes_per_batch=2, num_partitions=2,
                           bank_size=4, num_positives=2, neg_per_partition=2,
                           step_strategy=step_strategy)
  if method == "rotation":
    fns = models.ModelFns(models.get_model("unet_encoder", base=2, depth=2, hidden_dim=4,
                                           feature_dim=4))
  else:
    fns = models.ModelFns(models.get_model("unet_encoder", base=2, depth=2, hidden_dim=4,
                                           feature_dim=dim))
  variables = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, hw, hw, 1)))
  rng = np.random.default_rng(0)
  vols = [[rng.normal(size=(4, hw, hw, 1)).astype(np.float32) for _ in range(2 + c)]
          for c in range(2)]
  data = fcl.stack_volumes(vols)
  tx = optax.adam(1e-2)
  view = lambda key, x: x + 0.1 * jax.random.normal(key, x.shape)
  cu = fcl.make_client_update(hp, fns, tx, view)
  state = fcl.init_state(hp, variables, 2, dim)
  if client_strategy == "chunked":
    chunked = scale.make_chunked_algorithm_round(fcl.make_algorithm(hp, cu), 1, "map")
    rr = lambda s, d, k, on: chunked(s, d, k, exchange_on=on)
  else:
    rr = _helpers.jit_round(_helpers.build_round(lambda s: fcl.make_run_round(hp, cu, s),
                                                 client_strategy))
  for _ in range(2):
    state, info = rr(state, data, jax.random.PRNGKey(1), jnp.bool_(True))
  return {"model": _fp(state.variables), "private": _fp(state.clients),
          "loss": [float(t) for t in info["loss"]]}


CASES = {
    "core": case_core,
    "step": case_step,
    **{f"semi_{m}": (lambda m=m: case_semi(m)) for m in
       ("supervised_only", "fedwep_random", "cps", "mean_teacher", "pseudoseg")},
    "semi_server_fedwep_real": lambda: case_semi("fedwep_real", "label_at_server"),
    # the current defaults (recorded from the round that introduced them; not pre-rebuild)
    "semi_cps_defaults": lambda: case_semi("cps", cps_on_labelled=True),
    "semi_mean_teacher_defaults": lambda: case_semi("mean_teacher", mt_ema_warmup=True),
    "semi_server_mean_teacher_defaults": lambda: case_semi("mean_teacher", "label_at_server",
                                                           mt_ema_warmup=True),
    "semi_server_supervised_only": lambda: case_semi("supervised_only", "label_at_server"),
    "fcl_fcl": lambda: case_fcl("fcl"),
    "fcl_rotation": lambda: case_fcl("rotation"),
}

GOLDEN = {"core": {"model": [2.9777593261678703, 20.553755967178766],
    "train_loss": [1.1914502382278442, 1.192582607269287],
    "weights": [0.5357511639595032, 0.4642488658428192]},
 "fcl_fcl": {"loss": [3.593716859817505, 2.6516597270965576],
    "model": [-0.961719683582487, 20.23112216534878],
    "private": [10.042676168897742, 48.15902249192109]},
 "fcl_rotation": {"loss": [1.6808929443359375, 1.379997730255127],
    "model": [0.16878403099326533, 20.354822957164256],
    "private": [0.0, 0.0]},
 "semi_cps": {"model": [-7.244918241021878, 40.15850146968039],
    "train_loss": [3.7560160160064697, 3.7569470405578613]},
 "semi_fedwep_random": {"model": [7.203430424560793, 20.86075093483972],
    "train_loss": [2.5651283264160156, 2.5606179237365723]},
 "semi_mean_teacher": {"model": [5.701143933067215, 41.26886830637508],
    "train_loss": [1.1932085752487183, 1.191043734550476]},
 "semi_pseudoseg": {"model": [5.764859318413073, 20.91314792273829],
    "train_loss": [1.8805959224700928, 1.8768126964569092]},
 "semi_server_fedwep_real": {"model": [3.6105180969752837, 20.957372498496664],
    "server_loss": 1.1960192918777466, "train_loss": [1.3681520223617554, 1.367473840713501]},
 "semi_server_supervised_only": {"model": [-0.36357570948894136, 20.656929706775713],
    "server_loss": 1.1902081966400146, "train_loss": [0.0, 0.0]},
 "semi_supervised_only": {"model": [1.813655969192041, 20.614109897899763],
    "train_loss": [1.1931978464126587, 1.191033124923706]},
 "step": {"loss": 1.193141222000122, "model": [0.19765014458971564, 20.2897193515636]},
 # recorded from the round that added the MT EMA warm-up and CPS on labelled data (defaults)
 "semi_cps_defaults": {"model": [-7.73987052404118, 40.17417651478894],
    "train_loss": [5.126249313354492, 5.132532596588135]},
 "semi_mean_teacher_defaults": {"model": [5.526300446330424, 41.26396315471306],
    "train_loss": [1.1932048797607422, 1.1910401582717896]},
 "semi_server_mean_teacher_defaults": {"model": [5.2824062784602575, 40.96921629404147],
    "server_loss": 1.1900525093078613,
    "train_loss": [7.678118890908081e-06, 1.050365244736895e-05]}}
# recorded 2026-12-02 from commit 0f4b7e2 (the round code before the rebuild), except the
# *_defaults entries


def _close(a, b, rtol=2e-4, atol=1e-5):
  if isinstance(a, dict):
    assert set(a) == set(b), (set(a), set(b))
    for k in a:
      _close(a[k], b[k], rtol, atol)
  elif isinstance(a, list):
    assert len(a) == len(b)
    for u, w in zip(a, b):
      _close(u, w, rtol, atol)
  else:
    assert abs(a - b) <= atol + rtol * abs(b), (a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_reproduces_pre_rebuild_numbers(name):
  if name not in GOLDEN:
    pytest.fail(f"no golden numbers recorded for {name}")
  _close(CASES[name](), GOLDEN[name])


if __name__ == "__main__":
  names = sys.argv[1:] or sorted(CASES)
  print(json.dumps({n: CASES[n]() for n in names}, indent=1))
