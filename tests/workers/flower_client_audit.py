"""A Flower hospital (``python -m fedjax_seg.flower.client``) that records what it touches.

$FLOWER_AUDIT_DIR/hospital<K>.jsonl gets one line per file or folder the process opens
or lists (Python audit events 'open', 'os.listdir', 'os.scandir'; every path made
absolute): {"path": ...}; and one line per message at the ``flwr.client.Client``
boundary, i.e. the FitIns/FitRes objects Flower turns into its wire messages:
{"recv": type, ...} for what the server sent (for 'fit': the config keys, the number,
shapes and dtypes of the arrays and a SHA-256 of their serialised bytes), {"send": type,
...} for the reply (for 'fit': the same of the arrays, num_examples, the metrics).
Every array a hospital sends is also saved as $FLOWER_AUDIT_DIR/hospital<K>_round<R>.npz
(arr_0, arr_1, ... in wire order) so that a test can compare values.
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_dir = os.environ["FLOWER_AUDIT_DIR"]
_hospital = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--hospital="))
_log = open(os.path.join(_dir, f"hospital{_hospital}.jsonl"), "a", buffering=1)
_write = _log.write


def _hook(event, args):
  if event in ("open", "os.listdir", "os.scandir") and args:
    path = args[0]
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    if isinstance(path, str):
      _write(json.dumps({"path": os.path.abspath(path)}) + "\n")


sys.addaudithook(_hook)

import numpy as np  # noqa: E402
from flwr.client import Client  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.compat.client import client as _compat  # noqa: E402

from fedjax_seg.flower import client  # noqa: E402


def tensors_sha256(parameters) -> str:
  digest = hashlib.sha256()
  for t in parameters.tensors:
    digest.update(t)
  return digest.hexdigest()


def describe(parameters):
  arrays = parameters_to_ndarrays(parameters)
  return arrays, {"tensor_type": parameters.tensor_type,
                  "arrays": [[list(a.shape), str(a.dtype)] for a in arrays],
                  "sha256": tensors_sha256(parameters)}


def _record(**entry):
  _write(json.dumps(entry) + "\n")


class RecordingClient(Client):
  """Forwards every call to the hospital's Flower client, recording both directions."""

  def __init__(self, inner):
    self.inner = inner

  def get_properties(self, ins):
    _record(recv="get_properties", config=sorted(ins.config))
    res = self.inner.get_properties(ins)
    _record(send="get_properties", properties=dict(res.properties))
    return res

  def get_parameters(self, ins):
    _record(recv="get_parameters", config=sorted(ins.config))
    return _compat.maybe_call_get_parameters(self.inner, ins)

  def fit(self, ins):
    _, got = describe(ins.parameters)
    _record(recv="fit", config=sorted(ins.config), round=int(ins.config["round"]), **got)
    res = self.inner.fit(ins)
    arrays, sent = describe(res.parameters)
    np.savez(os.path.join(_dir, f"hospital{_hospital}_round{int(ins.config['round'])}.npz"),
             *arrays)
    _record(send="fit", round=int(ins.config["round"]), num_examples=int(res.num_examples),
            metrics=dict(res.metrics), **sent)
    return res

  def evaluate(self, ins):
    _record(recv="evaluate", config=sorted(ins.config))
    return _compat.maybe_call_evaluate(self.inner, ins)


_numpy_client = client.numpy_client


def _recording_numpy_client(core):
  inner = _numpy_client(core).to_client()

  class _Wrapped:
    def to_client(self):
      return RecordingClient(inner)

  return _Wrapped()


client.numpy_client = _recording_numpy_client

if __name__ == "__main__":
  sys.argv[0] = "fedjax_seg.flower.client"
  client.main()
