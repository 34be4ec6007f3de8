"""Round speed: execution strategies of one federated round, measured in one run.

For each K, the same client update (E local Adam steps of a U-Net on batches
sampled from the client's data + the aggregator statistics) is executed as
  loop      a Python loop over K clients of the *jitted single-client update*
            (what a per-client framework does), then a jitted FedAvg
  loopedC   the trainers' 'loop' round (algorithm.LoopedRound, C clients per call,
            config fl.clients_per_call): begin, a program of C unrolled clients
            called ceil(K / C) times, and post (FedAvg), nothing leaving the device
            in between; the calls are issued from --host-threads threads (config
            fl.host_threads; 0 = the trainers' auto, 2 on a CPU), or T threads with
            the suffix tT (looped2t1: 2 clients per call, one thread)
  hostedC   the same with every local step a program call (config
            fl.step_strategy=host): per call of C clients a stage program, a one-step
            program of the C clients called E times, a closing stage program
            (hosted1t2: one client per call, two host threads)
  vmap      one jitted program: jax.vmap over clients + FedAvg
  unrolled  one jitted program: clients unrolled in Python inside the jit + FedAvg
            (compile time grows with K·E: only for K <= --max-unrolled-k)
  sharded   one jitted program: clients over the mesh axis 'clients' of all
            devices (fl/scale.py; with one device it is 'unrolled' + a shard_map)
  torch     a per-client PyTorch loop of the same U-Net (same layers, Dice+CE,
            Adam, E steps, stats forward passes before/after, FedAvg of the
            state dicts) with torch's threads = --threads (0: all cores)
  torch1    the same PyTorch loop on one thread (torch.set_num_threads(1))
Every row runs in a subprocess of its own (--no-isolate: the JAX rows in this
process, where a row measured 5-10 % slower the later it ran); the torch rows
never import JAX (in a JAX process, torch's threads competed with XLA's and its
speed collapsed). --repeats N measures every row N times, the rows of each repeat
in a rotated order, and gives the ratios 95 % confidence intervals. Without torch installed the torch rows are skipped with a
message (pip install -e '.[bench]').

Reported per row (docs/performance.md describes every column): ms/round
(median of --reps after a warm-up call), rounds/s, client-steps/s (K·E/round
time), process CPU seconds per round (all threads; CPU/wall = cores busy),
achieved GFLOP/s (XLA cost analysis of the compiled programs; the torch loop is
credited with the JAX loop's FLOPs) against the machine's measured f32 matmul
peak, compile seconds cold (trace + lower + XLA compile into an empty
persistent cache, one fresh cache folder per K and strategy) and cached (the
same programs compiled again by a second process that reads that cache; the
cache hits are recorded), and the 1-minute load average when the row started
(the machine may be shared); then speedups vs `loop` and vs the torch loops.
Markdown + JSON results go to benchmarks/results/round_speed[_quick].{md,json}.

  python benchmarks/round_speed.py                 # K = 1 2 4 8 16 32, 64×64, base 16, depth 4
  python benchmarks/round_speed.py --quick         # K = 1 2 4, 32×32, base 8, depth 3
  python benchmarks/round_speed.py --size 32 --base 8 --depth 3 --ks 1 8 32
  python benchmarks/round_speed.py --quick --ks 1 --strategies torch torch1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _runs  # noqa: E402

# loopedC / hostedC, optionally with tT: T host threads issuing the calls (default --host-threads)
_LOOPED_RE = re.compile(r"(looped|hosted)([1-9][0-9]*)(?:t([1-9][0-9]*))?$")


def looped_spec(strategy):
  """(clients per call, host steps, host threads or None) of a loopedC[tT] / hostedC[tT]
  row; None for any other strategy."""
  m = _LOOPED_RE.match(strategy)
  return None if m is None else (int(m[2]), m[1] == "hosted", None if m[3] is None else int(m[3]))


def is_jax(strategy) -> bool:
  return strategy in ("loop", "unrolled", "vmap", "sharded") or looped_spec(strategy) is not None


def _strategy_arg(strategy):
  if is_jax(strategy) or strategy in TORCH_STRATEGIES:
    return strategy
  raise argparse.ArgumentTypeError(
      f"unknown strategy {strategy!r}: loop, loopedC, hostedC (C clients per call; a "
      f"suffix tT = T host threads), unrolled, vmap, sharded, torch, torch1")
TORCH_STRATEGIES = ("torch", "torch1")
_RESULT = "ROUND_SPEED_RESULT "  # prefix of a worker's JSON line on stdout


def _flag_from_argv(name, default=None):
  """The value of ``--name V`` / ``--name=V`` in sys.argv, read before argparse
  (needed before jax is imported)."""
  for i, a in enumerate(sys.argv):
    if a == name and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
  return default


THREADS = int(_flag_from_argv("--threads", 0))
TORCH_WORKER = _flag_from_argv("--torch-worker")  # JSON spec: this process is one torch row
ROW_WORKER = _flag_from_argv("--row-worker")      # JSON spec: this process is one JAX row
XLA_FLAGS_IN = os.environ.get("XLA_FLAGS")        # handed unchanged to the compile worker

from fedjax_seg import hostmem  # noqa: E402  (imports no JAX)

# The same malloc settings as launch.py, in the JAX process and in each torch worker
# (FEDJAX_SEG_MALLOC_TUNING=0: glibc's defaults for both): docs/performance.md.
MALLOC = hostmem.tune()

if TORCH_WORKER is None:  # the torch worker never imports JAX
  if THREADS == 1:  # one thread for XLA and torch alike (on a shared, oversubscribed
    # machine a 2-thread torch step measured 130x slower than a 1-thread one)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
  import jax  # noqa: E402
  import jax.numpy as jnp  # noqa: E402
  import optax  # noqa: E402
  from jax import monitoring  # noqa: E402

  from fedjax_seg import compile_cache, models  # noqa: E402
  from fedjax_seg.data import federated  # noqa: E402
  from fedjax_seg.fl import aggregators, algorithm, backends, core  # noqa: E402
  import dataclasses  # noqa: E402


def _load() -> float:
  return round(os.getloadavg()[0], 2)


def _time(fn, reps, block=lambda r: r):
  """(median wall s, first-call s, mean process CPU s) of ``reps`` calls after a warm-up call."""
  t0 = time.perf_counter()
  block(fn())
  first = time.perf_counter() - t0
  ts, cpu0 = [], time.process_time()
  for _ in range(reps):
    t0 = time.perf_counter()
    block(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)), first, (time.process_time() - cpu0) / max(reps, 1)


def client_arrays(k, args):
  """The K clients' samples (numpy): the same data in the JAX process and the torch worker."""
  rng = np.random.default_rng(0)
  per = []
  for _ in range(k):
    x = rng.normal(size=(args.samples, args.size, args.size, 3)).astype(np.float32)
    per.append((x, (x[..., 0] > 0.8).astype(np.int32)))
  return per


