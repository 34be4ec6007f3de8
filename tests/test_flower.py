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
SERVER_AUDIT_WORKER = os.path.join(REPO, "tests", "workers", "flower_server_audit.py")
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
  c.update_from_flattened_dict(ov)  # dotted keys
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


@pytest.fixture(scope="module")
def cores(hospitals, data_cache):
  """The 3 hospitals' Flower-independent cores of the tiny FedAvg config, built once (the
  in-process units and check_wire share their compiled client updates)."""
  roots, _ = hospitals
  c = make_config("fedavg", overrides(data_cache, 1))
  return [client.HospitalClient(c, k, roots[k], verbose=False) for k in range(len(roots))]


def in_process(algorithm_name, ov, workdir):
  """The reference: fl/train.train_federated on the same config (pooled phantom)."""
  fl_train.train_federated(make_config(algorithm_name, ov), str(workdir))
  return load_model(workdir)


def start_federation(algorithm_name, ov, workdir, roots, audit_dir=None, **kw):
  """Server + one process per hospital on 127.0.0.1 (not waited for); with ``audit_dir``
  both sides record every message at the Flower boundary (tests/workers/flower_*_audit.py)."""
  if audit_dir:
    kw.update(client_prefix=(sys.executable, AUDIT_WORKER),
              server_prefix=(sys.executable, SERVER_AUDIT_WORKER),
              env={"FLOWER_AUDIT_DIR": str(audit_dir)})
  return localhost.start(config_args(algorithm_name, ov), str(workdir), roots, **kw)


def wait_federation(fed, timeout_s=300):
  codes = fed.wait(timeout_s)
  n = len(fed.clients)
  assert codes == {"server": 0, "clients": [0] * n}, (
      codes, fed.log(0)[-3000:], *(fed.log(i)[-2000:] for i in range(1, n + 1)))
  return fed


def run_federation(algorithm_name, ov, workdir, roots, audit_dir=None, timeout_s=300, **kw):
  return wait_federation(start_federation(algorithm_name, ov, workdir, roots, audit_dir, **kw),
                         timeout_s)


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


def test_upload_is_exactly_the_declared_upload(cores):
  """What a hospital sends: the leaves of alg.uploads' entries (shapes, dtypes, order),
  nothing else, plus the stats as metrics; a malformed global model is refused."""
  core = cores[1]
  c = core.config
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


def test_server_sends_only_the_global_model_and_refuses_extra_arrays(cores, data_cache,
                                                                     tmp_path):
  c = cores[0].config
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
    ("fl.scaffold", True, "standard model-uploading round"),
    ("fl.ditto_lambda", 0.1, "standard model-uploading round"),
    ("fl.clients_per_round", 2, "every hospital"),
])
def test_refused_configs(data_cache, key, value, match):
  c = make_config("fedavg", {**overrides(data_cache, 1), key: value})
  with pytest.raises(ValueError, match=match):
    common.check_config(c)


# --- real federations: server + 3 hospital processes on 127.0.0.1 --------------------


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _serialised_sha256(arrays):
  """SHA-256 of the tensors Flower sends for ``arrays`` (its NumPy serialisation)."""
  from flwr.common import ndarrays_to_parameters
  digest = hashlib.sha256()
  for t in ndarrays_to_parameters(list(arrays)).tensors:
    digest.update(t)
  return digest.hexdigest()


