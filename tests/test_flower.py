"""The Flower federation (fedjax_seg/flower): real processes on localhost give the
in-process run's global model; a hospital reads only its own folder, receives only the
global model and sends only the algorithm's declared upload."""
import hashlib
import json
import os
import sys
import time

import flax
import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from configs import lgg_dcew, lgg_fedavg  # noqa: E402
from fedjax_seg.fl import algorithm  # noqa: E402
from fedjax_seg.fl import train as fl_train  # noqa: E402
from fedjax_seg.flower import client, common, localhost, server  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT_WORKER = os.path.join(REPO, "tests", "workers", "flower_client_audit.py")
CONFIGS = {"fedavg": (lgg_fedavg, "configs/lgg_fedavg.py"),
           "dcew": (lgg_dcew, "configs/lgg_dcew.py")}
# 3 hospitals (phantom sites CS, DU, HT), 4 patients each (2 train), 16x16 slices, U-Net base 4.
TINY = {"data.phantom.size": 32, "data.phantom.patients_per_site": 4,
        "data.phantom.slices_per_patient": 8, "data.image_size": 16, "model.base": 4,
        "model.depth": 3, "model.dropout": 0.0, "fl.local_steps": 2, "fl.client_batch_size": 4,
        "fl.stats_samples": 4, "fl.client_strategy": "vmap", "fl.step_strategy": "scan",
        "fl.eval_clients": False, "eval_batch_size": 16}


def overrides(data_cache, rounds):
  return {**TINY, "data.cache_dir": data_cache, "fl.rounds": rounds, "fl.eval_every": rounds}


def make_config(algorithm_name, ov):
  c = CONFIGS[algorithm_name][0].get_config()
  for key, value in ov.items():
    *head, last = key.split(".")
    node = c
    for h in head:
      node = node[h]
    node[last] = value
  return c


def config_args(algorithm_name, ov):
  return ([f"--config={os.path.join(REPO, CONFIGS[algorithm_name][1])}"]
          + [f"--config.{k}={v}" for k, v in ov.items()])


