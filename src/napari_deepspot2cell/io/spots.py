"""Spot-level training data: Visium Space Ranger folders and AnnData ``.h5ad`` files.

``read_spots`` turns either input into one normalised AnnData that the rest of
the package relies on:

- ``X``: raw counts (spots x genes), float32, CSR when sparse; ``var_names``
  unique gene names (``var["gene_ids"]`` kept when present);
- ``obs_names``: spot barcodes (str); ``obs["in_tissue"]`` (bool) where known;
  ``obs["array_row"]``, ``obs["array_col"]`` (int) where known: they give the
  hexagonal neighbours exactly;
- ``obsm["spatial"]``: float64 (n, 2) spot centres in full-resolution (level-0
  slide) pixels as (x = column, y = row);
- ``uns["deepspot2cell_spots"]``: ``{"diameter_px", "diameter_um", "source", "kind"}``.

Conventions read:

- Space Ranger 1.x ``spatial/tissue_positions_list.csv`` (no header) and 2.x and
  later ``spatial/tissue_positions.csv`` (header) or ``tissue_positions.parquet``;
  columns barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
  pxl_col_in_fullres. ``spatial/scalefactors_json.json`` gives
  ``spot_diameter_fullres`` (full-resolution px).
- squidpy / scanpy ``.h5ad``: ``obsm["spatial"]`` (x, y) in full-res px and
  ``uns["spatial"][library]["scalefactors"]["spot_diameter_fullres"]``.
- HEST ``.h5ad``: ``obs["pxl_col_in_fullres"]`` / ``obs["pxl_row_in_fullres"]``
  and a metadata JSON beside it (same stem) whose ``spot_diameter`` is in um
  (``inter_spot_dist`` likewise in um; ``pixel_size_um_estimated`` /
  ``pixel_size_um_embedded`` its pixel size).

No Qt, no napari, no pickle: AnnData files are read with anndata (HDF5 only).
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_deepspot2cell.errors import InputError, positive_number

if TYPE_CHECKING:
    import anndata

__all__ = ["read_spots", "check_spots_on_slide", "SPOTS_UNS_KEY", "POSITION_COLUMNS"]

SPOTS_UNS_KEY = "deepspot2cell_spots"
POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
_MATRIX_NAME = "filtered_feature_bc_matrix.h5"
_POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
_SCALEFACTORS_NAME = "scalefactors_json.json"
# values checked for integer-likeness (log-normalised data fail on almost every value)
_INTEGER_SAMPLE = 1_000_000


def read_spots(
    path: str | os.PathLike,
    *,
    um_per_px: float,
    spot_diameter_um: float | None = None,
    library_id: str | None = None,
    image: str | os.PathLike | None = None,
) -> anndata.AnnData:
    """Read spot counts and geometry from a Space Ranger folder or an ``.h5ad``.

    Parameters
    ----------
    path
        A Space Ranger output folder (or its ``filtered_feature_bc_matrix.h5``,
        or its ``spatial/`` folder), or an AnnData ``.h5ad``.
    um_per_px
        Pixel size of the full-resolution slide the spot coordinates refer to.
    spot_diameter_um
        Spot diameter in um; when given it overrides the file's diameter.
    library_id
        The ``uns["spatial"]`` library to use in an ``.h5ad`` holding several;
        when ``obs["library_id"]`` exists, only that library's spots are kept.
    image
        The slide the spots will be laid on. When it is the Space Ranger
        folder's own ``spatial/tissue_hires_image.png`` or ``tissue_lowres_image.png``
        (datasets often ship no full-resolution image), the full-resolution
        coordinates and diameter are scaled by that image's scale factor.

    Returns
    -------
    anndata.AnnData
        The normalised spot AnnData described in the module docstring.

    Raises
    ------
    InputError
        For every problem with the input, naming the file.
    """
    path = Path(path)
    um_per_px = positive_number(path, um_per_px, "pixel size (--um-per-px)")
    if spot_diameter_um is not None:
        spot_diameter_um = positive_number(path, spot_diameter_um, "spot diameter (--spot-diameter-um)")
    if not path.exists():
        raise InputError(path, "no such file or folder")

    if path.is_dir():
        folder = path.parent if path.name == "spatial" and not (path / "spatial").is_dir() else path
        adata = _read_spaceranger(folder, None, um_per_px, spot_diameter_um)
    elif path.suffix.lower() == ".h5ad":
        adata = _read_h5ad(path, um_per_px, spot_diameter_um, library_id)
    elif path.suffix.lower() == ".h5":
        adata = _read_spaceranger(path.parent, path, um_per_px, spot_diameter_um)
    else:
        raise InputError(
            path,
            "not a spots input: expected an AnnData .h5ad, a Space Ranger output folder "
            "or its filtered_feature_bc_matrix.h5",
        )
    adata.uns[SPOTS_UNS_KEY]["source"] = str(path)
    if image is not None and (path.is_dir() or path.suffix.lower() == ".h5"):
        _scale_to_spaceranger_image(adata, folder if path.is_dir() else path.parent, Path(image), um_per_px)
    return adata


def _scale_to_spaceranger_image(adata, folder: Path, image: Path, um_per_px: float) -> None:
    """Map full-resolution spot coordinates into the folder's hires/lowres image."""
    names = {"tissue_hires_image.png": "tissue_hires_scalef", "tissue_lowres_image.png": "tissue_lowres_scalef"}
    key = names.get(image.name)
    if key is None or image.resolve().parent != (folder / "spatial").resolve():
        return
    factors_path = _find_scalefactors(folder)
    factors = _read_json(factors_path) if factors_path is not None else {}
    if key not in factors:
        raise InputError(factors_path or folder, f"{image.name} is used as the slide but the scale factors lack {key}")
    scale = positive_number(factors_path, factors[key], key)
    meta = adata.uns[SPOTS_UNS_KEY]
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64) * scale
    meta["diameter_px"] = float(meta["diameter_px"]) * scale
    meta["diameter_um"] = float(meta["diameter_px"] * um_per_px)
    meta["image_scale"] = float(scale)


