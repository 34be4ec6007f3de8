"""Grid sweeps: one workdir per point, run sequentially, resumable point by point, then a report.

    python launch.py --config configs/lgg_fedavg.py --workdir runs/cmp \\
        --sweep 'seed=0,1,2;algorithm=fedavg,dcew'

Grid syntax: ``key=v1,v2,...`` axes separated by ``;``; the points are the
Cartesian product, first axis outermost. Keys are config paths
(``optimizer.lr``, ``fl.rounds``; a leading ``config.`` is accepted). Values
are parsed as Python literals (``0``, ``1e-3``, ``True``, ``None``,
``(2.0, 2.0, 2.0)`` — commas inside brackets do not split) and fall back to
strings (``fedavg``); a value is converted to the type of the field it
replaces (``lr=1`` -> 1.0, ``data.root=123`` -> '123'), and an unknown key
is an error naming it.

A config module may instead define ``get_sweep(arg=None)`` (big_vision style)
returning the same string, a dict {key: [values]} (product), or a list of
point dicts {key: value}; `launch.py` uses it when ``--sweep`` is not given
(``--sweep=none`` runs the plain config).

Point ``{'seed': 0, 'algorithm': 'fedavg'}`` runs in ``<workdir>/seed=0,algorithm=fedavg``.
A point whose workdir has ``results.json`` is done and skipped; an
interrupted point resumes from its last checkpoint (``train.run`` resumes),
so re-running the same command finishes the sweep. After the last point
``<workdir>/report.md`` is written (`fedjax_seg.report`), and ``<workdir>/hparams/``
(TensorBoard HParams: each point's overrides with its val/test Dice; `write_hparams`).

Parallel points, one process per accelerator: ``--sweep_shard i/n`` runs only
points i, i+n, i+2n, ... of the same grid::

    for i in 0 1 2 3; do
      CUDA_VISIBLE_DEVICES=$i python launch.py --config ... --workdir runs/cmp \\
          --sweep '...' --sweep_shard $i/4 > runs/cmp.shard$i.log 2>&1 &
    done; wait
    python -m fedjax_seg.report runs/cmp --out runs/cmp/report.md

Shards never share a point (so never a workdir); the shard that finds every
point done writes the report.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import itertools
import json
import os
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from fedjax_seg import progress

Point = Dict[str, Any]


class SweepError(ValueError):
  """Bad grid / key, or points that failed (after the others ran); launch.py prints it as ``error: ...``."""


# ---------------------------------------------------------------------------
# Grid parsing.
# ---------------------------------------------------------------------------
def _split_top(text: str, sep: str) -> List[str]:
  """Splits on ``sep`` outside (), [], {} and quotes."""
  out, depth, cur, quote = [], 0, [], None
  for ch in text:
    if quote:
      cur.append(ch)
      if ch == quote:
        quote = None
      continue
    if ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == sep and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  out.append("".join(cur))
  return out


def parse_value(text: str) -> Any:
  """A Python literal when it is one (int, float, bool, None, tuple, quoted str), else the string."""
  t = text.strip()
  if t.lower() in ("true", "false"):
    return t.lower() == "true"
  if t.lower() in ("none", "null"):
    return None
  try:
    return ast.literal_eval(t)
  except (ValueError, SyntaxError):
    return t


def _key(k: str) -> str:
  k = k.strip()
  return k[len("config."):] if k.startswith("config.") else k


def parse_grid(spec: str) -> List[Tuple[str, List[Any]]]:
  """'seed=0,1;algorithm=fedavg,dcew' -> [('seed', [0, 1]), ('algorithm', ['fedavg', 'dcew'])]."""
  axes: List[Tuple[str, List[Any]]] = []
  for part in _split_top(spec, ";"):
    if not part.strip():
      continue
    if "=" not in part:
      raise SweepError(f"--sweep axis {part.strip()!r}: expected key=value1,value2,...")
    k, vals = part.split("=", 1)
    k = _key(k)
    if not k:
      raise SweepError(f"--sweep axis {part.strip()!r}: empty key")
    if any(k == a for a, _ in axes):
      raise SweepError(f"--sweep: key {k!r} appears twice")
    values = [parse_value(v) for v in _split_top(vals, ",") if v.strip()]
    if not values:
      raise SweepError(f"--sweep axis {k!r}: no values")
    axes.append((k, values))
  if not axes:
    raise SweepError(f"--sweep {spec!r}: empty grid")
  return axes


def product(axes: Sequence[Tuple[str, Sequence[Any]]]) -> List[Point]:
  keys = [k for k, _ in axes]
  return [dict(zip(keys, combo)) for combo in itertools.product(*[v for _, v in axes])]


def points_from(spec) -> List[Point]:
  """Points from a grid string, a {key: [values]} dict, or a list of point dicts."""
  if isinstance(spec, str):
    return product(parse_grid(spec))
  if isinstance(spec, dict):
    return product([(_key(k), list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in spec.items()])
  if isinstance(spec, (list, tuple)) and all(isinstance(p, dict) for p in spec):
    return [{_key(k): v for k, v in p.items()} for p in spec]
  raise SweepError(f"a sweep is a 'key=v1,v2;...' string, a {{key: [values]}} dict or a list of point "
                   f"dicts, got {type(spec).__name__}")


def _fmt(v: Any) -> str:
  s = v if isinstance(v, str) else repr(v)
  return s.replace("/", "_").replace(" ", "")


def point_name(point: Point) -> str:
  """Folder name of a point: 'seed=0,algorithm=fedavg'."""
  return ",".join(f"{k}={_fmt(v)}" for k, v in point.items())


def _field(config, key: str):
  """The value of ``config.<key>``; a one-line SweepError naming the key when it does not exist."""
  import ml_collections
  parts = key.split(".")
  node = config
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      where = (f"config has no {'.'.join(parts[:i + 1])!r}" if i < len(parts) - 1
               else f"unknown config key (config.{key} does not exist)")
      raise SweepError(f"sweep key {key!r}: {where}")
    node = node[p]
  return node


def apply_point(config, point: Point):
  """A copy of ``config`` with the point's overrides (`ConfigDict.update_from_flattened_dict`).

  Every key must exist (`_field`: never adds a field). ConfigDict's type
  rules apply (int -> float field, list <-> tuple, else the field's type);
  in addition a non-string value on a string field becomes its ``str``.
  """
  c = copy.deepcopy(config)
  for key, value in point.items():
    old = _field(c, key)
    if isinstance(old, str) and not isinstance(value, str) and value is not None:
      value = str(value)
    try:
      c.update_from_flattened_dict({key: value})
    except (TypeError, ValueError) as e:
      raise SweepError(f"sweep key {key!r}: cannot set {value!r} (type {type(value).__name__}) on a field "
                       f"of type {type(old).__name__}: {e}") from e
  return c


# ---------------------------------------------------------------------------
# Config modules with get_sweep().
# ---------------------------------------------------------------------------
def config_module_sweep(config_path: str) -> Optional[List[Point]]:
  """Points from ``get_sweep(arg)`` of the config file ``path[:arg]``, or None when it has none."""
  path, _, arg = config_path.partition(":")
  if not os.path.isfile(path):
    return None
  spec = importlib.util.spec_from_file_location("_fedjax_seg_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, "get_sweep", None)
  if fn is None:
    return None
  params = inspect.signature(fn).parameters
  out = fn(arg or None) if params else fn()
  return points_from(out)


def resolve(sweep_flag: Optional[str], config_path: Optional[str]) -> Optional[List[Point]]:
  """The points launch.py runs: ``--sweep`` if given (``none`` = no sweep), else the config's get_sweep()."""
  if sweep_flag is not None:
    if sweep_flag.strip().lower() in ("", "none", "off"):
      return None
    return points_from(sweep_flag)
  return config_module_sweep(config_path) if config_path else None


def parse_shard(text: str) -> Tuple[int, int]:
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise SweepError(f"--sweep_shard={text!r}: expected i/n, e.g. 0/4") from None
  if not (n >= 1 and 0 <= i < n):
    raise SweepError(f"--sweep_shard={text!r}: need 0 <= i < n")
  return i, n


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------
def is_done(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, "results.json"))


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=repr)
  os.replace(tmp, path)


