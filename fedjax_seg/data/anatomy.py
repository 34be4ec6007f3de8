"""Anatomical phantom hospitals: real brain anatomy from the ICBM152 2009a template.

The geometric phantom (`fedjax_seg.data.phantom.head_labels`) draws a brain
as nested ellipses. This module renders the same hospitals on *real* human
anatomy: the MNI ICBM152 2009a nonlinear symmetric template (1 mm, T1 and
grey- / white-matter probability maps, 197×233×189) that ships inside the
nilearn wheel (``nilearn/datasets/data/``). The files are read with nibabel
straight from the installed package directory; nilearn itself is never
imported (its scikit-learn / pandas / scipy stack is not needed), so
``pip install --no-deps nilearn`` or the extra ``pip install -e '.[anatomy]'``
is enough. Without it every entry point raises `TemplateUnavailable` naming
the extra.

Pipeline, per patient (all deterministic from ``(seed, site, index)``)::

    template (GM, WM maps; brain mask = T1 > 0.2 max as in nilearn;
              CSF = mask - GM - WM; head hull for skull / scalp)
      -> tumour grown in white matter      `grow_tumour`: perturbed level-set core
         (template space, 2 mm)            (+ necrotic core inside an enhancing rim)
                                           and Fisher-KPP reaction-diffusion edema
                                           with white-matter diffusivity 5x grey
                                           matter, none in CSF (follows the tracts)
      -> per-patient deformation          `random_deformation`: affine (rotation,
                                           anisotropic scale, shift) + smooth
                                           low-frequency displacement field;
                                           optional mass effect around the tumour
      -> output grid (crop / downsample)  `Grid`: any FOV, shape and voxel size;
                                           only output voxels are sampled
      -> contrasts                        `render`: tissue fractions x `INTENSITY`
                                           (FLAIR, T1, T1ce, T2) + texture
      -> hospital scanner                 `apply_scanner`: PSF / slice-thickness blur,
                                           contrast, bias field (`phantom.bias_field`),
                                           gain / offset, Rician or Gaussian noise
      -> layouts                          `generate_lgg_patient` (3 channels: T1,
                                           FLAIR, T1ce; binary mask; head with skull)
                                           and `generate_brats_patient` (4 modalities,
                                           skull-stripped, seg {0, 1, 2, 4}); the
                                           files are written by `phantom.write_lgg` /
                                           `phantom.write_brats` with
                                           ``style='anatomical'``.

Scanner effects reuse `phantom.site_effects` / `phantom.brats_site_effects`
(gain, offset, bias field, noise, FLAIR / tumour contrast, tumour size and
grade mix) and add what only a real anatomy makes meaningful
(`ScannerProfile`: field strength, in-plane resolution, slice thickness,
grey / white-matter contrast).

Template licence (MNI ICBM152 2009a, as distributed by the McConnell Brain
Imaging Centre): "Copyright (C) 1993-2009 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies." (See
BUILD.md ("Building the anatomical phantom").)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import types
from collections.abc import Mapping, Sequence

import numpy as np

from fedjax_seg.data import phantom

EXTRA = "anatomy"
TEMPLATE_FILES: Mapping[str, str] = types.MappingProxyType({
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
})
TEMPLATE_NOTICE = ("MNI ICBM152 2009a template: Copyright (C) 1993-2009 Louis Collins, McConnell Brain "
                   "Imaging Centre, Montreal Neurological Institute, McGill University.")

# --------------------------------------------------------------------------
# Tissue classes. The first nine coincide with `phantom`'s anatomical labels
# (so `phantom.BRATS_LABEL_OF` applies); NET (solid non-enhancing tumour, the
# core of a low-grade glioma) is ours and maps to BraTS label 1 (NCR/NET).
# --------------------------------------------------------------------------
BACKGROUND, SCALP, SKULL, CSF, GREY, WHITE, EDEMA, ENHANCING, NECROTIC, NON_ENHANCING = range(10)
CLASS_NAMES = ("background", "scalp", "skull", "csf", "grey", "white", "edema", "enhancing", "necrotic",
               "non_enhancing")
TUMOUR_CLASSES = (EDEMA, ENHANCING, NECROTIC, NON_ENHANCING)
BRAIN_CLASSES = (CSF, GREY, WHITE) + TUMOUR_CLASSES
# Tissue class -> BraTS label (0 bg, 1 necrotic / non-enhancing core, 2 edema, 4 enhancing).
BRATS_LABEL_OF = np.array([0, 0, 0, 0, 0, 0, 2, 4, 1, 1], np.uint8)
BRATS_LABEL_OF.setflags(write=False)

MODALITIES = ("flair", "t1", "t1ce", "t2")  # BraTS channel order (SPEC §1.1)
# Kaggle LGG channels (pre-contrast, FLAIR, post-contrast) = (t1, flair, t1ce).
LGG_CHANNELS = (1, 0, 2)

# Nominal signal per tissue class and sequence, columns (FLAIR, T1, T1ce, T2),
# in [0, 1] relative to the brightest tissue of each sequence. Rationale
# (textbook neuroradiology appearance; seed brats_3d_unet_report.md §2.1):
# * T1: fat (scalp) > white > grey matter > CSF (WM/GM ~ 1.35 at 1.5-3 T);
#   gliomas are T1-hypointense, necrosis (fluid) darkest after CSF.
# * T1ce (post-gadolinium T1): as T1, but the enhancing rim, where the
#   blood-brain barrier is broken, is the brightest tissue in the brain.
# * T2: water is bright: CSF > necrosis > edema > solid tumour > GM > WM.
# * FLAIR: T2 weighting with free water nulled: CSF dark, so edema and the
#   whole lesion are the brightest tissue; necrosis partly suppressed.
# Skull (cortical bone) is dark on every sequence. The orderings that the
# tests check are `CONTRAST_ORDER`.
INTENSITY = np.array([
    # flair  t1    t1ce  t2
    [0.00, 0.00, 0.00, 0.00],  # BACKGROUND (air)
    [0.60, 0.90, 0.90, 0.70],  # SCALP (fat)
    [0.04, 0.05, 0.05, 0.04],  # SKULL (cortical bone)
    [0.08, 0.15, 0.16, 1.00],  # CSF
    [0.58, 0.58, 0.60, 0.62],  # GREY
    [0.46, 0.78, 0.80, 0.47],  # WHITE
    [0.92, 0.45, 0.47, 0.84],  # EDEMA (vasogenic: water in white matter)
    [0.80, 0.50, 0.98, 0.71],  # ENHANCING rim (gadolinium)
    [0.66, 0.25, 0.27, 0.91],  # NECROTIC core (fluid-like)
    [0.86, 0.40, 0.42, 0.78],  # NON_ENHANCING solid tumour (low grade)
], dtype=np.float64)
INTENSITY.setflags(write=False)

# Documented contrast ordering per sequence, brightest first (checked by tests).
CONTRAST_ORDER: Mapping[str, tuple[int, ...]] = types.MappingProxyType({
    "flair": (EDEMA, NON_ENHANCING, ENHANCING, NECROTIC, GREY, WHITE, CSF),
    "t1": (WHITE, GREY, ENHANCING, EDEMA, NON_ENHANCING, NECROTIC, CSF),
    "t1ce": (ENHANCING, WHITE, GREY, EDEMA, NON_ENHANCING, NECROTIC, CSF),
    "t2": (CSF, NECROTIC, EDEMA, NON_ENHANCING, ENHANCING, GREY, WHITE),
})

# Random streams (distinct from phantom's 0..8).
_STREAM_PROFILE, _STREAM_TUMOUR, _STREAM_DEFORM, _STREAM_RENDER, _STREAM_SCANNER = range(20, 25)

# Reaction-diffusion constants on the 2 mm tumour grid (Swanson et al. 2000:
# glioma cells diffuse ~5x faster in white than grey matter, not into CSF).
TUMOUR_RES_MM = 2.0
D_WHITE, D_GREY, RHO = 0.6, 0.12, 0.25   # mm^2 / step, mm^2 / step, 1 / step
EDEMA_THRESHOLD = 0.25
FRONT_SPEED_WM = 2.0 * np.sqrt(D_WHITE * RHO)  # Fisher-KPP front speed, mm / step


class TemplateUnavailable(ImportError):
  """The ICBM152 template files (shipped in the nilearn wheel) are not installed."""


# --------------------------------------------------------------------------
# Template.
# --------------------------------------------------------------------------
def template_dir() -> str:
  """Folder holding the ICBM152 2009a files inside the installed nilearn package.

  Found with `importlib.util.find_spec` (nilearn is *not* imported).

  Raises:
    TemplateUnavailable: nilearn is not installed or lacks the files; the
      message names the extra to install.
  """
  hint = (f"the anatomical phantom needs the ICBM152 template shipped in the nilearn wheel: "
          f"pip install -e '.[{EXTRA}]' (or just the data files: pip install --no-deps nilearn); "
          f"see BUILD.md, 'Building the anatomical phantom'")
  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise TemplateUnavailable(f"nilearn is not installed: {hint}")
  for base in spec.submodule_search_locations:
    folder = os.path.join(base, "datasets", "data")
    if all(os.path.isfile(os.path.join(folder, f)) for f in TEMPLATE_FILES.values()):
      return folder
  raise TemplateUnavailable(f"nilearn at {list(spec.submodule_search_locations)} has no "
                            f"{sorted(TEMPLATE_FILES.values())} under datasets/data: {hint}")


def available() -> bool:
  """Whether the template files are installed (for skipping tests / choosing a default)."""
  try:
    template_dir()
  except TemplateUnavailable:
    return False
  return True


@dataclasses.dataclass(frozen=True, eq=False)
class Template:
  """The ICBM152 tissue model on a regular grid (RAS voxel axes [X, Y, Z], world mm = origin + res * index).

  Attributes:
    gm, wm, csf: float32 [X, Y, Z] tissue fractions in the brain (sum <= 1;
      CSF = brain mask - GM - WM, clipped at 0).
    brain: bool [X, Y, Z], GM + WM + CSF >= 0.5.
    depth: float32 [X, Y, Z] distance (mm) from a brain voxel to the outside.
    hull: float32 [X, Y, Z] distance (mm) outside the smoothed intracranial
      hull (0 inside): skull and scalp are shells of it.
    resolution: voxel size, mm (isotropic).
    origin: world (x, y, z) mm of voxel (0, 0, 0)'s centre.
    centre, extent: world centre and size (mm) of the brain's bounding box.
  """

  gm: np.ndarray
  wm: np.ndarray
  csf: np.ndarray
  brain: np.ndarray
  depth: np.ndarray
  hull: np.ndarray
  resolution: float
  origin: np.ndarray
  centre: np.ndarray
  extent: np.ndarray

  def index(self, world: np.ndarray) -> np.ndarray:
    """World mm [3, ...] -> fractional voxel indices [3, ...]."""
    return (world - self.origin.reshape((3,) + (1,) * (world.ndim - 1))) / self.resolution


@functools.lru_cache(maxsize=1)
def _template_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(brain mask, gm, wm, affine) at 1 mm, float32, as stored (RAS, 197×233×189)."""
  import nibabel as nib

  folder = template_dir()
  imgs = {k: nib.load(os.path.join(folder, f)) for k, f in TEMPLATE_FILES.items()}
  affine = imgs["t1"].affine
  for k, im in imgs.items():
    if im.shape != imgs["t1"].shape or not np.allclose(im.affine, affine):
      raise ValueError(f"template file {TEMPLATE_FILES[k]} does not share the T1 grid")
  if not np.allclose(affine[:3, :3], np.eye(3)):
    raise ValueError(f"expected a 1 mm RAS template grid, got affine {affine.tolist()}")
  t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
  mask = (t1 / t1.max() > 0.2).astype(np.float32)  # nilearn.datasets.load_mni152_brain_mask
  gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0 * mask
  wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0 * mask
  return mask, gm, wm, affine


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
  if f == 1:
    return a
  pad = [(0, (-n) % f) for n in a.shape]
  a = np.pad(a, pad)
  x, y, z = (n // f for n in a.shape)
  return a.reshape(x, f, y, f, z, f).mean(axis=(1, 3, 5))


@functools.lru_cache(maxsize=4)
def load_template(resolution_mm: int = 2) -> Template:
  """The template block-averaged to ``resolution_mm`` (integer, 1 = native), cached per process.

  CSF is derived as ``clip(mask - GM - WM, 0, 1)`` (ventricles, sulci); the
  head hull is the brain mask smoothed with a 4 mm Gaussian and
  hole-filled, so the skull does not dip into the sulci.
  """
  from scipy import ndimage

  f = int(resolution_mm)
  if f < 1 or f != resolution_mm:
    raise ValueError(f"resolution_mm must be a positive integer, got {resolution_mm!r}")
  mask1, gm1, wm1, affine = _template_1mm()
  csf1 = np.clip(mask1 - gm1 - wm1, 0.0, 1.0)
  gm, wm, csf = (_block_mean(a, f).astype(np.float32) for a in (gm1, wm1, csf1))
  brain = (gm + wm + csf) >= 0.5
  depth = (ndimage.distance_transform_edt(brain) * f).astype(np.float32)
  smooth = ndimage.gaussian_filter(brain.astype(np.float32), 4.0 / f) > 0.4
  hull = ndimage.binary_fill_holes(smooth | brain)
  hull_dist = (ndimage.distance_transform_edt(~hull) * f).astype(np.float32)
  origin = affine[:3, 3] + 0.5 * (f - 1)
  idx = np.argwhere(brain)
  lo, hi = origin + f * idx.min(0), origin + f * idx.max(0)
  for a in (gm, wm, csf, brain, depth, hull_dist):
    a.setflags(write=False)
  return Template(gm=gm, wm=wm, csf=csf, brain=brain, depth=depth, hull=hull_dist, resolution=float(f),
                  origin=origin.astype(np.float64), centre=(lo + hi) / 2.0, extent=hi - lo + f)


# --------------------------------------------------------------------------
# Output grid (the crop / downsampling) and per-patient deformation.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Grid:
  """An output voxel grid in the internal axis order [Z, Y, X].

  Radiological orientation, as `phantom.nifti_affine` writes it: slice 0 is
  inferior, row 0 anterior, column 0 the patient's right.

  Attributes:
    shape: (Z, Y, X) voxels.
    spacing: (dz, dy, dx) mm.
    centre: world (x, y, z) mm of the grid centre (patient frame, before
      the deformation maps it into the template).
  """

  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  centre: tuple[float, float, float]

  def points(self) -> np.ndarray:
    """World (x, y, z) mm of every voxel centre: float64 [3, Z, Y, X]."""
    nz, ny, nx = self.shape
    dz, dy, dx = self.spacing
    z = self.centre[2] + (np.arange(nz) - (nz - 1) / 2.0) * dz
    y = self.centre[1] - (np.arange(ny) - (ny - 1) / 2.0) * dy
    x = self.centre[0] - (np.arange(nx) - (nx - 1) / 2.0) * dx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz])


