"""A Flower server (``python -m fedjax_seg.flower.server``) that records what it sends and
receives, at the Flower strategy boundary (the FitIns it hands Flower to send, the FitRes
Flower hands it after receipt).

$FLOWER_AUDIT_DIR/server.jsonl gets one line per instruction sent ({"sent": "fit",
"round", "cid", "hospital", "config", "arrays", "sha256"}) and one per result received
({"received": "fit", "round", "cid", "hospital", "arrays", "sha256", "num_examples",
"metrics"}); arrays = [[shape], dtype] of the deserialised arrays, sha256 = SHA-256 of
the serialised tensors, in order.
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from flwr.common import parameters_to_ndarrays  # noqa: E402

from fedjax_seg.flower import server  # noqa: E402

_log = open(os.path.join(os.environ["FLOWER_AUDIT_DIR"], "server.jsonl"), "a", buffering=1)


def _describe(parameters):
  digest = hashlib.sha256()
  for t in parameters.tensors:
    digest.update(t)
  return {"arrays": [[list(a.shape), str(a.dtype)] for a in parameters_to_ndarrays(parameters)],
          "sha256": digest.hexdigest()}


def _record(**entry):
  _log.write(json.dumps(entry) + "\n")


_strategy = server.strategy


def _recording_strategy(core, *args, **kwargs):
  s = _strategy(core, *args, **kwargs)
  configure_fit, aggregate_fit = s.configure_fit, s.aggregate_fit
  to_hospital = {}

  def recording_configure_fit(server_round, parameters, client_manager):
    instructions = configure_fit(server_round, parameters, client_manager)
    for proxy, ins in instructions:
      to_hospital[proxy.cid] = int(ins.config["hospital"])
      _record(sent="fit", round=int(ins.config["round"]), cid=proxy.cid,
              hospital=int(ins.config["hospital"]), config=dict(ins.config),
              **_describe(ins.parameters))
    return instructions

  def recording_aggregate_fit(server_round, results, failures):
    rnd = core.round
    for proxy, res in results:
      _record(received="fit", round=rnd, cid=proxy.cid, hospital=to_hospital.get(proxy.cid),
              num_examples=int(res.num_examples), metrics=dict(res.metrics),
              **_describe(res.parameters))
    return aggregate_fit(server_round, results, failures)

  s.configure_fit, s.aggregate_fit = recording_configure_fit, recording_aggregate_fit
  return s


server.strategy = _recording_strategy

if __name__ == "__main__":
  sys.argv[0] = "fedjax_seg.flower.server"
  server.main()
