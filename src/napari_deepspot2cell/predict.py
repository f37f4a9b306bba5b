"""Slide + cells + checkpoint -> AnnData of cells x genes (the CELLS.h5ad contract)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .encoders.cache import EmbeddingCache, boxes_digest, default_cache_root
from .encoders.device import describe_device, resolve_device
from .encoders.embed import iter_embed
from .errors import InputError
from .geometry.cells import iter_cell_table
from .geometry.spots import Spots, patch_grid
from .geometry.tiles import cell_tile_boxes, spot_tile_boxes
from .progress import Job, Progress, delegate

CODE_BATCH = 8192


def embedding_cache(cache_dir, slide, encoder, boxes: np.ndarray, kind: str) -> EmbeddingCache | None:
    """The cache for these tiles of this slide through this encoder; None when disabled."""
    if cache_dir is False:
        return None
    root = Path(cache_dir) if cache_dir else default_cache_root()
    signature = {
        "slide": slide.identity(),
        "encoder": {"id": encoder.id, "weights_hash": encoder.weights_hash, "dim": int(encoder.dim), "input_size": int(encoder.input_size)},
        "tiles": {"kind": kind, "n": int(len(boxes)), "boxes_sha256": boxes_digest(boxes)},
    }
    return EmbeddingCache(root, signature)


def context_for_cells(cells: pd.DataFrame, shape, um_per_px: float, geometry: dict, spots: Spots | None = None, assignment=None):
    """The context spot of every cell: the given spots (with their assignment) or
    the patch grid of the checkpoint's geometry, scaled to this slide's pixel size."""
    xy = cells[["x", "y"]].to_numpy(np.float64)
    if spots is not None:
        cell_spot = assignment.spot.copy()
        far = cell_spot < 0
        if far.any():  # cells away from every spot still need a context: the nearest one
            from scipy.spatial import cKDTree

            cell_spot[far] = cKDTree(spots.xy).query(xy[far])[1]
        return spots, cell_spot, assignment.inside
    patch_um = geometry.get("patch_um") or geometry.get("spot_tile_um")
    if not patch_um:
        raise InputError(None, "the checkpoint records no spot tile size (geometry.patch_um)")
    grid, cell_patch = patch_grid(shape, float(patch_um) / um_per_px, xy)
    return grid, cell_patch, None


def iter_predict_cells(
    slide,
    labels,
    ckpt,
    encoder,
    *,
    device="auto",
    batch_size: int | None = None,
    cache_dir=None,
    spots: Spots | None = None,
    assignment=None,
    cells: pd.DataFrame | None = None,
    source: dict | None = None,
) -> Job:
    """Job: the prediction AnnData for opened inputs (the widgets call this directly)."""
    import anndata as ad

    dev = resolve_device(device)
    if cells is None:
        cells = yield from delegate(iter_cell_table(labels, source=(source or {}).get("labels")))
    if len(cells) == 0:
        raise InputError((source or {}).get("labels"), "the cell mask holds no cells (all pixels are 0)")
    in_dim = int(ckpt.hyper_parameters["input_size"])
    if int(encoder.dim) != in_dim:
        raise InputError(
            (source or {}).get("checkpoint"),
            f"the model takes {in_dim}-dim embeddings ({ckpt.encoder.get('id', '?')}) but encoder {encoder.id} gives {encoder.dim}; pass --encoder {ckpt.encoder.get('id', 'NAME')}",
        )
    context, cell_spot, inside = context_for_cells(cells, slide.shape, slide.um_per_px, ckpt.geometry, spots, assignment)
    cell_boxes = cell_tile_boxes(cells)
    spot_boxes = spot_tile_boxes(context)
    emb_cells = yield from iter_embed(
        slide, cell_boxes, encoder, device=dev, batch_size=batch_size,
        cache=embedding_cache(cache_dir, slide, encoder, cell_boxes, "cells"), stage="embedding cells",
    )
    emb_spots = yield from iter_embed(
        slide, spot_boxes, encoder, device=dev, batch_size=batch_size,
        cache=embedding_cache(cache_dir, slide, encoder, spot_boxes, "spots"), stage="embedding spots",
    )
    mean, spread, rates, nonfinite = yield from iter_cell_outputs(ckpt.model, emb_cells, emb_spots, context.neighbours, cell_spot, dev)
    obs = pd.DataFrame(
        {
            "label": cells["label"].to_numpy(np.int64),
            "x": cells["x"].to_numpy(np.float64),
            "y": cells["y"].to_numpy(np.float64),
            "area": cells["area"].to_numpy(np.int64),
            "spot": pd.Categorical(np.asarray(context.ids, dtype=str)[cell_spot]),
        },
        index=cells["label"].astype(str).to_numpy(),
    )
    if inside is not None:
        obs["inside_spot"] = np.asarray(inside, dtype=bool)
    obs["nonfinite_replaced"] = nonfinite
    adata = ad.AnnData(X=mean, obs=obs, var=pd.DataFrame(index=pd.Index(list(ckpt.genes), dtype=str)))
    adata.obsm["spatial"] = obs[["x", "y"]].to_numpy(np.float64)
    adata.layers["uncertainty"] = spread
    if rates is not None:
        adata.layers["rates"] = rates
    adata.uns["deepspot2cell"] = {
        "software_version": __version__,
        "encoder": {"id": encoder.id, "dim": int(encoder.dim), "weights_hash": encoder.weights_hash},
        "checkpoint": str((source or {}).get("checkpoint", "")),
        "aggregate": ckpt.aggregate,
        "um_per_px": float(slide.um_per_px),
        "tile_sizes": {
            "cell_tile": "max(width, height) of the cell mask",
            "spot_kind": context.kind,
            "spot_tile_px": float(context.tile_px),
            "spot_tile_um": float(context.tile_px * slide.um_per_px),
            "encoder_input_px": int(encoder.input_size),
        },
        "device": describe_device(dev),
        "image_path": str((source or {}).get("image", "")),
        "labels_path": str((source or {}).get("labels", "")),
        "n_cells": int(len(cells)),
        "n_nonfinite_replaced": int(nonfinite.sum()),
    }
    return adata


def iter_cell_outputs(model, emb_cells, emb_spots, neighbours, cell_spot, device) -> Job:
    """Job: per-cell (mean, spread, rates, nonfinite) with phi_spot computed once per spot, not per cell."""
    model = model.to(device).eval()
    n = len(emb_cells)
    with torch.inference_mode():
        spots_t = torch.from_numpy(emb_spots).to(device)
        nb = torch.from_numpy(np.asarray(neighbours)).to(device)
        missing = nb < 0
        # Each spot gathers its K neighbours' embeddings, so a batch of spots costs (1 + K)
        # times a batch of cells: with CODE_BATCH spots (8 neighbours, 10 phi members) one
        # batch held ~1.3 GB, and peak RSS grew with the slide until 8192 spots
        # (benchmarks/RESULTS.md). Batching spots by CODE_BATCH // (1 + K) bounds it like a cell batch.
        spot_batch = max(1, CODE_BATCH // (1 + int(nb.shape[-1])))
        ctx = torch.cat(
            [
                model.context_codes(spots_t[s : s + spot_batch], spots_t[nb[s : s + spot_batch].clamp(min=0)], missing[s : s + spot_batch])
                for s in range(0, len(spots_t), spot_batch)
            ]
        )
        cs = torch.from_numpy(np.asarray(cell_spot, dtype=np.int64)).to(device)
        means, spreads, rates = [], [], []
        for s in range(0, n, CODE_BATCH):
            codes = model.cell_codes(torch.from_numpy(emb_cells[s : s + CODE_BATCH]).to(device))
            outp = model.forward_cells_from_codes(codes, ctx[cs[s : s + CODE_BATCH]])
            means.append(outp.mean.float().cpu().numpy())
            spreads.append(outp.spread.float().cpu().numpy())
            if outp.rates is not None:
                rates.append(outp.rates.float().cpu().numpy())
            yield Progress("prediction", min(s + CODE_BATCH, n), n)
    mean, spread = np.concatenate(means), np.concatenate(spreads)
    # X is never NaN: a non-finite output (which the model's guards should prevent) becomes 0
    # and its cell is marked in obs["nonfinite_replaced"]
    bad = ~(np.isfinite(mean).all(axis=1) & np.isfinite(spread).all(axis=1))
    mean = np.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    spread = np.nan_to_num(spread, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
    rates = np.nan_to_num(np.concatenate(rates), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32) if rates else None
    return mean, spread, rates, bad


def iter_predict(
    image,
    labels,
    checkpoint,
    *,
    encoder: str | None = None,
    weights=None,
    device: str = "auto",
    batch_size: int | None = None,
    um_per_px: float | None = None,
    cache_dir=None,
    spots=None,
    spot_diameter_um: float | None = None,
    genes: list[str] | None = None,
    cell_diameter_um: float | None = None,
    centroid_columns: tuple[str, str] | None = None,
    token: str | None = None,
) -> Job:
    """Job: open the files, predict every cell, return the AnnData (not written)."""
    from .encoders import get_encoder
    from .io.masks import open_cells
    from .io.slides import open_slide
    from .model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, genes=genes, encoder=encoder)
    slide = open_slide(image, um_per_px=um_per_px)
    yield Progress("opening", 1, 3, {"slide": str(image), "um_per_px": slide.um_per_px})
    mask = open_cells(
        labels, slide.shape, slide.um_per_px, cell_diameter_um=cell_diameter_um, centroid_columns=centroid_columns, slide=slide
    )
    enc_name = encoder or ckpt.encoder.get("id")
    enc = get_encoder(enc_name, token=token, weights=weights)
    yield Progress("opening", 3, 3, {"encoder": enc.id})
    source = {"image": os.path.abspath(image), "labels": os.path.abspath(labels), "checkpoint": os.path.abspath(checkpoint)}
    spot_obj = assignment = cells = None
    if spots is not None:
        from .geometry.assign import iter_assign_cells
        from .geometry.spots import spots_from_anndata
        from .io.spots import check_spots_on_slide, read_spots

        sp = read_spots(spots, um_per_px=slide.um_per_px, spot_diameter_um=spot_diameter_um, image=image)
        check_spots_on_slide(sp, slide.shape)
        spot_obj = spots_from_anndata(sp)
        cells = yield from delegate(iter_cell_table(mask.labels, source=labels))
        assignment = yield from delegate(iter_assign_cells(mask.labels, cells, spot_obj))
    adata = yield from iter_predict_cells(
        slide, mask.labels, ckpt, enc, device=device, batch_size=batch_size, cache_dir=cache_dir,
        spots=spot_obj, assignment=assignment, cells=cells, source=source,
    )
    return adata


def write_cells(adata, out) -> Path:
    """Write the AnnData atomically to `out` (.h5ad)."""
    from .io.atomic import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return out