# --- the same U-Net and client update in PyTorch (its own process) -------------------


def torch_worker(spec):
  """One torch row: ``spec`` = {k, threads, args}; prints the result as one JSON line."""
  try:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
  except ImportError as e:
    print(_RESULT + json.dumps({"error": f"torch not importable ({e})"}), flush=True)
    return
  k, threads = spec["k"], spec["threads"]
  args = argparse.Namespace(**spec["args"])
  torch.set_num_threads(threads)
  if threads == 1:
    torch.set_num_interop_threads(1)

  class Block(tnn.Module):
    def __init__(s, i, o):
      super().__init__()
      s.c = tnn.Sequential(tnn.Conv2d(i, o, 3, padding=1), tnn.ReLU(),
                           tnn.Conv2d(o, o, 3, padding=1), tnn.ReLU())

    def forward(s, x):
      return s.c(x)

  class UNet(tnn.Module):  # fedjax_seg.models.unet.UNet(norm='none', dropout=0), NCHW
    def __init__(s, base, depth, cin=3, classes=2):
      super().__init__()
      s.down, c = tnn.ModuleList(), cin
      for lvl in range(depth - 1):
        s.down.append(Block(c, base * 2 ** lvl))
        c = base * 2 ** lvl
      s.mid = Block(c, base * 2 ** (depth - 1))
      c = base * 2 ** (depth - 1)
      s.up, s.ub = tnn.ModuleList(), tnn.ModuleList()
      for lvl in reversed(range(depth - 1)):
        s.up.append(tnn.ConvTranspose2d(c, base * 2 ** lvl, 2, 2))
        s.ub.append(Block(2 * base * 2 ** lvl, base * 2 ** lvl))
        c = base * 2 ** lvl
      s.head = tnn.Conv2d(c, classes, 1)

    def forward(s, x):
      skips = []
      for b in s.down:
        x = b(x)
        skips.append(x)
        x = F.max_pool2d(x, 2)
      x = s.mid(x)
      for u, b in zip(s.up, s.ub):
        x = b(torch.cat([u(x), skips.pop()], 1))
      return s.head(x)

  def dice_ce(logits, y):
    p = torch.softmax(logits, 1)
    g = F.one_hot(y, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter = (p * g).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + g.sum((0, 2, 3)) + 1)
    return (1 - dice.mean()) + F.cross_entropy(logits, y)

  want = getattr(args, "torch_device", "cpu")
  if want == "auto":
    want = "cuda" if torch.cuda.is_available() else "cpu"
  dev = torch.device(want)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
  model = UNet(args.base, args.depth).to(dev)
  n_params = sum(p.numel() for p in model.parameters())
  global_state = {n: v.clone() for n, v in model.state_dict().items()}
  per = client_arrays(k, args)
  xs = [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dev) for x, _ in per]
  ys = [torch.from_numpy(y.astype(np.int64)).to(dev) for _, y in per]
  ns = [len(x) for x, _ in per]
  rng = np.random.default_rng(0)

  def run():
    states, weights = [], []
    for i in range(k):
      model.load_state_dict(global_state)
      opt = torch.optim.Adam(model.parameters(), 1e-3)
      sidx = torch.as_tensor(rng.integers(0, ns[i], args.batch), device=dev)
      with torch.no_grad():
        dice_ce(model(xs[i][sidx]), ys[i][sidx])                 # cost/dice of M_{t-1}
      for _ in range(args.local_steps):
        idx = torch.as_tensor(rng.integers(0, ns[i], args.batch), device=dev)
        opt.zero_grad()
        dice_ce(model(xs[i][idx]), ys[i][idx]).backward()
        opt.step()
      with torch.no_grad():
        dice_ce(model(xs[i][sidx]), ys[i][sidx])                 # cost/dice of M_t
      states.append({n: v.detach().clone() for n, v in model.state_dict().items()})
      weights.append(ns[i])
    tot = float(sum(weights))
    with torch.no_grad():
      for n in global_state:
        global_state[n] = sum(w / tot * s[n] for w, s in zip(weights, states))
    sync()

  load = _load()
  t, first, cpu = _time(run, args.reps)
  print(_RESULT + json.dumps({"torch": torch.__version__, "params": n_params, "time": t,
                              "first_s": first, "cpu_s": cpu, "load": load,
                              "threads": torch.get_num_threads(), "device": str(dev)}),
        flush=True)


