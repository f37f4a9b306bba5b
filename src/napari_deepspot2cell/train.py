"""Spot data + slide + cells -> a DeepSpot2Cell checkpoint, its metrics and loss plot.

``iter_train(slides, out, ...)`` is a job (see :mod:`progress`): it yields the
embedding progress of each slide and one ``Progress("training", epoch,
max_epochs, info)`` per epoch, and returns a :class:`TrainResult`.

Cancelling: closing the generator (``job.close()``, what the widget's cancel
button and the end of a ``for`` loop do) or a KeyboardInterrupt (Ctrl-C in the
CLI) during training stops at once and still writes the best model so far to
``out``, with its metrics, as long as one epoch has finished; the checkpoint's
``training["stopped"]`` says ``"cancelled"``. Nothing is written if no epoch
finished. Embeddings finished before the cancel stay in the cache.

The pieces: :mod:`dataset` (targets, genes, examples, split), :mod:`metrics`
(Pearson per gene, JSON, the PNG).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import dataset as D
from . import metrics as M
from .errors import Cancelled, InputError
from .geometry.assign import iter_assign_cells, nearest_spot_baseline, spot_pitch
from .geometry.cells import iter_cell_table
from .geometry.spots import Spots, patch_grid, spots_from_anndata
from .geometry.tiles import cell_tile_boxes, spot_tile_boxes
from .optim import AdamW
from .progress import Job, Progress, delegate, run

MIN_TRAIN_SPOTS = 4
BLOCK_PITCHES = 3.0  # side of the validation blocks, in spot pitches


@dataclass
class TrainInput:
    """One slide: paths (or already-open objects) of the image, the cell mask, the spots.

    image: path or an open ``io.slides.Slide``; labels: path, ``io.masks.CellMask``
    or a (H, W) integer array; spots: path (h5ad or Space Ranger folder) or the
    normalised AnnData of ``io.spots.read_spots`` (``uns["deepspot2cell_spots"]
    ["kind"] == "grid"`` with ``patch_px`` for simulated patch-grid spots);
    cell_truth: optional path or AnnData of the cells' true expression (raw
    counts in ``layers["counts"]`` or X; obs index or ``obs["label"]`` = label id).
    """

    image: Any
    labels: Any
    spots: Any  # None with ``simulate_spots``: the spots are made from the cells' own counts
    cell_truth: Any = None
    simulate_spots: bool = False  # labels is a single-cell AnnData (centroids + counts), as Xenium/HEST give
    patch_um: float | None = None  # simulated spots: patch side (default 47.6 um, the reference's 224 px at 0.2125)
    um_per_px: float | None = None
    spot_diameter_um: float | None = None
    cell_diameter_um: float | None = None
    centroid_columns: tuple[str, str] | None = None
    name: str | None = None


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict
    history: dict
    metrics_json: Path | None = None
    loss_png: Path | None = None


@dataclass
class _Slide:
    name: str
    source: str  # the spots file, for error messages
    slide: Any
    labels: Any
    cells: pd.DataFrame
    layout: Spots
    measured: np.ndarray  # (M_layout,) row of the spot AnnData, -1 where not measured
    counts: Any  # spot AnnData X (measured spots x all genes)
    var_names: list[str]
    assignment: Any
    truth: Any = None
    emb_cells: np.ndarray | None = None
    emb_spots: np.ndarray | None = None
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------- opening


def _grid_meta(spots_path) -> dict | None:
    """The ``uns["deepspot2cell_spots"]`` of an h5ad when it describes a patch grid."""
    p = Path(spots_path)
    if p.suffix.lower() != ".h5ad" or not p.is_file():
        return None
    try:
        import h5py

        with h5py.File(p, "r") as f:
            g = f.get("uns/deepspot2cell_spots")
            if g is None or "kind" not in g:
                return None
            meta = {k: (g[k][()].decode() if isinstance(g[k][()], bytes) else g[k][()]) for k in g.keys() if isinstance(g[k], h5py.Dataset)}
    except (OSError, KeyError, ValueError):
        return None
    return meta if str(meta.get("kind")) == "grid" else None


def _layout(adata, grid_meta: dict | None, shape, cells_xy: np.ndarray, um_per_px: float, source) -> tuple[Spots, np.ndarray]:
    """The spot layout and, per layout spot, its row in the spot AnnData (-1 = not measured)."""
    meta = grid_meta or adata.uns.get("deepspot2cell_spots", {})
    if str(meta.get("kind")) == "grid":
        patch_px = float(meta["patch_um"]) / um_per_px if meta.get("patch_um") else float(meta["patch_px"])
        d_px = float(adata.uns["deepspot2cell_spots"]["diameter_px"])
        grid, _ = patch_grid(tuple(shape), patch_px, cells_xy, spot_diameter_px=d_px)
        cols = next((c for c in (["grid_row", "grid_col"], ["array_row", "array_col"]) if set(c) <= set(adata.obs.columns)), None)
        if cols is None:
            raise InputError(source, "grid spots need obs['grid_row'] and obs['grid_col'] (the patch row and column)")
        rc = adata.obs[cols].to_numpy(np.int64)
        index = {(int(r), int(c)): i for i, (r, c) in enumerate(grid.grid_rc)}
        measured = np.full(len(grid), -1, np.int64)
        for row, (r, c) in enumerate(rc):
            i = index.get((int(r), int(c)))
            if i is not None:
                measured[i] = row
        return grid, measured
    layout = spots_from_anndata(adata)
    return layout, np.arange(len(layout), dtype=np.int64)


def _read_truth(truth, source_default) -> tuple[Any, str]:
    if truth is None:
        return None, ""
    if isinstance(truth, (str, os.PathLike)):
        import anndata as ad

        p = Path(truth)
        if not p.is_file():
            raise InputError(p, "cell truth file not found")
        try:
            return ad.read_h5ad(p), str(p)
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(p, f"not a readable AnnData .h5ad: {exc}") from None
    return truth, str(source_default)


def _truth_values(truth, src: str, cells: pd.DataFrame, assignment, genes: list[str]):
    """(N, G) true values for the genes the truth holds (NaN rows for unknown cells), and those genes."""
    import scipy.sparse as sp

    have = [g for g in genes if g in set(map(str, truth.var_names))]
    if not have:
        raise InputError(src, "the cell truth holds none of the trained genes")
    labels = truth.obs["label"].to_numpy(np.int64) if "label" in truth.obs.columns else np.asarray(truth.obs_names).astype(np.int64)
    pos = pd.Index(labels).get_indexer(cells["label"].to_numpy(np.int64))
    var = pd.Index(list(map(str, truth.var_names)))
    counts = truth.layers["counts"] if "counts" in truth.layers else truth.X
    vals = counts.data if sp.issparse(counts) else np.asarray(counts)
    if np.all(np.isfinite(vals)) and np.all(vals == np.round(vals)) and vals.min(initial=0) >= 0:
        c = counts[np.maximum(pos, 0)]
        out = D.cell_truth_targets(c, assignment.spot, assignment.inside, var.get_indexer(have)).astype(np.float64)
    else:  # already on the target scale
        x = truth.X.toarray() if sp.issparse(truth.X) else np.asarray(truth.X)
        out = np.asarray(x, np.float64)[np.maximum(pos, 0)][:, var.get_indexer(have)]
    out[pos < 0] = np.nan
    return out, have


def _simulated_spots(inp: TrainInput, mask, slide, cells: pd.DataFrame):
    """Spots simulated from single-cell data: the counts of the cells of a centroid
    table (an AnnData whose obs hold the centroids and whose X the counts), summed
    over the cells inside each patch's disk. Returns the spots and the cells' truth."""
    import anndata as ad
    import scipy.sparse as sp

    from .synthetic import simulate_spots_from_cells

    src = str(inp.labels)
    if mask is None or mask.centroids is None or Path(str(mask.path)).suffix.lower() != ".h5ad":
        raise InputError(src, "simulated spots need the cells as an AnnData .h5ad: centroids in obs, counts in X")
    cells_ad = ad.read_h5ad(inp.labels)
    X = cells_ad.X
    values = X.data if sp.issparse(X) else np.asarray(X)
    if values.size and (values.min() < 0 or not np.allclose(values, np.round(values))):
        raise InputError(src, "simulated spots need raw integer counts in X")
    row_of_label = pd.Series(pd.Index(cells_ad.obs_names.astype(str)).get_indexer(mask.centroids["cell_id"].astype(str)),
                             index=mask.centroids["label"].to_numpy(np.int64))
    rows = row_of_label.reindex(cells["label"].to_numpy(np.int64)).to_numpy()
    if (np.isnan(rows) | (rows < 0)).any():
        raise InputError(src, "some cells of the mask have no row of counts")
    counts = X[rows.astype(np.int64)]
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    genes = [str(g) for g in cells_ad.var_names]
    spots, _, _ = simulate_spots_from_cells(mask.labels, cells, counts, genes, um_per_px=slide.um_per_px,
                                            patch_um=inp.patch_um, spot_diameter_um=inp.spot_diameter_um)
    spots.uns["deepspot2cell_spots"]["source"] = f"simulated from {Path(src).name}"
    truth = ad.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame({"label": cells["label"].to_numpy(np.int64)}, index=cells["label"].astype(str).to_numpy()),
                       var=pd.DataFrame(index=genes))
    truth.layers["counts"] = truth.X.copy()
    return spots, truth


def _prepare(inp: TrainInput, index: int, n: int) -> Job[_Slide]:
    """Open one slide, its cells and spots; assign cells to spots (no embedding yet)."""
    from .io.masks import CellMask, open_cells
    from .io.slides import open_slide
    from .io.spots import check_spots_on_slide, read_spots

    slide = open_slide(inp.image, um_per_px=inp.um_per_px) if isinstance(inp.image, (str, os.PathLike)) else inp.image
    name = inp.name or (Path(inp.image).stem if isinstance(inp.image, (str, os.PathLike)) else f"slide {index + 1}")
    mask = None
    if isinstance(inp.labels, (str, os.PathLike)):
        mask = open_cells(inp.labels, slide.shape, slide.um_per_px, cell_diameter_um=inp.cell_diameter_um,
                          centroid_columns=inp.centroid_columns, slide=slide)
        labels = mask.labels
        labels_src = str(inp.labels)
    else:
        mask = inp.labels if isinstance(inp.labels, CellMask) else None
        labels = inp.labels.labels if isinstance(inp.labels, CellMask) else inp.labels
        labels_src = None
    grid_meta = None
    if inp.simulate_spots:
        cells = yield from delegate(iter_cell_table(labels, source=labels_src))
        adata, truth = _simulated_spots(inp, mask, slide, cells)
        if inp.cell_truth is None:
            inp = TrainInput(**{**inp.__dict__, "cell_truth": truth})
        spots_src = str(inp.labels)
    elif isinstance(inp.spots, (str, os.PathLike)):
        spots_src = str(inp.spots)
        adata = read_spots(inp.spots, um_per_px=slide.um_per_px, spot_diameter_um=inp.spot_diameter_um,
                           image=inp.image if isinstance(inp.image, (str, os.PathLike)) else None)
        grid_meta = _grid_meta(inp.spots)
    else:
        adata = inp.spots
        spots_src = str(adata.uns.get("deepspot2cell_spots", {}).get("source", f"spots of {name}"))
    check_spots_on_slide(adata, slide.shape)
    yield Progress("opening", index + 1, n, {"slide": name, "um_per_px": float(slide.um_per_px)})
    if not inp.simulate_spots:
        cells = yield from delegate(iter_cell_table(labels, source=labels_src))
    if len(cells) == 0:
        raise InputError(labels_src, "the cell mask holds no cells (all pixels are 0)")
    layout, measured = _layout(adata, grid_meta, slide.shape, cells[["x", "y"]].to_numpy(np.float64), slide.um_per_px, spots_src)
    try:
        assignment = yield from delegate(iter_assign_cells(labels, cells, layout))
    except InputError as exc:
        if exc.source is not None:
            raise
        raise InputError(spots_src, exc.problem) from None
    truth, truth_src = _read_truth(inp.cell_truth, spots_src)
    return _Slide(
        name=name, source=spots_src, slide=slide, labels=labels, cells=cells, layout=layout, measured=measured,
        counts=adata.X, var_names=[str(v) for v in adata.var_names], assignment=assignment,
        truth=(truth, truth_src) if truth is not None else None,
    )


# ---------------------------------------------------------------- the job


def _geometry(s: _Slide) -> dict:
    um = float(s.slide.um_per_px)
    lay = s.layout
    tile_um = float(lay.tile_px) * um
    return {
        "cell_tile": "max_side",
        "spot_kind": lay.kind,
        "spot_tile_um": tile_um,
        "spot_tile_px": float(lay.tile_px),
        "patch_um": float(lay.patch_px) * um if lay.kind == "grid" and lay.patch_px else tile_um,
        "spot_diameter_um": None if lay.diameter_px is None else float(lay.diameter_px) * um,
        "spot_diameter_px": None if lay.diameter_px is None else float(lay.diameter_px),
        "um_per_px": um,
        "neighbours": "grid8" if lay.kind == "grid" else "hex6",
    }


def _mse_eval(model, ex, idx, emb_c, emb_s, batch: int) -> tuple[float, np.ndarray]:
    """Mean squared error over the examples ``idx`` (eval mode) and the predictions."""
    model.eval()
    preds, sq, count = [], 0.0, 0
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            cells, mask, own, nb, miss, y = D.collate(ex, idx[s : s + batch], emb_c, emb_s)
            p = model.forward_spot(cells, mask, own, nb, miss)
            sq += float(((p - y) ** 2).sum())
            count += y.numel()
            preds.append(p.cpu().numpy())
    g = ex.targets.shape[1]
    return (sq / count if count else float("nan")), (np.concatenate(preds) if preds else np.zeros((0, g), np.float32))


def iter_train(
    slides: list[TrainInput] | TrainInput,
    out,
    *,
    encoder: str | None = None,
    weights=None,
    token: str | None = None,
    genes: list[str] | None = None,
    n_top_genes: int | None = None,
    aggregate: str = "counts",
    val_fraction: float = 0.2,
    max_epochs: int = 100,
    patience: int = 5,
    min_delta: float = 1e-3,
    lr: float = 1e-4,
    weight_decay: float = 1e-6,
    dropout: float = 0.3,
    n_ensemble: int = 10,
    phi2rho_size: int = 512,
    batch_spots: int = 32,
    seed: int = 0,
    device: str = "auto",
    embed_batch_size: int | None = None,
    cache_dir=None,
    block_pitches: float = BLOCK_PITCHES,
) -> Job[TrainResult]:
    """Job: train DeepSpot2Cell on the spots of one or more slides and write ``out`` (.ckpt).

    Beside ``out`` it writes ``out.metrics.json`` and ``out.loss.png``
    (``MODEL.ckpt`` -> ``MODEL.metrics.json``, ``MODEL.loss.png``). All slides
    go through the same encoder; each slide is embedded (with the embedding
    cache) and split into training and validation spot blocks on its own.
    """
    from .encoders import get_encoder
    from .encoders.device import describe_device, resolve_device
    from .encoders.embed import iter_embed
    from .model import AGGREGATES, DeepSpot2Cell, seed_everything, save_checkpoint
    from .predict import embedding_cache, iter_cell_outputs

    t_start = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".ckpt":
        raise InputError(out, "the model output must end in .ckpt")
    if out.is_dir():
        raise InputError(out, "is a folder; give a file name ending in .ckpt")
    if aggregate not in AGGREGATES:
        raise InputError(None, f"--aggregate must be one of {', '.join(AGGREGATES)}, not {aggregate!r}")
    if not 0 <= float(val_fraction) < 1:
        raise InputError(None, f"--val-fraction must be in [0, 1), got {val_fraction}")
    for what, v in (("--max-epochs", max_epochs), ("--n-ensemble", n_ensemble), ("batch of spots", batch_spots)):
        if int(v) < 1:
            raise InputError(None, f"{what} must be >= 1, got {v}")
    inputs = [slides] if isinstance(slides, TrainInput) else list(slides)
    if not inputs:
        raise InputError(None, "no slides to train on")
    dev = resolve_device(device)

    # 1. open every slide and assign its cells (cheap; every input check before any embedding)
    data: list[_Slide] = []
    for i, inp in enumerate(inputs):
        data.append((yield from _prepare(inp, i, len(inputs))))

    # 2. genes: present in every slide; chosen on the first slide's order
    first = data[0]
    common = [g for g in first.var_names if all(g in set(s.var_names) for s in data[1:])]
    if genes is not None:
        for s in data:
            D.select_genes(s.var_names, None, genes=genes, source=s.source)
    if genes is None and len(data) > 1:
        import scipy.sparse as sp

        stack = [s.counts[:, pd.Index(s.var_names).get_indexer(common)] for s in data]
        pooled = sp.vstack(stack).tocsr() if any(sp.issparse(x) for x in stack) else np.vstack(stack)
    else:
        pooled = first.counts[:, pd.Index(first.var_names).get_indexer(common)] if genes is None else None
    chosen, gene_info = D.select_genes(common, pooled, genes=genes, n_top_genes=n_top_genes, source=first.source)

    # 3. targets, examples and the spatial split, per slide
    examples, val_masks, spot_targets = [], [], []
    for s in data:
        gidx = pd.Index(s.var_names).get_indexer(chosen)
        t_meas = D.log1p_cp10k(s.counts, gidx)  # library size = all genes of the input
        targets = np.zeros((len(s.layout), len(chosen)), np.float32)
        has = s.measured >= 0
        targets[has] = t_meas[s.measured[has]]
        inside = s.assignment.inside & (s.assignment.spot >= 0)
        inside[inside] = has[s.assignment.spot[inside]]
        ex = D.build_examples(s.assignment.spot, inside, s.layout.neighbours, targets)
        if len(ex) == 0:
            raise InputError(s.source, "no cell lies >= 60 % inside any measured spot")
        weight = np.bincount(ex.spot, minlength=len(s.layout))
        block_px = block_pitches * (s.assignment.pitch_px or spot_pitch(s.layout))
        val_spot = D.spatial_block_split(s.layout.xy, block_px, float(val_fraction), seed, weight=weight)
        n_train = int((~val_spot[ex.spot]).sum())
        if n_train < MIN_TRAIN_SPOTS:
            raise InputError(s.source, f"only {n_train} training spot(s) with inside cells after the validation split (need >= {MIN_TRAIN_SPOTS}); lower --val-fraction or use a larger slide")
        s.info.update(n_spots=int(len(s.layout)), n_examples=int(len(ex)), n_val=int(val_spot[ex.spot].sum()), n_cells=int(len(s.cells)),
                      n_inside=int(inside.sum()))
        examples.append(ex)
        val_masks.append(val_spot)
        spot_targets.append(targets)

    # 4. embeddings through the shared cache (the same tiles as predict: a later predict embeds nothing)
    enc = get_encoder(encoder, token=token, weights=weights)
    prefix = len(data) > 1
    for i, s in enumerate(data):
        pre = f"{s.name}: " if prefix else ""
        cb, sb = cell_tile_boxes(s.cells), spot_tile_boxes(s.layout)
        s.emb_cells = yield from delegate(iter_embed(s.slide, cb, enc, device=dev, batch_size=embed_batch_size,
                                                     cache=embedding_cache(cache_dir, s.slide, enc, cb, "cells"), stage="embedding cells"), pre)
        s.emb_spots = yield from delegate(iter_embed(s.slide, sb, enc, device=dev, batch_size=embed_batch_size,
                                                     cache=embedding_cache(cache_dir, s.slide, enc, sb, "spots"), stage="embedding spots"), pre)

    # 5. one pool of examples over all slides
    c_off = np.cumsum([0] + [len(s.cells) for s in data])
    s_off = np.cumsum([0] + [len(s.layout) for s in data])
    parts = [ex.shifted(int(c_off[i]), int(s_off[i])) for i, ex in enumerate(examples)]
    pool = D.SpotExamples.concat(parts)
    is_val = np.concatenate([val_masks[i][ex.spot] for i, ex in enumerate(examples)])
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    emb_c = torch.from_numpy(np.concatenate([s.emb_cells for s in data])).to(dev)
    emb_s = torch.from_numpy(np.concatenate([s.emb_spots for s in data])).to(dev)

    # 6. training
    seed_everything(seed)
    model = DeepSpot2Cell(int(enc.dim), len(chosen), n_ensemble=int(n_ensemble), phi2rho_size=int(phi2rho_size),
                          p=float(dropout), aggregate=aggregate, seed=seed).to(dev)
    opt = AdamW(model.parameters(), lr=float(lr), weight_decay=float(weight_decay))
    rng = np.random.default_rng(seed)
    history: dict[str, list] = {"epoch": [], "train_loss": [], "val_loss": []}
    best = {"loss": math.inf, "epoch": None, "state": None}
    monitor = "val_loss" if len(val_idx) else "train_loss"
    stale, stopped = 0, "max_epochs"
    saved = False

    def finish(reason: str) -> TrainResult:
        model.load_state_dict(best["state"])
        model.eval()
        metrics = _metrics(model, data, pool, val_idx, train_idx, val_masks, spot_targets, chosen, emb_c, emb_s, dev,
                           iter_cell_outputs, batch_spots)
        metrics.update(best_epoch=best["epoch"], epochs_run=len(history["epoch"]), stopped=reason, monitor=monitor)
        training = {
            "seed": int(seed), "lr": float(lr), "weight_decay": float(weight_decay), "dropout": float(dropout),
            "n_ensemble": int(n_ensemble), "phi2rho_size": int(phi2rho_size), "aggregate": aggregate,
            "batch_spots": int(batch_spots), "max_epochs": int(max_epochs), "patience": int(patience),
            "min_delta": float(min_delta), "val_fraction": float(val_fraction), "block_pitches": float(block_pitches),
            "monitor": monitor, "best_epoch": best["epoch"], "epochs_run": len(history["epoch"]), "stopped": reason,
            "history": history, "genes": gene_info, "device": describe_device(dev),
            "seconds": time.perf_counter() - t_start,
            "slides": [{"name": s.name, "spots": s.source, "um_per_px": float(s.slide.um_per_px), **s.info} for s in data],
        }
        save_checkpoint(out, model, genes=chosen, encoder={"id": enc.id, "dim": int(enc.dim), "weights_hash": enc.weights_hash},
                        geometry={**_geometry(first), "slides": [_geometry(s) for s in data]},
                        target=dict(D.TARGET), metrics=metrics, training=training)
        mj = M.write_json(out.with_suffix(".metrics.json"), metrics)
        png = M.plot_losses(out.with_suffix(".loss.png"), history["train_loss"], history["val_loss"], best["epoch"])
        return TrainResult(checkpoint=out, metrics=metrics, history=history, metrics_json=mj, loss_png=png)

    try:
        for epoch in range(1, int(max_epochs) + 1):
            model.train()
            order = train_idx[rng.permutation(len(train_idx))]
            tot, seen = 0.0, 0
            for b in range(0, len(order), int(batch_spots)):
                cells, mask, own, nb, miss, y = D.collate(pool, order[b : b + int(batch_spots)], emb_c, emb_s)
                loss = torch.nn.functional.mse_loss(model.forward_spot(cells, mask, own, nb, miss), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(y)
                seen += len(y)
            train_loss = tot / max(seen, 1)
            val_loss = _mse_eval(model, pool, val_idx, emb_c, emb_s, 256)[0] if len(val_idx) else None
            history["epoch"].append(epoch)
            history["train_loss"].append(train_loss)
            history["val_loss"].append(val_loss)
            watched = val_loss if val_loss is not None else train_loss
            if not math.isfinite(watched):
                raise RuntimeError(f"the loss became {watched} at epoch {epoch}")
            if watched < best["loss"] - float(min_delta):
                best.update(loss=watched, epoch=epoch, state=copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}))
                stale = 0
            else:
                stale += 1
            info = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_epoch": best["epoch"],
                    "best_loss": best["loss"], "n_train_spots": int(len(train_idx)), "n_val_spots": int(len(val_idx))}
            if epoch == 1:
                info["device"] = describe_device(dev)
            yield Progress("training", epoch, int(max_epochs), info)
            if stale >= int(patience):
                stopped = "early stopping"
                break
        result = finish(stopped)
        saved = True
        return result
    except (GeneratorExit, KeyboardInterrupt, Cancelled):
        if best["state"] is not None and not saved:
            finish("cancelled")
            saved = True
        raise


def train(slides, out, **kwargs) -> TrainResult:
    """:func:`iter_train` without progress events."""
    return run(iter_train(slides, out, **kwargs))


# ---------------------------------------------------------------- metrics


def _metrics(model, data, pool, val_idx, train_idx, val_masks, spot_targets, genes, emb_c, emb_s, dev, iter_cell_outputs, batch) -> dict:
    """Spot-level Pearson on validation (and training) spots; cell-level Pearson against the
    truth, where known, for the model and the nearest-spot baseline."""
    _, p_val = _mse_eval(model, pool, val_idx, emb_c, emb_s, 256)
    _, p_tr = _mse_eval(model, pool, train_idx, emb_c, emb_s, 256)
    out: dict = {
        "note": M.NAN_NOTE,
        "genes": list(genes),
        "spot": {
            "validation": M.summarise(M.pearson_per_gene(p_val, pool.targets[val_idx]), genes, len(val_idx)),
            "train": M.summarise(M.pearson_per_gene(p_tr, pool.targets[train_idx]), genes, len(train_idx)),
        },
        "cell": None,
    }
    out["val_spot_pearson"] = out["spot"]["validation"]["mean_pearson"]
    if not any(s.truth is not None for s in data):
        return out
    preds, truths, bases, inside, val = [], [], [], [], []
    cell_genes = None
    for i, s in enumerate(data):
        if s.truth is None:
            continue
        truth, src = s.truth
        t, have = _truth_values(truth, src, s.cells, s.assignment, genes)
        cell_genes = have if cell_genes is None else [g for g in cell_genes if g in have]
        cell_spot = s.assignment.spot.copy()
        far = cell_spot < 0
        if far.any():
            from scipy.spatial import cKDTree

            cell_spot[far] = cKDTree(s.layout.xy).query(s.cells[["x", "y"]].to_numpy(np.float64)[far])[1]
        mean, _, _, _ = run(iter_cell_outputs(model, s.emb_cells, s.emb_spots, s.layout.neighbours, cell_spot, dev))
        # baseline: every cell painted with its nearest MEASURED spot's target-scale expression
        meas = np.flatnonzero(s.measured >= 0)
        sub = Spots(ids=s.layout.ids[meas], xy=s.layout.xy[meas], tile_px=s.layout.tile_px, kind=s.layout.kind,
                    neighbours=np.full((len(meas), 1), -1, np.int64))
        base = nearest_spot_baseline(s.cells[["x", "y"]].to_numpy(np.float64), sub, spot_targets[i][meas])
        preds.append(pd.DataFrame(mean, columns=genes)[have])
        bases.append(pd.DataFrame(base, columns=genes)[have])
        truths.append(pd.DataFrame(t, columns=have))
        inside.append(np.asarray(s.assignment.inside, bool))
        val.append(val_masks[i][cell_spot])
    cols = list(cell_genes)
    P = pd.concat([p[cols] for p in preds]).to_numpy(np.float64)
    B = pd.concat([b[cols] for b in bases]).to_numpy(np.float64)
    T = pd.concat([t[cols] for t in truths]).to_numpy(np.float64)
    ins, vl = np.concatenate(inside), np.concatenate(val)
    known = np.all(np.isfinite(T), axis=1)
    cell: dict = {"genes": cols, "n_cells_without_truth": int((~known).sum())}
    for scope, sel in (("validation", vl), ("all", np.ones_like(vl))):
        cell[scope] = {}
        for where, rows in (("inside", ins), ("outside", ~ins)):
            r = known & sel & rows
            cell[scope][where] = {"model": M.compare(P, T, r, cols), "baseline": M.compare(B, T, r, cols)}
    out["cell"] = cell
    return out


# ---------------------------------------------------------------- command line


def add_train_arguments(p) -> None:
    """The ``deepspot2cell train`` options (the common ones come from ``cli._add_common``)."""
    from .cli import _add_common

    _add_common(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spots", help="spot counts: AnnData .h5ad or a Space Ranger output folder")
    src.add_argument("--simulate-spots", action="store_true",
                     help="single-cell data: --labels is an AnnData of cells (centroids in obs, counts in X); "
                          "spots are simulated on a patch grid by summing the counts of the cells inside each")
    p.add_argument("--patch-um", type=float, default=None, help="simulated spots: patch side in um (default 47.6)")
    p.add_argument("--out", required=True, help="output MODEL.ckpt (MODEL.metrics.json and MODEL.loss.png are written beside it)")
    p.add_argument("--spot-diameter-um", type=float, default=None, help="spot diameter in um, overriding the file (simulated spots: default 34)")
    p.add_argument("--cell-truth", default=None, help="optional cells x genes .h5ad of known per-cell counts, for cell-level metrics")
    p.add_argument("--aggregate", default="counts", choices=["counts", "codes"], help="sum cells' rates in count space (default) or their codes (the reference)")
    p.add_argument("--genes", default=None, help="file of genes to train on, one per line")
    p.add_argument("--n-top-genes", type=int, default=None, help="train on the top N highly variable genes (default: all genes up to 1000, else the top 1000)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of spots, in spatial blocks, held out for validation")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=5, help="epochs without validation improvement before stopping")
    p.add_argument("--spot-batch-size", type=int, default=32, help="spots per training batch")
    p.add_argument("--n-ensemble", type=int, default=10)
    p.add_argument("--phi2rho-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args) -> int:
    from .cli import ProgressPrinter, _centroid_columns, _existing, _genes, _out_path

    out = _out_path(args.out, (".ckpt",))
    for path, what in ((args.image, "slide"), (args.labels, "cell mask"), (args.spots, "spot data")):
        if path is not None:
            _existing(path, what)
    if args.cell_truth:
        _existing(args.cell_truth, "cell truth")
    inp = TrainInput(image=args.image, labels=args.labels, spots=args.spots, cell_truth=args.cell_truth,
                     simulate_spots=args.simulate_spots, patch_um=args.patch_um,
                     um_per_px=args.um_per_px, spot_diameter_um=args.spot_diameter_um,
                     cell_diameter_um=args.cell_diameter_um, centroid_columns=_centroid_columns(args.centroid_columns))
    job = iter_train(
        [inp], out, encoder=args.encoder, weights=args.weights, genes=_genes(args.genes), n_top_genes=args.n_top_genes,
        aggregate=args.aggregate, val_fraction=args.val_fraction, max_epochs=args.max_epochs, patience=args.patience,
        lr=args.lr, n_ensemble=args.n_ensemble, phi2rho_size=args.phi2rho_size, batch_spots=args.spot_batch_size,
        seed=args.seed, device=args.device, embed_batch_size=args.batch_size,
        cache_dir=False if args.no_cache else args.cache_dir,
    )
    printer = ProgressPrinter(args.quiet)

    def on_event(event):
        printer(event)
        if event.stage == "training":
            i = event.info
            val = "-" if i.get("val_loss") is None else f"{i['val_loss']:.5f}"
            line = f"epoch {i['epoch']:>3}: train loss {i['train_loss']:.5f}  validation loss {val}  best epoch {i['best_epoch']}"
            if printer.bar is not None:
                printer.bar.write(line, file=sys.stdout)
            else:
                print(line)

    try:
        result = run(job, on_event)
    finally:
        printer.close()
    for line in format_metrics(result.metrics):
        print(line)
    print(f"wrote {result.checkpoint} ({len(result.metrics['genes'])} genes), {result.metrics_json.name}, {result.loss_png.name}")
    return 0


def format_metrics(m: dict) -> list[str]:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"best epoch {m['best_epoch']} of {m['epochs_run']} ({m['stopped']})",
             f"spot Pearson (mean over genes): validation {f(m['spot']['validation']['mean_pearson'])}, train {f(m['spot']['train']['mean_pearson'])}"]
    if m.get("cell"):
        for scope in ("validation", "all"):
            for where in ("inside", "outside"):
                c = m["cell"][scope][where]
                lines.append(f"cell Pearson, {scope} spots, {where} cells: model {f(c['model']['mean_pearson'])}, "
                             f"nearest-spot baseline {f(c['baseline']['mean_pearson'])} ({c['model']['n_rows']} cells)")
    return lines
