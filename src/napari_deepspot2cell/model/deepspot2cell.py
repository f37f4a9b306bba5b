"""The DeepSpot2Cell network: deep sets over cells, with ensembles.

Layer order and parameter names follow the authors' reference implementation
exactly (``phi_spot.{i}.model.{j}``, ``phi_cell...``, ``rho...``), so a
reference state dict loads into this module unchanged and predicts the same.

Shapes: D = encoder dim, h = ``phi2rho_size``, G = genes, B = spots,
C = cell slots per spot, K = neighbour slots, N = cells.
Masks: ``cell_mask`` True = a real cell inside the spot (it enters the sum);
``neighbour_missing`` True = that neighbour slot is empty (reference convention).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

AGGREGATES = ("codes", "counts")
SCALE = 1e4  # counts-per-10k, the scale of the spot targets
RATE_EPS = 1e-12  # keeps a spot (or cell) whose rates are all ~0 finite: 0 / eps = 0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all GPUs) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Phi(nn.Module):
    """Linear(d,d) -> Dropout -> ReLU -> Linear(d,h) -> Dropout -> ReLU."""

    def __init__(self, input_size: int, output_size: int, p: float):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(input_size, input_size),
            nn.Dropout(p),
            nn.ReLU(),
            nn.Linear(input_size, output_size),
            nn.Dropout(p),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Rho(nn.Module):
    """Dropout -> Linear(3h,3h) -> ReLU -> Linear(3h,G) -> ReLU|Softplus -> Dropout(0.1).

    Softplus in ``counts`` mode: strictly positive, smooth rates per gene.
    """

    def __init__(self, input_size: int, output_size: int, p: float, softplus: bool):
        super().__init__()
        self.model = nn.Sequential(
            nn.Dropout(p),
            nn.Linear(input_size, input_size),
            nn.ReLU(),
            nn.Linear(input_size, output_size),
            nn.Softplus() if softplus else nn.ReLU(),
            nn.Dropout(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class CellOutput(NamedTuple):
    mean: torch.Tensor  # (N, G) prediction on the log1p-normalised scale
    spread: torch.Tensor  # (N, G) std over rho's ensemble members: the uncertainty
    rates: torch.Tensor | None  # (N, G) raw non-negative rates (counts mode), else None


def log1p_normalise(rates: torch.Tensor) -> torch.Tensor:
    """log1p(1e4 * rates / their sum over genes), eps-guarded: the spot target's scale."""
    return torch.log1p(SCALE * rates / (rates.sum(-1, keepdim=True) + RATE_EPS))