def _worker_result(cmd, env=None, timeout=None):
  """Run a worker subprocess; its JSON result line, or {'error': ...}."""
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout} s"}
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith(_RESULT)]
  if r.returncode != 0 or not lines:
    return {"error": f"exit {r.returncode}: {r.stderr.strip()[-800:]}"}
  return json.loads(lines[-1][len(_RESULT):])


def torch_row(k, strategy, args):
  """One torch row measured in a subprocess: the worker's result dict (or {'error': ...})."""
  threads = 1 if strategy == "torch1" else (THREADS or os.cpu_count() or 1)
  spec = {"k": k, "threads": threads,
          "args": {a: getattr(args, a) for a in ("size", "base", "depth", "batch", "samples",
                                                 "local_steps", "reps", "torch_device")}}
  return _worker_result([sys.executable, os.path.abspath(__file__),
                         "--torch-worker", json.dumps(spec)])


# --- JAX strategies ------------------------------------------------------------------


def _block(tree):
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)
  return tree


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", 0.0))


def matmul_peak(n=2048, reps=5) -> float:
  """Measured f32 matmul GFLOP/s (jitted n×n @ n×n): the machine's roof."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  t, _, _ = _time(lambda: f(a, a), reps, _block)
  return 2 * n ** 3 / t / 1e9


_VARS = {}
_HITS = []  # persistent-cache hit events (the compile worker reports them)


def _count_hits(name, **kw):
  if name == "/jax/compilation_cache/cache_hits":
    _HITS.append(name)


def setup(k, args):
  """Model functions, the K clients' data, initial variables (the same for every K)."""
  fns = models.build({"name": "unet", "base": args.base, "depth": args.depth, "dropout": 0.0,
                      "dtype": args.dtype}, 2)
  data = jax.tree.map(jnp.asarray, federated.stack_clients(client_arrays(k, args), host=True))
  vkey = (args.base, args.depth, args.size, args.dtype)
  if vkey not in _VARS:  # the same initial model for every K (init compiles slowly on CPU)
    _VARS[vkey] = fns.init(jax.random.PRNGKey(0), jnp.zeros((1, args.size, args.size, 3)))
  return fns, data, _VARS[vkey]


def build(k, strategy, args, fns, data, variables):
  """Compile ``strategy``'s programs: (run() -> output, FLOPs per round, compile seconds).

  Compile seconds = trace + lower + XLA compile of the programs of one round
  (ahead of time); the loop's one client update run to get the aggregator's
  input shapes is not counted."""
  key = jax.random.PRNGKey(1)
  step_strategy = "unrolled" if strategy in ("unrolled", "sharded") else args.step_strategy
  hp = core.ClientHParams(local_steps=args.local_steps, batch_size=args.batch,
                          stats_samples=args.batch, step_strategy=step_strategy, prox_mu=0.0)
  cu = core.make_client_update(fns, optax.adam(1e-3), "dice_ce", 2, hp)
  if strategy == "loop":
    clients = [jax.tree.map(lambda a: a[i], data) for i in range(k)]
    # the client keys the round gives in round 0 (the supervised family's 'flat' scheme)
    keys = list(algorithm.round_keys("flat", jax.random.fold_in(key, 0), k)[1])
    t0 = time.perf_counter()
    cu_c = jax.jit(cu).lower(variables, clients[0], keys[0]).compile()
    compile_s = time.perf_counter() - t0
    outs = [cu_c(variables, clients[0], keys[0])]
    t0 = time.perf_counter()
    agg_c = jax.jit(aggregators.fedavg).lower(
        variables, *jax.tree.map(lambda *xs: jnp.stack(xs), *(outs * k))).compile()
    compile_s += time.perf_counter() - t0

    def run():
      o = [cu_c(variables, clients[i], keys[i]) for i in range(k)]
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[a[0] for a in o])
      stats = jax.tree.map(lambda *xs: jnp.stack(xs), *[a[1] for a in o])
      return agg_c(variables, stacked, stats)[0]
    return run, _flops(cu_c) * k + _flops(agg_c), compile_s
  state = core.ServerState(variables, jnp.int32(0))
  spec = looped_spec(strategy)
  if spec is not None:
    c, host, threads = spec
    return _build_looped(c, cu, state, data, key, host=host,
                         threads=args.host_threads if threads is None else threads)
  t0 = time.perf_counter()
  rr = jax.jit(core.make_run_round(cu, aggregators.fedavg, strategy)).lower(
      state, data, key).compile()
  compile_s = time.perf_counter() - t0

  def run():
    return rr(state, data, key)[0].variables
  return run, _flops(rr), compile_s


