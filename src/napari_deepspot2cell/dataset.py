"""Spot-level training data: targets, gene selection, spot examples, spatial splits.

Everything here is plain NumPy on arrays that are already in memory (spot
counts, the cell-to-spot assignment, embeddings); the training job in
:mod:`train` builds them from files.

Targets (DESIGN.md): a spot's target is log1p(1e4 * counts / the spot's total
over ALL genes of the input), then the selected genes are taken, so a library
size is the whole library, not the part that was kept. A cell's known truth is
log1p(1e4 * the cell's counts / the total of its context spot's inside cells),
for inside and outside cells alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .errors import InputError

SCALE = 1e4
DEFAULT_MAX_ALL_GENES = 1000  # up to this many genes all are used; above it the top 1000 HVG
TARGET = {
    "normalisation": "log1p_cp10k",
    "scale": SCALE,
    "library_size": "total counts of the spot over all genes of the input, before gene selection",
    "cell_truth": "log1p(1e4 * cell counts / total counts of the context spot's inside cells)",
}


# ---------------------------------------------------------------- targets


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def library_sizes(counts) -> np.ndarray:
    """(M,) total counts per row over all genes."""
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()


def log1p_cp10k(counts, gene_idx: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
    """(M, G') float32 log1p(1e4 * counts[:, gene_idx] / totals); totals default to the
    rows' sums over all genes. A zero total gives zeros (nothing was counted)."""
    totals = library_sizes(counts) if totals is None else np.asarray(totals, dtype=np.float64)
    sel = _dense(counts[:, gene_idx]) if sp.issparse(counts) else np.asarray(counts, np.float64)[:, gene_idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(totals[:, None] > 0, SCALE * sel / totals[:, None], 0.0)
    return np.log1p(scaled).astype(np.float32)


def cell_truth_targets(cell_counts, context: np.ndarray, inside: np.ndarray, gene_idx: np.ndarray) -> np.ndarray:
    """(N, G') the cells' true expression on the spot targets' scale.

    cell_counts (N, all genes) raw counts in the order of the cell table;
    context (N,) each cell's context spot (-1: none); inside (N,) bool. Each cell
    is divided by the total of its context spot's inside cells (over all genes);
    a cell whose context spot holds no inside cell (or that has none) has no
    defined truth: NaN.
    """
    context = np.asarray(context, np.int64)
    inside = np.asarray(inside, bool)
    cell_tot = library_sizes(cell_counts)
    m = int(context.max(initial=-1)) + 1
    spot_tot = np.bincount(context[inside], weights=cell_tot[inside], minlength=m) if m else np.zeros(0)
    have = spot_tot > 0
    totals = np.zeros(len(context))
    ok = context >= 0
    ok[ok] = have[context[ok]]
    totals[ok] = spot_tot[context[ok]]
    out = log1p_cp10k(cell_counts, gene_idx, totals)
    out[~ok] = np.nan
    return out


# ---------------------------------------------------------------- genes


def _loess_quadratic(x: np.ndarray, y: np.ndarray, span: float = 0.3, max_points: int = 1000) -> np.ndarray:
    """Local quadratic regression with tricube weights (loess, degree 2, gaussian family).

    The neighbourhood of each point is its ceil(span * n) nearest points in x. As
    in loess's default ``surface="interpolate"``, the fit is evaluated at up to
    ``max_points`` vertices (quantiles of x) and interpolated between them.
    """
    n = len(x)
    q = int(min(n, max(3, np.floor(span * n))))
    verts = np.unique(np.quantile(x, np.linspace(0.0, 1.0, min(n, max_points))))
    fitted_v = np.empty(len(verts))
    for i, x0 in enumerate(verts):
        d = np.abs(x - x0)
        h = np.partition(d, q - 1)[q - 1] if q < n else d.max()
        if q >= n:
            h = h * max(1.0, span) if span > 1 else h
        h = max(h, 1e-12) * (1.0 + 1e-9)
        u = d / h
        w = np.where(u < 1.0, (1.0 - u**3) ** 3, 0.0)
        sel = w > 0
        dx = x[sel] - x0
        sw = np.sqrt(w[sel])
        design = np.stack([np.ones_like(dx), dx, dx * dx], axis=1) * sw[:, None]
        coef, *_ = np.linalg.lstsq(design, y[sel] * sw, rcond=None)
        fitted_v[i] = coef[0]
    if len(verts) == 1:
        return np.full(n, fitted_v[0])
    return np.interp(x, verts, fitted_v)


def seurat_v3_variances(counts, span: float = 0.3) -> np.ndarray:
    """(G,) the normalised variance of Seurat v3 / ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``.

    A loess fit (degree 2, span 0.3) of log10 variance on log10 mean over the
    non-constant genes gives each gene an expected variance; counts are clipped
    at mean + sqrt(n_spots) * expected std, and the variance of the clipped
    counts standardised by the expected std is the score (0 for constant genes).
    """
    x = counts.tocsc() if sp.issparse(counts) else np.asarray(counts, np.float64)
    n = x.shape[0]
    if n < 2:
        return np.zeros(x.shape[1])
    mean = np.asarray(x.mean(axis=0), np.float64).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0) if sp.issparse(x) else (x * x).mean(axis=0), np.float64).ravel()
    var = (sq - mean**2) * n / (n - 1)
    not_const = var > 0
    estimated = np.zeros(x.shape[1])
    if not_const.sum() >= 3:
        estimated[not_const] = _loess_quadratic(np.log10(mean[not_const]), np.log10(var[not_const]), span=span)
    reg_std = np.sqrt(10.0**estimated)
    clip = reg_std * np.sqrt(n) + mean
    if sp.issparse(x):
        c = x.astype(np.float64).tocsc(copy=True)
        cols = np.repeat(np.arange(c.shape[1]), np.diff(c.indptr))
        c.data = np.minimum(c.data, clip[cols])
        s1 = np.asarray(c.sum(axis=0)).ravel()
        s2 = np.asarray(c.multiply(c).sum(axis=0)).ravel()
    else:
        c = np.minimum(x, clip[None, :])
        s1, s2 = c.sum(axis=0), (c * c).sum(axis=0)
    score = (n * mean**2 + s2 - 2 * s1 * mean) / ((n - 1) * reg_std**2)
    score[~not_const] = 0.0
    return score