def check_wire(audit, roots, phantom_root, c, rounds, cores=None):
  """The must-shows of a federation run with the audit workers, from both ends of every
  connection:

  * hospital k opened files of its own folder only (never another hospital's, never the
    pooled phantom), and read its data;
  * it received exactly: one get_properties, then one fit per round (no evaluate, no
    get_parameters); each fit carried the round, its index and K, and arrays with the
    global model's structure, byte-identical to what the server sent it that round, the
    same for every hospital, in round 0 the initial model, and never any hospital's upload;
  * it sent, per round, exactly the algorithm's declared upload (``alg.uploads``: the
    leaves of each entry, shapes and dtypes in order), num_examples and its stats
    (nothing else), and the server received those bytes unchanged from it, once each.

  cores: the hospitals' HospitalClient of config ``c`` if already built (else built here).
  Returns the per-hospital audit records (fits received, fits sent)."""
  K = len(roots)
  cores = cores or [client.HospitalClient(c, k, roots[k], verbose=False) for k in range(K)]
  assert all(core.digest == common.config_digest(c) for core in cores)
  local = [core.local for core in cores]
  fed = common.build(c, K, local[0].num_classes, local[0].sample_shape)
  init = common.to_wire(common.initial_state(fed).variables)
  model_struct = [[list(a.shape), str(a.dtype)] for a in init]
  upload_like, stats_like = common.upload_like(fed)
  upload_struct = [[list(l.shape), str(np.dtype(l.dtype))] for name in fed.alg.uploads
                   for l in jax.tree.leaves(upload_like[name])]
  assert fed.alg.uploads and upload_struct

  srv = _jsonl(os.path.join(audit, "server.jsonl"))
  sent_by_server = {(e["round"], e["hospital"]): e for e in srv if e.get("sent") == "fit"}
  got_by_server = [e for e in srv if e.get("received") == "fit"]
  assert sorted(sent_by_server) == [(r, k) for r in range(rounds) for k in range(K)]
  assert sorted((e["round"], e["hospital"]) for e in got_by_server) == sorted(sent_by_server)

  recv, sent = {}, {}
  for k, root in enumerate(roots):
    lines = _jsonl(os.path.join(audit, f"hospital{k}.jsonl"))
    paths = [l["path"] for l in lines if "path" in l]
    mine = [p for p in paths if p.startswith(root + os.sep)]
    assert any(p.endswith("_mask.tif") for p in mine), "the audit hook saw no data file"
    for other in [phantom_root] + [q for j, q in enumerate(roots) if j != k]:
      assert not [p for p in paths if p == other or p.startswith(other + os.sep)], (k, other)
    assert [l["recv"] for l in lines if "recv" in l] == ["get_properties"] + ["fit"] * rounds
    recv[k] = [l for l in lines if l.get("recv") == "fit"]
    sent[k] = [l for l in lines if l.get("send") == "fit"]
    assert [m["round"] for m in recv[k]] == [m["round"] for m in sent[k]] == list(range(rounds))
    for rnd, (m, u) in enumerate(zip(recv[k], sent[k])):
      assert m["config"] == ["hospital", "num_clients", "round"]
      assert m["arrays"] == model_struct
      assert m["sha256"] == sent_by_server[(rnd, k)]["sha256"]
      assert sent_by_server[(rnd, k)]["config"] == {"round": rnd, "hospital": k, "num_clients": K}
      assert u["arrays"] == upload_struct
      assert set(u["metrics"]) == set(stats_like) | {"hospital", "round"}
      assert (u["metrics"]["hospital"], u["metrics"]["round"]) == (k, rnd)
      assert u["num_examples"] == int(local[k].data.valid.sum()) == u["metrics"]["num_samples"]
      (at_server,) = [e for e in got_by_server if (e["round"], e["hospital"]) == (rnd, k)]
      assert {key: at_server[key] for key in ("arrays", "sha256", "num_examples", "metrics")} \
          == {key: u[key] for key in ("arrays", "sha256", "num_examples", "metrics")}
  for rnd in range(rounds):
    assert len({recv[k][rnd]["sha256"] for k in range(K)}) == 1
  assert recv[0][0]["sha256"] == _serialised_sha256(init)
  uploads = {u["sha256"] for k in range(K) for u in sent[k]}
  assert not uploads & {m["sha256"] for k in range(K) for m in recv[k]}

  # Round 0's uploads are the hospitals' own client updates of the initial model.
  for k in range(K):
    want, _, _ = cores[k].fit(init, {"round": 0, "hospital": k, "num_clients": K})
    with np.load(os.path.join(audit, f"hospital{k}_round0.npz")) as z:
      got = [z[f"arr_{i}"] for i in range(len(z.files))]
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
  return recv, sent


def test_fedavg_one_round_processes_equal_in_process(hospitals, cores, data_cache, tmp_path):
  """R=1 FedAvg as 4 OS processes = train_federated; what each hospital opened, received
  and sent, recorded at both ends of the wire (check_wire)."""
  roots, phantom_root = hospitals
  ov = overrides(data_cache, 1)
  audit = tmp_path / "audit"
  audit.mkdir()
  fed = start_federation("fedavg", ov, tmp_path / "flower", roots, audit_dir=audit)
  try:
    ref = in_process("fedavg", ov, tmp_path / "ref")  # while the processes run
  finally:
    wait_federation(fed)
  assert max_abs_diff(load_model(tmp_path / "flower"), ref) < 1e-5
  r = rows(tmp_path / "flower")
  assert [x["round"] for x in r] == [1] and r[0]["weights"] == pytest.approx([1 / 3] * 3)
  check_wire(str(audit), roots, phantom_root, make_config("fedavg", ov), 1, cores)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm_name", ["fedavg", "dcew"])
def test_three_rounds_processes_equal_in_process(hospitals, data_cache, tmp_path, algorithm_name):
  """R=3 (FedAvg; DCEW, whose weights use every hospital's cost and Dice stats) over
  Flower = train_federated round by round (weights) and in the final global model; every
  round's messages as check_wire requires."""
  roots, phantom_root = hospitals
  ov = overrides(data_cache, 3)
  audit = tmp_path / "audit"
  audit.mkdir()
  run_federation(algorithm_name, ov, tmp_path / "flower", roots, audit_dir=audit)
  ref = in_process(algorithm_name, ov, tmp_path / "ref")
  assert max_abs_diff(load_model(tmp_path / "flower"), ref) < 1e-5
  got, want = rows(tmp_path / "flower"), rows(tmp_path / "ref")[1:]
  assert [x["round"] for x in got] == [w["round"] for w in want] == [1, 2, 3]
  for g, w in zip(got, want):
    assert g["weights"] == pytest.approx(w["weights"], abs=1e-6)
    assert g["client_train_loss"] == pytest.approx(w["client_train_loss"], abs=1e-5)
  check_wire(str(audit), roots, phantom_root, make_config(algorithm_name, ov), 3)