HPARAM_METRICS = ("val", "test")  # results.json metrics[split]['dice_mean'] -> hparams/<split>_dice_mean


def _hparam_value(v):
  return v if isinstance(v, (bool, int, float, str)) else repr(v)


def write_hparams(workdir: str, points: Sequence[Point], dirs: Sequence[str]) -> Optional[str]:
  """TensorBoard HParams of the finished sweep: ``SummaryWriter.add_hparams`` with each
  point's overrides and its val/test Dice (results.json), one session per point
  (``<workdir>/hparams/<point name>``, replaced whole). Returns the folder, or None
  (no tensorboardX; a write error is a warning, never fatal)."""
  import shutil
  import warnings

  from fedjax_seg import runlog
  out = os.path.join(workdir, "hparams")
  try:
    shutil.rmtree(out, ignore_errors=True)
    w = runlog.tb_writer(out)
    if w is None:
      return None
    with w:
      for p, d in zip(points, dirs):
        with open(os.path.join(d, "results.json")) as f:
          metrics = json.load(f).get("metrics", {})
        m = {f"hparams/{s}_dice_mean": float(metrics[s]["dice_mean"]) for s in HPARAM_METRICS
             if isinstance(metrics.get(s), dict) and isinstance(metrics[s].get("dice_mean"), (int, float))}
        w.add_hparams({k: _hparam_value(v) for k, v in p.items()}, m, name=os.path.basename(d))
  except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience
    warnings.warn(f"TensorBoard hparams in {out} not written: {e!r}", RuntimeWarning, stacklevel=2)
    return None
  return out


