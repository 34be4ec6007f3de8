"""FedWeP: randomized weight perturbation with seed pairs (SPEC §4.2; seed
``fedwep_scaunet_summary.md``; Yu, Kim & Baek, "Federated semi-supervised
segmentation with randomized weight perturbation").

The server sends ONE model W plus two PRNG seeds (s_i*, s_j*). Server and
client regenerate the same perturbations from the seeds alone:

    (1)  W̃ = W ⊙ Z
    (2)  Z_i = G ~ N(1, σ²)  with probability p,   1  with probability 1 − p

Server seed search over candidate seeds s_1..s_N on a search set X:

    c_ij = (1/|X|) Σ_{x∈X} cos( f(x; W̃_i), f(x; W̃_j) ),   i ≠ j

(f = softmax probabilities, flattened per sample). X is the server's real
images (FedWeP-Real) or random inputs (FedWeP-Random). The pair is chosen by
a criterion (:data:`PAIR_CRITERIA`); the default is ``'max'`` — the most
similar pair. Why: the method's stated purpose for the search is that "models
are perturbed in a controlled way so that the predictions from perturbed
models do not deviate excessively" (FedWeP, ISBI 2023 abstract; the seed's
"model consistency" criterion); diversity between the two views is already
supplied by the perturbation itself (p, σ). ``'min'`` (most diverse) and
``'median'`` are available for ablations.

Client loss on an unlabelled batch U (cross pseudo supervision between two
perturbed views of one model):

    L_RWP = ℓ(f(U; W̃_1), Y_2) + ℓ(f(U; W̃_2), Y_1),
    Y_j   = stop_gradient(argmax f(U; W̃_j))

plus the supervised Dice+CE on labelled data with the unperturbed W. The
gradient reaches W through W̃ = W ⊙ Z (∂L/∂W = ∂L/∂W̃ ⊙ Z), never through Y.

Determinism: Z depends on (seed, the shapes of the params tree, p, σ) only —
never on a global key or on W's values — so the same seed gives the same Z
on the server and on every client: the same weights selected and the same
values (bit-identical for the same compiled program; an eager and a compiled
evaluation may differ in the last float32 bit where XLA contracts 1 + σ·n
into an FMA).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from fedjax_seg import losses
from fedjax_seg.fl import local

PAIR_CRITERIA = ("max", "min", "median")
SEARCH_INPUTS = ("real", "random")
SEED_BYTES = 4  # a seed travels as one int32


# ---------------------------------------------------------------------------
# (1)–(2): perturbation from a seed alone.

def seed_key(seed) -> jax.Array:
  """The PRNG key of a seed (python int or int32 array, traceable)."""
  return jax.random.PRNGKey(jnp.asarray(seed, jnp.uint32))


def perturbation(params, seed, p: float, sigma: float):
  """Z of eq. (2), a pytree shaped like ``params``.

  One draw for the whole model (two PRNG calls, whatever the number of
  leaves, so the compiled program stays small): with k_u, k_n =
  split(PRNGKey(seed)), u ~ U[0,1)^P and n ~ N(0,1)^P over the P float
  parameters concatenated in ``jax.tree.leaves`` order, Z = 1 + σ·n where
  u < p, else 1; leaf l receives its contiguous slice. Non-float leaves get
  Z = 1.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(jnp.size(w)) if jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating) else 0
           for w in leaves]
  total = sum(sizes)
  ku, kn = jax.random.split(seed_key(seed))
  select = jax.random.uniform(ku, (max(total, 1),)) < p
  flat = jnp.where(select, 1.0 + sigma * jax.random.normal(kn, (max(total, 1),)), 1.0)
  zs, off = [], 0
  for w, n in zip(leaves, sizes):
    if n == 0:
      zs.append(jnp.ones_like(w))
      continue
    zs.append(flat[off:off + n].reshape(jnp.shape(w)).astype(jnp.asarray(w).dtype))
    off += n
  return jax.tree.unflatten(treedef, zs)


def perturb(params, seed, p: float, sigma: float):
  """W̃ = W ⊙ Z (eq. 1), Z = :func:`perturbation` (params, seed, p, σ)."""
  return jax.tree.map(jnp.multiply, params, perturbation(params, seed, p, sigma))


def perturb_variables(variables: Dict[str, Any], seed, p: float, sigma: float):
  """Perturbs the ``'params'`` collection only (batch statistics are state, not weights)."""
  return scale_params(variables, perturbation(variables["params"], seed, p, sigma))


def scale_params(variables: Dict[str, Any], z):
  """``variables`` with W̃ = W ⊙ Z in its ``'params'`` collection (Z shaped like it)."""
  return {**variables, "params": jax.tree.map(jnp.multiply, variables["params"], z)}


