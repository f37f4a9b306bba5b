"""Generated tissue with known per-cell counts: the ground truth of the accuracy tests.

:func:`make_tissue` draws an H&E-like slide with four cell types laid out in
spatial regions, the cell mask, per-cell counts that depend on the type and on
the cells' look, and Visium-like spots whose counts are the sums over their
inside cells (the 60 % rule of :mod:`geometry.assign`). The per-cell truth is on
the method's target scale: log1p(1e4 * cell counts / total counts of the context
spot's inside cells), for inside and outside cells alike.

:func:`simulate_spots_from_cells` is the single-cell route of the method: cells
with known counts (Xenium-like) summed into a grid of square patches with a
centred disk.

Everything here is plainly simulated: gene names start with ``SIM_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .geometry.assign import Assignment, assign_cells
from .geometry.cells import cell_table
from .geometry.spots import Spots, patch_grid, spots_from_anndata

TYPE_NAMES = ("lymphocyte", "tumour", "fibroblast", "plasma")
TYPE_LETTERS = ("A", "B", "C", "D")

# Ruifrok & Johnston optical-density vectors (R, G, B) of haematoxylin and eosin.
_H_OD = np.array([0.650, 0.704, 0.286])
_E_OD = np.array([0.072, 0.990, 0.105])

# Per-type look, indexed by type: position in the diameter range, elongation,
# nucleus radius / cell radius, nucleus offset along the long axis (x radius),
# nuclear haematoxylin, cytoplasm eosin, cytoplasm haematoxylin, lattice keep factor.
_SIZE = np.array([0.08, 0.85, 0.50, 0.45])
_ELONG = np.array([1.05, 1.15, 2.8, 1.3])
_NUC = np.array([0.80, 0.62, 0.55, 0.50])
_NUC_OFFSET = np.array([0.0, 0.0, 0.0, 0.40])
_H_NUC = np.array([1.45, 0.55, 1.00, 1.15])
_E_CYTO = np.array([0.22, 0.40, 0.28, 0.95])
_H_CYTO = np.array([0.06, 0.20, 0.04, 0.10])
_KEEP = np.array([1.0, 1.0, 0.65, 0.9])

TRUTH_FORMULA = "log1p(1e4 * cell counts / total counts of the context spot's inside cells)"


@dataclass
class Tissue:
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32, cells 1..N
    nuclei: np.ndarray  # (H, W) int32, the cell's label on its nucleus pixels
    um_per_px: float
    cells: pd.DataFrame  # the cell table of labels
    cell_types: np.ndarray  # (N,) int, index into type_names
    cell_features: pd.DataFrame  # per cell: type, look, density
    cells_xy: np.ndarray  # (N, 2) centroids (x, y)
    cell_counts: np.ndarray  # (N, G) int64
    genes: list[str]
    gene_info: pd.DataFrame  # per gene: program, type
    spots: object  # AnnData of spots (normalised as the spot reader returns)
    spot_layout: Spots
    cell_truth: object  # AnnData cells x genes, X on the target scale
    assignment: Assignment
    type_names: tuple[str, ...] = TYPE_NAMES
    seed: int = 0
    info: dict = field(default_factory=dict)


def _smooth_fields(rng, k: int, shape: tuple[int, int], step: float, sigma: float) -> tuple[np.ndarray, float]:
    """k standardised smooth random fields on a coarse grid of `step` px."""
    h, w = shape
    lh, lw = int(h // step) + 3, int(w // step) + 3
    f = ndi.gaussian_filter(rng.standard_normal((k, lh, lw)), (0, sigma, sigma), mode="wrap")
    f -= f.mean(axis=(1, 2), keepdims=True)
    f /= f.std(axis=(1, 2), keepdims=True) + 1e-12
    return f, step


def _sample(fields: np.ndarray, step: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    coords = np.stack([y / step, x / step])
    return np.stack([ndi.map_coordinates(f, coords, order=1, mode="nearest") for f in fields])


def _zscore(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return (v - v.mean()) / (v.std() + 1e-12)


def _gene_programs(n_genes: int) -> pd.DataFrame:
    if n_genes < 7:
        raise ValueError(f"n_genes must be >= 7 (4 type markers and 3 look-linked genes), got {n_genes}")
    rest = n_genes - 3
    per_type = max(1, (rest - rest // 5) // 4)
    n_hk = rest - 4 * per_type
    rows = []
    for t, letter in enumerate(TYPE_LETTERS):
        rows += [(f"SIM_TYPE_{letter}_{i + 1}", "type", t) for i in range(per_type)]
    rows += [("SIM_NUCSIZE", "nucleus size", -1), ("SIM_EOSIN", "eosin", -1), ("SIM_DENSITY", "density", -1)]
    rows += [(f"SIM_HK_{i + 1}", "housekeeping", -1) for i in range(n_hk)]
    return pd.DataFrame(rows, columns=["gene", "program", "type"]).set_index("gene", drop=False)


def _rasterise(h, w, cx, cy, a, b, theta) -> np.ndarray:
    """Owner of each pixel (-1: none): the cell whose ellipse holds it with the
    smallest normalised radius, so cells pack without overlapping."""
    owner = np.full((h, w), -1, np.int32)
    best = np.full((h, w), np.inf, np.float32)
    cos, sin = np.cos(theta), np.sin(theta)
    ex = np.sqrt((a * cos) ** 2 + (b * sin) ** 2)
    ey = np.sqrt((a * sin) ** 2 + (b * cos) ** 2)
    r0 = np.clip(np.floor(cy - ey), 0, h).astype(int)
    r1 = np.clip(np.ceil(cy + ey) + 1, 0, h).astype(int)
    c0 = np.clip(np.floor(cx - ex), 0, w).astype(int)
    c1 = np.clip(np.ceil(cx + ex) + 1, 0, w).astype(int)
    for i in range(len(cx)):
        if r0[i] >= r1[i] or c0[i] >= c1[i]:
            continue
        dy = np.arange(r0[i], r1[i])[:, None] - cy[i]
        dx = np.arange(c0[i], c1[i])[None, :] - cx[i]
        u = dx * cos[i] + dy * sin[i]
        v = -dx * sin[i] + dy * cos[i]
        rho = ((u / a[i]) ** 2 + (v / b[i]) ** 2).astype(np.float32)
        win_b = best[r0[i] : r1[i], c0[i] : c1[i]]
        win_o = owner[r0[i] : r1[i], c0[i] : c1[i]]
        take = (rho <= 1.0) & (rho < win_b)
        win_b[take] = rho[take]
        win_o[take] = i
    return owner


def _hex_spots(shape, pitch_px: float):
    """Visium hex centres over the canvas: rows dy = pitch * sqrt(3) / 2 apart,
    array_col of the parity of array_row, neighbours (r, c +- 2), (r +- 1, c +- 1)."""
    h, w = shape
    dy = pitch_px * np.sqrt(3) / 2
    half = pitch_px / 2
    nr = int((h - 1) // dy) + 1
    nc = int((w - 1) // half) + 1
    y_off = ((h - 1) - (nr - 1) * dy) / 2
    x_off = ((w - 1) - (nc - 1) * half) / 2
    rc = np.array([(r, c) for r in range(nr) for c in range(r % 2, nc, 2)], dtype=np.int64).reshape(-1, 2)
    xy = np.stack([x_off + rc[:, 1] * half, y_off + rc[:, 0] * dy], axis=1)
    return rc, xy


def _spot_sums(context: np.ndarray, inside: np.ndarray, counts, m: int) -> np.ndarray:
    """(M, G) sums of the counts of each spot's inside cells."""
    cells = np.flatnonzero(inside)
    ind = sp.csr_matrix((np.ones(cells.size), (context[cells], cells)), shape=(m, counts.shape[0]))
    out = ind @ counts
    return np.asarray(out.toarray() if sp.issparse(out) else out)