def _build_looped(c, cu, state, data, key, host, threads):
  """The trainers' LoopedRound with c clients per call: its programs are compiled ahead
  of time inside the first round (a jit hook times lower + compile of each and counts
  each program's FLOPs once per call in that round); the state is donated to 'post',
  so each timed round feeds the next one the state it returned. ``host``: the 'hostedC'
  rows, the same round with every local step a program call (fl.step_strategy=host).
  ``threads``: host threads issuing the calls (config fl.host_threads; 0 = the trainers'
  auto: 2 on a CPU)."""
  rr = dataclasses.replace(core.make_run_round(cu, aggregators.fedavg, "loop"),
                           clients_per_call=c, host_steps=host,
                           host_threads=backends.host_threads(threads, "loop"))
  acc = {"compile_s": 0.0, "flops": 0.0, "counting": True}

  def timed_jit(name, build_fn, **kw):
    f, box = jax.jit(build_fn(), **kw), {}

    def call(*a):
      if "exe" not in box:
        t0 = time.perf_counter()
        box["exe"] = f.lower(*a).compile()
        acc["compile_s"] += time.perf_counter() - t0
      if acc["counting"]:
        acc["flops"] += _flops(box["exe"])
      # called through the jitted function (it reuses that executable), as the trainers'
      # runlog.TimedJit does: a Compiled object's call path measured 12% slower per round
      # for the host-step rows (80 calls of programs with hundreds of arguments per round)
      return f(*a)
    return call
  rr = rr.with_jit(timed_jit)
  box = {"state": jax.tree.map(jnp.copy, state)}
  box["state"] = rr(box["state"], data, key)[0]  # compiles every program, counts FLOPs
  _block(box["state"].variables)
  acc["counting"] = False
  first = jax.tree.map(jnp.copy, box["state"].variables)  # the next call donates the state

  def run():
    box["state"] = rr(box["state"], data, key)[0]
    return box["state"].variables
  run.first_round = lambda: first
  return run, acc["flops"], acc["compile_s"]