def run_sweep(config, workdir: str, points: Sequence[Point], run_fn: Optional[Callable] = None,
              shard: Tuple[int, int] = (0, 1), report: bool = True, command: Optional[str] = None,
              keep_going: bool = True, **run_kwargs) -> List[Dict[str, Any]]:
  """Runs the grid ``points`` one after the other, each in ``<workdir>/<point_name>``.

  Args:
    config: the base ConfigDict (command-line overrides applied).
    points: from `points_from` / `resolve`.
    run_fn: ``run_fn(config, workdir, **run_kwargs)``; default `fedjax_seg.train.run`.
    shard: (i, n): run only points i, i+n, ... (parallel processes, one per device).
    report: write ``<workdir>/report.md`` once every point is done.
    keep_going: a failing point (exception) is reported and the sweep goes on;
      ``train.Interrupted`` and KeyboardInterrupt always stop it.
  Returns:
    one status dict per point of this shard: name, workdir, status ('skipped' |
    'ran' | 'failed'), seconds, error.
  Raises:
    SweepError: a bad key / value (before anything runs), or failed points.
  """
  from fedjax_seg import train
  from fedjax_seg.config_utils import validate
  run_fn = run_fn or train.run
  if not points:
    raise SweepError("the sweep has no points")
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise SweepError(f"sweep points with the same folder name: {names}")
  configs = []
  from fedjax_seg import validate as rules
  base = dict(rules.leaves(config))
  for p in points:  # every override checked before the first point runs
    c = apply_point(config, p)
    try:
      validate(c)
      rules.check_unread(c, base)
    except ValueError as e:
      raise SweepError(f"sweep point {point_name(p)}: {e}") from e
    configs.append(c)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "sweep.json"),
              {"points": [{"name": n, "overrides": p} for n, p in zip(names, points)],
               "command": command})
  i0, n = shard
  mine = list(range(i0, len(points), n))
  status = []
  bar = progress.Bar(len(mine), f"[sweep] points of shard {i0}/{n}")
  for j, idx in enumerate(mine, start=1):
    name, wd = names[idx], os.path.join(workdir, names[idx])
    tag = f"[sweep] point {idx + 1}/{len(points)} ({j}/{len(mine)} of shard {i0}/{n}) {name}"
    bar.update(j - 1, name)
    if is_done(wd):
      print(f"{tag}: done (results.json), skipped", flush=True)
      status.append({"name": name, "workdir": wd, "status": "skipped"})
      continue
    resumed = os.path.isdir(os.path.join(wd, "checkpoints"))
    print(f"{tag}: {'resuming' if resumed else 'starting'} in {wd}", flush=True)
    t0 = time.time()
    try:
      run_fn(configs[idx], wd, **run_kwargs)
    except (train.Interrupted, KeyboardInterrupt):
      raise
    except Exception as e:  # noqa: BLE001 - reported below, the sweep goes on
      if not keep_going:
        raise
      print(f"{tag}: FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
      status.append({"name": name, "workdir": wd, "status": "failed", "seconds": time.time() - t0,
                     "error": f"{type(e).__name__}: {e}"})
      continue
    status.append({"name": name, "workdir": wd, "status": "ran", "seconds": time.time() - t0})
  bar.close()
  all_dirs = [os.path.join(workdir, nm) for nm in names]
  finished = [d for d in all_dirs if is_done(d)]
  print(f"[sweep] {len(finished)}/{len(points)} points done "
        f"({sum(s['status'] == 'ran' for s in status)} run now, "
        f"{sum(s['status'] == 'skipped' for s in status)} skipped, "
        f"{sum(s['status'] == 'failed' for s in status)} failed)", flush=True)
  if len(finished) == len(all_dirs):
    write_hparams(workdir, points, all_dirs)
  if report and finished:
    if len(finished) == len(all_dirs):
      from fedjax_seg import report as report_lib
      out = os.path.join(workdir, "report.md")
      report_lib.write_report(all_dirs, out, title=f"Sweep {os.path.basename(os.path.abspath(workdir))}",
                              command=command)
      print(f"[sweep] report: {out}", flush=True)
    else:
      print(f"[sweep] {len(all_dirs) - len(finished)} point(s) not done (other shards, or failed); "
            f"once all are: python -m fedjax_seg.report {workdir} --out {workdir}/report.md", flush=True)
  failed = [s for s in status if s["status"] == "failed"]
  if failed:
    raise SweepError(f"{len(failed)} sweep point(s) failed: " + "; ".join(
        f"{s['name']}: {s['error']}" for s in failed) + " (re-run the same command to retry them)")
  return status
