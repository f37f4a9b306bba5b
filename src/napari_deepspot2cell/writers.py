"""npe2 writers: the predictions behind a DeepSpot2Cell cells layer, as ``.h5ad`` or ``.csv``.

Both find the AnnData that :func:`..widgets.layers.prediction_layers` attached to
the cells layer (``metadata["deepspot2cell"]["adata"]``) among the layers being
saved. The ``.h5ad`` is the AnnData as is (the ``CELLS.h5ad`` contract); the
``.csv`` has ``label, x, y`` and one column per gene. Every file goes through
:func:`..io.atomic.atomic_path`: nothing half-written ever sits at the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .io.atomic import atomic_path

__all__ = ["predictions_from_layers", "predictions_table", "write_predictions_csv", "write_predictions_h5ad"]

META = "deepspot2cell"


def predictions_from_layers(layer_data):
    """The attached predictions AnnData from napari's ``[(data, attributes, layer_type), ...]``."""
    for item in layer_data:
        attributes = item[1] if len(item) > 1 else {}
        info = (attributes.get("metadata") or {}).get(META)
        if isinstance(info, dict) and info.get("adata") is not None:
            return info["adata"]
    raise ValueError(
        "none of the layers being saved holds DeepSpot2Cell predictions; "
        "select the 'DeepSpot2Cell cells' layer (added by the Predict widget or by opening a CELLS.h5ad)"
    )


def _with_suffix(path, suffix: str) -> Path:
    path = Path(path)
    return path if path.name.lower().endswith(suffix) else path.with_name(path.name + suffix)


def write_predictions_h5ad(path, layer_data) -> list[str]:
    """Write the predictions AnnData as is to ``path`` (``.h5ad``); returns ``[path]``."""
    adata = predictions_from_layers(layer_data)
    target = _with_suffix(path, ".h5ad")
    with atomic_path(target) as tmp:
        adata.write_h5ad(tmp)
    return [str(target)]


def predictions_table(adata) -> pd.DataFrame:
    """One row per cell: ``label, x, y`` then one column per gene (float32 values)."""
    if "label" in adata.obs:
        label = adata.obs["label"].to_numpy()
    else:
        label = adata.obs_names.astype(np.int64)
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"], dtype=float)
    else:
        xy = adata.obs[["x", "y"]].to_numpy(float)
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    genes = pd.DataFrame(x, columns=[str(g) for g in adata.var_names], index=adata.obs_names)
    head = pd.DataFrame({"label": label, "x": xy[:, 0], "y": xy[:, 1]}, index=adata.obs_names)
    clash = [g for g in genes.columns if g in head.columns]
    if clash:
        raise ValueError(f"gene names {clash} collide with the label/x/y columns of the CSV")
    return pd.concat([head, genes], axis=1)


def write_predictions_csv(path, layer_data) -> list[str]:
    """Write ``label, x, y`` and one column per gene to ``path`` (``.csv``); returns ``[path]``."""
    table = predictions_table(predictions_from_layers(layer_data))
    target = _with_suffix(path, ".csv")
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return [str(target)]
