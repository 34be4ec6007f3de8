"""Federated partitions of *patients* over K clients (SPEC §1.6).

Every split is a pure function of (patients, K, seed): the same inputs give
the same clients. Patients, never slices, are assigned, so no patient is seen
by two hospitals.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def iid(patient_ids: Sequence[str], num_clients: int, seed: int) -> List[List[str]]:
  """Patients shuffled and dealt round-robin: client sizes differ by ≤ 1."""
  _check(patient_ids, num_clients)
  ids = sorted(patient_ids)
  order = np.random.default_rng(seed).permutation(len(ids))
  clients: List[List[str]] = [[] for _ in range(num_clients)]
  for r, i in enumerate(order):
    clients[r % num_clients].append(ids[i])
  return [sorted(c) for c in clients]


def by_site(patient_ids: Sequence[str], sites: Dict[str, str], num_clients: int = 0,
            seed: int = 0) -> List[List[str]]:
  """One client per site (institution / phantom scanner / ACDC group).

  With ``num_clients`` = 0 (or = #sites) each site is one client. With fewer
  clients than sites, sites are merged (largest first onto the smallest
  client); more clients than sites is an error (it would split a site).

  Raises:
    ValueError: no patient has a known site (every site is
      `layouts.UNKNOWN_SITE` or empty, e.g. BraTS without
      ``name_mapping.csv``): one client named ``other`` is not a federation.
      The message names ``config.fl.partition`` and the alternatives.
  """
  _check_sites(patient_ids, sites)
  groups: Dict[str, List[str]] = {}
  for p in sorted(patient_ids):
    groups.setdefault(sites[p], []).append(p)
  names = sorted(groups)
  k = num_clients or len(names)
  if k > len(names):
    raise ValueError(f"partition 'by_site' with num_clients={k} but only {len(names)} sites "
                     f"({', '.join(names)}); use num_clients <= {len(names)} or 'iid'/'dirichlet'")
  if k == len(names):
    return [sorted(groups[n]) for n in names]
  clients: List[List[str]] = [[] for _ in range(k)]
  for n in sorted(names, key=lambda n: (-len(groups[n]), n)):
    j = int(np.argmin([len(c) for c in clients]))
    clients[j] += groups[n]
  return [sorted(c) for c in clients]


def _check_sites(patient_ids: Sequence[str], sites: Dict[str, str] | None) -> None:
  """Raises ValueError when ``by_site`` has no site information to split on."""
  from fedjax_seg.data.layouts import UNKNOWN_SITE  # local import: layouts pulls in io

  ids = list(patient_ids)
  known = [p for p in ids if sites and (sites.get(p) or UNKNOWN_SITE) != UNKNOWN_SITE]
  if ids and not known:
    raise ValueError(
        f"config.fl.partition='by_site' needs site ids, but none of the {len(ids)} patients has one "
        f"(every site is {UNKNOWN_SITE!r}; BraTS reads the site from TCGA_TCIA_subject_ID in "
        f"name_mapping.csv next to the patient folders, which is missing or all NA): add that file, or "
        f"split without sites: --config.fl.partition=iid --config.fl.num_clients=N "
        f"(or partition=dirichlet)")


def dirichlet(patient_ids: Sequence[str], bins: Dict[str, int], num_clients: int, alpha: float,
              seed: int, min_per_client: int = 1) -> List[List[str]]:
  """Dirichlet(α) label-skew over patient bins (e.g. tumour-size bins).

  For each bin b, proportions q_b ~ Dir(α·1_K) decide how its patients are
  spread over clients; small α → each client dominated by few bins. Patients
  are moved from the largest clients so every client gets ≥ min_per_client.
  """
  _check(patient_ids, num_clients * min_per_client)
  if alpha <= 0:
    raise ValueError(f"dirichlet alpha={alpha} must be > 0")
  rng = np.random.default_rng(seed)
  clients: List[List[str]] = [[] for _ in range(num_clients)]
  by_bin: Dict[int, List[str]] = {}
  for p in sorted(patient_ids):
    by_bin.setdefault(bins[p], []).append(p)
  for b in sorted(by_bin):
    members = [by_bin[b][i] for i in rng.permutation(len(by_bin[b]))]
    q = rng.dirichlet(alpha * np.ones(num_clients))
    cuts = (np.cumsum(q)[:-1] * len(members)).round().astype(int)
    for k, part in enumerate(np.split(np.array(members, dtype=object), cuts)):
      clients[k] += list(part)
  for k in range(num_clients):
    while len(clients[k]) < min_per_client:
      donor = int(np.argmax([len(c) for c in clients]))
      clients[k].append(clients[donor].pop(rng.integers(len(clients[donor]))))
  return [sorted(c) for c in clients]


def size_bins(tumour_fraction: Dict[str, float], num_bins: int = 4) -> Dict[str, int]:
  """Quantile bins of a per-patient scalar (e.g. tumour voxel fraction)."""
  ids = sorted(tumour_fraction)
  vals = np.array([tumour_fraction[i] for i in ids])
  edges = np.quantile(vals, np.linspace(0, 1, num_bins + 1)[1:-1])
  return {i: int(np.searchsorted(edges, v, side="right")) for i, v in zip(ids, vals)}


def _check(patient_ids, need):
  if len(patient_ids) < need:
    raise ValueError(f"cannot give {need} clients at least one patient each: only "
                     f"{len(patient_ids)} patients")


def make_partition(kind: str, patient_ids, num_clients: int, seed: int, sites=None,
                   tumour_fraction=None, alpha: float = 0.5) -> List[List[str]]:
  """Dispatch on ``config.fl.partition`` in {'iid', 'by_site', 'dirichlet'}."""
  if kind == "iid":
    return iid(patient_ids, num_clients, seed)
  if kind == "by_site":
    return by_site(patient_ids, sites, num_clients, seed)
  if kind == "dirichlet":
    return dirichlet(patient_ids, size_bins(tumour_fraction), num_clients, alpha, seed)
  raise ValueError(f"config.fl.partition={kind!r}: expected 'iid', 'by_site' or 'dirichlet'")