@dataclasses.dataclass(frozen=True)
class Deformation:
  """Patient -> template mapping ``q = c + A (p - c) + t + u(p)`` (world mm).

  Attributes:
    centre: c, the brain centre.
    matrix: A = rotation @ diag(scale), 3×3.
    shift: t, mm.
    control: float64 [3, n, n, n] displacement (mm) at control points on a
      regular lattice spanning ``centre ± half_width`` (u is their cubic
      spline interpolation: smooth, low frequency).
    half_width: mm.
  """

  centre: np.ndarray
  matrix: np.ndarray
  shift: np.ndarray
  control: np.ndarray
  half_width: float

  def __call__(self, p: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    c = self.centre.reshape((3,) + (1,) * (p.ndim - 1))
    q = np.tensordot(self.matrix, p - c, axes=1) + c + self.shift.reshape(c.shape)
    n = self.control.shape[1]
    lattice = (p - c + self.half_width) / (2.0 * self.half_width) * (n - 1)
    for k in range(3):
      q[k] += ndimage.map_coordinates(self.control[k], lattice, order=3, mode="nearest")
    return q

  def on_grid(self, grid: "Grid") -> np.ndarray:
    """``self(grid.points())`` computed separably (the grid is axis-aligned, the spline a tensor
    product): float64 [3, Z, Y, X], much faster than pointwise interpolation on big grids."""
    from scipy import ndimage

    p = grid.points()
    c = self.centre.reshape(3, 1, 1, 1)
    q = np.tensordot(self.matrix, p - c, axes=1) + c + self.shift.reshape(3, 1, 1, 1)
    n = self.control.shape[1]
    axes_1d = (p[0, 0, 0, :], p[1, 0, :, 0], p[2, :, 0, 0])  # x along X, y along Y, z along Z
    weights = []
    for k, v in enumerate(axes_1d):
      lattice = (v - self.centre[k] + self.half_width) / (2.0 * self.half_width) * (n - 1)
      weights.append(np.stack([ndimage.map_coordinates(np.eye(n)[j], lattice[None], order=3, mode="nearest")
                               for j in range(n)], axis=1))  # [len, n]
    wx, wy, wz = weights
    for k in range(3):
      q[k] += np.einsum("abc,xa,yb,zc->zyx", self.control[k], wx, wy, wz, optimize=True)
    return q

  def inverse(self, q: np.ndarray, iterations: int = 6) -> np.ndarray:
    """Template mm [3, N] -> patient mm [3, N] by fixed-point iteration (the displacement is small and smooth)."""
    c = self.centre[:, None]
    p = np.linalg.solve(self.matrix, q - c - self.shift[:, None]) + c
    for _ in range(iterations):
      residual = q - self(p)
      p = p + np.linalg.solve(self.matrix, residual)
    return p


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float] | float) -> np.ndarray:
  """`phantom.smooth_noise` (zero mean, unit std smoothed white noise) with scipy's Gaussian filter.

  Same draws from ``rng``; scipy's separable filter is much faster than the
  pure-NumPy one on whole volumes (a 240×240×155 BraTS volume).
  """
  from scipy import ndimage

  field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="reflect", truncate=4.0)
  std = field.std()
  return (field - field.mean()) / (std if std > 0 else 1.0)