def max_abs_diff(a, b) -> float:
  """max |a − b| over every leaf of two variable pytrees of the same structure."""
  return float(max(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _skip_unrolled(k, strategy, args):
  return strategy == "unrolled" and k > args.max_unrolled_k


def _use_cache(cache_root, k, strategy):
  """A persistent cache folder of its own per (K, strategy): 'cold' is a real first compile."""
  return compile_cache.enable(os.path.join(cache_root, f"K{k}_{strategy}"))


def _cache_dir(cache_root, k, strategy, rep):
  """The row's own persistent-cache folder: 'cold' is a real first compile in every repeat."""
  return os.path.join(cache_root, f"K{k}_{strategy}" + (f"_r{rep}" if rep else ""))


def jax_row(k, strategy, args, fns, data, variables, cache_dir):
  """Compile and time one JAX row in this process: a dict of its numbers, with 'r0' the
  global model's leaves after round 0 (for the agreement check)."""
  compile_cache.enable(cache_dir)
  run, fl, compile_s = build(k, strategy, args, fns, data, variables)
  box = {}

  def timed():  # keeps the warm-up call's output: round 0 from the initial state
    o = run()
    box.setdefault("r0", o)
    return o
  t, first, cpu = _time(timed, args.reps, _block)
  # the looped rows feed each round the last state (donated): their round 0 ran in build
  r0 = run.first_round() if hasattr(run, "first_round") else box.pop("r0")
  return {"time": t, "first_s": first, "cpu_s": cpu, "flops": fl, "compile_s": compile_s,
          "r0": [np.asarray(a) for a in jax.tree.leaves(jax.device_get(r0))]}


def row_worker(spec):
  """One JAX row in a process of its own (``--row-worker``): prints its result as one JSON
  line and writes round 0's global model to ``spec['r0']`` (.npz)."""
  args = argparse.Namespace(**spec["args"])
  fns, data, variables = setup(spec["k"], args)
  res = jax_row(spec["k"], spec["strategy"], args, fns, data, variables, spec["cache"])
  np.savez(spec["r0"], *res.pop("r0"))
  print(_RESULT + json.dumps(res), flush=True)


_ROW_ARGS = ("size", "base", "depth", "batch", "samples", "local_steps", "dtype",
             "step_strategy", "reps", "host_threads")


def isolated_jax_row(k, strategy, args, cache_dir):
  """One JAX row measured by a subprocess (same XLA_FLAGS, same malloc settings): the
  JAX rows run one after another in one process had come out 5–10 % slower the later
  they ran (docs/results/speed.md), so by default every row gets a fresh process."""
  r0 = cache_dir + "_r0.npz"
  spec = {"k": k, "strategy": strategy, "cache": cache_dir, "r0": r0,
          "args": {a: getattr(args, a) for a in _ROW_ARGS}}
  env = dict(os.environ)
  if XLA_FLAGS_IN is None:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = XLA_FLAGS_IN
  res = _worker_result([sys.executable, os.path.abspath(__file__), *_thread_argv(),
                        "--row-worker", json.dumps(spec)], env=env)
  if "error" not in res:
    with np.load(r0) as z:
      res["r0"] = [z[f"arr_{i}"] for i in range(len(z.files))]
  return res


def _thread_argv():
  return ["--threads", str(THREADS)] if THREADS else []


def bench(k, args, peak, cache_root, order, rep=0):
  """One repeat of every row at ``k`` clients, in the order ``order``: the row dict."""
  fns, data, variables = setup(k, args)
  n_params = sum(int(a.size) for a in jax.tree.leaves(variables))
  out = {"K": k, "params": n_params, "load": {}, "repeat": rep}
  steps_per_round = k * args.local_steps
  ref = None  # (strategy, its round-0 variables): every JAX row is checked against it
  for strategy in order:
    if _skip_unrolled(k, strategy, args):
      print(f"  K={k:3d} {strategy:9s} skipped (K > --max-unrolled-k={args.max_unrolled_k})",
            flush=True)
      continue
    out["load"][strategy] = _load()
    if strategy in TORCH_STRATEGIES:
      if not args.torch_ok:
        continue
      if strategy == "torch1" and THREADS == 1:
        print(f"  K={k:3d} torch1    skipped (--threads 1: the 'torch' row is one thread)",
              flush=True)
        continue
      tr = torch_row(k, strategy, args)
      if "error" in tr:
        print(f"  K={k:3d} {strategy:9s} failed: {tr['error']}", flush=True)
        continue
      if tr["params"] != n_params:
        raise RuntimeError(f"torch U-Net has {tr['params']} params, JAX {n_params}: "
                           "not the same model")
      t, first, cpu = tr["time"], tr["first_s"], tr["cpu_s"]
      out["load"][strategy], args.torch_version = tr["load"], tr["torch"]
      out[f"{strategy}_threads"] = tr["threads"]
      out[f"{strategy}_device"] = args.torch_device_used = tr.get("device", "cpu")
      out[f"{strategy}_compile_cold_s"] = out[f"{strategy}_compile_cached_s"] = None
      fl = None  # credited with the JAX loop's FLOPs below
    else:
      cache_dir = _cache_dir(cache_root, k, strategy, rep)
      if args.isolate:
        res = isolated_jax_row(k, strategy, args, cache_dir)
        if "error" in res:
          print(f"  K={k:3d} {strategy:9s} failed: {res['error']}", flush=True)
          continue
      else:
        res = jax_row(k, strategy, args, fns, data, variables, cache_dir)
      t, first, cpu, fl = res["time"], res["first_s"], res["cpu_s"], res["flops"]
      if ref is None:
        ref = (strategy, res["r0"])
      out[f"{strategy}_max_abs_diff"] = max_abs_diff(ref[1], res["r0"])
      out["agreement_ref"] = ref[0]
      out[f"{strategy}_threads"] = 1 if THREADS == 1 else "all"
      out[f"{strategy}_compile_cold_s"] = res["compile_s"]
      out[f"{strategy}_compile_cached_s"] = None  # filled in by the compile worker
    out[strategy] = t
    out[f"{strategy}_first_s"] = first
    out[f"{strategy}_cpu_s"] = cpu
    out[f"{strategy}_flops"] = fl
    cold = out[f"{strategy}_compile_cold_s"]
    print(f"  K={k:3d} {strategy:9s} {t * 1e3:9.1f} ms/round  {1 / t:7.2f} rounds/s  "
          f"{steps_per_round / t:8.1f} client-steps/s  CPU {cpu:6.2f} s/round  "
          f"{_fmt(None if fl is None else fl / t / 1e9, '6.1f')} GFLOP/s  "
          f"compile {_fmt(cold, '5.1f')} s  first call {first:5.1f} s  "
          f"load {out['load'][strategy]}" + (f"  (repeat {rep + 1})" if args.repeats > 1 else ""),
          flush=True)
  return out


def _rotated(strategies, rep):
  """Repeat ``rep``'s row order: the strategies rotated by ``rep`` places, so that over the
  repeats every row runs early and late (the order effect averages out of the ratios)."""
  n = len(strategies)
  return [strategies[(i + rep) % n] for i in range(n)]


def merge_repeats(reps, args, peak):
  """One row per K from its repeats: per strategy the median over repeats of each number
  (ms/round, CPU, compile, first call), the per-repeat times in ``<s>_times`` and the
  loads as a 'min–max' range; then the derived columns."""
  out = {"K": reps[0]["K"], "params": reps[0]["params"], "load": {}, "repeats": len(reps)}
  for key in ("agreement_ref",):
    if key in reps[0]:
      out[key] = reps[0][key]
  steps_per_round = out["K"] * args.local_steps
  for s in args.strategies:
    got = [r for r in reps if s in r]
    if not got:
      continue
    med = lambda f: (None if any(r.get(f) is None for r in got)
                     else float(np.median([r[f] for r in got])))
    out[s] = med(s)
    out[f"{s}_times"] = [r[s] for r in got]
    for f in ("first_s", "cpu_s", "flops", "compile_cold_s"):
      out[f"{s}_{f}"] = med(f"{s}_{f}")
    out[f"{s}_compile_cached_s"] = None
    out[f"{s}_threads"] = got[0][f"{s}_threads"]
    if f"{s}_device" in got[0]:
      out[f"{s}_device"] = got[0][f"{s}_device"]
    if f"{s}_max_abs_diff" in got[0]:
      out[f"{s}_max_abs_diff"] = max(r[f"{s}_max_abs_diff"] for r in got)
    loads = [r["load"][s] for r in got]
    out["load"][s] = loads[0] if len(loads) == 1 else f"{min(loads)}–{max(loads)}"
  for s in args.strategies:
    if s not in out:
      continue
    if s in TORCH_STRATEGIES:
      out[f"{s}_flops"] = out.get("loop_flops")  # the JAX loop's FLOPs (None without it)
    t, fl = out[s], out[f"{s}_flops"]
    out[f"{s}_rounds_per_s"] = 1.0 / t
    out[f"{s}_client_steps_per_s"] = steps_per_round / t
    out[f"{s}_gflops_per_s"] = None if fl is None else fl / t / 1e9
    out[f"{s}_pct_peak"] = None if fl is None else 100.0 * fl / t / 1e9 / peak
  return out


def paired_ratio(ref_times, times, level=0.95):
  """Speed ratio of a strategy to a reference from paired repeats (the two rows of one
  repeat ran minutes apart): (the geometric mean of ref/strategy over the repeats, its
  ``level`` confidence interval, the two-sided p of a paired t test of the log ratios
  against 0); interval and p are None with fewer than 2 repeats. > 1: the strategy is
  faster."""
  from scipy import stats
  logs = np.log(np.asarray(ref_times, float) / np.asarray(times, float))
  g = float(np.exp(logs.mean()))
  if len(logs) < 2:
    return g, None, None
  se = logs.std(ddof=1) / np.sqrt(len(logs))
  half = stats.t.ppf(0.5 + level / 2, len(logs) - 1) * se
  p = float(2 * stats.t.sf(abs(logs.mean()) / se, len(logs) - 1)) if se > 0 else 0.0
  return g, (float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))), p