# ---------------------------------------------------------------------------
# Server seed-pair search.

def candidate_seeds(key: jax.Array, n: int) -> jnp.ndarray:
  """N candidate seeds, int32 [N], drawn from a round key (distinct w.h.p.)."""
  return jax.random.randint(key, (n,), 0, jnp.iinfo(jnp.int32).max, jnp.int32)


def pairwise_cosine(outputs: jnp.ndarray) -> jnp.ndarray:
  """c_ij = (1/|X|) Σ_x cos(o_i(x), o_j(x)) for all pairs at once.

  outputs: [N, |X|, ...] (e.g. softmax probabilities [N, B, H, W, C]); each
  sample's output is flattened to one vector. Returns float32 [N, N]
  (diagonal = 1 up to rounding; ignored by :func:`select_pair`).
  """
  n, b = outputs.shape[:2]
  u = outputs.reshape(n, b, -1).astype(jnp.float32)
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
  return jnp.einsum("ibd,jbd->ij", u, u) / b


def select_pair(c: jnp.ndarray, criterion: str = "max") -> Tuple[jnp.ndarray, jnp.ndarray]:
  """(i*, j*) with i* < j* chosen from the off-diagonal of c [N, N].

  'max': argmax_{i<j} c_ij (most consistent pair; the default, see module doc)
  'min': argmin_{i<j} c_ij (most diverse pair)
  'median': the pair whose c_ij is closest to the median over i<j.
  Ties resolve to the first pair in row-major order.
  """
  if criterion not in PAIR_CRITERIA:
    raise ValueError(f"config.fedwep.pair_criterion={criterion!r}: expected one of {PAIR_CRITERIA}")
  n = c.shape[0]
  if n < 2:
    raise ValueError(f"seed search needs >= 2 candidate seeds, got {n}")
  iu, ju = jnp.triu_indices(n, k=1)
  vals = c[iu, ju]
  if criterion == "max":
    idx = jnp.argmax(vals)
  elif criterion == "min":
    idx = jnp.argmin(vals)
  else:
    idx = jnp.argmin(jnp.abs(vals - jnp.median(vals)))
  return iu[idx], ju[idx]


def perturbed_outputs(apply_fn: Callable, variables, x: jnp.ndarray, seeds: jnp.ndarray,
                      p: float, sigma: float, strategy: str) -> jnp.ndarray:
  """softmax f(x; W̃_s) for every seed s: float [N, |X|, ..., C].

  apply_fn(variables, x) -> logits (eval mode). seeds: int32 [N]. ``strategy``: 'vmap'
  (one vectorised model over the N weight sets, accelerators) or 'unrolled' (the N
  models one after another, XLA:CPU: a loop of :func:`local.run_steps` over the seeds,
  unrolled in the program, or, where the 'loop' round calls local steps from the host,
  one program per seed called N times); the same values either way
  (backends.resolve_strategy, kind 'models').
  """
  def one(seed):
    return jax.nn.softmax(apply_fn(perturb_variables(variables, seed, p, sigma), x), axis=-1)
  if strategy == "vmap":
    return jax.vmap(one)(seeds)
  if strategy == "unrolled":
    return local.run_steps(lambda carry, seed: (carry, one(seed)), (), seeds, "unrolled")[1]
  raise ValueError(f"perturbed_outputs: strategy {strategy!r}: expected 'vmap' or 'unrolled'")


def search_seeds(apply_fn: Callable, variables, x: jnp.ndarray, seeds: jnp.ndarray, p: float,
                 sigma: float, criterion: str, strategy: str):
  """Server seed search (Fig. 1a): returns (seed_pair int32 [2], info). ``criterion``:
  :func:`select_pair`'s; ``strategy``: :func:`perturbed_outputs`'.

  info: {'similarity': c [N, N], 'pair': (i*, j*) int32 [2], 'c_star': c_{i*j*},
  'c_mean': mean off-diagonal c}.
  """
  out = perturbed_outputs(apply_fn, variables, x, seeds, p, sigma, strategy)
  c = pairwise_cosine(out)
  i, j = select_pair(c, criterion)
  n = c.shape[0]
  off = (jnp.sum(c) - jnp.trace(c)) / (n * (n - 1))
  info = {"similarity": c, "pair": jnp.stack([i, j]).astype(jnp.int32), "c_star": c[i, j],
          "c_mean": off}
  return jnp.stack([seeds[i], seeds[j]]).astype(jnp.int32), info