def check_spots_on_slide(spots: anndata.AnnData, slide_shape: tuple[int, ...]) -> None:
    """Refuse spots that mostly miss the slide.

    ``slide_shape`` is the level-0 (rows, cols[, ...]) shape. More than half of
    the spot centres outside it is the typical sign of a wrong pixel size or of
    coordinates in a downscaled (hires/lowres) image rather than full resolution.
    """
    height, width = int(slide_shape[0]), int(slide_shape[1])
    info = spots.uns.get(SPOTS_UNS_KEY, {}) if hasattr(spots, "uns") else {}
    source = info.get("source") if isinstance(info, dict) else None
    xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    n = xy.shape[0]
    if n == 0:
        raise InputError(source, "no spots to place on the slide")
    x, y = xy[:, 0], xy[:, 1]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    outside = 1.0 - float(inside.mean())
    if outside > 0.5:
        raise InputError(
            source,
            f"{outside:.0%} of {n} spot centres fall outside the slide: spots span "
            f"x {np.nanmin(x):.0f}..{np.nanmax(x):.0f}, y {np.nanmin(y):.0f}..{np.nanmax(y):.0f} px "
            f"but the slide is {width} x {height} px (width x height); check the pixel size "
            "(--um-per-px) and that the spot coordinates are in full-resolution pixels, "
            "not those of a hires or lowres image",
        )


# --------------------------------------------------------------------------- helpers