def compile_worker(args, cache_root):
  """The 'cached' compile column: compile every (K, JAX strategy) again in this
  second process from the caches the first one wrote."""
  monitoring.register_event_listener(_count_hits)
  res = {}
  for k in args.ks:
    fns, data, variables = setup(k, args)
    for strategy in args.strategies:
      if not is_jax(strategy) or _skip_unrolled(k, strategy, args):
        continue
      _use_cache(cache_root, k, strategy)
      n0 = len(_HITS)
      _, _, compile_s = build(k, strategy, args, fns, data, variables)
      res[f"{k}/{strategy}"] = {"compile_s": compile_s, "hits": len(_HITS) - n0}
  print(_RESULT + json.dumps(res), flush=True)


def cached_compiles(rows, cache_root):
  """Run the compile worker (same command line, same XLA_FLAGS) and merge its seconds into rows."""
  if not any(is_jax(s) for r in rows for s in r):
    return
  print("[round_speed] compiling again in a second process from the persistent cache ...",
        flush=True)
  env = dict(os.environ)
  if XLA_FLAGS_IN is None:
    env.pop("XLA_FLAGS", None)
  else:
    env["XLA_FLAGS"] = XLA_FLAGS_IN
  res = _worker_result([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                        "--compile-worker", cache_root], env=env)
  if "error" in res:
    print(f"[round_speed] cached compile failed: {res['error']}", flush=True)
    return
  for r in rows:
    for s in [s for s in r if is_jax(s)]:
      got = res.get(f"{r['K']}/{s}")
      if s in r and got:
        r[f"{s}_compile_cached_s"], r[f"{s}_cache_hits"] = got["compile_s"], got["hits"]
        print(f"  K={r['K']:3d} {s:9s} compile cold {r[s + '_compile_cold_s']:6.1f} s, cached "
              f"{got['compile_s']:6.2f} s ({got['hits']} cache hits)", flush=True)


def _fmt(x, spec):
  return "–" if x is None else format(x, spec)


