"""The 'loop' round (algorithm.LoopedRound): one compiled client program called per
client between a broadcast program and an aggregation program, and the CPU 'auto'
policy that picks it above backends.AUTO_UNROLL_MAX client-steps per round.

The round-level equalities (supervised DCEW+prox, FedWeP, CPS, Mean Teacher, FedWeP-Real
label-at-server, FCL with its exchange switch) are in tests/test_backends.py (recorded
numbers); per-client state, FedBN/SiloBN, SCAFFOLD, Ditto and client sampling against
NumPy in tests/test_algorithm.py, tests/test_fedbn_scaffold_ditto.py, tests/test_sampling.py.
"""
import json

import chex
import numpy as np
import pytest

from fedjax_seg import runlog, train
from fedjax_seg.fl import backends


def test_auto_loops_with_host_threads_or_above_the_unroll_budget_on_cpu_only():
  top = backends.AUTO_UNROLL_MAX

  def rs(strategy, k, e, platform, threads):
    return backends.round_strategy(strategy, k, e, platform, host_threads_setting=threads)
  # one host thread: unrolled (one program) up to the budget, then the loop round
  assert rs("auto", top, 1, "cpu", 1) == "auto"
  assert rs("auto", 1, top, "cpu", 1) == "auto"
  assert rs("auto", top, 2, "cpu", 1) == "loop"
  # host threads: the loop round for 2 clients or more; one client stays one program
  assert rs("auto", 2, 1, "cpu", 2) == "loop"
  assert rs("auto", 1, top, "cpu", 2) == "auto"
  assert rs("auto", 1, top + 1, "cpu", 2) == "loop"
  auto_threads = backends.host_threads(0, "loop", "cpu")
  assert rs("auto", 2, 1, "cpu", 0) == ("loop" if auto_threads > 1 else "auto")
  assert rs("auto", 8, 8, "gpu", 0) == "auto"                         # vmap on accelerators
  assert rs("auto", 8, 1, "gpu", 2) == "auto"
  assert rs("unrolled", 8, 8, "cpu", 0) == "unrolled"                  # an explicit choice stays
  assert rs("loop", 1, 1, "gpu", 0) == "loop"
  with pytest.raises(ValueError, match="config.fl.client_strategy='bad'"):
    rs("bad", 1, 1, "cpu", 0)


def test_clients_per_call_auto_keeps_a_call_within_the_unroll_budget():
  top = backends.AUTO_UNROLL_MAX
  assert backends.clients_per_call(0, 32, 1) == top            # auto: 8 // 1
  assert backends.clients_per_call(0, 32, 3) == top // 3       # 8 // 3 = 2
  assert backends.clients_per_call(0, 32, top + 1) == 1        # one client at least
  assert backends.clients_per_call(0, 3, 1) == 3               # never more than the clients
  assert backends.clients_per_call(5, 32, 10) == 5             # an explicit value stays
  assert backends.clients_per_call(5, 2, 10) == 2
  with pytest.raises(ValueError, match="config.fl.clients_per_call=-1"):
    backends.clients_per_call(-1, 4, 1)


def test_loop_is_a_round_strategy_not_a_per_client_backend():
  with pytest.raises(ValueError, match="runs a whole round"):
    backends.for_each_client(lambda b, c, k: c, "loop")


def _rows(d):
  return [json.loads(l) for l in open(d / "metrics.jsonl")]


def _same_run(a, b, keys):
  ra, rb = _rows(a), _rows(b)
  assert len(ra) == len(rb)
  for x, y in zip(ra, rb):
    for key in keys:
      if key in x:
        np.testing.assert_allclose(x[key], y[key], rtol=1e-4, atol=1e-6)
  ca, cb = runlog.Checkpointer(str(a)), runlog.Checkpointer(str(b))
  sa, sb = ca.manager.restore(ca.manager.latest_step()), cb.manager.restore(cb.manager.latest_step())
  ca.close(); cb.close()
  chex.assert_trees_all_close(sa, sb, rtol=1e-4, atol=1e-5)


def test_federated_trainer_auto_loop_equals_the_one_program_round(tiny, tmp_path, capsys):
  """DCEW, K = 3 by site × 3 local steps = 9 > AUTO_UNROLL_MAX client-steps: 'auto' runs the
  loop round with host-called steps and, on a CPU with 2 cores or more, one client per call
  issued from 2 host threads (said in the progress line, its programs timed in
  results.json); with one host thread the clients per call come from the step's size.
  Both give the metrics and the final model of the one-program round."""
  from conftest import tiny_federated
  # unrolled clients, scanned steps (a fast compile; the loop's client program scans too)
  c = tiny_federated(tiny, "dcew", local_steps=3, client_strategy="unrolled")
  train.run(c, str(tmp_path / "one"))
  c.fl.client_strategy = c.fl.step_strategy = "auto"
  assert c.fl.host_threads == 0  # auto
  capsys.readouterr()
  r = train.run(c, str(tmp_path / "loop"))
  out = capsys.readouterr().out
  threads = backends.host_threads(0, "loop")
  if threads > 1:
    assert ("client strategy loop (1 client per call, 3 calls, each local step a program "
            f"call, calls issued from {threads} host threads, auto: 3 clients x 3 steps > 8), "
            "step strategy host (auto: loop round, E > 1)") in out, out
    assert {"round_begin", "round_stage0", "round_step0", "round_stage1",
            "round_post"} <= set(r["compile_s"]), r["compile_s"]
    _same_run(tmp_path / "one", tmp_path / "loop", ("weights", "train_loss", "val_loss"))
  # one host thread: clients per call from the step's size (this tiny U-Net's step: 926
  # operations, 2 fit in 2,500, 1 divides K = 3 and is at least half of 2)
  c.fl.host_threads = 1
  r = train.run(c, str(tmp_path / "loop1"))
  out = capsys.readouterr().out
  assert ("client strategy loop (clients per call chosen from the local step's size, each "
          "local step a program call, auto: 3 clients x 3 steps > 8), step strategy host "
          "(auto: loop round, E > 1)") in out, out
  assert ("a local step of 926 operations; 1 client per call (at most 2,500 operations per "
          "call)") in out, out
  # the trace that sized the calls is compile time too
  assert {"round_begin", "round_host_probe", "round_stage0", "round_step0", "round_stage1",
          "round_post"} <= set(r["compile_s"]), r["compile_s"]
  # and the trace + lower part of each, recorded on its own (the probe is all trace)
  assert set(r["trace_s"]) == set(r["compile_s"]), r["trace_s"]
  assert r["trace_s"]["round_host_probe"] == r["compile_s"]["round_host_probe"]
  assert all(0 <= r["trace_s"][k] <= r["compile_s"][k] for k in r["trace_s"]), r["trace_s"]
  _same_run(tmp_path / "one", tmp_path / "loop1", ("weights", "train_loss", "val_loss"))