def search_set(kind: str, key: jax.Array, n: int, sample_shape, server_x: Optional[jnp.ndarray] = None,
               server_valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """X for the seed search, [n, *sample_shape].

  'random' (FedWeP-Random): i.i.d. U[0, 1) pixels (the range of slice_max-
  normalised images). 'real' (FedWeP-Real): n images drawn (with
  replacement) from the server's real images server_x [M, ...] whose
  server_valid [M] is 1.
  """
  if kind == "random":
    return jax.random.uniform(key, (n,) + tuple(sample_shape), jnp.float32)
  if kind == "real":
    if server_x is None:
      raise ValueError("FedWeP-Real (config.fedwep.search_inputs='real') needs server images; "
                       "use the label_at_server scenario or search_inputs='random'")
    m = jnp.sum(server_valid) if server_valid is not None else server_x.shape[0]
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(m, 1).astype(jnp.int32))
    return server_x[idx]
  raise ValueError(f"config.fedwep.search_inputs={kind!r}: expected one of {SEARCH_INPUTS}")


# ---------------------------------------------------------------------------
# Client loss.

PSEUDO_LOSSES = ("ce", "dice_ce")


def hard_pseudo_loss(logits: jnp.ndarray, labels: jnp.ndarray, mask=None,
                     loss: str = "ce") -> jnp.ndarray:
  """ℓ(logits, Y) for integer pseudo-labels Y: 'ce' = sparse CE (default);
  'dice_ce' = soft Dice + CE (the supervised loss; its Dice term keeps a rare
  foreground class from being out-voted by background pixels)."""
  if loss == "ce":
    return losses.sparse_cross_entropy(logits, labels, mask)
  if loss == "dice_ce":
    return losses.dice_ce_loss(logits, labels, logits.shape[-1], mask)
  raise ValueError(f"config.semi.pseudo_loss={loss!r}: expected one of {PSEUDO_LOSSES}")


def cross_pseudo_loss(logits_1: jnp.ndarray, logits_2: jnp.ndarray, mask=None,
                      pseudo: str = "hard", loss: str = "ce") -> jnp.ndarray:
  """ℓ(logits_1, Y_2) + ℓ(logits_2, Y_1) with Y_j = stop_gradient(pseudo-label of logits_j).

  pseudo='hard': Y = argmax (SPEC §4.2), ℓ = ``loss`` (sparse CE by default,
  or Dice+CE, see :func:`hard_pseudo_loss`).
  pseudo='soft': Y = softmax probabilities, ℓ = CE against soft targets
  (an ablation; here stop_gradient is what keeps gradients out of Y).
  logits_*: [B, ..., C]; mask: per-sample [B] or per-pixel [B, ...].
  """
  if pseudo == "hard":
    y1 = jax.lax.stop_gradient(jnp.argmax(logits_1, axis=-1))
    y2 = jax.lax.stop_gradient(jnp.argmax(logits_2, axis=-1))
    return (hard_pseudo_loss(logits_1, y2, mask, loss)
            + hard_pseudo_loss(logits_2, y1, mask, loss))
  if pseudo == "soft":
    t1 = jax.lax.stop_gradient(jax.nn.softmax(logits_1, axis=-1))
    t2 = jax.lax.stop_gradient(jax.nn.softmax(logits_2, axis=-1))
    return (losses.categorical_cross_entropy(logits_1, t2, mask)
            + losses.categorical_cross_entropy(logits_2, t1, mask))
  raise ValueError(f"config.fedwep.pseudo={pseudo!r}: expected 'hard' or 'soft'")


def rwp_loss(apply_train: Callable, variables, x_u: jnp.ndarray, mask_u, seeds: jnp.ndarray,
             p: float, sigma: float, key: jax.Array, pseudo: str = "hard", loss: str = "ce",
             zs=None):
  """L_RWP on one unlabelled batch (Fig. 1c).

  apply_train(variables, x, key) -> logits (train mode, dropout from key).
  ``variables['params']`` is the (differentiated) unperturbed W; the two
  views are W̃_1 = W ⊙ Z(seeds[0]), W̃_2 = W ⊙ Z(seeds[1]). ``zs``: the two Z already
  drawn (:func:`perturbations`; Z depends on the seeds and the shapes only, so a client
  draws them once per round instead of at every local step), else drawn here.
  """
  if zs is None:
    zs = perturbations(variables["params"], seeds, p, sigma)
  k1, k2 = jax.random.split(key)
  logits_1 = apply_train(scale_params(variables, zs[0]), x_u, k1)
  logits_2 = apply_train(scale_params(variables, zs[1]), x_u, k2)
  return cross_pseudo_loss(logits_1, logits_2, mask_u, pseudo, loss)


def perturbations(params, seeds: jnp.ndarray, p: float, sigma: float):
  """(Z(seeds[0]), Z(seeds[1])) of eq. (2) for ``params`` (:func:`perturbation`)."""
  return tuple(perturbation(params, seeds[i], p, sigma) for i in range(2))