def _spots_anndata(x, ids, xy, rc, genes, meta, n_cells, scalefactors=True, rc_names=("array_row", "array_col")):
    import anndata as ad

    obs = pd.DataFrame(
        {
            rc_names[0]: rc[:, 0].astype(np.int64),
            rc_names[1]: rc[:, 1].astype(np.int64),
            "in_tissue": np.ones(len(ids), np.int64),
            "pxl_col_in_fullres": xy[:, 0],
            "pxl_row_in_fullres": xy[:, 1],
            "n_cells": np.asarray(n_cells, np.int64),
        },
        index=pd.Index([str(i) for i in ids]),
    )
    adata = ad.AnnData(X=np.asarray(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))
    adata.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    adata.uns["deepspot2cell_spots"] = dict(meta)
    if scalefactors:
        adata.uns["spatial"] = {
            "synthetic": {
                "scalefactors": {"spot_diameter_fullres": float(meta["diameter_px"]), "tissue_hires_scalef": 1.0},
                "metadata": {"source": str(meta["source"])},
            }
        }
    return adata


def make_tissue(
    seed: int = 0,
    shape: tuple[int, int] = (1024, 1024),
    um_per_px: float = 0.5,
    n_genes: int = 24,
    cell_diameter_um: tuple[float, float] = (8.0, 16.0),
    density: float = 0.75,
    spot_diameter_um: float = 55.0,
    spot_pitch_um: float = 100.0,
) -> Tissue:
    """Generate a tissue: H&E-like image, cell mask, per-cell counts, Visium-like spots.

    density: the mean share of the slots of a cell-sized jittered hex lattice that
    hold a cell (0..1], modulated by a smooth field and by the cell type (fibroblast
    regions are sparser). Types cluster in regions of about 100-200 um.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = np.random.default_rng(seed)
    h, w = int(shape[0]), int(shape[1])
    genes_df = _gene_programs(n_genes)
    genes = genes_df["gene"].tolist()
    d_lo, d_hi = (float(cell_diameter_um[0]) / um_per_px, float(cell_diameter_um[1]) / um_per_px)

    # Smooth fields: 4 type affinities, local density, fibre orientation, stroma fibre mix.
    fields, step = _smooth_fields(rng, 7, (h, w), step=25.0 / um_per_px, sigma=2.5)

    # Seeds on a jittered hex lattice with cell-sized spacing.
    s = 0.5 * (d_lo + d_hi) * 0.9
    dy = s * np.sqrt(3) / 2
    ys = np.arange(dy / 2, h, dy)
    pts = [(x + (i % 2) * s / 2, y) for i, y in enumerate(ys) for x in np.arange(s / 4, w, s)]
    seeds = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    seeds += rng.uniform(-0.3 * s, 0.3 * s, size=seeds.shape)
    seeds = seeds[(seeds[:, 0] >= 0) & (seeds[:, 0] <= w - 1) & (seeds[:, 1] >= 0) & (seeds[:, 1] <= h - 1)]
    f = _sample(fields, step, seeds[:, 0], seeds[:, 1])
    logits = 2.2 * f[:4]
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    types = (p.cumsum(0) < rng.uniform(size=p.shape[1])).sum(0).clip(0, 3)
    keep = rng.uniform(size=len(seeds)) < np.clip(density * (1 + 0.3 * f[4]) * _KEEP[types], 0.02, 1.0)
    seeds, types, f = seeds[keep], types[keep], f[:, keep]
    n0 = len(seeds)

    # Per-cell look, with continuous variation inside each type.
    u = np.clip(_SIZE[types] + 0.12 * rng.standard_normal(n0), 0, 1)
    radius = 0.5 * (d_lo + (d_hi - d_lo) * u)
    elong = _ELONG[types] * np.exp(0.08 * rng.standard_normal(n0))
    a, b = radius * np.sqrt(elong), radius / np.sqrt(elong)
    theta = np.where(types == 2, np.pi * f[5] / 2 + 0.2 * rng.standard_normal(n0), rng.uniform(0, np.pi, n0))
    nuc = np.clip(_NUC[types] * np.exp(0.12 * rng.standard_normal(n0)), 0.3, 0.9)
    h_nuc = _H_NUC[types] * np.exp(0.12 * rng.standard_normal(n0))
    e_cyto = _E_CYTO[types] * np.exp(0.15 * rng.standard_normal(n0))
    h_cyto = _H_CYTO[types] * np.exp(0.2 * rng.standard_normal(n0))
    offset = _NUC_OFFSET[types] * a * rng.choice([-1.0, 1.0], n0)

    owner = _rasterise(h, w, seeds[:, 0], seeds[:, 1], a, b, theta)
    area = np.bincount(owner[owner >= 0], minlength=n0)
    ok = area >= np.maximum(8, 0.25 * np.pi * a * b)
    n = int(ok.sum())
    relabel = np.zeros(n0 + 1, np.int32)
    relabel[1:][ok] = np.arange(1, n + 1, dtype=np.int32)
    labels = relabel[owner + 1]
    sel = np.flatnonzero(ok)
    seeds, types, a, b, theta, nuc = seeds[sel], types[sel], a[sel], b[sel], theta[sel], nuc[sel]
    h_nuc, e_cyto, h_cyto, offset, elong = h_nuc[sel], e_cyto[sel], h_cyto[sel], offset[sel], elong[sel]

    # Pixel geometry within each cell: nucleus ellipse (offset for plasma-like cells).
    fg = np.flatnonzero(labels.ravel())
    ci = labels.ravel()[fg] - 1
    pr, pc = np.divmod(fg, w)
    ddy, ddx = pr - seeds[ci, 1], pc - seeds[ci, 0]
    cos, sin = np.cos(theta[ci]), np.sin(theta[ci])
    uu = ddx * cos + ddy * sin - offset[ci]
    vv = -ddx * sin + ddy * cos
    rho_n = (uu / (nuc[ci] * a[ci])) ** 2 + (vv / (nuc[ci] * b[ci])) ** 2
    in_nuc = rho_n <= 1.0
    nuclei = np.zeros(h * w, np.int32)
    nuclei[fg[in_nuc]] = ci[in_nuc] + 1
    nuclei = nuclei.reshape(h, w)

    # Stain concentration maps: stroma, cytoplasm, nuclei, membranes.
    noise = rng.standard_normal((3, h, w), dtype=np.float32)
    fib1 = ndi.gaussian_filter(noise[0], (0.8, 5.0))
    fib2 = ndi.gaussian_filter(noise[0], (5.0, 0.8))
    mix = 1 / (1 + np.exp(-2 * ndi.map_coordinates(fields[6], np.mgrid[0:h:8, 0:w:8] / step, order=1, mode="nearest")))
    mix = np.kron(mix, np.ones((8, 8), np.float32))[:h, :w]
    fibre = mix * fib1 / (fib1.std() + 1e-6) + (1 - mix) * fib2 / (fib2.std() + 1e-6)
    fine = ndi.gaussian_filter(noise[1], 1.0)
    fine /= fine.std() + 1e-6
    hmap = (0.035 + 0.01 * fine).astype(np.float32).ravel()
    emap = np.clip(0.20 + 0.07 * fibre + 0.02 * fine, 0.03, None).astype(np.float32).ravel()
    grain = noise[2].ravel()[fg]
    cyto_e = e_cyto[ci] * (1 + 0.1 * fine.ravel()[fg])
    hmap[fg] = h_cyto[ci]
    emap[fg] = cyto_e
    t_nuc = types[ci]
    vesicular = h_nuc[ci] * (0.45 + 1.1 * rho_n**3)  # pale centre, chromatin at the rim
    nucleolus = (uu - 0.25 * nuc[ci] * a[ci]) ** 2 + vv**2 <= (0.22 * nuc[ci] * np.minimum(a[ci], b[ci])) ** 2
    dense = h_nuc[ci] * (0.9 + 0.15 * grain)
    h_n = np.where(t_nuc == 1, vesicular + 0.9 * nucleolus, dense)
    hmap[fg[in_nuc]] = h_n[in_nuc]
    emap[fg[in_nuc]] = 0.08 + 0.15 * (t_nuc[in_nuc] == 1) * nucleolus[in_nuc]
    from skimage.segmentation import find_boundaries

    edge = find_boundaries(labels, mode="inner").ravel()
    hmap[edge] += 0.04
    emap[edge] += 0.12
    hmap, emap = hmap.reshape(h, w), emap.reshape(h, w)

    # Per-cell measured look (before blur and noise), then the image.
    nuc_area = np.bincount(nuclei.ravel(), minlength=n + 1)[1:]
    lab_flat = labels.ravel()
    nuc_flat = nuclei.ravel()
    h_sum = np.bincount(nuc_flat, weights=hmap.ravel(), minlength=n + 1)[1:]
    cyto = (lab_flat > 0) & (nuc_flat == 0)
    e_sum = np.bincount(lab_flat[cyto], weights=emap.ravel()[cyto], minlength=n + 1)[1:]
    cyto_area = np.bincount(lab_flat[cyto], minlength=n + 1)[1:]
    h_int = np.where(nuc_area > 0, h_sum / np.maximum(nuc_area, 1), h_nuc)
    eosin = np.where(cyto_area > 0, e_sum / np.maximum(cyto_area, 1), e_cyto)

    hb = ndi.gaussian_filter(hmap, 0.7)
    eb = ndi.gaussian_filter(emap, 0.7)
    od = hb[..., None] * _H_OD.astype(np.float32) + eb[..., None] * _E_OD.astype(np.float32)
    rgb = np.exp(-od) * np.array([0.98 * 255, 0.96 * 255, 0.98 * 255], np.float32)
    rgb += 2.5 * rng.standard_normal((h, w, 3), dtype=np.float32)
    image = np.clip(rgb, 0, 255).astype(np.uint8)

    cells = cell_table(labels)
    cells_xy = cells[["x", "y"]].to_numpy()
    radius_um = 25.0
    tree = cKDTree(cells_xy)
    local = tree.query_ball_point(cells_xy, radius_um / um_per_px, return_length=True) - 1
    features = pd.DataFrame(
        {
            "label": cells["label"].to_numpy(),
            "type": types.astype(np.int64),
            "type_name": pd.Categorical.from_codes(types, categories=list(TYPE_NAMES)),
            "area": cells["area"].to_numpy(),
            "nucleus_area": nuc_area.astype(np.int64),
            "h_intensity": h_int,
            "eosin": eosin,
            "elongation": elong,
            "density": local.astype(np.int64),
        },
        index=cells.index,
    )

    # Counts: type markers, nucleus size, eosin, density; library sizes vary mildly.
    counts = _simulate_counts(rng, features, genes_df)

    # Visium-like spots, counts summed over each spot's inside cells.
    pitch_px = spot_pitch_um / um_per_px
    d_px = spot_diameter_um / um_per_px
    rc, sxy = _hex_spots((h, w), pitch_px)
    meta = {"diameter_px": float(d_px), "diameter_um": float(spot_diameter_um), "source": "synthetic", "kind": "visium"}
    ids = np.array([f"r{r}_c{c}" for r, c in rc], dtype=object)
    full = _spots_anndata(np.zeros((len(ids), len(genes))), ids, sxy, rc, genes, meta, np.zeros(len(ids)))
    first = assign_cells(labels, cells, spots_from_anndata(full))
    kept = np.flatnonzero(first.cells_per_spot > 0)
    # Spots with no inside cell are dropped; assigning again against the kept spots
    # gives outside cells a context spot that exists (inside cells do not change).
    kept_ad = full[kept].copy()
    layout = spots_from_anndata(kept_ad)
    asg = assign_cells(labels, cells, layout)
    x = _spot_sums(asg.spot, asg.inside, counts, len(kept))
    spots = _spots_anndata(x, ids[kept], sxy[kept], rc[kept], genes, meta, asg.cells_per_spot)

    truth = _cell_truth(cells, features, counts, genes, asg, layout, x.sum(1))
    truth.uns["um_per_px"] = float(um_per_px)
    info = {"n_seeds": int(n0), "n_cells": int(n), "n_spots_grid": int(len(ids)), "n_spots": int(len(kept))}
    return Tissue(
        image=image,
        labels=labels,
        nuclei=nuclei,
        um_per_px=float(um_per_px),
        cells=cells,
        cell_types=types.astype(np.int64),
        cell_features=features,
        cells_xy=cells_xy,
        cell_counts=counts,
        genes=genes,
        gene_info=genes_df,
        spots=spots,
        spot_layout=layout,
        cell_truth=truth,
        assignment=asg,
        seed=seed,
        info=info,
    )


def _simulate_counts(rng, features: pd.DataFrame, genes_df: pd.DataFrame) -> np.ndarray:
    n, g = len(features), len(genes_df)
    types = features["type"].to_numpy()
    z_nuc = _zscore(np.log(np.maximum(features["nucleus_area"].to_numpy(), 1)))
    z_eos = _zscore(features["eosin"].to_numpy())
    z_den = _zscore(features["density"].to_numpy())
    base = np.exp(rng.normal(0.0, 0.4, g))
    eff = np.zeros((n, g))
    program = genes_df["program"].to_numpy()
    gtype = genes_df["type"].to_numpy()
    for j in range(g):
        if program[j] == "type":
            eff[:, j] = rng.uniform(1.6, 2.6) * (types == gtype[j])
        elif program[j] == "nucleus size":
            eff[:, j] = 1.0 * z_nuc
        elif program[j] == "eosin":
            eff[:, j] = 1.0 * z_eos
        elif program[j] == "density":
            eff[:, j] = 0.8 * z_den
    area = features["area"].to_numpy(dtype=np.float64)
    lib = np.sqrt(area / np.median(area)) * np.exp(rng.normal(0.0, 0.15, n))
    mu = 3.0 * lib[:, None] * base[None, :] * np.exp(eff)
    return rng.poisson(mu).astype(np.int64)


def _cell_truth(cells, features, counts, genes, asg: Assignment, layout: Spots, spot_totals):
    """AnnData of the cells' true expression on the target scale (NaN without a context spot)."""
    import anndata as ad

    ctx = asg.spot
    total = np.full(len(ctx), np.nan)
    has = ctx >= 0
    total[has] = np.asarray(spot_totals, dtype=np.float64)[ctx[has]]
    total[total <= 0] = np.nan
    with np.errstate(invalid="ignore"):
        x = np.log1p(1e4 * counts / total[:, None])
    ids = np.asarray(layout.ids, dtype=object)
    obs = pd.DataFrame(
        {
            "label": cells["label"].to_numpy(np.int64),
            "x": cells["x"].to_numpy(),
            "y": cells["y"].to_numpy(),
            "area": cells["area"].to_numpy(np.int64),
            "type": features["type"].to_numpy(np.int64),
            "type_name": features["type_name"].astype(str).to_numpy(),
            "inside": asg.inside.astype(bool),
            "inside_fraction": asg.inside_fraction,
            "spot": np.where(has, ids[np.maximum(ctx, 0)], "").astype(str),
            "spot_index": ctx.astype(np.int64),
        },
        index=pd.Index(cells["label"].astype(str).to_numpy()),
    )
    truth = ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes))))
    truth.layers["counts"] = counts.astype(np.int32)
    truth.obsm["spatial"] = cells[["x", "y"]].to_numpy()
    truth.uns["truth_formula"] = TRUTH_FORMULA
    return truth


