"""Figure of the anatomical phantom: one patient, four modalities + segmentation, two hospitals.

The same patient (ICBM152 anatomy after its own deformation, one tumour grown
in white matter) is rendered BraTS-style (skull-stripped FLAIR, T1, T1ce, T2)
through hospital A's scanner and through hospital B's scanner, and shown in
axial, coronal and sagittal planes through the tumour centre:

    rows: axial / coronal / sagittal
    cols: A FLAIR, A T1, A T1ce, A T2, segmentation | B FLAIR, B T1, B T1ce, B T2

Each image is windowed by its own 0.5-99.5 % brain percentiles (as a viewer
would), so what differs between the halves is the scanners' contrast, bias
field, noise and resolution (A: 3 T, thin slices; B: 1.5 T, thick slices).

  python benchmarks/anatomy_figure.py                      # -> docs/img/anatomy_phantom.png
  python benchmarks/anatomy_figure.py --sites CS,DU --index 2 --out /tmp/fig.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fedjax_seg.data import anatomy as A  # noqa: E402
from fedjax_seg.data import phantom  # noqa: E402

# Seed-report colours: necrotic / non-enhancing core blue, edema green, enhancing red.
SEG_COLOURS = {1: (0.15, 0.35, 1.0), 2: (0.1, 0.85, 0.2), 4: (1.0, 0.15, 0.1)}


def two_hospitals(seed: int, sites: tuple[str, str], index: int, size: int, n_slices: int):
  """Renders one patient (tumour and deformation from ``sites[0]``'s patient ``index``) at both hospitals.

  Returns (grid, classes uint8 [Z, Y, X], BraTS seg, [images float [Z, Y, X, 4] per site], profiles, tumour).
  """
  site_a = sites[0]
  prof = [A.scanner_profile(s, seed) for s in sites]
  rng_t = phantom.rng_for(seed, "anatomy", "figure", site_a, index, 1)
  tumour = A.grow_tumour(rng_t, whole_radius=A._tumour_size(rng_t, prof[0].base, 1.8), enhancing=True)
  tpl = A.load_template(2)
  deformation = A.random_deformation(phantom.rng_for(seed, "anatomy", "figure", site_a, index, 2), tpl.centre)
  sx, sy, sz = A.brats_spacing(n_slices, size, None)
  grid = A.Grid(shape=(n_slices, size, size), spacing=(sz, sy, sx), centre=tuple(tpl.centre))
  images, clean = [], None
  for k, p in enumerate(prof):
    clean = A.render(grid, deformation, tumour, phantom.rng_for(seed, "anatomy", "figure", site_a, index, 3),
                     mass_effect=0.3 * tumour.core_radius / 20.0, tissue_contrast=p.tissue_contrast,
                     tumour_contrast=tuple(p.brats.tumour_contrast))
    img = A.apply_scanner(clean, p, phantom.rng_for(seed, "anatomy", "figure", p.site, index, 4 + k),
                          skull_stripped=True)
    images.append(img * p.brats.scale)
  seg = A.BRATS_LABEL_OF[clean.classes]
  return grid, clean, seg, images, prof, tumour


def planes(vol: np.ndarray, c: tuple[int, int, int], box: tuple[slice, slice, slice]) -> list[np.ndarray]:
  """Axial (anterior up, patient right on the left), coronal and sagittal (superior up) through c,
  cropped to ``box`` (the brain's bounding box)."""
  z, y, x = c
  bz, by, bx = box
  return [vol[z, by, bx], vol[bz, y, bx][::-1], vol[bz, by, x][::-1]]


def window(img: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
  vals = img[brain]
  return float(np.percentile(vals, 0.5)), float(np.percentile(vals, 99.5))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                               "docs", "img", "anatomy_phantom.png"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sites", default="CS,DU", help="hospital A,B")
  p.add_argument("--index", type=int, default=0, help="patient index (tumour / deformation draw)")
  p.add_argument("--size", type=int, default=128, help="in-plane voxels (240 mm FOV)")
  p.add_argument("--slices", type=int, default=96, help="axial slices (155 mm)")
  p.add_argument("--dpi", type=int, default=100)
  args = p.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t0 = time.time()
  sites = tuple(s.strip() for s in args.sites.split(","))
  if len(sites) != 2:
    p.error("--sites needs exactly two hospitals, e.g. CS,DU")
  grid, clean, seg, images, prof, tumour = two_hospitals(args.seed, sites, args.index, args.size, args.slices)
  brain = clean.brain
  tum = seg > 0
  zc = int(np.argmax(tum.sum(axis=(1, 2))))
  yc = int(np.argmax(tum.sum(axis=(0, 2))))
  xc = int(np.argmax(tum.sum(axis=(0, 1))))
  centre = (zc, yc, xc)
  nz_, ny_, nx_ = np.nonzero(brain.any(axis=(1, 2)))[0], np.nonzero(brain.any(axis=(0, 2)))[0], \
      np.nonzero(brain.any(axis=(0, 1)))[0]
  box = tuple(slice(max(int(a.min()) - 2, 0), int(a.max()) + 3) for a in (nz_, ny_, nx_))
  dz, dy, dx = grid.spacing
  aspects = [dy / dx, dz / dx, dz / dy]

  ncol = 9
  fig, axes = plt.subplots(3, ncol, figsize=(ncol * 1.25, 3 * 1.3 + 0.55),
                           gridspec_kw=dict(wspace=0.02, hspace=0.04))
  names = [m.upper() if m != "t1ce" else "T1ce" for m in A.MODALITIES]
  for half, (img, pr) in enumerate(zip(images, prof)):
    for m in range(4):
      lo, hi = window(img[..., m], brain)
      col = m if half == 0 else 5 + m
      for r, (pl, asp) in enumerate(zip(planes(img[..., m], centre, box), aspects)):
        axes[r, col].imshow(pl, cmap="gray", vmin=lo, vmax=hi, aspect=asp, interpolation="nearest")
      axes[0, col].set_title(f"{pr.site} {names[m]}", fontsize=7, pad=2)
  base = images[0][..., 2]
  lo, hi = window(base, brain)
  for r, (pl, sg, asp) in enumerate(zip(planes(base, centre, box), planes(seg, centre, box), aspects)):
    rgb = np.repeat(np.clip((pl - lo) / (hi - lo), 0, 1)[..., None], 3, axis=-1)
    for lab, colour in SEG_COLOURS.items():
      rgb[sg == lab] = 0.45 * rgb[sg == lab] + 0.55 * np.asarray(colour)
    axes[r, 4].imshow(rgb, aspect=asp, interpolation="nearest")
  axes[0, 4].set_title("seg on T1ce", fontsize=7, pad=2)
  for r, name in enumerate(("axial", "coronal", "sagittal")):
    axes[r, 0].set_ylabel(name, fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
      s.set_visible(False)
  desc = [f"{pr.site}: {pr.field_tesla:g} T, PSF {pr.psf_mm:.1f} mm, slices {pr.slice_thickness_mm:.1f} mm, "
          f"GM/WM contrast x{pr.tissue_contrast:.2f}, noise {pr.base.noise_sigma:.3f}" for pr in prof]
  fig.suptitle("Anatomical phantom (ICBM152 2009a anatomy; tumour grown in white matter): "
               "one patient, two hospitals\n" + " | ".join(desc) +
               "\nseg: necrotic/non-enhancing core blue, edema green, enhancing red", fontsize=6.5, y=0.995)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=args.dpi, bbox_inches="tight", pad_inches=0.03)
  plt.close(fig)
  from PIL import Image  # 256-colour palette: grey images + a few label colours, ~2x smaller file

  Image.open(args.out).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(args.out, optimize=True)
  counts = {int(k): int(v) for k, v in zip(*np.unique(seg, return_counts=True))}
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) in {time.time() - t0:.1f}s; "
        f"grid {grid.shape} spacing {tuple(round(s, 2) for s in grid.spacing)} mm; seg voxels {counts}; "
        f"tumour core radius {tumour.core_radius:.1f} mm, edema margin {tumour.margin:.1f} mm")
  return 0


if __name__ == "__main__":
  sys.exit(main())
