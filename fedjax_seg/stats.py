"""Paired comparisons of methods over (seed, patient) pairs (pure NumPy / SciPy).

The data of one method is ``{seed: {patient id: value}}``: a per-patient
metric (results.json ``per_patient``, `fedjax_seg.evaluation`) of each
training seed's run. Two methods are paired by seed and, within a seed, by
patient id; the paired differences ``d[s][p] = B[s][p] - A[s][p]`` (A = the
reference) are summarised by `paired_comparison`:

* ``mean_diff``: the mean over seeds of each seed's mean difference over its
  patients (the grand mean of all pairs when every seed has the same
  patients);
* a percentile bootstrap CI from `hierarchical_bootstrap`: seeds are the
  outer resampling unit (drawn with replacement), patients are resampled
  with replacement within each drawn seed, and each replicate is the same
  statistic as ``mean_diff`` (mean of the drawn seeds' resampled means).
  Both sources of variation -- which training seed, which test patients --
  are in the interval. The RNG is ``np.random.default_rng(rng_seed)``; the
  outer draws (``[n_boot, S]`` seed indices) are taken first, so with a
  single patient per seed it is exactly `seed_bootstrap`;
* ``se``: the standard deviation (ddof = 1) of the bootstrap replicates;
  ``mdd`` = ``MDD_FACTOR * se`` = (z_0.975 + z_0.80) * se = 2.80 * se, the
  smallest true difference this design (these seeds and patients) detects
  with 80 % power in a two-sided test at alpha = 0.05 (normal approximation);
* ``p_wilcoxon``: `scipy.stats.wilcoxon` (two-sided, zero differences
  dropped, the 'wilcox' method) over all paired (seed, patient)
  differences; 1.0 when every difference is zero. It treats the pairs as
  independent, which they are not (the same patient recurs across seeds),
  so it is optimistic next to the hierarchical CI: read the CI first;
* wins / ties / losses of B over A over the pairs (``|d| <= TIE_TOL`` is a
  tie; for HD95-like metrics, lower is better, see `lower_is_better`);
* ``verdict``: 'no difference detected' when the CI covers 0.

`compare` runs this for every method against one reference and adds
Holm-corrected p-values (`holm`) over those comparisons.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Sequence

import numpy as np

# Defaults of `python -m fedjax_seg.report compare` (its --n-boot / --rng-seed / --ci).
DEFAULT_N_BOOT = 10_000
DEFAULT_RNG_SEED = 0
DEFAULT_CI_LEVEL = 0.95
# (z_{1 - 0.05/2} + z_{0.80}) = 1.960 + 0.842: 80 % power, two-sided alpha = 0.05.
MDD_FACTOR = 2.8
# |B - A| at or below this counts as a tie (float noise of identical predictions).
TIE_TOL = 1e-9
# Below this many common seeds the table warns that the seed-level resampling is coarse.
FEW_SEEDS = 5
_CHUNK = 2_000  # bootstrap replicates per vectorised block (bounds memory)

MethodData = Mapping[object, Mapping[str, float]]  # {seed: {patient id: value}}


def lower_is_better(metric: str) -> bool:
  """True for distance metrics (any name containing 'hd95'); Dice / IoU: higher is better."""
  return "hd95" in metric


def seed_bootstrap(values: Sequence[float], n_boot: int, rng_seed: int) -> np.ndarray:
  """Plain bootstrap of the mean of ``values`` (float [S]): float64 [n_boot] replicates.

  Replicate b is ``mean(values[idx[b]])`` with ``idx = rng.integers(0, S, (n_boot, S))``.
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or not len(v):
    raise ValueError(f"seed_bootstrap needs a non-empty 1-D array, got shape {v.shape}")
  rng = np.random.default_rng(rng_seed)
  idx = rng.integers(0, len(v), size=(n_boot, len(v)))
  return v[idx].mean(axis=1)


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], n_boot: int, rng_seed: int) -> np.ndarray:
  """Two-level bootstrap of the mean of group means: float64 [n_boot] replicates.

  Args:
    groups: one float array per seed (its patients' paired differences), S >= 1
      groups, each non-empty; sizes may differ.
    n_boot: number of replicates.
    rng_seed: seed of ``np.random.default_rng``.
  Replicate b: draw S seeds with replacement (``rng.integers(0, S, (n_boot, S))``,
  drawn first, all replicates at once), then for every drawn seed s draw
  ``n_s`` of its patients with replacement; the replicate is the mean over
  the S drawn seeds of their resampled patient means.
  """
  gs = [np.asarray(g, np.float64) for g in groups]
  if not gs or any(g.ndim != 1 or not len(g) for g in gs):
    raise ValueError("hierarchical_bootstrap needs >= 1 group, each a non-empty 1-D array")
  s = len(gs)
  rng = np.random.default_rng(rng_seed)
  outer = rng.integers(0, s, size=(n_boot, s))
  out = np.empty(n_boot, np.float64)
  for b0 in range(0, n_boot, _CHUNK):
    block = outer[b0:b0 + _CHUNK]                      # [nb, S] seed indices
    slot_means = np.empty(block.shape, np.float64)
    for k, g in enumerate(gs):
      where = np.nonzero(block == k)
      if not len(where[0]):
        continue
      draw = rng.integers(0, len(g), size=(len(where[0]), len(g)))
      slot_means[where] = g[draw].mean(axis=1)
    out[b0:b0 + len(block)] = slot_means.mean(axis=1)
  return out


