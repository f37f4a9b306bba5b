"""Cell and spot geometry: the cell table, spot layouts, neighbours, tile boxes."""

from .cells import cell_table
from .spots import Spots, patch_grid, spots_from_anndata

__all__ = ["cell_table", "Spots", "patch_grid", "spots_from_anndata"]