@contextmanager
def _quiet_duplicate_names():
    """anndata warns on duplicate names; this module checks barcodes and makes genes unique."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* names are not unique", category=UserWarning)
        yield


def _find_matrix(folder: Path) -> Path:
    matrix = folder / _MATRIX_NAME
    if matrix.is_file():
        return matrix
    # GEO / HEST downloads often prefix the sample name
    prefixed = sorted(folder.glob(f"*{_MATRIX_NAME}"))
    if len(prefixed) == 1:
        return prefixed[0]
    raise InputError(folder, f"not a Space Ranger output folder: missing {_MATRIX_NAME}")


def _find_positions(folder: Path) -> Path:
    for name in _POSITION_FILES:
        for candidate in (folder / "spatial" / name, folder / name):
            if candidate.is_file():
                return candidate
    raise InputError(
        folder,
        "not a Space Ranger output folder: missing spatial/tissue_positions.csv "
        "(or spatial/tissue_positions_list.csv)",
    )


def _find_scalefactors(folder: Path) -> Path | None:
    for candidate in (folder / "spatial" / _SCALEFACTORS_NAME, folder / _SCALEFACTORS_NAME):
        if candidate.is_file():
            return candidate
    return None


def _read_positions(path: Path) -> pd.DataFrame:
    """Tissue positions indexed by barcode, with the six Space Ranger columns."""
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as fh:
                first = fh.readline()
            has_header = first.split(",")[0].strip().strip('"').lower() == "barcode"
            table = pd.read_csv(
                path,
                header=0 if has_header else None,
                dtype={0: str} if not has_header else {"barcode": str},
            )
    except (OSError, ValueError, pd.errors.ParserError, ImportError) as exc:
        raise InputError(path, f"cannot read tissue positions: {exc}") from None
    if table.shape[1] < len(POSITION_COLUMNS):
        raise InputError(
            path,
            f"expected {len(POSITION_COLUMNS)} columns ({', '.join(POSITION_COLUMNS)}), "
            f"found {table.shape[1]}",
        )
    if all(c in table.columns for c in POSITION_COLUMNS):
        table = table[list(POSITION_COLUMNS)]
    else:
        table = table.iloc[:, : len(POSITION_COLUMNS)]
        table.columns = list(POSITION_COLUMNS)
    table["barcode"] = table["barcode"].astype(str)
    dup = table["barcode"].duplicated()
    if dup.any():
        raise InputError(path, f"duplicate barcodes, e.g. {table['barcode'][dup].iloc[0]!r}")
    numeric = {}
    for col in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        numeric[col] = values
    for col in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        bad = ~np.isfinite(numeric[col])
        if bad.any():
            raise InputError(
                path,
                f"non-finite or non-numeric spot coordinates in {col} "
                f"({int(bad.sum())} rows, e.g. barcode {table['barcode'][bad].iloc[0]!r})",
            )
    for col in ("in_tissue", "array_row", "array_col"):
        v = numeric[col]
        if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
            raise InputError(path, f"column {col} must hold integers")
    out = pd.DataFrame(
        {
            "in_tissue": numeric["in_tissue"] != 0,
            "array_row": numeric["array_row"].astype(np.int64),
            "array_col": numeric["array_col"].astype(np.int64),
            "pxl_row_in_fullres": numeric["pxl_row_in_fullres"],
            "pxl_col_in_fullres": numeric["pxl_col_in_fullres"],
        },
        index=pd.Index(table["barcode"].to_numpy(), name=None),
    )
    return out


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data


def _read_spaceranger(folder: Path, matrix: Path | None, um_per_px: float, spot_diameter_um):
    import scanpy as sc

    if matrix is None:
        matrix = _find_matrix(folder)
    positions_path = _find_positions(folder)
    scalefactors_path = _find_scalefactors(folder)

    if spot_diameter_um is not None:
        diameter_px = spot_diameter_um / um_per_px
    else:
        if scalefactors_path is None:
            raise InputError(
                folder,
                "missing spatial/scalefactors_json.json (it gives the spot diameter); "
                "add it or pass --spot-diameter-um",
            )
        factors = _read_json(scalefactors_path)
        if "spot_diameter_fullres" not in factors:
            raise InputError(
                scalefactors_path, "no spot_diameter_fullres; pass --spot-diameter-um"
            )
        diameter_px = positive_number(scalefactors_path, factors["spot_diameter_fullres"], "spot_diameter_fullres")

    try:
        with _quiet_duplicate_names():
            adata = sc.read_10x_h5(matrix)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(matrix, f"not a readable 10x HDF5 feature-barcode matrix: {exc}") from None
    adata.obs_names = adata.obs_names.astype(str)
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()][0]
        raise InputError(matrix, f"duplicate barcodes, e.g. {dup!r}")

    positions = _read_positions(positions_path)
    in_tissue = positions.index[positions["in_tissue"].to_numpy()]
    keep = adata.obs_names.isin(in_tissue)
    if not keep.any():
        raise InputError(
            matrix,
            f"zero spots: none of the matrix's {adata.n_obs} barcodes is an in-tissue spot "
            f"of {positions_path.name}",
        )
    with _quiet_duplicate_names():
        adata = adata[keep].copy()
    pos = positions.loc[adata.obs_names]
    xy = np.column_stack([pos["pxl_col_in_fullres"].to_numpy(), pos["pxl_row_in_fullres"].to_numpy()])

    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(adata.n_obs, dtype=bool),
            "array_row": pos["array_row"].to_numpy(np.int64),
            "array_col": pos["array_col"].to_numpy(np.int64),
        },
        index=adata.obs_names,
    )
    return _normalise(
        adata.X,
        obs,
        adata.var,
        xy,
        diameter_px=diameter_px,
        um_per_px=um_per_px,
        source=matrix,
        coord_source=positions_path,
    )


def _library(uns: dict, library_id: str | None, path: Path, required: bool):
    """The ``uns["spatial"]`` entry to use (None when there is none and it is not required)."""
    spatial = uns.get("spatial") if isinstance(uns, dict) else None
    libraries = sorted(str(k) for k in spatial) if isinstance(spatial, dict) else []
    if library_id is not None:
        if libraries and library_id not in spatial:
            raise InputError(
                path, f"library {library_id!r} not in uns['spatial']; it holds {', '.join(libraries)}"
            )
        return spatial.get(library_id) if spatial else None
    if len(libraries) > 1 and required:
        raise InputError(
            path,
            f"uns['spatial'] holds several libraries ({', '.join(libraries)}); choose one "
            "(library_id) or pass --spot-diameter-um",
        )
    if len(libraries) == 1:
        return spatial[next(iter(spatial))]
    return None


def _hest_metadata(path: Path) -> tuple[Path, dict] | tuple[None, None]:
    meta = path.with_suffix(".json")
    if meta.is_file():
        return meta, _read_json(meta)
    return None, None


def _read_h5ad(path: Path, um_per_px: float, spot_diameter_um, library_id: str | None):
    import anndata as ad

    try:
        with _quiet_duplicate_names():
            adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as exc:  # AnnDataReadError is an OSError
        raise InputError(path, f"not a readable AnnData .h5ad file: {exc}") from None

    uns = dict(adata.uns) if adata.uns is not None else {}
    if library_id is not None and "library_id" in adata.obs.columns:
        mask = (adata.obs["library_id"].astype(str) == str(library_id)).to_numpy()
        if not mask.any():
            values = sorted(set(adata.obs["library_id"].astype(str)))
            raise InputError(
                path, f"no spots with obs['library_id'] == {library_id!r}; found {', '.join(values[:10])}"
            )
        with _quiet_duplicate_names():
            adata = adata[mask].copy()

    # spot diameter: flag, then uns['spatial'] scalefactors, then HEST metadata JSON
    if spot_diameter_um is not None:
        diameter_px = spot_diameter_um / um_per_px
        _library(uns, library_id, path, required=False)  # still validates a named library
    else:
        diameter_px = None
        lib = _library(uns, library_id, path, required=True)
        factors = lib.get("scalefactors") if isinstance(lib, dict) else None
        if isinstance(factors, dict) and factors.get("spot_diameter_fullres") is not None:
            diameter_px = positive_number(path, factors["spot_diameter_fullres"], "uns['spatial'] spot_diameter_fullres")
        else:
            meta_path, meta = _hest_metadata(path)
            if meta is not None and meta.get("spot_diameter") is not None:
                diameter_um = positive_number(meta_path, meta["spot_diameter"], "spot_diameter (um)")
                diameter_px = diameter_um / um_per_px
        if diameter_px is None:
            raise InputError(
                path,
                "no spot diameter: neither uns['spatial'][library]['scalefactors']"
                "['spot_diameter_fullres'] nor a metadata JSON beside it with spot_diameter; "
                "pass --spot-diameter-um",
            )

    xy = _h5ad_coordinates(adata, path)

    obs = adata.obs.copy()
    obs.index = adata.obs_names.astype(str)
    if "in_tissue" in obs.columns:
        v = pd.to_numeric(obs["in_tissue"], errors="coerce").to_numpy(dtype=np.float64)
        if np.all(np.isfinite(v)):
            obs["in_tissue"] = v != 0
        else:
            raise InputError(path, "obs['in_tissue'] must hold 0/1 or booleans")
    for col in ("array_row", "array_col"):
        if col in obs.columns:
            v = pd.to_numeric(obs[col], errors="coerce").to_numpy(dtype=np.float64)
            if np.all(np.isfinite(v)) and np.all(v == np.round(v)):
                obs[col] = v.astype(np.int64)

    X = adata.X
    counts_source = "X"
    if X is not None and not _integer_like(X) and "counts" in adata.layers:
        X = adata.layers["counts"]
        counts_source = "layers['counts']"
    if X is None:
        raise InputError(path, "no counts in X")
    return _normalise(
        X,
        obs,
        adata.var,
        xy,
        diameter_px=diameter_px,
        um_per_px=um_per_px,
        source=path,
        coord_source=path,
        counts_source=counts_source,
    )


def _h5ad_coordinates(adata, path: Path) -> np.ndarray:
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"])
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise InputError(path, f"obsm['spatial'] must be (n_spots, 2) x, y; got shape {xy.shape}")
        try:
            return xy[:, :2].astype(np.float64)
        except (TypeError, ValueError):
            raise InputError(path, "obsm['spatial'] is not numeric") from None
    cols = ("pxl_col_in_fullres", "pxl_row_in_fullres")
    if all(c in adata.obs.columns for c in cols):
        return np.column_stack(
            [pd.to_numeric(adata.obs[c], errors="coerce").to_numpy(dtype=np.float64) for c in cols]
        )
    raise InputError(
        path,
        "no spot coordinates: expected obsm['spatial'] (x, y) or obs['pxl_col_in_fullres'] "
        "and obs['pxl_row_in_fullres'] in full-resolution pixels",
    )


def _values(X) -> np.ndarray:
    """The stored values of a matrix (non-zeros of a sparse one), flattened."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def _integer_like(X) -> bool:
    values = _values(X)
    if values.size > _INTEGER_SAMPLE:
        rng = np.random.default_rng(0)
        values = values[rng.choice(values.size, _INTEGER_SAMPLE, replace=False)]
    if not np.issubdtype(values.dtype, np.number):
        return False
    if np.issubdtype(values.dtype, np.integer):
        return True
    finite = values[np.isfinite(values)]
    return bool(np.all(finite == np.round(finite)))


