#!/usr/bin/env python
"""Regenerate the shipped sample data's cell mask, spots and per-cell truth.

    python scripts/make_sample_data.py [--out sample_data] [--slide PATH]

From the real H&E slide (CMU-1 small region, CC0) this makes, deterministically
(no randomness outside one seeded generator, no dependence on the machine):

1. ``cmu_small_region_cells.tif``: a cell mask by a simple classical method.
   Nuclei are haematoxylin blobs: colour deconvolution (skimage.color.rgb2hed),
   Gaussian smoothing, Otsu's threshold over the tissue, OR a local-contrast
   threshold for paler nuclei, morphological cleaning, then a distance-transform
   watershed to split touching nuclei. Each nucleus is grown into a cell body
   by ``expand_labels`` (3 um), limited to the tissue. uint32, zlib-compressed,
   256 px tiles, the slide's level-0 shape.
2. ``cell_truth.h5ad``: SIMULATED expression of every cell (cells x genes,
   counts) from a small panel of gene programs driven by each cell's MEASURED
   morphology (nuclear haematoxylin, nuclear size, cytoplasmic eosin and
   haematoxylin, local cell density, nuclear elongation, ...), counts drawn
   from a seeded Gamma-Poisson (negative binomial) around those rates.
3. ``spots.h5ad``: Visium-like spots (55 um disks, 100 um pitch, hexagonal)
   over the tissue whose counts are the sums of their INSIDE cells' counts
   (>= 60 % of the cell's mask in the disk, by ``geometry.assign.assign_cells``),
   in the squidpy convention.

The model checkpoint is made afterwards by ``scripts/train_sample_model.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "cmu1_small_region" / "cmu_small_region.svs"

SEED = 20240611
LIBRARY_ID = "cmu1_small_region"
SLIDE_NAME = "cmu_small_region.svs"
MASK_NAME = "cmu_small_region_cells.tif"
SPOTS_NAME = "spots.h5ad"
TRUTH_NAME = "cell_truth.h5ad"

# Visium geometry
SPOT_DIAMETER_UM = 55.0
SPOT_PITCH_UM = 100.0
MIN_TISSUE_FRACTION = 0.2  # a spot is kept when this much of its disk is tissue ...
# ... and it holds at least one inside cell (else it has no counts at all)

# segmentation parameters (um where physical)
TISSUE_MAX_RGB = 215.0
CELL_GROWTH_UM = 3.0
DENSITY_RADIUS_UM = 25.0

# gene programs: weights on the standardised measured features; log-rate = base + sum w * z.
# "type:NAME" weights the log of a soft cell identity instead (see CELL_TYPES).
FEATURES = ("nuclear_h", "nuclear_size", "cytoplasm_e", "cytoplasm_h", "density", "elongation")
PROGRAMS: dict[str, dict[str, float]] = {
    "SIM_NUCLEAR_SIZE_PROGRAM": {"nuclear_size": 0.9},
    "SIM_HAEMATOXYLIN_PROGRAM": {"nuclear_h": 0.9},
    "SIM_EOSIN_PROGRAM": {"cytoplasm_e": 0.9},
    "SIM_CYTOPLASM_HAEMATOXYLIN_PROGRAM": {"cytoplasm_h": 0.8},
    "SIM_DENSITY_PROGRAM": {"density": 0.8},
    "SIM_ELONGATION_PROGRAM": {"elongation": 0.9},
    "SIM_EPITHELIAL_TYPE_PROGRAM": {"type:epithelial": 1.0},
    "SIM_STROMAL_TYPE_PROGRAM": {"type:stromal": 1.0},
    "SIM_IMMUNE_TYPE_PROGRAM": {"type:immune": 1.0},
    "SIM_PALE_LARGE_NUCLEUS_PROGRAM": {"nuclear_size": 0.6, "nuclear_h": -0.6},
    "SIM_DARK_DENSE_PROGRAM": {"nuclear_h": 0.6, "density": 0.6},
    "SIM_SPINDLE_STROMA_PROGRAM": {"elongation": 0.5, "cytoplasm_e": 0.5, "cytoplasm_h": -0.5},
    "SIM_HOUSEKEEPING": {},
    "SIM_NOISE": {},  # a per-cell random log-rate, unrelated to morphology
}
# soft cell identities (skin): a score per type from the same measured features,
# identity = softmax(TYPE_SHARPNESS * [scores..., 0 for "other"])
CELL_TYPES: dict[str, dict[str, float]] = {
    "epithelial": {"density": 1.0, "cytoplasm_h": 1.0, "cytoplasm_e": -0.5},  # keratinocyte-like: packed, purple cytoplasm
    "stromal": {"elongation": 1.0, "cytoplasm_e": 1.0, "density": -0.5},  # fibroblast-like: spindle nuclei in eosin
    "immune": {"nuclear_h": 1.0, "nuclear_size": -1.0, "elongation": -0.5},  # lymphocyte-like: small, round, dark
}
TYPE_SHARPNESS = 1.5
TYPE_FLOOR = 0.1  # a type marker's rate is base * (TYPE_FLOOR + 2 * identity)
# mean counts per cell of each gene at z = 0
BASE_COUNTS = {
    "SIM_NUCLEAR_SIZE_PROGRAM": 30.0,
    "SIM_HAEMATOXYLIN_PROGRAM": 25.0,
    "SIM_EOSIN_PROGRAM": 30.0,
    "SIM_CYTOPLASM_HAEMATOXYLIN_PROGRAM": 20.0,
    "SIM_DENSITY_PROGRAM": 20.0,
    "SIM_ELONGATION_PROGRAM": 25.0,
    "SIM_EPITHELIAL_TYPE_PROGRAM": 20.0,
    "SIM_STROMAL_TYPE_PROGRAM": 20.0,
    "SIM_IMMUNE_TYPE_PROGRAM": 15.0,
    "SIM_PALE_LARGE_NUCLEUS_PROGRAM": 15.0,
    "SIM_DARK_DENSE_PROGRAM": 15.0,
    "SIM_SPINDLE_STROMA_PROGRAM": 12.0,
    "SIM_HOUSEKEEPING": 40.0,
    "SIM_NOISE": 15.0,
}
# a program whose gene sits past this many standard deviations of a feature is capped there
Z_CLIP = 3.0
NB_THETA = 20.0  # Gamma-Poisson shape: variance = mu + mu^2 / theta
LIBRARY_SD = 0.15  # per-cell log-normal size factor
NOISE_SD = 0.8


# ---------------------------------------------------------------- segmentation


def segment(rgb: np.ndarray, um_per_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cells uint32, nuclei uint32, tissue bool) of an RGB uint8 H&E image."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk, opening
    from skimage.segmentation import expand_labels, relabel_sequential, watershed

    px2 = 1.0 / um_per_px**2  # px per um^2
    tissue = ndi.gaussian_filter(rgb.mean(axis=2), 4.0) < TISSUE_MAX_RGB
    tissue = _drop_small(tissue, int(400 * px2))

    h = rgb2hed(rgb)[..., 0]
    hs = ndi.gaussian_filter(h, 1.0)
    thr = float(threshold_otsu(hs[tissue]))
    background = ndi.gaussian_filter(hs, 5.0 / um_per_px)
    nuclei = ((hs > thr) | (((hs - background) > 0.3 * thr) & (hs > 0.6 * thr))) & tissue
    nuclei = opening(nuclei, disk(2))
    nuclei = ~_drop_small(~nuclei, int(4 * px2))  # fill small holes
    nuclei = _drop_small(nuclei, int(12 * px2))

    dist = ndi.gaussian_filter(ndi.distance_transform_edt(nuclei), 1.0)
    blobs, _ = ndi.label(nuclei)
    peaks = peak_local_max(dist, min_distance=int(round(3.0 / um_per_px)), labels=blobs, exclude_border=False)
    peaks = peaks[np.lexsort((peaks[:, 1], peaks[:, 0]))]  # row-major: independent of the peak finder's order
    markers = np.zeros(nuclei.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    nuc = watershed(-dist, markers, mask=nuclei)
    sizes = np.bincount(nuc.ravel())
    small = np.flatnonzero(sizes < int(8 * px2))
    nuc[np.isin(nuc, small)] = 0
    nuc, _, _ = relabel_sequential(nuc)
    cells = expand_labels(nuc, distance=CELL_GROWTH_UM / um_per_px)
    cells[~tissue] = 0
    return cells.astype(np.uint32), nuc.astype(np.uint32), tissue


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Connected components of ``mask`` with at least ``min_px`` pixels."""
    from scipy import ndimage as ndi

    lab, _ = ndi.label(mask)
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


