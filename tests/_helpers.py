"""Small helpers shared by several test files."""
import os


def read_tree(root):
  """Every file below ``root``: {path relative to ``root``: its bytes}."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = fh.read()
  return out
