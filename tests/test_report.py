"""fedjax_seg.report: tables equal results.json, mean ± std over seeds, federated plots."""
import json
import os

import numpy as np
import pytest

from fedjax_seg import report, train


@pytest.fixture(scope="module")
def two_runs(data_cache, tmp_path_factory):
  """Two tiny centralised runs that differ only in their seed."""
  from conftest import tiny_config
  base = tmp_path_factory.mktemp("two_runs")
  out = []
  for seed in (0, 1):
    c = tiny_config(data_cache)
    c.num_epochs = 1
    c.seed = seed
    wd = str(base / f"seed{seed}")
    train.run(c, wd)
    out.append(wd)
  return out


def _table(text, heading):
  """Rows of the first Markdown table after ``heading``: list of cell lists (header first)."""
  lines = text.splitlines()
  i = lines.index(heading)
  rows = []
  for line in lines[i + 1:]:
    if line.startswith("|"):
      rows.append([c.strip() for c in line.strip("|").split("|")])
    elif rows:
      break
  return rows[0], rows[2:]


def test_table_numbers_equal_results_json(two_runs, tmp_path):
  out = str(tmp_path / "rep" / "report.md")
  text = report.write_report(two_runs, out)
  assert open(out).read() == text
  results = [json.load(open(os.path.join(wd, "results.json"))) for wd in two_runs]
  for split in ("test", "val"):
    head, rows = _table(text, f"## Results: {split} split")
    assert [r[0] for r in rows] == ["seed0", "seed1"]
    col = {h: i for i, h in enumerate(head)}
    for seed, (row, res) in enumerate(zip(rows, results)):
      m = res["metrics"][split]
      assert row[col["seed"]] == str(seed)
      assert row[col["Dice (fg mean)"]] == f"{m['dice_mean']:.4f}"
      assert row[col["IoU (fg mean)"]] == f"{m['iou_mean']:.4f}"
      assert row[col["Dice tumour"]] == f"{m['dice/tumour']:.4f}"
      assert row[col["pixel acc. (incl. bg)"]] == f"{m['pixel_accuracy']:.4f}"
      assert row[col["precision"]] == f"{m['precision_mean']:.4f}"
    # the two runs share their config apart from the seed: one mean ± std row
    head, rows = _table(text, f"### Mean ± std over seeds ({split})")
    assert len(rows) == 1 and rows[0][1] == "2" and rows[0][2] == "0,1"
    col = {h: i for i, h in enumerate(head)}
    for title, key in (("Dice (fg mean)", "dice_mean"), ("pixel acc. (incl. bg)", "pixel_accuracy")):
      vals = [r["metrics"][split][key] for r in results]
      assert rows[0][col[title]] == f"{np.mean(vals):.4f} ± {np.std(vals, ddof=1):.4f}"
  files = tmp_path / "rep" / "report_files"
  assert (files / "learning_curves.png").is_file()
  assert "](report_files/learning_curves.png)" in text
  assert "seed0/overlays.png" in text  # sample overlays linked from the runs
  assert "Per-client" not in text  # no federated run


def _synthetic_federated(wd, algorithm, weights):
  """A finished federated run's files (as fl/train.py writes them), without training."""
  os.makedirs(wd)
  json.dump({"algorithm": algorithm, "seed": 0, "model": {"name": "unet"},
             "fl": {"rounds": len(weights)}}, open(os.path.join(wd, "config.json"), "w"))
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"round": 0, "val_dice_mean": 0.1, "client_val_dice": [0.1, 0.2]}) + "\n")
    for t, w in enumerate(weights, start=1):
      f.write(json.dumps({"round": t, "val_dice_mean": 0.1 * t, "train_loss": 1.0 / t, "weights": w,
                          "client_val_dice": [0.1 * t, None]}) + "\n")
  m = {"dice_mean": 0.5, "iou_mean": 0.4, "dice/background": 0.99, "dice/tumour": 0.5,
       "pixel_accuracy": 0.98, "background_in_means": False}
  json.dump({"algorithm": algorithm, "metrics": {"test": m, "val": m}, "class_names": ["background", "tumour"],
             "clients": ["CS", "DU"], "rounds": len(weights), "bytes_per_round": 2_000_000,
             "region_metrics": {"test": {"dice/ET": 0.3, "dice/WT": 0.9, "hd95/WT": 1.25}}},
            open(os.path.join(wd, "results.json"), "w"))


def test_federated_sections(tmp_path):
  _synthetic_federated(str(tmp_path / "runs" / "fedavg"), "fedavg", [[0.5, 0.5]] * 3)
  _synthetic_federated(str(tmp_path / "runs" / "dcew"), "dcew", [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
  os.makedirs(tmp_path / "runs" / "running")
  json.dump({"algorithm": "dcew", "seed": 1}, open(tmp_path / "runs" / "running" / "config.json", "w"))
  out = tmp_path / "r.md"
  text = report.write_report([str(tmp_path / "runs")], str(out))  # a folder of runs (sweep root)
  assert "## Per-client validation Dice" in text and "## Aggregation weights over rounds" in text
  for name in ("learning_curves.png", "client_val_dice.png", "aggregation_weights.png"):
    assert (tmp_path / "r_files" / name).is_file()
  head, rows = _table(text, "`dcew` (dcew): mean weight per client over rounds")
  assert rows[0] == ["CS", "0.7000", "0.6000", "0.8000"]
  assert "Unfinished" in text and "`running`" in text
  head, rows = _table(text, "## Results: test split")
  assert {r[0] for r in rows} == {"fedavg", "dcew"}
  assert rows[0][head.index("MB / round")] == "2.000"
  assert head.index("WT Dice (region)") < head.index("ET Dice (region)") < head.index("WT HD95 (mm)")
  assert rows[0][head.index("WT Dice (region)")] == "0.9000" and rows[0][head.index("WT HD95 (mm)")] == "1.25"


def test_cli(two_runs, tmp_path, capsys):
  out = str(tmp_path / "cli.md")
  assert report.main([*two_runs, "--out", out]) == 0
  assert "python -m fedjax_seg.report" in open(out).read()
  assert report.main([str(tmp_path / "nothing"), "--out", out]) == 2
  assert capsys.readouterr().err.startswith("error: ")