def select_genes(var_names, counts, genes=None, n_top_genes: int | None = None, source=None) -> tuple[list[str], dict]:
    """The genes to train on, in the spot file's order, and how they were chosen.

    ``genes``: the user's list (each must exist; InputError naming the missing
    ones). Else ``n_top_genes`` highly variable genes by Seurat v3 (see
    :func:`seurat_v3_variances`); by default all genes when there are at most
    1000, else the top 1000.
    """
    names = [str(g) for g in var_names]
    if genes is not None:
        genes = [str(g) for g in genes]
        if not genes:
            raise InputError(source, "the gene list is empty")
        known = set(names)
        missing = [g for g in genes if g not in known]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise InputError(source, f"{len(missing)} requested gene(s) are not in the spot data: {', '.join(missing[:5])}{more}")
        if len(set(genes)) != len(genes):
            raise InputError(source, "the gene list names a gene twice")
        return genes, {"method": "user list", "n_genes": len(genes)}
    if n_top_genes is None:
        if len(names) <= DEFAULT_MAX_ALL_GENES:
            return names, {"method": "all genes", "n_genes": len(names)}
        n_top_genes = DEFAULT_MAX_ALL_GENES
    n_top_genes = int(n_top_genes)
    if n_top_genes < 1:
        raise InputError(source, f"--n-top-genes must be >= 1, got {n_top_genes}")
    if n_top_genes >= len(names):
        return names, {"method": "all genes", "n_genes": len(names)}
    score = seurat_v3_variances(counts)
    top = np.argsort(-score, kind="stable")[:n_top_genes]
    keep = np.sort(top)
    return [names[i] for i in keep], {
        "method": "highly variable genes, seurat_v3 normalised variance (loess span 0.3, own implementation)",
        "n_genes": int(n_top_genes),
    }


# ---------------------------------------------------------------- examples


@dataclass
class SpotExamples:
    """One training example per spot with at least one inside cell.

    spot (E,) index of the spot (its own embedding); cell_ptr (E+1,) and cell_idx:
    the inside cells of example e are ``cell_idx[cell_ptr[e]:cell_ptr[e+1]]``
    (indices into the cell table, ascending); neighbours (E, K) spot indices, -1
    missing; targets (E, G) float32.
    """

    spot: np.ndarray
    cell_ptr: np.ndarray
    cell_idx: np.ndarray
    neighbours: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.spot)

    def cells_of(self, e: int) -> np.ndarray:
        return self.cell_idx[self.cell_ptr[e] : self.cell_ptr[e + 1]]

    def subset(self, idx) -> SpotExamples:
        idx = np.asarray(idx, np.int64)
        counts = np.diff(self.cell_ptr)[idx]
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cells = np.concatenate([self.cells_of(int(e)) for e in idx]) if len(idx) else np.zeros(0, np.int64)
        return SpotExamples(self.spot[idx], ptr, cells.astype(np.int64), self.neighbours[idx], self.targets[idx])

    @staticmethod
    def concat(parts: list[SpotExamples]) -> SpotExamples:
        """Examples of several slides in one pool (indices already shifted)."""
        ptrs, start = [np.zeros(1, np.int64)], 0
        for p in parts:
            ptrs.append(p.cell_ptr[1:] + start)
            start += int(p.cell_ptr[-1])
        return SpotExamples(
            spot=np.concatenate([p.spot for p in parts]),
            cell_ptr=np.concatenate(ptrs).astype(np.int64),
            cell_idx=np.concatenate([p.cell_idx for p in parts]),
            neighbours=np.concatenate([p.neighbours for p in parts]),
            targets=np.concatenate([p.targets for p in parts]),
        )

    def shifted(self, cell_offset: int, spot_offset: int) -> SpotExamples:
        """The same examples indexing into embeddings concatenated after others."""
        nb = np.where(self.neighbours >= 0, self.neighbours + spot_offset, -1)
        return SpotExamples(self.spot + spot_offset, self.cell_ptr, self.cell_idx + cell_offset, nb, self.targets)


