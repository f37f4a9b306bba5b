"""napari sample data: "DeepSpot2Cell demo (CMU-1 skin)".

The real H&E slide at its physical scale, the cells, the simulated Visium spots
as a Points layer (true diameter; measured counts and normalised expression
per gene in `features`), and the shipped predictions painted, so the Gene
browser works at once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .readers import read_predictions
from .sample import sample_paths


def spot_points_layer(spots, um_per_px: float, name: str = "spots (measured)") -> tuple:
    """A Points layer tuple of spots (normalised AnnData of io.spots.read_spots)."""
    counts = spots.X.toarray() if sp.issparse(spots.X) else np.asarray(spots.X)
    total = counts.sum(axis=1, keepdims=True)
    expr = np.log1p(1e4 * counts / np.maximum(total, 1e-12))  # the scale the model is trained on
    features = pd.DataFrame(expr, columns=list(spots.var_names), index=np.arange(spots.n_obs))
    features.insert(0, "total_counts", total[:, 0])
    features.insert(0, "spot", np.asarray(spots.obs_names, dtype=str))
    diameter = float(spots.uns["deepspot2cell_spots"]["diameter_px"])
    xy = np.asarray(spots.obsm["spatial"], dtype=float)
    meta = {"deepspot2cell": {"kind": "spots", "spot_diameter": diameter, "values": "log1p(1e4 * counts / spot total)",
                              "counts": {g: counts[:, i] for i, g in enumerate(spots.var_names)}}}
    return (
        xy[:, ::-1],
        {"name": name, "scale": (um_per_px, um_per_px), "size": diameter, "features": features, "face_color": "transparent",
         "border_color": "#00b3ff", "border_width": 0.05, "opacity": 0.8, "metadata": meta},
        "points",
    )


def demo_sample() -> list[tuple]:
    from .io.spots import read_spots

    paths = sample_paths(require=("slide", "labels", "spots", "predictions"))
    layers = read_predictions(paths["predictions"])
    um = next(kw["scale"][0] for _, kw, kind in layers if kind == "image")
    layers.append(spot_points_layer(read_spots(paths["spots"], um_per_px=um), um))
    return layers