# ---------------------------------------------------------------- morphology


def measure(rgb: np.ndarray, cells: np.ndarray, nuclei: np.ndarray, um_per_px: float) -> pd.DataFrame:
    """Per-cell measured morphology, indexed by label (the cells' and nuclei's shared id)."""
    from scipy.spatial import cKDTree
    from skimage.color import rgb2hed
    from skimage.measure import regionprops_table

    hed = rgb2hed(rgb)
    n = int(cells.max())
    idx = np.arange(1, n + 1)

    def mean_over(lab: np.ndarray, values: np.ndarray) -> np.ndarray:
        cnt = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        tot = np.bincount(lab.ravel(), weights=values.ravel(), minlength=n + 1)[1:]
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan), cnt

    nuc_h, nuc_px = mean_over(nuclei, hed[..., 0])
    cyto = np.where(nuclei == 0, cells, 0)
    cyto_e, _ = mean_over(cyto, hed[..., 1])
    cyto_h, _ = mean_over(cyto, hed[..., 0])
    cell_px = np.bincount(cells.ravel(), minlength=n + 1)[1:]
    props = regionprops_table(nuclei, properties=("label", "centroid", "axis_major_length", "axis_minor_length"))
    order = np.argsort(props["label"])
    major = np.asarray(props["axis_major_length"])[order]
    minor = np.asarray(props["axis_minor_length"])[order]
    cy, cx = np.asarray(props["centroid-0"])[order], np.asarray(props["centroid-1"])[order]
    if not np.array_equal(np.asarray(props["label"])[order], idx):
        raise RuntimeError("nuclei and cells must share the labels 1..N")
    xy = np.stack([cx, cy], axis=1)
    neighbours = cKDTree(xy).query_ball_point(xy, DENSITY_RADIUS_UM / um_per_px, return_length=True) - 1
    # cells whose whole body is nucleus (none expected) measure their cytoplasm as the median
    cyto_e = np.where(np.isfinite(cyto_e), cyto_e, np.nanmedian(cyto_e))
    cyto_h = np.where(np.isfinite(cyto_h), cyto_h, np.nanmedian(cyto_h))
    return pd.DataFrame(
        {
            "nuclear_h": nuc_h,
            "nuclear_size": np.log(nuc_px * um_per_px**2),
            "cytoplasm_e": cyto_e,
            "cytoplasm_h": cyto_h,
            "density": np.log1p(neighbours),
            "elongation": 1.0 - minor / np.maximum(major, 1e-9),
            "cell_size": np.log(cell_px * um_per_px**2),
        },
        index=pd.Index(idx, name="label"),
    )