def _rotation(angles: Sequence[float]) -> np.ndarray:
  ax, ay, az = angles
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def random_deformation(
    rng: np.random.Generator,
    centre: np.ndarray,
    *,
    rotation_deg: tuple[float, float, float] = (8.0, 4.0, 6.0),
    scale_sigma: float = 0.06,
    shift_mm: float = 4.0,
    displacement_mm: float = 3.0,
    control_points: int = 5,
    half_width: float = 120.0,
) -> Deformation:
  """A random smooth deformation: head pitch / roll / yaw up to ``rotation_deg`` (uniform),
  per-axis scale exp(N(0, scale_sigma)) (head size and shape), shift U(±shift_mm), and a
  displacement field N(0, displacement_mm) on a ``control_points``³ lattice (~60 mm apart)."""
  angles = np.deg2rad([rng.uniform(-r, r) for r in rotation_deg])
  scale = np.exp(rng.normal(0.0, scale_sigma, 3))
  matrix = _rotation(angles) @ np.diag(scale)
  shift = rng.uniform(-shift_mm, shift_mm, 3)
  control = rng.normal(0.0, displacement_mm, (3,) + (control_points,) * 3)
  return Deformation(centre=np.asarray(centre, np.float64), matrix=matrix, shift=shift, control=control,
                     half_width=float(half_width))