def markdown(rows, args, machine, peak):
  e = args.local_steps
  head = ("Machine: " + machine + f". f32 matmul peak (jitted {args.peak_n}², default precision, measured): {peak:.1f} GFLOP/s."
          f"\nU-Net base {args.base}, depth {args.depth}, {args.size}×{args.size}×3, 2 classes, "
          f"compute dtype {args.dtype}, batch {args.batch}, E={e} local Adam steps + 2 stats "
          f"forward passes per client, FedAvg; median of {args.reps} rounds after a warm-up; "
          f"torch {args.torch_version or 'not installed'} on {getattr(args, 'torch_device_used', args.torch_device)} (each torch row in its own process). "
          "CPU = process CPU seconds per round, all threads. Compile: trace + lower + XLA "
          "compile of one round's programs, cold = into an empty persistent cache, cached = "
          "a second process reading it. Load = 1-min load average when the row started "
          "(the machine is shared). "
          + ("Each JAX row ran in a process of its own. " if args.isolate else
             "The JAX rows ran one after another in one process. ")
          + (f"{args.repeats} repeats, each with the rows in a rotated order: every number is "
             "the median over the repeats, and the ratios have 95 % confidence intervals. "
             if args.repeats > 1 else "One repeat: the ratios have no confidence interval. ")
          + "docs/performance.md explains every column.\n")
  t1 = ["| K | strategy | threads | ms/round | rounds/s | client-steps/s | CPU s/round | "
        "GFLOP/round | GFLOP/s | % of matmul peak | compile s cold | compile s cached | "
        "first call s | load |", "|---|" + "---|" * 13]
  for r in rows:
    for s in args.strategies:
      if s in r:
        fl = r[s + "_flops"]
        t1.append(f"| {r['K']} | {s} | {r[s + '_threads']} | {r[s] * 1e3:.0f} | "
                  f"{r[s + '_rounds_per_s']:.2f} | {r[s + '_client_steps_per_s']:.1f} | "
                  f"{r[s + '_cpu_s']:.2f} | {_fmt(None if fl is None else fl / 1e9, '.2f')} | "
                  f"{_fmt(r[s + '_gflops_per_s'], '.1f')} | "
                  f"{_fmt(r[s + '_pct_peak'], '.1f')}{'%' if r[s + '_pct_peak'] is not None else ''} | "
                  f"{_fmt(r[s + '_compile_cold_s'], '.1f')} | "
                  f"{_fmt(r.get(s + '_compile_cached_s'), '.2f')} | "
                  f"{r[s + '_first_s']:.1f} | {r['load'][s]} |")
  jax_s = [s for s in args.strategies if is_jax(s)]
  agree = []
  for r in rows:
    d = [f"{s} {r[s + '_max_abs_diff']:.1e}" for s in jax_s
         if s in r and s != r.get("agreement_ref") and r.get(s + "_max_abs_diff") is not None]
    if d:
      agree.append(f"K = {r['K']}: " + ", ".join(d))
  if agree:
    head += ("\nSame round: max |Δ| of the global model after round 0 from the same state and "
             f"keys, against the {next(r['agreement_ref'] for r in rows if 'agreement_ref' in r)} row: " + "; ".join(agree) + ".\n")
  others = [s for s in jax_s if s != "loop"]
  torches = [s for s in args.strategies if s in TORCH_STRATEGIES and any(s in r for r in rows)]
  cols = ([f"{s} vs loop" for s in others] + [f"JAX loop vs {t}" for t in torches]
          + [f"best JAX vs {t}" for t in torches])
  if not cols:
    return head + "\n" + "\n".join(t1) + "\n"
  t2 = ["| K | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for r in rows:
    cells = [f"{r['loop'] / r[s]:.2f}×" if s in r and "loop" in r else "–" for s in others]
    cells += [f"{r[t] / r['loop']:.2f}×" if t in r and "loop" in r else "–" for t in torches]
    best = min(((r[s], s) for s in jax_s if s in r), default=None)
    cells += [f"{r[t] / best[0]:.2f}× ({best[1]})" if t in r and best else "–" for t in torches]
    t2.append(f"| {r['K']} | " + " | ".join(cells) + " |")
  md = (head + "\n" + "\n".join(t1) + "\n\nSpeedups (time of the reference / time of the "
        "strategy; > 1 = faster than the reference):\n\n" + "\n".join(t2) + "\n")
  if args.repeats > 1 and (torches or len(jax_s) > 1):
    t3 = ["| K | strategy | reference | ratio (geometric mean) | 95 % CI | p | repeats |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:  # every JAX row against the torch rows, then against the first JAX row
      refs = torches + [next((s for s in jax_s if s in r), None)]
      for t in [t for t in refs if t is not None]:
        for s in jax_s:
          if s != t and s in r and t in r and len(r[s + "_times"]) == len(r[t + "_times"]):
            g, ci, pv = paired_ratio(r[t + "_times"], r[s + "_times"])
            t3.append(f"| {r['K']} | {s} | {t} | {g:.3f}× | "
                      f"{'–' if ci is None else f'{ci[0]:.3f}–{ci[1]:.3f}×'} | "
                      f"{'–' if pv is None else f'{pv:.2g}'} | {len(r[s + '_times'])} |")
    md += ("\nPaired over repeats (the strategy's round and the reference's of one repeat; "
           "> 1 = the strategy is faster than the reference; an interval that covers 1 = no "
           "difference detected):\n\n" + "\n".join(t3) + "\n")
  return md


def _speedups(rows):
  for out in rows:
    for s in [s for s in list(out) if is_jax(s) or s in TORCH_STRATEGIES]:
      if s != "loop" and "loop" in out:
        out[f"{s}_vs_loop"] = out[s] / out["loop"]          # time ratio (< 1: faster than loop)
      for t in TORCH_STRATEGIES:
        if s != t and t in out:
          out[f"{s}_vs_{t}"] = out[s] / out[t]
          if is_jax(s) and len(out.get(s + "_times", ())) == len(out.get(t + "_times", ())) > 1:
            g, ci, pv = paired_ratio(out[t + "_times"], out[s + "_times"])
            out[f"{s}_speedup_over_{t}"] = {"geomean": g, "ci95": ci, "p": pv}  # > 1: JAX faster


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ks", type=int, nargs="+", default=None,
                 help="client counts (default 1 2 4 8 16 32; --quick: 1 2 4)")
  p.add_argument("--strategies", nargs="+", default=["loop", "unrolled", "vmap", "torch", "torch1"],
                 type=_strategy_arg,
                 help="of loop, loopedC (the trainers' loop round, C clients per call), "
                      "hostedC (the same, each local step a program call), either with a suffix "
                      "tT for T host threads (e.g. hosted1t2), unrolled, vmap, sharded, torch, "
                      "torch1")
  p.add_argument("--host-threads", type=int, default=0,
                 help="host threads of the loopedC/hostedC rows without a tT suffix "
                      "(config fl.host_threads; 0 = the trainers' auto: 2 on a CPU)")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--base", type=int, default=16)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--samples", type=int, default=16, help="samples per client")
  p.add_argument("--local-steps", type=int, default=1)
  p.add_argument("--dtype", default="float32", help="U-Net compute dtype (bfloat16: mixed precision)")
  p.add_argument("--step-strategy", default="auto", help="local-step strategy for loop/vmap clients (unrolled clients always unroll steps)")
  p.add_argument("--max-unrolled-k", type=int, default=8,
                 help="skip 'unrolled' above this K (its compile time grows with K·E)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--torch-device", default="cpu", choices=["cpu", "cuda", "auto"],
                 help="where the PyTorch loop runs (auto: cuda when torch sees a GPU)")
  p.add_argument("--peak-n", type=int, default=0,
                 help="matmul size of the measured peak (default 2048 on CPU, 8192 on GPU/TPU)")
  p.add_argument("--threads", type=int, default=0,
                 help="0: all cores (default); 1: one thread for XLA and torch (a shared, "
                 "loaded machine); other values set torch's threads only")
  p.add_argument("--repeats", type=int, default=1,
                 help="measure every row this many times (each repeat with its rows in a "
                 "rotated order); the ratios then get 95%% confidence intervals")
  p.add_argument("--no-isolate", dest="isolate", action="store_false",
                 help="run the JAX rows one after another in this process (default: each "
                 "row in a fresh process)")
  p.add_argument("--row-worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--no-cached-compile", action="store_true",
                 help="skip the second process that measures the 'compile s cached' column")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--tag", default=None, help="output file stem (default round_speed[_quick])")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  p.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.quick:
    args.size, args.base, args.depth, args.samples = 32, 8, 3, 8
  args.ks = args.ks or ([1, 2, 4] if args.quick else [1, 2, 4, 8, 16, 32])
  if args.repeats < 1:
    p.error(f"--repeats={args.repeats}: expected 1 or more")
  if args.compile_worker:
    compile_worker(args, args.compile_worker)
    return
  args.torch_version = None
  args.torch_ok = importlib.util.find_spec("torch") is not None
  if not args.torch_ok and any(s in TORCH_STRATEGIES for s in args.strategies):
    print("[round_speed] torch is not importable: the PyTorch per-client loop rows are skipped "
          "(pip install -e '.[bench]' or pip install torch)", flush=True)
  machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{jax.device_count()} {jax.default_backend()} device(s) "
             f"({jax.devices()[0].device_kind}), jax {jax.__version__}, "
             f"threads {THREADS or 'all'}, "
             f"{'malloc tuned' if MALLOC else 'malloc defaults'} (both sides), "
             f"load at start {_load()}")
  args.peak_n = args.peak_n or (2048 if jax.default_backend() == "cpu" else 8192)
  peak = matmul_peak(args.peak_n)
  print(f"[round_speed] {machine}\n[round_speed] f32 matmul peak {peak:.1f} GFLOP/s\n"
        f"[round_speed] U-Net base {args.base} depth {args.depth}, {args.size}×{args.size}, "
        f"batch {args.batch}, E={args.local_steps}, dtype {args.dtype}", flush=True)
  cache_root = tempfile.mkdtemp(prefix="round_speed_cache_")
  try:
    rows = []
    for k in args.ks:
      reps = [bench(k, args, peak, cache_root, _rotated(args.strategies, rep), rep)
              for rep in range(args.repeats)]
      rows.append(merge_repeats(reps, args, peak))
    if not args.no_cached_compile:
      cached_compiles(rows, cache_root)
  finally:
    compile_cache.enable("")
    shutil.rmtree(cache_root, ignore_errors=True)
  _speedups(rows)
  md = markdown(rows, args, machine + f", load at end {_load()}", peak)
  print("\n" + md)
  _runs.write_results(args.out, args.tag or ("round_speed_quick" if args.quick else "round_speed"), md,
                      {"machine": machine, "matmul_peak_gflops": peak, "torch": args.torch_version,
                       "args": vars(args), "rows": rows})


if __name__ == "__main__":
  if TORCH_WORKER is not None:
    torch_worker(json.loads(TORCH_WORKER))
  elif ROW_WORKER is not None:
    row_worker(json.loads(ROW_WORKER))
  else:
    main()