class DeepSpot2Cell(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        n_ensemble: int = 10,
        phi2rho_size: int = 512,
        p: float = 0.3,
        aggregate: str = "counts",
        n_ensemble_phi: int | None = None,
        n_ensemble_rho: int | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
        for name, value in (("input_size", input_size), ("output_size", output_size),
                            ("n_ensemble", n_ensemble), ("phi2rho_size", phi2rho_size)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, not {value}")
        self.input_size = int(input_size)
        self.output_size = int(output_size)
        self.n_ensemble = int(n_ensemble)
        self.n_ensemble_phi = int(n_ensemble_phi or n_ensemble)
        self.n_ensemble_rho = int(n_ensemble_rho or n_ensemble)
        self.phi2rho_size = int(phi2rho_size)
        self.p = float(p)
        self.aggregate = aggregate

        # A seed makes construction deterministic without disturbing the caller's RNG.
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            d, h = self.input_size, self.phi2rho_size
            self.phi_spot = nn.ModuleList(Phi(d, h, self.p) for _ in range(self.n_ensemble_phi))
            self.phi_cell = nn.ModuleList(Phi(d, h, self.p) for _ in range(self.n_ensemble_phi))
            self.rho = nn.ModuleList(
                Rho(3 * h, self.output_size, self.p, aggregate == "counts")
                for _ in range(self.n_ensemble_rho)
            )

    @property
    def hyper_parameters(self) -> dict:
        return {
            "input_size": self.input_size,
            "output_size": self.output_size,
            "n_ensemble": self.n_ensemble,
            "n_ensemble_phi": self.n_ensemble_phi,
            "n_ensemble_rho": self.n_ensemble_rho,
            "phi2rho_size": self.phi2rho_size,
            "p": self.p,
            "aggregate": self.aggregate,
        }

    # -- encoders of cells and spots: ensemble median (robust to one bad member)
    @staticmethod
    def _median(members: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in members], 0).median(0).values

    def spot_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) spot tile embeddings -> (..., h)."""
        return self._median(self.phi_spot, x)

    def cell_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) cell tile embeddings -> (..., h)."""
        return self._median(self.phi_cell, x)

    @staticmethod
    def combine_context(
        own_code: torch.Tensor, neighbour_codes: torch.Tensor, neighbour_missing: torch.Tensor
    ) -> torch.Tensor:
        """[own spot code, mean code of the valid neighbours (0 when none)] -> (B, 2h).

        Takes codes already computed, so whole-slide prediction runs phi_spot once per spot.
        """
        missing = neighbour_missing.to(torch.bool)
        summed = neighbour_codes.masked_fill(missing.unsqueeze(-1), 0.0).sum(1)
        count = (~missing).sum(1, keepdim=True).to(summed.dtype).clamp(min=1)
        return torch.cat([own_code, summed / count], -1)

    def context_codes(
        self, own: torch.Tensor, neighbours: torch.Tensor, neighbour_missing: torch.Tensor
    ) -> torch.Tensor:
        """own (B, D), neighbours (B, K, D), neighbour_missing (B, K) -> (B, 2h)."""
        return self.combine_context(
            self.spot_codes(own), self.spot_codes(neighbours), neighbour_missing
        )

    def rho_members(self, z: torch.Tensor) -> torch.Tensor:
        """(N, 3h) -> (n_ensemble_rho, N, G), one output per member."""
        return torch.stack([r(z) for r in self.rho], 0)

    # -- spot level: what training fits to the spot targets
    def forward_spot(
        self,
        cells: torch.Tensor,
        cell_mask: torch.Tensor,
        own: torch.Tensor,
        neighbours: torch.Tensor,
        neighbour_missing: torch.Tensor,
    ) -> torch.Tensor:
        """cells (B, C, D), cell_mask (B, C), own (B, D), neighbours (B, K, D) -> (B, G)."""
        b, c, _ = cells.shape
        mask = cell_mask.to(torch.bool)
        ctx = self.context_codes(own, neighbours, neighbour_missing)  # (B, 2h)
        if self.aggregate == "codes":
            z = torch.cat([self.cell_codes(cells), ctx.unsqueeze(1).expand(-1, c, -1)], -1)
            # where, not multiply: a padded slot holding NaN must not leak into the sum
            z = torch.where(mask.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
            return self.rho_members(z.sum(1)).mean(0)
        # counts: rates only for the real inside cells, summed per spot in count space
        spot_of, slot = mask.nonzero(as_tuple=True)
        z = torch.cat([self.cell_codes(cells[spot_of, slot]), ctx[spot_of]], -1)
        rates = self.rho_members(z).mean(0)  # (M, G)
        total = rates.new_zeros((b, self.output_size)).index_add(0, spot_of, rates)
        return log1p_normalise(total)

    forward = forward_spot

    # -- cell level: inference
    def forward_cells(
        self,
        cells: torch.Tensor,
        own: torch.Tensor,
        neighbours: torch.Tensor,
        neighbour_missing: torch.Tensor,
    ) -> CellOutput:
        """cells (N, D), own (N, D), neighbours (N, K, D), neighbour_missing (N, K)."""
        return self.forward_cells_from_codes(
            self.cell_codes(cells), self.context_codes(own, neighbours, neighbour_missing)
        )

    def forward_cells_from_codes(self, cell_codes: torch.Tensor, context_codes: torch.Tensor) -> CellOutput:
        """cell_codes (N, h), context_codes (N, 2h) -> CellOutput."""
        members = self.rho_members(torch.cat([cell_codes, context_codes], -1))
        if self.aggregate == "codes":
            return CellOutput(
                mean=members.mean(0).clamp(min=0.0),
                spread=members.clamp(min=0.0).std(0, correction=0),
                rates=None,
            )
        rates = members.mean(0)
        return CellOutput(
            mean=log1p_normalise(rates),
            spread=log1p_normalise(members).std(0, correction=0),
            rates=rates,
        )