def write_files(tissue: Tissue, folder) -> dict[str, Path]:
    """Write the slide (tiled TIFF with resolution tags), the label mask (TIFF), the
    spots and the cell truth (.h5ad) into `folder`; returns their paths by name."""
    import tifffile

    from .io.atomic import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "slide": folder / "slide.tif",
        "labels": folder / "labels.tif",
        "spots": folder / "spots.h5ad",
        "truth": folder / "cells_truth.h5ad",
    }
    px_per_cm = 1e4 / tissue.um_per_px
    res = dict(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
    with atomic_path(paths["slide"]) as tmp:
        tifffile.imwrite(tmp, tissue.image, photometric="rgb", tile=(256, 256), compression="zlib", metadata=None, **res)
    with atomic_path(paths["labels"]) as tmp:
        tifffile.imwrite(tmp, tissue.labels, photometric="minisblack", tile=(256, 256), compression="zlib", metadata=None, **res)
    with atomic_path(paths["spots"]) as tmp:
        tissue.spots.write_h5ad(tmp)
    with atomic_path(paths["truth"]) as tmp:
        tissue.cell_truth.write_h5ad(tmp)
    return paths


def simulate_spots_from_cells(
    labels,
    cells: pd.DataFrame,
    counts,
    genes,
    *,
    um_per_px: float,
    patch_um: float | None = None,
    spot_diameter_um: float | None = None,
):
    """Single-cell data as simulated spots: a grid of square patches, each with a
    centred disk; a patch's counts are the sums over the cells >= 60 % in its disk.

    Defaults as in the reference: 224 px patches holding a 160 px disk at
    0.2125 um/px (patch 47.6 um, disk 34 um), converted with `um_per_px`.
    Returns (spots AnnData of the patches with an inside cell, ids matching the
    grid's, the full grid `Spots`, the `Assignment` against that grid).
    """
    if patch_um is None:
        patch_um = 224 * 0.2125
    if spot_diameter_um is None:
        spot_diameter_um = 160 * 0.2125
    genes = list(genes)
    if counts.shape != (len(cells), len(genes)):
        raise ValueError(f"counts has shape {counts.shape}, expected ({len(cells)}, {len(genes)})")
    patch_px = float(patch_um) / um_per_px
    d_px = float(spot_diameter_um) / um_per_px
    grid, _ = patch_grid(tuple(labels.shape), patch_px, cells[["x", "y"]].to_numpy(dtype=np.float64), spot_diameter_px=d_px)
    asg = assign_cells(labels, cells, grid)
    sums = _spot_sums(asg.spot, asg.inside, counts, len(grid))
    kept = np.flatnonzero(asg.cells_per_spot > 0)
    meta = {
        "diameter_px": d_px,
        "diameter_um": float(spot_diameter_um),
        "patch_px": patch_px,
        "patch_um": float(patch_um),
        "source": "simulated",
        "kind": "grid",
    }
    adata = _spots_anndata(
        sums[kept], grid.ids[kept], grid.xy[kept], grid.grid_rc[kept], genes, meta, asg.cells_per_spot[kept],
        scalefactors=False,
        rc_names=("grid_row", "grid_col"),
    )
    return adata, grid, asg