def standardise(features: pd.DataFrame) -> pd.DataFrame:
    """Robust z-scores (median, 1.4826 * MAD), clipped to +-Z_CLIP."""
    med = features.median()
    mad = (features - med).abs().median() * 1.4826
    return ((features - med) / mad.where(mad > 0, 1.0)).clip(-Z_CLIP, Z_CLIP)


# ---------------------------------------------------------------- expression


def cell_identities(z: pd.DataFrame) -> pd.DataFrame:
    """(N, types + "other") soft identities from the standardised features."""
    scores = np.stack([sum(w * z[f].to_numpy() for f, w in CELL_TYPES[t].items()) for t in CELL_TYPES], axis=1)
    scores = np.concatenate([scores, np.zeros((len(z), 1))], axis=1) * TYPE_SHARPNESS
    scores -= scores.max(axis=1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=1, keepdims=True)
    return pd.DataFrame(p, index=z.index, columns=[*CELL_TYPES, "other"])


def simulate_counts(z: pd.DataFrame, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(counts (N, G) int64, rates (N, G) float64) of the gene programs."""
    genes = list(PROGRAMS)
    n = len(z)
    identity = cell_identities(z)
    log_rate = np.empty((n, len(genes)))
    for j, g in enumerate(genes):
        value = np.log(BASE_COUNTS[g]) + np.zeros(n)
        for feature, w in PROGRAMS[g].items():
            if feature.startswith("type:"):
                value += w * np.log(TYPE_FLOOR + 2.0 * identity[feature[5:]].to_numpy())
            else:
                value += w * z[feature].to_numpy()
        log_rate[:, j] = value
    j_noise = genes.index("SIM_NOISE")
    log_rate[:, j_noise] += rng.normal(0.0, NOISE_SD, n)
    size_factor = np.exp(rng.normal(0.0, LIBRARY_SD, n))
    rates = np.exp(log_rate) * size_factor[:, None]
    counts = rng.poisson(rng.gamma(NB_THETA, rates / NB_THETA))
    return counts.astype(np.int64), rates


# ---------------------------------------------------------------- spots


def hex_spots(shape: tuple[int, int], um_per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Visium layout over the image: (array_row, array_col) and centres (x, y) in px.

    Neighbours along a row are two array columns (one pitch) apart; rows are
    pitch * sqrt(3) / 2 apart and odd rows are shifted by half a pitch.
    """
    h, w = shape
    pitch = SPOT_PITCH_UM / um_per_px
    dy = pitch * np.sqrt(3.0) / 2.0
    radius = SPOT_DIAMETER_UM / um_per_px / 2.0
    n_rows = int(np.floor((h - 2 * radius) / dy)) + 1
    n_cols = int(np.floor((w - 2 * radius) / (pitch / 2.0))) + 1
    oy = (h - 1 - (n_rows - 1) * dy) / 2.0
    ox = (w - 1 - (n_cols - 1) * pitch / 2.0) / 2.0
    rc = np.array([(r, c) for r in range(n_rows) for c in range(n_cols) if (r + c) % 2 == 0], dtype=np.int64)
    xy = np.stack([ox + rc[:, 1] * pitch / 2.0, oy + rc[:, 0] * dy], axis=1)
    return rc, xy


def disk_fraction(mask: np.ndarray, xy: np.ndarray, radius: float) -> np.ndarray:
    out = np.zeros(len(xy))
    rows, cols = np.arange(mask.shape[0]), np.arange(mask.shape[1])
    for i, (x, y) in enumerate(xy):
        r0, r1 = int(max(0, np.ceil(y - radius))), int(min(mask.shape[0], np.floor(y + radius) + 1))
        c0, c1 = int(max(0, np.ceil(x - radius))), int(min(mask.shape[1], np.floor(x + radius) + 1))
        d = ((rows[r0:r1, None] - y) ** 2 + (cols[None, c0:c1] - x) ** 2) <= radius**2
        out[i] = mask[r0:r1, c0:c1][d].mean() if d.any() else 0.0
    return out


def _spots(ids, xy, diameter_px):
    from napari_deepspot2cell.geometry.spots import Spots

    return Spots(
        ids=np.asarray(ids, dtype=object), xy=np.asarray(xy, np.float64), tile_px=float(diameter_px),
        kind="visium", neighbours=np.full((len(ids), 6), -1, np.int64), diameter_px=float(diameter_px),
    )


# ---------------------------------------------------------------- writing


def write_mask(path: Path, cells: np.ndarray) -> None:
    import tifffile

    from napari_deepspot2cell.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        # no date, no software tag: the file depends on the pixels alone
        tifffile.imwrite(tmp, cells, tile=(256, 256), compression="zlib", metadata=None, software=False)


def write_h5ad(path: Path, adata) -> None:
    from napari_deepspot2cell.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


def make(out: Path, slide_path: Path = DEFAULT_SLIDE, *, copy_slide: bool = True, log=print) -> dict:
    """Make the mask, the truth and the spots in ``out``; returns their paths and counts."""
    import anndata as ad
    import scipy.sparse as sp

    from napari_deepspot2cell import __version__
    from napari_deepspot2cell.geometry.assign import assign_cells
    from napari_deepspot2cell.geometry.cells import cell_table
    from napari_deepspot2cell.io.slides import open_slide

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slide = open_slide(slide_path)
    um = float(slide.um_per_px)
    rgb = np.asarray(slide.read_region(0, 0, *slide.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cells, nuclei, tissue = segment(rgb, um)
    log(f"segmented {int(cells.max())} cells")

    table = cell_table(cells)
    feats = measure(rgb, cells, nuclei, um).loc[table.index]
    z = standardise(feats[list(FEATURES)])
    rng = np.random.default_rng(SEED)
    counts, rates = simulate_counts(z, rng)
    genes = list(PROGRAMS)

    diameter_px = SPOT_DIAMETER_UM / um
    rc, xy = hex_spots(slide.shape, um)
    frac = disk_fraction(tissue, xy, diameter_px / 2.0)
    cand = np.flatnonzero(frac >= MIN_TISSUE_FRACTION)
    ids = np.array([f"spot_r{r:02d}_c{c:02d}" for r, c in rc], dtype=object)
    first = assign_cells(cells, table, _spots(ids[cand], xy[cand], diameter_px))
    keep = cand[first.cells_per_spot > 0]
    spots = _spots(ids[keep], xy[keep], diameter_px)
    assignment = assign_cells(cells, table, spots)
    inside = assignment.inside
    m = len(keep)
    spot_counts = np.zeros((m, len(genes)), np.int64)
    np.add.at(spot_counts, assignment.spot[inside], counts[inside])
    log(f"{m} spots, {int(inside.sum())} of {len(table)} cells inside one")

    var = pd.DataFrame(index=pd.Index(genes, name=None))
    var["program"] = [", ".join(f"{w:+g} {f}" for f, w in PROGRAMS[g].items()) or ("random per cell" if g == "SIM_NOISE" else "constant") for g in genes]
    spots_obs = pd.DataFrame(
        {
            "in_tissue": np.ones(m, np.int64),
            "array_row": rc[keep, 0],
            "array_col": rc[keep, 1],
            "tissue_fraction": frac[keep],
            "n_inside_cells": assignment.cells_per_spot.astype(np.int64),
        },
        index=pd.Index(ids[keep].astype(str)),
    )
    spot_ad = ad.AnnData(X=sp.csr_matrix(spot_counts.astype(np.float32)), obs=spots_obs, var=var.copy())
    spot_ad.obsm["spatial"] = xy[keep].astype(np.float64)
    lowres, scalef = _lowres(slide)
    spot_ad.uns["spatial"] = {
        LIBRARY_ID: {
            "images": {"lowres": lowres},
            "scalefactors": {
                "spot_diameter_fullres": float(diameter_px),
                "tissue_lowres_scalef": float(scalef),
                "tissue_hires_scalef": float(scalef),
                "fiducial_diameter_fullres": float(diameter_px * 1.5),
            },
            "metadata": {"source": "SIMULATED counts on real H&E (napari-deepspot2cell sample data)"},
        }
    }
    spot_ad.uns["simulation"] = _provenance(__version__, um)

    truth_obs = pd.DataFrame(
        {
            "label": table["label"].to_numpy(np.int64),
            "x": table["x"].to_numpy(np.float64),
            "y": table["y"].to_numpy(np.float64),
            "area": table["area"].to_numpy(np.int64),
            "spot": np.where(assignment.spot >= 0, np.asarray(spots.ids, dtype=str)[np.maximum(assignment.spot, 0)], ""),
            "inside": inside.astype(bool),
            "inside_fraction": assignment.inside_fraction,
        },
        index=table["label"].astype(str).to_numpy(),
    )
    for f in feats.columns:
        truth_obs[f"measured_{f}"] = feats[f].to_numpy(np.float64)
    identity = cell_identities(z)
    for t in identity.columns:
        truth_obs[f"identity_{t}"] = identity[t].to_numpy(np.float64)
    truth_obs["cell_type"] = pd.Categorical(identity.idxmax(axis=1).to_numpy(), categories=list(identity.columns))
    truth = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=truth_obs, var=var.copy())
    truth.layers["rates"] = rates.astype(np.float32)
    truth.obsm["spatial"] = truth_obs[["x", "y"]].to_numpy(np.float64)
    truth.uns["simulation"] = _provenance(__version__, um)

    paths = {"mask": out / MASK_NAME, "spots": out / SPOTS_NAME, "cell_truth": out / TRUTH_NAME}
    write_mask(paths["mask"], cells)
    write_h5ad(paths["spots"], spot_ad)
    write_h5ad(paths["cell_truth"], truth)
    for path in paths.values():
        path.chmod(0o644)  # shipped files: readable by all (temporary files are created 0600)
    if copy_slide:
        target = out / SLIDE_NAME
        if not target.exists() or target.read_bytes() != Path(slide_path).read_bytes():
            shutil.copyfile(slide_path, target)
        paths["slide"] = target
    return {"paths": paths, "n_cells": len(table), "n_spots": m, "n_inside": int(inside.sum())}


def _lowres(slide, max_side: int = 400) -> tuple[np.ndarray, float]:
    """A small RGB image for squidpy's plots, and its scale factor from full resolution."""
    from PIL import Image

    h, w = slide.shape
    scalef = max_side / max(h, w)
    small = np.asarray(slide.levels[-1])
    img = Image.fromarray(small).resize((int(round(w * scalef)), int(round(h * scalef))), Image.Resampling.LANCZOS)
    return np.asarray(img), scalef


def _provenance(version: str, um_per_px: float) -> dict:
    return {
        "what": "SIMULATED expression driven by measured morphology of real segmented cells",
        "seed": SEED,
        "programs": {g: dict(w) for g, w in PROGRAMS.items()},
        "cell_types": {t: dict(w) for t, w in CELL_TYPES.items()},
        "type_sharpness": TYPE_SHARPNESS,
        "type_floor": TYPE_FLOOR,
        "base_counts": dict(BASE_COUNTS),
        "nb_theta": NB_THETA,
        "library_sd": LIBRARY_SD,
        "noise_sd": NOISE_SD,
        "z_clip": Z_CLIP,
        "spot_diameter_um": SPOT_DIAMETER_UM,
        "spot_pitch_um": SPOT_PITCH_UM,
        "inside_threshold": 0.6,
        "um_per_px": um_per_px,
        "script": "scripts/make_sample_data.py",
        "software_version": version,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "sample_data"), help="output folder (default: sample_data/)")
    p.add_argument("--slide", default=str(DEFAULT_SLIDE), help="the CMU-1 small region SVS")
    p.add_argument("--no-copy-slide", action="store_true", help="do not copy the slide into --out")
    args = p.parse_args(argv)
    result = make(Path(args.out), Path(args.slide), copy_slide=not args.no_copy_slide)
    for name, path in result["paths"].items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