# --------------------------------------------------------------------------
# Tumour growth (template space, 2 mm).
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Tumour:
  """A tumour grown in template space, as smooth fields on a box of the 2 mm grid.

  Regions (nested by construction): whole tumour ``invasion >= threshold``
  (edema + core); core ``core < 1``; necrotic ``necrotic < 1`` (enhancing
  tumours only; the rest of the core is the enhancing rim).

  Attributes:
    centre: seed, world mm (a white-matter voxel).
    origin: world mm of the box's voxel (0, 0, 0).
    resolution: box voxel size, mm.
    core, necrotic: float32 [bx, by, bz] level-set functions (< 1 inside);
      ``necrotic`` is None for non-enhancing tumours.
    invasion: float32 [bx, by, bz] in [0, 1], the reaction-diffusion cell
      density (1 in the core).
    threshold: whole-tumour (edema) threshold of ``invasion``.
    enhancing: high grade: enhancing rim around a necrotic core; else the
      core is solid non-enhancing tumour.
    core_radius, margin: mm (nominal core radius, edema reach in white matter).
  """

  centre: np.ndarray
  origin: np.ndarray
  resolution: float
  core: np.ndarray
  necrotic: np.ndarray | None
  invasion: np.ndarray
  threshold: float
  enhancing: bool
  core_radius: float
  margin: float

  def whole_points(self) -> np.ndarray:
    """World mm [3, N] of the box voxels inside the whole tumour."""
    idx = np.argwhere(self.invasion >= self.threshold).T
    return self.origin[:, None] + self.resolution * idx


def _reaction_diffusion(core: np.ndarray, diffusivity: np.ndarray, steps: int, h: float) -> np.ndarray:
  """Fisher-KPP ``u_t = div(D grad u) + rho u (1 - u)``, explicit Euler, no-flux borders, u = 1 in the core.

  Face diffusivity is the min of the two voxels, so nothing crosses into
  D = 0 (CSF, outside the brain). Stable for ``D / h^2 <= 1/6`` per step.
  """
  u = core.astype(np.float32)
  faces = []
  for ax in range(3):
    a = np.moveaxis(diffusivity, ax, 0)
    faces.append(np.moveaxis(np.minimum(a[:-1], a[1:]) / (h * h), 0, ax).astype(np.float32))
  for _ in range(int(steps)):
    div = np.zeros_like(u)
    for ax in range(3):
      flux = np.diff(u, axis=ax) * faces[ax]
      pad = [(0, 0)] * 3
      pad[ax] = (1, 1)
      div += np.diff(np.pad(flux, pad), axis=ax)
    u = u + div + RHO * u * (1.0 - u)
    u[core] = 1.0
  return np.clip(u, 0.0, 1.0)


def grow_tumour(
    rng: np.random.Generator,
    *,
    whole_radius: float,
    enhancing: bool,
    core_fraction: tuple[float, float] = (0.45, 0.65),
    necrotic_fraction: tuple[float, float] = (0.35, 0.65),
    min_z: float = -20.0,
) -> Tumour:
  """Grow one tumour in the white matter of the 2 mm template.

  1. Seed: a voxel with WM fraction > 0.9, MNI z > ``min_z`` (cerebrum),
     at least 0.6 x the core radius from the brain surface.
  2. Core: an irregular ellipsoid level set (random axes 0.75-1.3 x the
     core radius, random rotation, smooth boundary noise), restricted to
     the brain; core radius = ``whole_radius`` x U(core_fraction).
  3. Necrotic core (``enhancing`` only): a second, smaller perturbed level
     set (x U(necrotic_fraction) of the core), so the enhancing rim is the
     shell between them.
  4. Edema: reaction-diffusion from the core for ``margin / front speed``
     steps with D = 0.6 WM + 0.12 GM mm²/step (none in CSF), thresholded at
     `EDEMA_THRESHOLD`: fingers along the white-matter tracts, stopped by
     cortex and ventricles.
  """
  from scipy import ndimage

  tpl = load_template(int(TUMOUR_RES_MM))
  h = tpl.resolution
  core_r = float(whole_radius * rng.uniform(*core_fraction))
  margin = float(whole_radius - core_r)
  world_z = tpl.origin[2] + h * np.arange(tpl.brain.shape[2])
  ok = (tpl.wm > 0.9) & (tpl.depth >= max(0.6 * core_r, 6.0)) & (world_z > min_z)[None, None, :]
  cands = np.argwhere(ok)
  if not len(cands):  # very large tumour: relax the depth requirement
    cands = np.argwhere((tpl.wm > 0.9) & (world_z > min_z)[None, None, :])
  seed_idx = cands[int(rng.integers(len(cands)))]
  centre = tpl.origin + h * seed_idx

  half = int(np.ceil((1.35 * core_r + 1.4 * margin + 6.0) / h))
  lo = np.maximum(seed_idx - half, 0)
  hi = np.minimum(seed_idx + half + 1, tpl.brain.shape)
  box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
  shape = tuple(int(b - a) for a, b in zip(lo, hi))
  origin = tpl.origin + h * lo
  coords = np.stack(np.meshgrid(*[origin[k] + h * np.arange(shape[k]) for k in range(3)], indexing="ij"))
  rel = coords - centre[:, None, None, None]

  def level_set(radius: float, roughness: float, sigma_mm: float) -> np.ndarray:
    axes = radius * rng.uniform(0.75, 1.3, 3)
    rot = _rotation(rng.uniform(-np.pi, np.pi, 3))
    local = np.tensordot(rot.T, rel, axes=1) / axes[:, None, None, None]
    noise = _smooth_noise(rng, shape, sigma=max(sigma_mm / h, 0.5))
    return (np.sqrt((local ** 2).sum(0)) * (1.0 + roughness * noise)).astype(np.float32)

  in_brain = (tpl.gm + tpl.wm)[box] > 0.3
  core = level_set(core_r, rng.uniform(0.12, 0.25), 0.5 * core_r)
  core = np.where(in_brain, core, np.float32(10.0))
  if not (core < 1.0).any():  # tiny tumour: keep the seed voxel
    core[tuple(seed_idx - lo)] = 0.0
  necrotic = None
  if enhancing:
    nec_r = core_r * rng.uniform(*necrotic_fraction)
    necrotic = level_set(nec_r, rng.uniform(0.1, 0.2), 0.5 * nec_r)
  diffusivity = D_WHITE * tpl.wm[box] + D_GREY * tpl.gm[box]
  steps = int(np.ceil(margin / FRONT_SPEED_WM)) if margin > 0 else 0
  invasion = _reaction_diffusion(core < 1.0, diffusivity, steps, h)
  # Smooth the front slightly (partial-volume-like) but keep u = 1 in the core.
  invasion = np.maximum(ndimage.gaussian_filter(invasion, 0.6), (core < 1.0)).astype(np.float32)
  return Tumour(centre=centre, origin=origin, resolution=h, core=core, necrotic=necrotic,
                invasion=invasion, threshold=EDEMA_THRESHOLD, enhancing=bool(enhancing),
                core_radius=core_r, margin=margin)