def test_federated_trainer_host_steps_equal_the_one_program_round(tiny, tmp_path, capsys):
  """fl.step_strategy='host' with fl.clients_per_call=2 under the loop round: K = 3
  clients as a call of 2 and a remainder call of 1, each of the 3 local steps a call of the
  one-step program; same metrics and final model as the one-program round."""
  from conftest import tiny_federated
  c = tiny_federated(tiny, "dcew", local_steps=3, client_strategy="unrolled")
  train.run(c, str(tmp_path / "one"))
  c.fl.client_strategy, c.fl.step_strategy, c.fl.clients_per_call = "loop", "host", 2
  capsys.readouterr()
  r = train.run(c, str(tmp_path / "host"))
  threads = backends.host_threads(0, "loop")  # auto
  assert ("client strategy loop (2 clients per call, 2 calls, each local step a program call"
          + (f", calls issued from {threads} host threads" if threads > 1 else "")
          + "), step strategy host") in capsys.readouterr().out
  assert {"round_begin", "round_stage0x2", "round_step0x2", "round_stage1x2", "round_stage0",
          "round_step0", "round_stage1", "round_post"} <= set(r["compile_s"]), r["compile_s"]
  _same_run(tmp_path / "one", tmp_path / "host", ("weights", "train_loss", "val_loss"))


def test_semi_trainer_loop_equals_the_one_program_round(tiny, tmp_path, capsys):
  """FedWeP label-at-client through its trainer with client_strategy 'loop' (the
  divergence guard on: post sees every upload at once; the seed search, unrolled on a CPU,
  in the one program there and as per-seed calls here)."""
  from test_semi import _semi_tiny
  c = _semi_tiny(tiny, "fedwep", rounds=2)
  c.fl.local_steps = 2
  c.fl.client_strategy = "unrolled"  # scanned steps (_semi_tiny), as the loop's client program
  train.run(c, str(tmp_path / "one"))
  c.fl.client_strategy = "loop"
  # fl.clients_per_call 0: 8 // 2 = 4, at most K per call, from one host thread; from 2 host
  # threads one client per call
  capsys.readouterr()
  r = train.run(c, str(tmp_path / "loop"))
  assert any(n.startswith("semi_round_client") for n in r["compile_s"]), r["compile_s"]
  assert {"semi_round_begin", "semi_round_begin_step0", "semi_round_begin_stage1"} <= set(
      r["compile_s"]), r["compile_s"]
  assert (f"; seed search: {c.semi.fedwep.num_seeds} perturbed models, unrolled (auto)"
          in capsys.readouterr().out)
  _same_run(tmp_path / "one", tmp_path / "loop", ("weights", "client_train_loss"))


def test_debug_round_runs_eagerly_through_the_trainer(tiny, tmp_path):
  """client_strategy 'debug': the trainer runs the round un-jitted (no round program is
  compiled), with the same result as the one-program round."""
  from conftest import tiny_federated
  c = tiny_federated(tiny, "fedavg", rounds=1, client_strategy="unrolled")
  train.run(c, str(tmp_path / "one"))
  c.fl.client_strategy = "debug"
  r = train.run(c, str(tmp_path / "debug"))
  assert not any(k.startswith("round") for k in r["compile_s"]), r["compile_s"]
  _same_run(tmp_path / "one", tmp_path / "debug", ("weights", "train_loss", "val_loss"))


def test_host_steps_run_resumes_to_the_uninterrupted_result(tiny, tmp_path):
  """An interrupted host-step run (auto: loop round, E > 1) resumes from its checkpoint and
  ends where the uninterrupted run ends (the clients per call are chosen the same way)."""
  from conftest import tiny_federated
  c = tiny_federated(tiny, "dcew", rounds=3, local_steps=3, client_strategy="auto",
                     step_strategy="auto")
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.run(c, full)
  with pytest.raises(train.Interrupted):
    train.run(c, cut, stop_after=2)
  train.run(c, cut)
  assert [r["round"] for r in _rows(tmp_path / "cut")] == [0, 1, 2, 3]
  a, b = runlog.Checkpointer(full), runlog.Checkpointer(cut)
  sa, sb = a.manager.restore(3), b.manager.restore(3)
  a.close(); b.close()
  chex.assert_trees_all_close(sa, sb, rtol=1e-6)
  assert _rows(tmp_path / "full")[-1]["train_loss"] == pytest.approx(
      _rows(tmp_path / "cut")[-1]["train_loss"], rel=1e-6)
