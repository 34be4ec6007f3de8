"""The one experiment loop shared by every run kind, and what every run writes.

    state, rows = run_loop(workdir, Run(...), stop_after)

A :class:`Run` is what differs between centralised training, the federated
algorithms and FCL pre-training: the initial (checkpointed) state, one step
(a round, or an epoch), the metrics row of a step and its progress line. The loop
is the same for all:

  * restore the latest orbax checkpoint of ``workdir/checkpoints`` (exact resume:
    keys and data order are pure functions of (config.seed, step), never of history),
  * evaluate step 0 (federated runs: the initial global model, so curves start at
    the same point for every algorithm),
  * for every remaining step: ``state, info = step(state, t)``, a metrics row appended
    to ``metrics.jsonl``/``metrics.csv`` (TensorBoard too), a checkpoint, a progress
    line with ETA; ``stop_after`` (test hook) raises :class:`Interrupted`. A row with a
    validation Dice (``val_dice_mean``) that beats the best so far also replaces the
    best checkpoint in ``workdir/checkpoints_best`` (``runlog.Checkpointer``).

:func:`finish` ends every run that trains a U-Net: val/test metrics, per-patient
records, ``results.json``, ``final_model.msgpack``, learning curves and overlays.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import numpy as np

from fedjax_seg import evaluation, runlog, steps

TABLE_KEYS = ["dice_mean", "iou_mean", "precision_mean", "sensitivity_mean",
              "specificity_mean", "pixel_accuracy", "loss"]
FINAL_MODEL = "final_model.msgpack"


class Interrupted(RuntimeError):
  """Raised by the ``stop_after`` test hook to simulate a killed run."""


@dataclasses.dataclass
class Run:
  """One run kind, for :func:`run_loop`.

  tag: prefix of printed lines ('[fl]', '[train]', ...); state: initial state (any
  pytree orbax can save); step(state, t) -> (state', info) runs step t (0-based);
  total: number of steps; done(state) -> steps completed (of a restored state);
  row(state, t, info) -> metrics row after t steps (info None for t = 0);
  describe(row) -> progress text; x_key: 'round' | 'epoch';
  log_initial: evaluate and log t = 0 before training;
  place(state) -> state: put a (restored) state where the step wants it (sharding);
  clients: site names in client order (TensorBoard tags per-client lists by site).
  """
  tag: str
  state: Any
  step: Callable[[Any, int], Tuple[Any, Any]]
  total: int
  done: Callable[[Any], int]
  row: Callable[[Any, int, Any], Dict]
  describe: Callable[[Dict], str]
  x_key: str = "round"
  log_initial: bool = True
  place: Optional[Callable[[Any], Any]] = None
  clients: Sequence[str] = ()


def run_loop(workdir: str, run: Run, stop_after: Optional[int] = None,
             verbose: bool = True) -> Tuple[Any, List[Dict]]:
  """Runs (or resumes) ``run`` in ``workdir``; returns (final state, metrics rows).

  Order per step: the metrics row of step t+1 is written (atomically) before the
  checkpoint of step t+1, so a run killed between the two resumes from step t and
  the row past the checkpoint is dropped on resume (``runlog.MetricsLog``): never a
  duplicated or a missing row. Nothing is written before the latest readable
  checkpoint has been restored (``runlog.Checkpointer.restore_latest``). A write
  that fails (a full disk) raises ``runlog.WorkdirError`` naming the file, with the
  previous checkpoint and metrics.jsonl intact.
  """
  os.makedirs(workdir, exist_ok=True)
  ckpt = runlog.Checkpointer(workdir)
  prog = None  # its bar is removed however the loop ends
  try:
    _, restored = ckpt.restore_latest(run.state)
    state, start = run.state, 0
    if restored is None:
      ckpt.reset_best()  # a fresh start drops a stale best, as MetricsLog drops old rows
    else:
      state, start = restored, int(run.done(restored))
      if start > run.total:
        raise runlog.WorkdirError(
            f"{ckpt.path}: the latest checkpoint is at {run.x_key} {start}, past the "
            f"{run.total} {run.x_key}s this config asks for; ask for at least {start}, or "
            f"re-run with --fresh to start anew")
      if verbose:
        print(f"{run.tag} resumed from checkpoint at {run.x_key} {start}", flush=True)
    if run.place is not None:
      state = run.place(state)
    else:
      # A restored state lives committed on a device, a fresh one does not: jit would
      # compile the round (and evaluation) again on resume. Commit both the same way.
      state = jax.device_put(state, jax.local_devices()[0])
    log = runlog.MetricsLog(workdir, resume_from=start if restored is not None else None,
                            key=run.x_key, clients=run.clients)
    if start == 0 and run.log_initial:
      log.append(run.row(state, 0, None))
    prog = runlog.Progress(run.total, start, what=run.x_key, bar=verbose, tag=run.tag)
    for t in range(start, run.total):
      state, info = run.step(state, t)
      row = run.row(state, t + 1, info)
      log.append(row)
      try:
        ckpt.save(t + 1, state, metrics=row)  # row[val_dice_mean]: the best checkpoint
      except Exception as e:  # noqa: BLE001 - a full disk, ...: the row of t + 1 goes too
        err = runlog.os_error(e)
        if err is None:
          raise
        try:
          log.truncate(t)
        except runlog.WorkdirError:
          pass  # best effort: a row past the checkpoint is dropped on resume anyway
        raise runlog.WorkdirError(
            f"{ckpt.path}: cannot save the checkpoint of {run.x_key} {t + 1} "
            f"({runlog.os_error_text(err)}); the checkpoint of {run.x_key} {t} and "
            f"metrics.jsonl up to it are intact: free space and re-run the same command "
            f"to resume") from e
      prog.step(t + 1, run.describe(row) if verbose else "", verbose)
      if stop_after is not None and t + 1 >= stop_after and t + 1 < run.total:
        raise Interrupted(f"stopped after {run.x_key} {t + 1} (test hook)")
    return state, log.rows
  finally:
    if prog is not None:
      prog.close()
    ckpt.close()


def save_config(config, workdir: str) -> None:
  """Writes ``workdir/config.json`` (atomically; left alone when unchanged) after
  ``runlog.check_workdir``: a path that is not a folder, a corrupt config.json or
  metrics.jsonl, or an earlier run with a different config (less
  ``runlog.RESUMABLE_KEYS``) raise ``runlog.WorkdirError`` before anything is written.
  A config.json of a workdir without training state (a run that failed before its
  first metrics row) is replaced, with a note."""
  new = json.loads(config.to_json_best_effort())
  old = runlog.check_workdir(workdir, new)
  path = os.path.join(workdir, "config.json")
  if old is not None and old != new:
    fo, fn, absent = runlog.flatten(old), runlog.flatten(new), object()
    changed = sorted(k for k in set(fo) | set(fn) if fo.get(k, absent) != fn.get(k, absent))
    print(f"[train] note: config.json in {workdir} updated ({', '.join(changed[:8])}"
          f"{' ...' if len(changed) > 8 else ''})", flush=True)
  os.makedirs(workdir, exist_ok=True)
  text = runlog.json_text(new)
  if runlog.read_bytes(path) != text.encode():
    runlog.atomic_write(path, text)


# config.fl keys that change the data or the logging of a federated run, never its compiled
# round (excluded from the round programs' compile keys: the seeds of a table share one program).
NOT_COMPILED_FL_KEYS = ("fl.partition_seed", "fl.eval_every", "fl.eval_clients",
                       "fl.host_threads")


def compile_key(config, ds, parts=None, exclude=()) -> str:
  """Everything a compiled step depends on besides its argument shapes:
  the whole config, or only the top-level ``parts`` named, less the dotted
  ``exclude`` paths (keys that change data, not the program)."""
  import json as _json
  blob = _json.loads(config.to_json_best_effort())
  if parts is not None:
    blob = {k: blob.get(k) for k in parts}
  for path in exclude:
    *head, last = path.split(".")
    node = blob
    for h in head:
      node = node.get(h) if isinstance(node, dict) else None
    if isinstance(node, dict):
      node.pop(last, None)
  return _json.dumps(blob, sort_keys=True) + str(ds.num_classes)


def num_params(variables) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def build_augment(config) -> Optional[steps.AugmentFn]:
  aug = config.augment
  if not aug.enabled:
    return None
  from fedjax_seg.data import augment
  return augment.make_augment(aug)


def save_model(workdir: str, variables) -> str:
  """Writes the evaluated U-Net's variables to ``workdir/final_model.msgpack``
  (flax serialisation; ``fedjax_seg.infer`` and the viewer load it with the run's
  config.model). Returns the file name."""
  path = os.path.join(workdir, FINAL_MODEL)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(flax.serialization.to_bytes(jax.device_get(variables)))
  os.replace(tmp, path)
  return FINAL_MODEL


def finish(config, workdir, fns, variables, ds, eval_batch, rows, extra: Dict,
           x_key: str = "epoch", personal: Optional[Dict] = None) -> Dict:
  """Final evaluation on val and test, results.json, plots, printed table.

  variables: the U-Net the tables evaluate (semi-supervised: ``SemiHParams.eval_model``;
  FCL: the fine-tuned U-Net), also written as ``final_model.msgpack`` for inference.
  personal: per-client models (FedBN, Ditto): {'models': [K variables],
  'model_of_patient': {patient id: k} (a patient not in it is segmented by
  ``variables``), 'rule': text, 'primary': bool}. results.json then holds
  ``personalised`` {metrics, per_patient, per_site, rule}; with primary (FedBN, whose
  clients' models *are* the method) those are also the headline ``metrics`` /
  ``per_patient`` / ``per_site`` and the single-model numbers move to ``global``.
  Every run gets ``per_site`` (per-site Dice, worst site, spread) from its per-patient
  records.
  """
  split_metrics = {}
  for name in ("val", "test"):
    x, y = ds.split(name)
    if len(x):
      split_metrics[name] = steps.evaluate(eval_batch, variables, x, y,
                                           config.eval_batch_size, ds.class_names)
  # Per-patient Dice / IoU / HD95 of every val and test patient (for paired comparisons,
  # `python -m fedjax_seg.report compare`): one jitted predict, fixed-size padded batches.
  predict_fn = evaluation.make_predict(fns)
  preds = {name: evaluation.predict_patients(predict_fn, variables, ds, ds.splits.get(name, []),
                                             config.eval_batch_size) for name in ("val", "test")}
  per_patient = evaluation.per_patient_report(ds, preds)
  per_site = {n: evaluation.per_site_summary(per_patient.get(n, [])) for n in ("val", "test")}
  personalised = None
  if personal is not None:
    p_preds = {n: evaluation.predict_by_model(
        predict_fn, personal["models"], personal["model_of_patient"], variables, ds,
        ds.splits.get(n, []), config.eval_batch_size) for n in ("val", "test")}
    p_patients = evaluation.per_patient_report(ds, p_preds)
    personalised = {"metrics": {n: evaluation.metrics_from_preds(ds, p_preds[n])
                                for n in ("val", "test") if p_preds[n]},
                    "per_patient": p_patients, "rule": personal["rule"],
                    "per_site": {n: evaluation.per_site_summary(p_patients.get(n, []))
                                 for n in ("val", "test")}}
  # Region Dice / HD95 (mm) / seed 001 table for layouts with voxel spacing (BraTS, ACDC).
  report = evaluation.dataset_report(config, fns, variables, ds, eval_batch, split_metrics,
                                     predict_fn=predict_fn, preds=preds)
  results = {"algorithm": config.algorithm, "metrics": split_metrics,
             "class_names": list(ds.class_names), "background_in_means": False,
             "hd95_convention": per_patient["hd95_convention"],
             **(report["results"] if report else {}), "per_patient": per_patient,
             "per_site": per_site, **extra}
  if personalised is not None:
    results["personalised"] = personalised
    if personal.get("primary"):
      results["global"] = {"metrics": split_metrics, "per_patient": per_patient,
                           "per_site": per_site}
      results.update(metrics=personalised["metrics"], per_patient=personalised["per_patient"],
                     per_site=personalised["per_site"], evaluated="personalised")
  best = runlog.best_checkpoint(workdir)  # (step, val Dice) of checkpoints_best/, or None
  results["best_step"] = best[0] if best else None
  results["best_val_dice_mean"] = best[1] if best else None
  results["trace_s"] = runlog.trace_times(reset=True)  # the trace + lower part of compile_s
  results["compile_s"] = runlog.compile_times(reset=True)  # {program: s} of this run
  results["final_model"] = save_model(workdir, variables)
  runlog.write_json(os.path.join(workdir, "results.json"), results)
  if rows:
    runlog.plot_learning_curves(rows, os.path.join(workdir, "learning_curves.png"), x_key)
  x_te, y_te = ds.split("test")
  if len(x_te):
    p_te = np.concatenate([preds["test"][pid] for pid in ds.splits["test"]])  # x_te's order
    samples = evaluation.overlay_samples(
        x_te[:config.eval_batch_size], y_te[:config.eval_batch_size], p_te[:config.eval_batch_size])
    runlog.plot_overlays(*samples, os.path.join(workdir, "overlays.png"))
    runlog.tb_overlays(workdir, *samples, step=int(rows[-1].get(x_key, 0)) if rows else 0)
  print("\n[results] foreground means (background excluded); pixel_accuracy includes background\n"
        + runlog.metrics_table(split_metrics, TABLE_KEYS), flush=True)
  per_class = {n: {k.split("/")[1]: v for k, v in m.items() if k.startswith("dice/")}
               for n, m in split_metrics.items()}
  print("\n[results] per-class Dice\n" + runlog.metrics_table(
      per_class, list(ds.class_names)), flush=True)
  if report:
    print(report["text"], flush=True)
  if per_site.get("test"):
    print("\n" + evaluation.per_site_text(per_site["test"], "test")
          + (" [single model]" if personalised else ""), flush=True)
  if personalised is not None:
    print(f"[results] personalised ({personal['rule']}): test Dice "
          f"{personalised['metrics'].get('test', {}).get('dice_mean', float('nan')):.4f}", flush=True)
    if personalised["per_site"].get("test"):
      print(evaluation.per_site_text(personalised["per_site"]["test"], "test")
            + " [personalised]", flush=True)
  print(f"\n[results] written to {os.path.join(workdir, 'results.json')}", flush=True)
  return results