# --------------------------------------------------------------------------
# Scanner model.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScannerProfile:
  """One hospital's scanner, for the anatomical phantom.

  Attributes:
    site: site code.
    brats: `phantom.BratsSiteEffects` (its ``base`` is the LGG-layout
      `phantom.SiteEffects`): gain / offset, bias field, noise, FLAIR and
      per-modality tumour contrast, tumour size, grade mix, stored scale.
    field_tesla: 1.5 or 3.0 (3 T: stronger bias, less noise).
    psf_mm: in-plane effective resolution (Gaussian FWHM), mm.
    slice_thickness_mm: through-plane effective resolution (FWHM), mm.
    tissue_contrast: multiplier of the grey / white matter difference
      (sequence parameters: TR, TE, TI, flip angle).
  """

  site: str
  brats: phantom.BratsSiteEffects
  field_tesla: float
  psf_mm: float
  slice_thickness_mm: float
  tissue_contrast: float

  @property
  def base(self) -> phantom.SiteEffects:
    return self.brats.base


# Nominal resolution / field strength of the known sites (jittered by seed).
SCANNER_PRESETS: Mapping[str, Mapping[str, float]] = types.MappingProxyType({
    "CS": types.MappingProxyType(dict(field_tesla=3.0, psf_mm=1.0, slice_thickness_mm=3.0, tissue_contrast=1.10)),
    "DU": types.MappingProxyType(dict(field_tesla=1.5, psf_mm=2.2, slice_thickness_mm=6.0, tissue_contrast=0.85)),
    "HT": types.MappingProxyType(dict(field_tesla=1.5, psf_mm=1.6, slice_thickness_mm=5.0, tissue_contrast=0.95)),
    "FG": types.MappingProxyType(dict(field_tesla=3.0, psf_mm=1.2, slice_thickness_mm=4.0, tissue_contrast=1.05)),
    "EZ": types.MappingProxyType(dict(field_tesla=1.5, psf_mm=1.8, slice_thickness_mm=5.0, tissue_contrast=0.90)),
})


def scanner_profile(site: str, seed: int = 0) -> ScannerProfile:
  """Deterministic scanner of ``site``: `phantom.brats_site_effects` + resolution / contrast.

  Known sites (`SCANNER_PRESETS`) jitter their nominal PSF, slice thickness
  and tissue contrast by exp(N(0, 0.05)); unknown sites draw 1.5 / 3 T
  (p = 0.5), PSF U(1, 2.2) mm, thickness U(3, 6) mm, contrast U(0.85, 1.1).
  """
  rng = phantom.rng_for(seed, "anatomy", site, _STREAM_PROFILE)
  preset = SCANNER_PRESETS.get(site)
  if preset is None:
    preset = dict(field_tesla=3.0 if rng.random() < 0.5 else 1.5, psf_mm=rng.uniform(1.0, 2.2),
                  slice_thickness_mm=rng.uniform(3.0, 6.0), tissue_contrast=rng.uniform(0.85, 1.1))
  jitter = np.exp(rng.normal(0.0, 0.05, 3))
  return ScannerProfile(site=site, brats=phantom.brats_site_effects(site, seed),
                        field_tesla=float(preset["field_tesla"]), psf_mm=float(preset["psf_mm"] * jitter[0]),
                        slice_thickness_mm=float(preset["slice_thickness_mm"] * jitter[1]),
                        tissue_contrast=float(preset["tissue_contrast"] * jitter[2]))


# --------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Rendered:
  """A clean (scanner-free) rendering on an output grid.

  Attributes:
    images: float32 [Z, Y, X, 4] signal in (FLAIR, T1, T1ce, T2) order, ~[0, 1].
    classes: uint8 [Z, Y, X] tissue class (`CLASS_NAMES`): the tumour
      region where there is one, else the largest tissue fraction.
    fractions: float32 [Z, Y, X, 3] template (CSF, GM, WM) fractions (after
      deformation and mass effect; tumour not subtracted).
    grid: the output `Grid`.
  """

  images: np.ndarray
  classes: np.ndarray
  fractions: np.ndarray
  grid: Grid

  @property
  def brain(self) -> np.ndarray:
    return np.isin(self.classes, BRAIN_CLASSES)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
  """0.5 at x = 0, linear to 0 / 1 at x = -/+ width."""
  return np.clip(0.5 + x / (2.0 * width), 0.0, 1.0)