def wilcoxon_p(diffs: Sequence[float]) -> float:
  """Two-sided Wilcoxon signed-rank p over paired differences; 1.0 if all are zero (or none)."""
  d = np.asarray(diffs, np.float64)
  if not len(d) or np.all(np.abs(d) <= TIE_TOL):
    return 1.0
  from scipy import stats as sps
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # small-sample / ties notes
    p = float(sps.wilcoxon(np.where(np.abs(d) <= TIE_TOL, 0.0, d), zero_method="wilcox").pvalue)
  return 1.0 if math.isnan(p) else p


def holm(pvalues: Sequence[float]) -> List[float]:
  """Holm step-down adjusted p-values (same order as given).

  Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
  """
  p = np.asarray(pvalues, np.float64)
  m = len(p)
  order = np.argsort(p, kind="stable")
  adj = np.empty(m, np.float64)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adj[i] = running
  return [float(x) for x in adj]


def wins_ties_losses(diffs: Sequence[float], lower_better: bool) -> Dict[str, int]:
  """Counts of pairs where B beats / ties / loses to A (``diffs`` = B - A)."""
  d = np.asarray(diffs, np.float64)
  better = d < -TIE_TOL if lower_better else d > TIE_TOL
  tie = np.abs(d) <= TIE_TOL
  return {"wins": int(better.sum()), "ties": int(tie.sum()), "losses": int((~better & ~tie).sum())}


def pair(a: MethodData, b: MethodData) -> Dict:
  """Pairs two methods by seed, then by patient id within each seed.

  Returns {'seeds': [common seeds, sorted], 'a' / 'b': [float array per seed]
  (patients in sorted id order), 'patients': [list of ids per seed],
  'seeds_only_a' / 'seeds_only_b', 'unpaired_patients': count of patients of
  common seeds present in only one method}. Seeds whose patients do not
  overlap at all are dropped (listed in 'seeds_without_common_patients').
  """
  common = sorted(set(a) & set(b), key=_seed_order)
  out = {"seeds": [], "a": [], "b": [], "patients": [],
         "seeds_only_a": sorted(set(a) - set(b), key=_seed_order),
         "seeds_only_b": sorted(set(b) - set(a), key=_seed_order),
         "seeds_without_common_patients": [], "unpaired_patients": 0}
  for s in common:
    ids = sorted(set(a[s]) & set(b[s]))
    out["unpaired_patients"] += len(set(a[s]) ^ set(b[s]))
    if not ids:
      out["seeds_without_common_patients"].append(s)
      continue
    out["seeds"].append(s)
    out["patients"].append(ids)
    out["a"].append(np.array([a[s][i] for i in ids], np.float64))
    out["b"].append(np.array([b[s][i] for i in ids], np.float64))
  return out


def _seed_order(s):
  return (0, s, "") if isinstance(s, (int, float)) else (1, 0, str(s))


def paired_comparison(a: MethodData, b: MethodData, metric: str, n_boot: int, rng_seed: int,
                      ci_level: float) -> Dict:
  """B against reference A on paired (seed, patient) values; see the module docstring.

  Raises ValueError when no seed has patients in common.
  """
  pr = pair(a, b)
  if not pr["seeds"]:
    raise ValueError("no (seed, patient) pairs in common")
  diffs = [pb - pa for pa, pb in zip(pr["a"], pr["b"])]
  flat = np.concatenate(diffs)
  boot = hierarchical_bootstrap(diffs, n_boot, rng_seed)
  alpha = 1.0 - ci_level
  lo, hi = (float(x) for x in np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)]))
  se = float(np.std(boot, ddof=1)) if n_boot > 1 else 0.0
  mean_diff = float(np.mean([d.mean() for d in diffs]))
  lower_better = lower_is_better(metric)
  covers = lo <= 0.0 <= hi
  if covers:
    verdict = "no difference detected"
  else:
    verdict = "better" if (mean_diff < 0) == lower_better else "worse"
  sizes = [len(d) for d in diffs]
  return {
      "metric": metric, "lower_is_better": lower_better,
      "seeds": [s for s in pr["seeds"]], "n_seeds": len(pr["seeds"]),
      "patients_per_seed": sizes, "n_pairs": int(sum(sizes)),
      "n_patients": len(set().union(*map(set, pr["patients"]))),
      "seeds_only_reference": pr["seeds_only_a"], "seeds_only_method": pr["seeds_only_b"],
      "seeds_without_common_patients": pr["seeds_without_common_patients"],
      "unpaired_patients": pr["unpaired_patients"],
      "mean_reference": float(np.mean([x.mean() for x in pr["a"]])),
      "mean_method": float(np.mean([x.mean() for x in pr["b"]])),
      "mean_diff": mean_diff, "ci": [lo, hi], "ci_level": ci_level, "se": se,
      "mdd": MDD_FACTOR * se, "p_wilcoxon": wilcoxon_p(flat),
      **wins_ties_losses(flat, lower_better),
      "ci_covers_zero": covers, "verdict": verdict,
  }