def build_examples(context: np.ndarray, inside: np.ndarray, neighbours: np.ndarray, targets: np.ndarray) -> SpotExamples:
    """Spot examples from each cell's context spot and inside flag (geometry.assign)."""
    context = np.asarray(context, np.int64)
    inside = np.asarray(inside, bool) & (context >= 0)
    m = len(neighbours)
    cells = np.flatnonzero(inside)
    order = np.lexsort((cells, context[cells]))
    cells = cells[order]
    per_spot = np.bincount(context[cells], minlength=m)
    spots = np.flatnonzero(per_spot > 0)
    ptr = np.concatenate([[0], np.cumsum(per_spot[spots])]).astype(np.int64)
    return SpotExamples(
        spot=spots.astype(np.int64),
        cell_ptr=ptr,
        cell_idx=cells.astype(np.int64),
        neighbours=np.asarray(neighbours, np.int64)[spots],
        targets=np.asarray(targets, np.float32)[spots],
    )


def block_ids(xy: np.ndarray, block_px: float) -> np.ndarray:
    """(E,) the square block of side ``block_px`` (from the points' top-left) holding each point."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros(0, np.int64)
    bx = np.floor((xy[:, 0] - xy[:, 0].min()) / block_px).astype(np.int64)
    by = np.floor((xy[:, 1] - xy[:, 1].min()) / block_px).astype(np.int64)
    _, block = np.unique(by * (bx.max() + 1) + bx, return_inverse=True)
    return block.ravel().astype(np.int64)


def spatial_block_split(xy: np.ndarray, block_px: float, val_fraction: float, seed: int, weight=None) -> np.ndarray:
    """(E,) bool, True = validation: whole square blocks of side ``block_px``, in a seeded
    random order, go to validation until ``val_fraction`` of the total ``weight``
    (default 1 per point; e.g. 1 per spot with inside cells, 0 for the others) is
    reached. A block that would overshoot by more than it fills is skipped, and
    never is every weighted point put into validation."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    n = len(xy)
    val = np.zeros(n, bool)
    weight = np.ones(n) if weight is None else np.asarray(weight, np.float64)
    if n == 0 or val_fraction <= 0:
        return val
    if not block_px > 0:
        raise ValueError("block_px must be positive")
    block = block_ids(xy, block_px)
    sizes = np.bincount(block, weights=weight)
    total = float(weight.sum())
    target = val_fraction * total
    got = 0.0
    chosen = []
    for b in np.random.default_rng(seed).permutation(len(sizes)):
        if got >= target:
            break
        if sizes[b] <= 0:
            continue
        if got > 0 and got + sizes[b] - target > target - got:
            continue
        if got + sizes[b] >= total:  # never every point
            continue
        chosen.append(b)
        got += sizes[b]
    val[np.isin(block, chosen)] = True
    return val


def collate(ex: SpotExamples, idx: np.ndarray, emb_cells: torch.Tensor, emb_spots: torch.Tensor):
    """The batch of examples ``idx`` as the tensors of ``DeepSpot2Cell.forward_spot``:
    cells (B, C, D) padded to the most cells in the batch, cell_mask (B, C) True =
    real, own (B, D), neighbours (B, K, D), neighbour_missing (B, K), targets (B, G)."""
    idx = np.asarray(idx, np.int64)
    counts = np.diff(ex.cell_ptr)[idx]
    c = int(counts.max(initial=1))
    slots = np.zeros((len(idx), c), np.int64)
    mask = np.arange(c)[None, :] < counts[:, None]
    for row, e in enumerate(idx):
        slots[row, : counts[row]] = ex.cells_of(int(e))
    dev = emb_cells.device
    slots_t = torch.from_numpy(slots).to(dev)
    nb = torch.from_numpy(ex.neighbours[idx]).to(dev)
    return (
        emb_cells[slots_t],
        torch.from_numpy(mask).to(dev),
        emb_spots[torch.from_numpy(ex.spot[idx]).to(dev)],
        emb_spots[nb.clamp(min=0)],
        nb < 0,
        torch.from_numpy(ex.targets[idx]).to(dev),
    )