def render(
    grid: Grid,
    deformation: Deformation | None,
    tumour: Tumour | None,
    rng: np.random.Generator,
    *,
    head: bool = False,
    mass_effect: float = 0.0,
    tissue_contrast: float = 1.0,
    tumour_contrast: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    texture: float = 0.04,
    template_resolution_mm: int | None = None,
    skull_mm: tuple[float, float] = (2.0, 7.0),
    scalp_mm: float = 6.0,
) -> Rendered:
  """Sample the (deformed) anatomy and tumour on ``grid`` and synthesise the four contrasts.

  Signal = sum over tissues of fraction x `INTENSITY` (partial volume),
  tumour regions blended in with soft boundaries, times a smooth ±``texture``
  tissue texture (+ twice that inside the tumour). ``head`` adds
  extra-axial CSF, skull and scalp shells of the intracranial hull (LGG
  images are not skull-stripped). ``mass_effect`` (0-1) pushes the tissue
  around the tumour outward (radial displacement within ~1.5 core radii).
  ``tissue_contrast`` scales the grey / white difference,
  ``tumour_contrast`` the tumour-vs-grey-matter difference per sequence.
  The template resolution is 1 mm for output voxels < 1.5 mm, else 2 mm.

  Returns:
    `Rendered` (images float32 [Z, Y, X, 4], classes uint8 [Z, Y, X]).
  """
  from scipy import ndimage

  if template_resolution_mm is None:
    template_resolution_mm = 1 if min(grid.spacing) < 1.5 else 2
  tpl = load_template(template_resolution_mm)
  p = grid.points()
  q = deformation.on_grid(grid) if deformation is not None else p
  q_tissue = q
  if tumour is not None and mass_effect > 0:
    c = tumour.centre.reshape(3, 1, 1, 1)
    r2 = ((q - c) ** 2).sum(0)
    s = 1.5 * tumour.core_radius
    k = float(np.clip(mass_effect, 0.0, 0.9))
    q_tissue = c + (q - c) * (1.0 - k * np.exp(-r2 / (2.0 * s * s)))

  idx = tpl.index(q_tissue)
  sample = functools.partial(ndimage.map_coordinates, coordinates=idx, order=1, mode="constant")
  gm, wm, csf = (sample(a, cval=0.0) for a in (tpl.gm, tpl.wm, tpl.csf))
  frac_brain = gm + wm + csf
  brain = frac_brain >= 0.5

  table = INTENSITY.astype(np.float32)
  mid = 0.5 * (table[GREY] + table[WHITE])
  table[GREY] = mid + tissue_contrast * (table[GREY] - mid)
  table[WHITE] = mid + tissue_contrast * (table[WHITE] - mid)
  for cls in TUMOUR_CLASSES:
    table[cls] = table[GREY] + np.asarray(tumour_contrast) * (table[cls] - table[GREY])

  img = csf[..., None] * table[CSF] + gm[..., None] * table[GREY] + wm[..., None] * table[WHITE]
  classes = np.full(grid.shape, BACKGROUND, np.uint8)
  tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + CSF
  classes[brain] = tissue[brain]
  if head:
    hull = sample(tpl.hull, cval=1e3)
    extra = np.clip(1.0 - frac_brain, 0.0, 1.0) * _ramp(1.0 - hull, 1.0)   # inside hull, not brain: CSF
    skull = _ramp(hull - skull_mm[0], 0.75) * _ramp(skull_mm[1] - hull, 0.75)
    scalp = _ramp(hull - skull_mm[1], 0.75) * _ramp(skull_mm[1] + scalp_mm - hull, 0.75)
    img = img + extra[..., None] * table[CSF] + skull[..., None] * table[SKULL] + scalp[..., None] * table[SCALP]
    outside = ~brain
    classes[outside & (extra >= 0.5)] = CSF
    classes[outside & (skull >= 0.5)] = SKULL
    classes[outside & (scalp >= 0.5)] = SCALP
  tex = _smooth_noise(rng, grid.shape, sigma=[max(2.0 / s, 0.5) for s in grid.spacing])
  tex_t = _smooth_noise(rng, grid.shape, sigma=[max(3.0 / s, 0.5) for s in grid.spacing])

  if tumour is not None:
    t_idx = (q - tumour.origin.reshape(3, 1, 1, 1)) / tumour.resolution
    t_sample = functools.partial(ndimage.map_coordinates, coordinates=t_idx, order=1, mode="constant")
    u = t_sample(tumour.invasion, cval=0.0)
    d = t_sample(tumour.core, cval=10.0)
    whole = (u >= tumour.threshold) & brain
    core = (d < 1.0) & whole
    w_whole = _ramp(u - tumour.threshold, 0.12)
    w_core = _ramp(1.0 - d, 0.12)
    if tumour.enhancing:
      d_n = t_sample(tumour.necrotic, cval=10.0)
      # Necrosis strictly inside the core (>= 1 voxel of enhancing rim around it).
      necrotic = (d_n < 1.0) & ndimage.binary_erosion(core, iterations=1)
      w_nec = _ramp(1.0 - d_n, 0.12) * necrotic
      core_sig = w_nec[..., None] * table[NECROTIC] + (1.0 - w_nec[..., None]) * table[ENHANCING]
      core_cls = ENHANCING
    else:
      necrotic = np.zeros_like(core)
      core_sig = np.broadcast_to(table[NON_ENHANCING], core.shape + (4,))
      core_cls = NON_ENHANCING
    tum_sig = w_core[..., None] * core_sig + (1.0 - w_core[..., None]) * table[EDEMA]
    w = (w_whole * (frac_brain >= 0.25))[..., None]
    img = (1.0 - w) * img + w * tum_sig * (1.0 + texture * tex_t[..., None])
    classes[whole] = EDEMA
    classes[core] = core_cls
    classes[necrotic] = NECROTIC
  img = img * (1.0 + texture * tex[..., None])
  return Rendered(images=np.clip(img, 0.0, None).astype(np.float32), classes=classes,
                  fractions=np.stack([csf, gm, wm], axis=-1).astype(np.float32), grid=grid)


