"""A Flower hospital (``python -m fedjax_seg.flower.client``) that records what it touches.

$FLOWER_AUDIT_DIR/hospital<K>.jsonl gets one line per file or folder the process opens
or lists (Python audit events 'open', 'os.listdir', 'os.scandir'; every path made
absolute) and one line per round with what the server sent: the number, shapes and
dtypes of the arrays and a SHA-256 of their bytes.
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_hospital = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--hospital="))
_log = open(os.path.join(os.environ["FLOWER_AUDIT_DIR"], f"hospital{_hospital}.jsonl"), "a",
            buffering=1)
_write = _log.write


def _hook(event, args):
  if event in ("open", "os.listdir", "os.scandir") and args:
    path = args[0]
    if isinstance(path, bytes):
      path = os.fsdecode(path)
    if isinstance(path, str):
      _write(json.dumps({"path": os.path.abspath(path)}) + "\n")


sys.addaudithook(_hook)

from fedjax_seg.flower import client  # noqa: E402

_fit = client.HospitalClient.fit


def _recording_fit(self, arrays, ins):
  digest = hashlib.sha256()
  for a in arrays:
    digest.update(a.tobytes())
  _write(json.dumps({"round": int(ins["round"]), "config": sorted(ins),
                     "arrays": [[list(a.shape), str(a.dtype)] for a in arrays],
                     "sha256": digest.hexdigest()}) + "\n")
  return _fit(self, arrays, ins)


client.HospitalClient.fit = _recording_fit

if __name__ == "__main__":
  sys.argv[0] = "fedjax_seg.flower.client"
  client.main()