@pytest.mark.slow
def test_tls_federation_equals_in_process(hospitals, data_cache, tmp_path):
  """The same federation over TLS (certificates of fedjax_seg.flower.certs, the flags of
  docs/flower.md): the server logs SSL enabled, the model equals train_federated."""
  from fedjax_seg.flower import certs
  roots, _ = hospitals
  ov = overrides(data_cache, 1)
  cert_dir = str(tmp_path / "certificates")
  certs.generate(cert_dir, key_size=2048)
  server_args, client_args = localhost.tls_args(cert_dir)
  assert not any("ca.key" in a for a in server_args + client_args)
  fed = run_federation("fedavg", ov, tmp_path / "flower", roots, server_args=server_args,
                       client_args=client_args)
  assert "SSL is enabled" in fed.log(0)
  assert max_abs_diff(load_model(tmp_path / "flower"), in_process("fedavg", ov, tmp_path / "ref")) < 1e-5


def wait_for_round_1(fed, wd, poll, timeout=300):
  """Until the server of ``fed`` has its checkpoint of round 1 in ``wd`` (orbax's finalised
  step 1), checking every ``poll`` seconds that it is still running."""
  deadline = time.time() + timeout
  while not os.path.isdir(wd / "checkpoints" / "1"):
    assert time.time() < deadline and fed.server.poll() is None, fed.log(0)[-3000:]
    time.sleep(poll)


def check_resumed(fed, codes, wd, algorithm_name, ov, ref_dir, resumed):
  """A resumed 3-round federation: every process exited 0, the server log says ``resumed``,
  rounds 1-3 are logged and the final model equals the in-process run (in ``ref_dir``)."""
  assert codes == {"server": 0, "clients": [0, 0, 0]}, (codes, fed.log(0)[-3000:])
  assert resumed in fed.log(0)
  assert [x["round"] for x in rows(wd)] == [1, 2, 3]
  assert max_abs_diff(load_model(wd), in_process(algorithm_name, ov, ref_dir)) < 1e-5


@pytest.mark.slow
def test_server_restart_resumes_and_equals_in_process(hospitals, data_cache, tmp_path):
  """The server is killed after round 1 of 3 and started again with the same command:
  it resumes from its orbax checkpoint, the hospitals reconnect, the result is unchanged."""
  roots, _ = hospitals
  ov = overrides(data_cache, 3)
  wd = tmp_path / "flower"
  fed = localhost.start(config_args("dcew", ov), str(wd), roots)
  try:
    wait_for_round_1(fed, wd, poll=0.05)
    fed.server.kill()
    fed.server.wait()
    again = localhost.start(config_args("dcew", ov), str(wd), roots,
                            port=int(fed.address.rsplit(":", 1)[1]), start_clients=False)
    fed.server = again.server
    codes = fed.wait(300)
  finally:
    fed.stop()
  check_resumed(fed, codes, wd, "dcew", ov, tmp_path / "ref", "resumed at round")


@pytest.mark.slow
def test_hospital_failure_stops_the_round_and_resume_equals_in_process(hospitals, data_cache,
                                                                       tmp_path):
  """Hospital 1 is killed after round 1 of 3: the server aggregates nothing of round 2 and
  exits with an error (code 2) instead of waiting or averaging two hospitals; restarting the
  server and that hospital resumes after round 1 and gives the uninterrupted result."""
  roots, _ = hospitals
  ov = overrides(data_cache, 3)
  wd = tmp_path / "flower"
  fed = start_federation("fedavg", ov, wd, roots)
  try:
    wait_for_round_1(fed, wd, poll=0.02)
    fed.clients[1].kill()
    fed.clients[1].wait()
    assert fed.server.wait(120) == 2, fed.log(0)[-3000:]
    assert "hospital(s) failed" in fed.log(0) and "resume after round 1" in fed.log(0)
    assert sorted(d for d in os.listdir(wd / "checkpoints") if d.isdigit()) == ["1"]
    assert [x["round"] for x in rows(wd)] == [1]
    port = int(fed.address.rsplit(":", 1)[1])
    fed.server = localhost.start(config_args("fedavg", ov), str(wd), roots, port=port,
                                 start_clients=False).server
    fed.clients[1] = localhost.start(config_args("fedavg", ov), str(wd), roots, port=port,
                                     start_server=False, hospitals=[1]).clients[0]
    codes = fed.wait(300)
  finally:
    fed.stop()
  check_resumed(fed, codes, wd, "fedavg", ov, tmp_path / "ref", "resumed at round 1")