def apply_scanner(
    rendered: Rendered,
    profile: ScannerProfile,
    rng: np.random.Generator,
    *,
    skull_stripped: bool,
    channels: Sequence[int] = (0, 1, 2, 3),
) -> np.ndarray:
  """The hospital's acquisition applied to a clean rendering.

  Steps: Gaussian PSF (in-plane FWHM ``psf_mm``, through-plane
  ``slice_thickness_mm``) → smooth multiplicative bias field
  (`phantom.bias_field`, site coefficients + patient jitter, stronger at 3 T)
  → per-channel gain / offset → noise: Rician (magnitude of complex
  Gaussian) for whole-head images, Gaussian inside the brain and 0 outside
  for skull-stripped ones. Gains: LGG-layout gain x BraTS modality gain.

  Args:
    rendered: `render` output (FLAIR, T1, T1ce, T2).
    profile: the hospital.
    rng: patient-specific generator.
    skull_stripped: BraTS-like (background forced to 0).
    channels: which of the four modalities to keep, in output order.
  Returns:
    float64 [Z, Y, X, len(channels)], >= 0 (not clipped above).
  """
  ch = list(channels)
  img = rendered.images[..., ch].astype(np.float64)
  grid = rendered.grid
  fwhm = (profile.slice_thickness_mm, profile.psf_mm, profile.psf_mm)
  sigma = [max(f / 2.355 / s, 0.0) for f, s in zip(fwhm, grid.spacing)]
  sigma = [s if s >= 0.2 else 0.0 for s in sigma]
  if any(sigma):
    from scipy import ndimage

    img = ndimage.gaussian_filter(img, sigma + [0.0], mode="nearest", truncate=4.0)

  base = profile.base
  nz, ny, nx = grid.shape
  z = np.linspace(-1.0, 1.0, nz) if nz > 1 else np.zeros(1)
  y, x = phantom.grid_2d(ny) if ny == nx else np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx),
                                                            indexing="ij")
  strength = base.bias_strength * (1.3 if profile.field_tesla >= 3.0 else 1.0)
  coeffs = np.asarray(base.bias_coeffs) * (1.3 if profile.field_tesla >= 3.0 else 1.0)
  coeffs = coeffs + rng.normal(0.0, 0.5 * strength, 8)
  fields = np.stack([phantom.bias_field(coeffs + rng.normal(0.0, 0.2 * strength, 8), z[:, None, None],
                                        y[None], x[None]) for _ in ch], axis=-1)
  img = img * fields
  lgg_gain = {0: base.gain[1], 1: base.gain[0], 2: base.gain[2], 3: base.gain[1]}  # (pre, FLAIR, post) -> modality
  lgg_off = {0: base.offset[1], 1: base.offset[0], 2: base.offset[2], 3: base.offset[1]}
  gain = np.array([lgg_gain[c] * profile.brats.modality_gain[c] for c in ch])
  noise = base.noise_sigma * (0.8 if profile.field_tesla >= 3.0 else 1.0)
  if skull_stripped:
    brain = rendered.brain[..., None]
    offset = np.array([profile.brats.modality_offset[c] for c in ch])
    img = img * gain + offset * brain + rng.normal(0.0, noise, img.shape) * brain
    return np.where(brain, np.clip(img, 0.0, None), 0.0)
  offset = np.array([lgg_off[c] for c in ch])
  img = img * gain + offset
  return np.hypot(img + rng.normal(0.0, noise, img.shape), rng.normal(0.0, noise, img.shape))


# --------------------------------------------------------------------------
# Patients.
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class AnatomyPatient:
  """Everything about one anatomical phantom patient (for figures and tests).

  Attributes:
    site: hospital; profile: its `ScannerProfile`.
    clean: scanner-free `Rendered` volume.
    images: float64 [Z, Y, X, C] after the scanner (C = 4 modalities or the
      3 LGG channels).
    tumour: the `Tumour` (None if tumour-free); deformation: the patient's.
  """

  site: str
  profile: ScannerProfile
  clean: Rendered
  images: np.ndarray
  tumour: Tumour | None
  deformation: Deformation


def _tumour_size(rng: np.random.Generator, base: phantom.SiteEffects, factor: float) -> float:
  """Whole-tumour radius (mm): the site's radius (fraction of a ~70 mm brain radius) x lognormal spread."""
  r = factor * base.tumour_radius * 70.0 * float(np.exp(rng.normal(0.0, base.tumour_spread)))
  return float(np.clip(r, 9.0, 45.0))


def make_patient(
    seed: int,
    site: str,
    index: int,
    *,
    layout: str,
    grid_fn,
    head: bool,
    skull_stripped: bool,
    channels: Sequence[int],
    size_factor: float,
    enhancing_prob: float | None = None,
    with_tumour: bool = True,
    mass_effect: float = 0.3,
    template_resolution_mm: int | None = None,
) -> AnatomyPatient:
  """Shared patient recipe; ``grid_fn(tumour, deformation, template) -> Grid`` picks the crop."""
  profile = scanner_profile(site, seed)
  base = profile.base
  rng_t = phantom.rng_for(seed, "anatomy", layout, site, index, _STREAM_TUMOUR)
  p_enh = profile.brats.enhancing_prob if enhancing_prob is None else enhancing_prob
  enhancing = bool(rng_t.random() < p_enh)
  tumour = None
  if with_tumour:
    tumour = grow_tumour(rng_t, whole_radius=_tumour_size(rng_t, base, size_factor), enhancing=enhancing)
  tpl = load_template(2)
  deformation = random_deformation(phantom.rng_for(seed, "anatomy", layout, site, index, _STREAM_DEFORM),
                                   tpl.centre)
  grid = grid_fn(tumour, deformation, tpl)
  clean = render(grid, deformation, tumour, phantom.rng_for(seed, "anatomy", layout, site, index, _STREAM_RENDER),
                 head=head, mass_effect=mass_effect * (tumour.core_radius / 20.0 if tumour else 0.0),
                 tissue_contrast=profile.tissue_contrast,
                 tumour_contrast=_tumour_contrast(profile, layout),
                 template_resolution_mm=template_resolution_mm)
  images = apply_scanner(clean, profile, phantom.rng_for(seed, "anatomy", layout, site, index, _STREAM_SCANNER),
                         skull_stripped=skull_stripped, channels=channels)
  return AnatomyPatient(site=site, profile=profile, clean=clean, images=images, tumour=tumour,
                        deformation=deformation)