def compare(methods: Mapping[str, MethodData], reference: str, metric: str, n_boot: int,
            rng_seed: int, ci_level: float) -> Dict:
  """Every method of ``methods`` (in order) against ``reference``, Holm over their Wilcoxon p.

  Returns {'reference', 'metric', 'lower_is_better', 'n_boot', 'rng_seed',
  'ci_level', 'mdd_factor', 'tie_tol', 'comparisons': [{'method': name,
  **paired_comparison, 'p_holm'}]}. Each comparison's bootstrap uses the same
  ``rng_seed``.
  """
  if reference not in methods:
    raise ValueError(f"reference {reference!r} not among the methods {list(methods)}")
  comps = []
  for name, data in methods.items():
    if name == reference:
      continue
    try:
      c = paired_comparison(methods[reference], data, metric, n_boot, rng_seed, ci_level)
    except ValueError as e:
      raise ValueError(f"{name} vs {reference}: {e}") from None
    comps.append({"method": name, **c})
  if not comps:
    raise ValueError("nothing to compare: give at least one method besides the reference")
  for c, p in zip(comps, holm([c["p_wilcoxon"] for c in comps])):
    c["p_holm"] = p
  return {"reference": reference, "metric": metric, "lower_is_better": lower_is_better(metric),
          "n_boot": n_boot, "rng_seed": rng_seed, "ci_level": ci_level, "mdd_factor": MDD_FACTOR,
          "tie_tol": TIE_TOL, "comparisons": comps}


def _p(p: float) -> str:
  return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def _sizes(sizes: Sequence[int]) -> str:
  return str(sizes[0]) if len(set(sizes)) == 1 else f"{min(sizes)}–{max(sizes)}"


def markdown(result: Dict) -> str:
  """The comparison table (Markdown) of a `compare` result, with its reading notes."""
  ref, metric = result["reference"], result["metric"]
  pct = f"{100 * result['ci_level']:g}%"
  head = ["method", "seeds", "patients / seed", "pairs", f"mean {ref}", "mean method",
          f"diff (method − {ref})", f"{pct} CI", "MDD", "Wilcoxon p", "Holm p", "W / T / L", "verdict"]
  lines = [f"Paired comparison against `{ref}` on `{metric}` "
           f"({'lower' if result['lower_is_better'] else 'higher'} is better).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  notes = []
  for c in result["comparisons"]:
    verdict = c["verdict"] if c["verdict"] == "no difference detected" else \
        f"{c['method']} {c['verdict']}"
    cells = [c["method"], str(c["n_seeds"]), _sizes(c["patients_per_seed"]), str(c["n_pairs"]),
             f"{c['mean_reference']:.4f}", f"{c['mean_method']:.4f}", f"{c['mean_diff']:+.4f}",
             f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}]", f"{c['mdd']:.4f}", _p(c["p_wilcoxon"]),
             _p(c["p_holm"]), f"{c['wins']} / {c['ties']} / {c['losses']}", verdict]
    lines.append("| " + " | ".join(cells) + " |")
    if c["n_seeds"] == 1:
      notes.append(f"`{c['method']}`: a single common seed: the CI covers patient sampling only, "
                   "not the variation between training seeds.")
    elif c["n_seeds"] < FEW_SEEDS:
      notes.append(f"`{c['method']}`: only {c['n_seeds']} common seeds: resampling so few seeds is "
                   "coarse and the CI likely too narrow; add seeds before trusting a difference.")
    dropped = c["seeds_only_reference"] + c["seeds_only_method"] + c["seeds_without_common_patients"]
    if dropped:
      notes.append(f"`{c['method']}`: seeds left unpaired: {', '.join(map(str, dropped))}.")
    if c["unpaired_patients"]:
      notes.append(f"`{c['method']}`: {c['unpaired_patients']} patient(s) present in one method only, left out.")
  lines += ["", f"CI: hierarchical percentile bootstrap, {result['n_boot']:,} resamples (rng seed "
            f"{result['rng_seed']}), seeds resampled, then patients within each seed. MDD = "
            f"{result['mdd_factor']} × bootstrap SE: the smallest difference this design detects with "
            "80% power at α = 0.05. Wilcoxon signed-rank over all (seed, patient) pairs (treated as "
            "independent, so optimistic); Holm over the methods compared with the reference. W / T / L: "
            f"pairs where the method beats / ties (|diff| ≤ {result['tie_tol']:g}) / loses to the reference."]
  if notes:
    lines += [""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n"