def load_model(workdir):
  with open(os.path.join(workdir, "final_model.msgpack"), "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def max_abs_diff(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def hospitals(data_cache, tmp_path_factory):
  """One folder per phantom site (hospital k = k-th sorted site) and the phantom's root."""
  c = make_config("fedavg", overrides(data_cache, 1))
  from fedjax_seg.data import pipeline
  roots = localhost.split_sites(c, str(tmp_path_factory.mktemp("hospitals")), verbose=False)
  return roots, pipeline.resolve_root(c.data, verbose=False)


def in_process(algorithm_name, ov, workdir):
  """The reference: fl/train.train_federated on the same config (pooled phantom)."""
  fl_train.train_federated(make_config(algorithm_name, ov), str(workdir))
  return load_model(workdir)


def run_federation(algorithm_name, ov, workdir, roots, audit_dir=None, timeout_s=300):
  prefix = (sys.executable, AUDIT_WORKER) if audit_dir else ()
  env = {"FLOWER_AUDIT_DIR": str(audit_dir)} if audit_dir else None
  fed = localhost.start(config_args(algorithm_name, ov), str(workdir), roots,
                        client_prefix=prefix, env=env)
  codes = fed.wait(timeout_s)
  assert codes == {"server": 0, "clients": [0] * len(roots)}, (
      codes, fed.log(0)[-3000:], *(fed.log(i)[-2000:] for i in range(1, len(roots) + 1)))
  return fed


# --- in-process units (no network) ----------------------------------------------------


def test_hospital_reads_its_sites_train_patients(hospitals, data_cache):
  """A hospital's own split equals what the pooled by-site partition gives its client."""
  roots, _ = hospitals
  c = make_config("fedavg", overrides(data_cache, 1))
  from fedjax_seg.data import pipeline
  ds = pipeline.build_dataset(c.data, verbose=False, seed=c.seed)
  names, train_ids, _ = fl_train.partition_dataset(ds, c.fl, verbose=False)
  for k, root in enumerate(roots):
    local = common.load_hospital(c, k, root, verbose=False)
    assert local.site == names[k]
    assert local.train_patients == train_ids[k]
    x, y = ds.arrays(train_ids[k])
    np.testing.assert_array_equal(np.asarray(local.data.x), x)
    np.testing.assert_array_equal(np.asarray(local.data.y), y)


def test_upload_is_exactly_the_declared_upload(hospitals, data_cache):
  """What a hospital sends: the leaves of alg.uploads' entries (shapes, dtypes, order),
  nothing else, plus the stats as metrics; a malformed global model is refused."""
  roots, _ = hospitals
  c = make_config("dcew", overrides(data_cache, 1))
  core = client.HospitalClient(c, 1, roots[1], verbose=False)
  fed = common.build(c, 3, core.local.num_classes, core.local.sample_shape)
  state = common.initial_state(fed)
  arrays, n, metrics = core.fit(common.to_wire(state.variables),
                                {"round": 0, "hospital": 1, "num_clients": 3})
  upload_like, stats_like = common.upload_like(fed)
  assert fed.alg.uploads == ("model",)
  expected = [(tuple(l.shape), np.dtype(l.dtype)) for name in fed.alg.uploads
              for l in jax.tree.leaves(upload_like[name])]
  assert [(a.shape, a.dtype) for a in arrays] == expected
  assert all(type(a) is np.ndarray for a in arrays)
  per_client = jax.tree.map(lambda a: a[None], core.local.data)
  assert sum(a.nbytes for a in arrays) == algorithm.comm_bytes(fed.alg, state, per_client)["up"]
  assert set(metrics) == set(stats_like) | {"hospital", "round"}
  assert set(stats_like) >= {"num_samples", "cost_pre", "cost_post", "ce_pre", "ce_post",
                             "dice_pre", "dice_post"}
  assert n == int(core.local.data.valid.sum()) == metrics["num_samples"]
  with pytest.raises(common.WireError):
    core.fit(common.to_wire(state.variables)[:-1], {"round": 0, "hospital": 1, "num_clients": 3})
  with pytest.raises(ValueError, match="hospital 2"):
    core.fit(common.to_wire(state.variables), {"round": 0, "hospital": 2, "num_clients": 3})


def test_server_sends_only_the_global_model_and_refuses_extra_arrays(hospitals, data_cache,
                                                                     tmp_path):
  roots, _ = hospitals
  c = make_config("fedavg", overrides(data_cache, 1))
  cores = [client.HospitalClient(c, k, roots[k], verbose=False) for k in range(3)]
  srv = server.ServerCore(c, str(tmp_path), 3, verbose=False)
  srv.setup({k: core.properties() for k, core in enumerate(cores)})
  sent = srv.broadcast()
  want = common.to_wire(srv.state.variables)
  assert len(sent) == len(want) and all(np.array_equal(a, b) for a, b in zip(sent, want))
  ins = {"round": 0, "hospital": 0, "num_clients": 3}
  received = {k: core.fit(sent, {**ins, "hospital": k})[::2] for k, core in enumerate(cores)}
  bad = dict(received)
  bad[2] = (received[2][0] + [np.zeros(3, np.float32)], received[2][1])
  with pytest.raises(common.WireError):
    srv.aggregate(bad)
  with pytest.raises(server.FederationError):
    srv.aggregate({k: v for k, v in received.items() if k != 1})
  other = make_config("fedavg", {**overrides(data_cache, 1), "fl.local_steps": 3})
  with pytest.raises(server.FederationError, match="another config"):
    server.ServerCore(other, str(tmp_path / "x"), 3, verbose=False).setup(
        {k: core.properties() for k, core in enumerate(cores)})


@pytest.mark.parametrize("key,value,match", [
    ("algorithm", "mean_teacher", "not supported yet"),
    ("fl.secagg", True, "unmasked"),
    ("fl.partition", "iid", "by_site"),
    ("fl.clients_per_chunk", 2, "chunks"),
])
def test_refused_configs(data_cache, key, value, match):
  c = make_config("fedavg", {**overrides(data_cache, 1), key: value})
  with pytest.raises(ValueError, match=match):
    common.check_config(c)


# --- real federations: server + 3 hospital processes on 127.0.0.1 --------------------


def _audit(audit_dir, k):
  with open(os.path.join(audit_dir, f"hospital{k}.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return [l["path"] for l in lines if "path" in l], [l for l in lines if "round" in l]


def test_fedavg_one_round_processes_equal_in_process(hospitals, data_cache, tmp_path):
  """R=1 FedAvg as 4 OS processes = train_federated; each hospital opened files of its own
  folder only (not the other hospitals', not the pooled phantom) and received exactly the
  initial global model."""
  roots, phantom_root = hospitals
  ov = overrides(data_cache, 1)
  audit = tmp_path / "audit"
  audit.mkdir()
  run_federation("fedavg", ov, tmp_path / "flower", roots, audit_dir=audit)
  ref = in_process("fedavg", ov, tmp_path / "ref")
  assert max_abs_diff(load_model(tmp_path / "flower"), ref) < 1e-5
  r = rows(tmp_path / "flower")
  assert [x["round"] for x in r] == [1] and r[0]["weights"] == pytest.approx([1 / 3] * 3)

  c = make_config("fedavg", ov)
  local = common.load_hospital(c, 0, roots[0], verbose=False)
  fed = common.build(c, 3, local.num_classes, local.sample_shape)
  init = common.to_wire(common.initial_state(fed).variables)
  init_sha = hashlib.sha256(b"".join(a.tobytes() for a in init)).hexdigest()
  for k, root in enumerate(roots):
    paths, msgs = _audit(audit, k)
    mine = [p for p in paths if p.startswith(root + os.sep)]
    assert any(p.endswith("_mask.tif") for p in mine), "the audit hook saw no data file"
    for other in [phantom_root] + [q for j, q in enumerate(roots) if j != k]:
      assert not [p for p in paths if p == other or p.startswith(other + os.sep)], (k, other)
    assert [m["round"] for m in msgs] == [0]
    assert msgs[0]["config"] == ["hospital", "num_clients", "round"]
    assert msgs[0]["arrays"] == [[list(a.shape), str(a.dtype)] for a in init]
    assert msgs[0]["sha256"] == init_sha


@pytest.mark.slow
@pytest.mark.parametrize("algorithm_name", ["fedavg", "dcew"])
def test_three_rounds_processes_equal_in_process(hospitals, data_cache, tmp_path, algorithm_name):
  """R=3 (FedAvg; DCEW, whose weights use every hospital's cost and Dice stats) over
  Flower = train_federated; every hospital received the same global model each round."""
  roots, _ = hospitals
  ov = overrides(data_cache, 3)
  audit = tmp_path / "audit"
  audit.mkdir()
  run_federation(algorithm_name, ov, tmp_path / "flower", roots, audit_dir=audit)
  ref = in_process(algorithm_name, ov, tmp_path / "ref")
  assert max_abs_diff(load_model(tmp_path / "flower"), ref) < 1e-5
  got, want = rows(tmp_path / "flower"), rows(tmp_path / "ref")[1:]
  assert [x["round"] for x in got] == [1, 2, 3]
  for g, w in zip(got, want):
    assert g["weights"] == pytest.approx(w["weights"], abs=1e-6)
  sent = [_audit(audit, k)[1] for k in range(3)]
  for rnd in range(3):
    assert len({s[rnd]["sha256"] for s in sent}) == 1 and sent[0][rnd]["round"] == rnd


@pytest.mark.slow
def test_server_restart_resumes_and_equals_in_process(hospitals, data_cache, tmp_path):
  """The server is killed after round 1 of 3 and started again with the same command:
  it resumes from its orbax checkpoint, the hospitals reconnect, the result is unchanged."""
  roots, _ = hospitals
  ov = overrides(data_cache, 3)
  wd = tmp_path / "flower"
  fed = localhost.start(config_args("dcew", ov), str(wd), roots)
  try:
    deadline = time.time() + 300
    while not os.path.isdir(wd / "checkpoints" / "1"):  # orbax's finalised step 1
      assert time.time() < deadline and fed.server.poll() is None, fed.log(0)[-3000:]
      time.sleep(0.05)
    fed.server.kill()
    fed.server.wait()
    again = localhost.start(config_args("dcew", ov), str(wd), roots,
                            port=int(fed.address.rsplit(":", 1)[1]), start_clients=False)
    fed.server = again.server
    codes = fed.wait(300)
  finally:
    fed.stop()
  assert codes == {"server": 0, "clients": [0, 0, 0]}, (codes, fed.log(0)[-3000:])
  assert "resumed at round" in fed.log(0)
  assert [x["round"] for x in rows(wd)] == [1, 2, 3]
  assert max_abs_diff(load_model(wd), in_process("dcew", ov, tmp_path / "ref")) < 1e-5