def _tumour_contrast(profile: ScannerProfile, layout: str) -> tuple[float, float, float, float]:
  if layout == "lgg":  # the LGG model has one knob: FLAIR tumour contrast
    return (profile.base.flair_contrast, 1.0, 1.0, 1.0)
  return tuple(profile.brats.tumour_contrast)


def lgg_grid(n_slices: int, size: int, tumour_free_fraction: float, fov_mm: float, rng: np.random.Generator):
  """``grid_fn`` for the LGG layout: an axial slab around the tumour.

  The slab is centred (± 10 % jitter) on the tumour's z extent (mapped to
  the patient frame) and thick enough that about ``tumour_free_fraction``
  of the ``n_slices`` slices miss it; slice spacing is clipped to
  [2, 8] mm. In-plane: ``fov_mm`` square, centred on the brain.
  """

  def fn(tumour: Tumour | None, deformation: Deformation, tpl: Template) -> Grid:
    centre = tpl.centre
    if tumour is None or tumour_free_fraction >= 1.0:
      dz = float(np.clip(0.6 * tpl.extent[2] / n_slices, 2.0, 8.0))
      zc = centre[2] + 0.15 * tpl.extent[2]
    else:
      pts = deformation.inverse(tumour.whole_points())
      z0, z1 = (float(v) for v in np.percentile(pts[2], [1.0, 99.0]))
      covered = max(1.0 - tumour_free_fraction, 1.0 / n_slices)
      dz = float(np.clip((z1 - z0) / (covered * n_slices), 2.0, 8.0))
      zc = 0.5 * (z0 + z1) + rng.uniform(-0.1, 0.1) * n_slices * dz * (1.0 - covered)
    dxy = fov_mm / size
    return Grid(shape=(n_slices, size, size), spacing=(dz, dxy, dxy), centre=(centre[0], centre[1], zc))

  return fn


def generate_lgg_patient(
    seed: int,
    site: str,
    index: int,
    *,
    n_slices: int = 12,
    size: int = 64,
    tumour_free_fraction: float = 0.3,
    fov_mm: float = 220.0,
    mass_effect: float = 0.3,
    return_patient: bool = False,
):
  """One anatomical Kaggle-LGG patient in memory; same contract as `phantom.generate_lgg_patient`.

  Channels (pre-contrast T1, FLAIR, post-contrast T1ce), whole head with
  skull and scalp, axial slab around the tumour (`lgg_grid`). Tumours use
  the site's LGG size and enhancing probability (mostly non-enhancing).

  Returns:
    (images uint8 [S, size, size, 3], masks uint8 [S, size, size] in {0, 255});
    with ``return_patient`` also the `AnatomyPatient`.
  """
  rng_g = phantom.rng_for(seed, "anatomy", "lgg", site, index, _STREAM_DEFORM + 100)
  pat = make_patient(seed, site, index, layout="lgg",
                     grid_fn=lgg_grid(n_slices, size, tumour_free_fraction, fov_mm, rng_g),
                     head=True, skull_stripped=False, channels=LGG_CHANNELS, size_factor=1.5,
                     enhancing_prob=phantom.site_effects(site, seed).enhancing_prob,
                     with_tumour=tumour_free_fraction < 1.0, mass_effect=mass_effect)
  images = np.round(np.clip(pat.images, 0.0, 1.0) * 255.0).astype(np.uint8)
  masks = np.where(np.isin(pat.clean.classes, TUMOUR_CLASSES), 255, 0).astype(np.uint8)
  return (images, masks, pat) if return_patient else (images, masks)


def brats_spacing(n_slices: int, size: int, spacing: Sequence[float] | None,
                  fov_mm: Sequence[float] = (240.0, 240.0, 155.0)) -> tuple[float, float, float]:
  """Voxel size (x, y, z) mm of an anatomical BraTS volume: ``spacing`` if given, else FOV / shape
  (real BraTS geometry, 240×240×155 mm, so ``size=240, n_slices=155`` is exactly 1 mm³)."""
  if spacing is not None:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
      raise ValueError(f"spacing must be 3 positive numbers (x, y, z mm), got {spacing}")
    return sp
  return (fov_mm[0] / size, fov_mm[1] / size, fov_mm[2] / n_slices)


def generate_brats_patient(
    seed: int,
    site: str,
    index: int,
    *,
    n_slices: int = 32,
    size: int = 64,
    spacing: Sequence[float] | None = None,
    mass_effect: float = 0.3,
    return_patient: bool = False,
):
  """One anatomical BraTS patient in memory; same contract as `phantom.generate_brats_patient`.

  Whole brain (grid centred on the brain, voxel size `brats_spacing`),
  skull-stripped, four modalities; tumours 1.8x the site radius (high-grade
  tumours and their edema are large), enhancing with the site's BraTS
  probability (necrotic core inside an enhancing rim) else a solid
  non-enhancing core (BraTS label 1), edema label 2.

  Returns:
    (images int16 [D, H, W, 4] (flair, t1, t1ce, t2), seg uint8 [D, H, W]
    in {0, 1, 2, 4}, grade 'HGG' | 'LGG'); with ``return_patient`` also the
    `AnatomyPatient`.
  """
  sx, sy, sz = brats_spacing(n_slices, size, spacing)

  def grid_fn(tumour, deformation, tpl):
    return Grid(shape=(n_slices, size, size), spacing=(sz, sy, sx), centre=tuple(tpl.centre))

  pat = make_patient(seed, site, index, layout="brats", grid_fn=grid_fn, head=False, skull_stripped=True,
                     channels=(0, 1, 2, 3), size_factor=1.8, mass_effect=mass_effect)
  images = np.clip(np.round(pat.images * pat.profile.brats.scale), 0, np.iinfo(np.int16).max).astype(np.int16)
  seg = BRATS_LABEL_OF[pat.clean.classes]
  grade = "HGG" if pat.tumour is not None and pat.tumour.enhancing else "LGG"
  return (images, seg, grade, pat) if return_patient else (images, seg, grade)