def _normalise(
    X,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    xy: np.ndarray,
    *,
    diameter_px: float,
    um_per_px: float,
    source: Path,
    coord_source: Path,
    counts_source: str = "X",
):
    import anndata as ad

    n_spots, n_genes = X.shape
    if n_spots == 0:
        raise InputError(source, "zero spots")
    if n_genes == 0:
        raise InputError(source, "zero genes")
    if obs.index.has_duplicates:
        raise InputError(source, f"duplicate barcodes, e.g. {obs.index[obs.index.duplicated()][0]!r}")

    xy = np.asarray(xy, dtype=np.float64)
    bad = ~np.all(np.isfinite(xy), axis=1)
    if bad.any():
        raise InputError(
            coord_source,
            f"non-finite spot coordinates for {int(bad.sum())} of {n_spots} spots, "
            f"e.g. barcode {obs.index[bad][0]!r}",
        )

    # counts: CSR float32 or dense float32, raw integer-like, non-negative
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sum_duplicates()
        X.sort_indices()
    else:
        try:
            X = np.asarray(X, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(source, f"counts in {counts_source} are not numeric") from None
    values = _values(X)
    if values.size:
        if not np.all(np.isfinite(values)):
            raise InputError(source, f"counts in {counts_source} hold NaN or infinite values")
        if values.min() < 0:
            raise InputError(
                source,
                f"counts in {counts_source} hold negative values (min {values.min():g}); "
                "raw counts are needed",
            )
        if not _integer_like(X):
            raise InputError(
                source,
                f"counts in {counts_source} are not integers (log-normalised or scaled data?); "
                "raw counts are needed, in X or layers['counts']",
            )

    var = var.copy()
    var.index = var.index.astype(str)
    keep_var = [c for c in ("gene_ids", "feature_types", "genome") if c in var.columns]
    var = var[keep_var]

    with _quiet_duplicate_names():
        out = ad.AnnData(X=X, obs=obs, var=var)
        out.var_names_make_unique()
    out.obsm["spatial"] = xy
    out.uns[SPOTS_UNS_KEY] = {
        "diameter_px": float(diameter_px),
        "diameter_um": float(diameter_px * um_per_px),
        "source": str(source),
        "kind": "visium",
    }
    return out
