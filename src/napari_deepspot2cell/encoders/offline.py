"""The offline default encoder: hand-crafted H&E morphology features, no weights.

Each 64 x 64 RGB tile (the pipeline resizes to it; other sizes are resized
here) is turned into optical density, -log((I * 255 + 1) / 256), and colour-
deconvolved with the Ruifrok-Johnston H&E-DAB matrix (as skimage.color.rgb2hed,
on natural-log optical density) into haematoxylin (H), eosin (E) and residual
(D). The features describe

* the centred disk of radius S/4 (where a cell tile's nucleus is) and the ring
  around it out to S/2: mean, std and 10/50/90 % quantiles of H and E, the
  fraction of strongly haematoxylin-positive pixels (nuclear area), of bright
  background pixels, mean RGB and mean optical density;
* texture: mean Sobel gradient magnitude of H and E in the disk and in the ring,
  mean absolute Laplacian of H and E;
* spatial layout: a 4 x 4 grid of H and E means, radial profiles of H and E in
  four rings;
* nuclei: blob peaks of smoothed H per tile and in the ring (neighbour density);
  H/(H+E) in disk and ring, disk-minus-ring H contrast, mean residual D.

Every operation acts on one tile at a time (elementwise arithmetic, sorts and
reductions along a tile's own pixels, pooling), so a tile's features do not
depend on the batch it is in, and nothing is standardised per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Encoder

#: Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage
_RGB_FROM_HED = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)


def _inverse3(m):
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    inv = (
        (e * i - f * h, c * h - b * i, b * f - c * e),
        (f * g - d * i, a * i - c * g, c * d - a * f),
        (d * h - e * g, b * g - a * h, a * e - b * d),
    )
    return tuple(tuple(v / det for v in row) for row in inv)


#: od (row vector) @ _HED_FROM_RGB -> (H, E, D)
_HED_FROM_RGB = _inverse3(_RGB_FROM_HED)

SIZE = 64
_H_POSITIVE = 0.6  # H optical density of nuclear chromatin (cytoplasm ~0.15, nuclei ~1-1.7)
_H_SOFTNESS = 0.1
_BRIGHT = 0.82  # mean RGB above which a pixel is background (glass)
_BRIGHT_SOFTNESS = 0.03
_PEAK_MIN_H = 0.5
_QUANTILES = (0.1, 0.5, 0.9)


def _region_names(region: str) -> list[str]:
    names = []
    for stain in ("h", "e"):
        names += [f"{region}_{stain}_mean", f"{region}_{stain}_std"]
        names += [f"{region}_{stain}_q{int(q * 100)}" for q in _QUANTILES]
    names += [f"{region}_nuclear_fraction", f"{region}_background_fraction"]
    names += [f"{region}_rgb_{c}" for c in "rgb"] + [f"{region}_od_{c}" for c in "rgb"]
    return names


FEATURE_NAMES: tuple[str, ...] = tuple(
    _region_names("disk")
    + _region_names("ring")
    + ["disk_h_gradient", "ring_h_gradient", "disk_e_gradient", "ring_e_gradient", "h_laplacian", "e_laplacian"]
    + [f"grid_h_{i}{j}" for i in range(4) for j in range(4)]
    + [f"grid_e_{i}{j}" for i in range(4) for j in range(4)]
    + [f"radial_h_{k}" for k in range(4)]
    + [f"radial_e_{k}" for k in range(4)]
    + ["nuclei_tile", "nuclei_ring", "disk_h_ratio", "ring_h_ratio", "disk_ring_h_contrast", "d_mean"]
)


def _shift_sum(
    p: torch.Tensor, weights: dict[tuple[int, int], float], pad: int, *, rows: int | None = None, cols: int | None = None
) -> torch.Tensor:
    """Weighted sum of shifted windows of a padded (B, H+2*rows, W+2*cols) image:
    a small convolution written elementwise (bitwise the same whatever the batch)."""
    rows = pad if rows is None else rows
    cols = pad if cols is None else cols
    hh, ww = p.shape[-2] - 2 * rows, p.shape[-1] - 2 * cols
    out = None
    for (dy, dx), w in weights.items():
        part = p[:, rows + dy : rows + dy + hh, cols + dx : cols + dx + ww]
        part = part * w if w != 1.0 else part
        out = part if out is None else out + part
    return out


_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


class OfflineEncoder(Encoder):
    """Deterministic H&E morphology features; no download, no weights."""

    def __init__(self):
        super().__init__()
        self.id = "offline-he-v1"
        self.weights_hash = ""
        self.input_size = SIZE
        self.dim = len(FEATURE_NAMES)
        self.feature_names = FEATURE_NAMES
        self.source = ""
        self.note = ""
        s = SIZE
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float64), torch.arange(s, dtype=torch.float64), indexing="ij")
        c = (s - 1) / 2
        r = torch.sqrt((yy - c) ** 2 + (xx - c) ** 2).reshape(-1)
        disk = torch.nonzero(r < s / 4).reshape(-1)
        ring = torch.nonzero((r >= s / 4) & (r < s / 2)).reshape(-1)
        self.register_buffer("disk_idx", disk, persistent=False)
        self.register_buffer("ring_idx", ring, persistent=False)
        rings = [torch.nonzero((r >= k * s / 8) & (r < (k + 1) * s / 8)).reshape(-1) for k in range(4)]
        for k, idx in enumerate(rings):
            self.register_buffer(f"radial_idx{k}", idx, persistent=False)
        self._q_disk = [round(q * (len(disk) - 1)) for q in _QUANTILES]
        self._q_ring = [round(q * (len(ring) - 1)) for q in _QUANTILES]

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _region(pix: torch.Tensor, q_index: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Region features (FEATURE_NAMES order) of the gathered pixels
        (B, 12, N) = h, e, nuclear, background, r, g, b, od r/g/b, grad h, grad e;
        and the mean gradients (B, 2)."""
        means = pix.mean(2)  # (B, 12)
        he = pix[:, :2]
        std = torch.sqrt(((he - means[:, :2, None]) ** 2).mean(2) + 1e-12)  # (B, 2)
        srt = torch.sort(he, dim=2).values
        quant = srt[:, :, q_index]  # (B, 2, 3)
        feats: list[torch.Tensor] = []
        for c in range(2):
            feats += [means[:, c], std[:, c]] + list(quant[:, c].unbind(1))
        feats += list(means[:, 2:10].unbind(1))
        return feats, means[:, 10:12]

    @staticmethod
    def _blur(img: torch.Tensor) -> torch.Tensor:
        p = F.pad(img[:, None], (2, 2, 2, 2), mode="replicate")[:, 0]
        rows = _shift_sum(p[:, 2:-2, :], {(0, d - 2): w for d, w in enumerate(_BINOMIAL)}, 0, cols=2)
        p = F.pad(rows[:, None], (0, 0, 2, 2), mode="replicate")[:, 0]
        return _shift_sum(p, {(d - 2, 0): w for d, w in enumerate(_BINOMIAL)}, 0, rows=2)

    @staticmethod
    def _sobel_laplace(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sobel gradient magnitude / 8 and |Laplacian| of (B, S, S), replicate borders."""
        p = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        vs = p[:, :-2] + 2.0 * p[:, 1:-1] + p[:, 2:]  # vertical smoothing, (B, S, S+2)
        hs = p[:, :, :-2] + 2.0 * p[:, :, 1:-1] + p[:, :, 2:]  # horizontal smoothing, (B, S+2, S)
        gx = vs[:, :, 2:] - vs[:, :, :-2]
        gy = hs[:, 2:] - hs[:, :-2]
        mag = torch.sqrt(gx * gx + gy * gy + 1e-12) / 8.0
        c = p[:, 1:-1, 1:-1]
        lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4.0 * c
        return mag, lap.abs()

    # ------------------------------------------------------------------ forward
    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"tiles must be (B, 3, S, S), got {tuple(tiles.shape)}")
        with torch.autocast(device_type=tiles.device.type, enabled=False):
            return self._features(tiles)

    def _features(self, tiles: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num(tiles.float(), nan=1.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
        s = SIZE
        if tuple(x.shape[-2:]) != (s, s):
            big = x.shape[-1] > s or x.shape[-2] > s
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=big).clamp(0.0, 1.0)
        b = x.shape[0]
        if b == 0:
            return torch.zeros((0, self.dim), dtype=torch.float32, device=x.device)
        od = -torch.log((x * 255.0 + 1.0) / 256.0)  # (B, 3, S, S), in [0, log 256]
        m = _HED_FROM_RGB
        hed = [od[:, 0] * m[0][j] + od[:, 1] * m[1][j] + od[:, 2] * m[2][j] for j in range(3)]
        h = hed[0].clamp_min(0.0)
        e = hed[1].clamp_min(0.0)
        d = hed[2]
        nuclear = torch.sigmoid((h - _H_POSITIVE) / _H_SOFTNESS)
        background = torch.sigmoid((x.mean(1) - _BRIGHT) / _BRIGHT_SOFTNESS)
        grad_h, lap_h = self._sobel_laplace(h)
        grad_e, lap_e = self._sobel_laplace(e)

        planes = torch.cat(
            [torch.stack([h, e, nuclear, background], 1), x, od, torch.stack([grad_h, grad_e], 1)], 1
        ).reshape(b, 12, s * s)
        disk_feats, disk_grad = self._region(planes[:, :, self.disk_idx], self._q_disk)
        ring_feats, ring_grad = self._region(planes[:, :, self.ring_idx], self._q_ring)
        feats: list[torch.Tensor] = disk_feats + ring_feats
        feats += [disk_grad[:, 0], ring_grad[:, 0], disk_grad[:, 1], ring_grad[:, 1]]
        feats += [lap_h.reshape(b, -1).mean(1), lap_e.reshape(b, -1).mean(1)]

        # spatial layout
        g = s // 4
        he = planes[:, :2].reshape(b, 2, 4, g, 4, g).permute(0, 1, 2, 4, 3, 5).reshape(b, 2, 16, g * g).mean(3)
        feats += list(he[:, 0].unbind(1)) + list(he[:, 1].unbind(1))
        radial = torch.stack([planes[:, :2, getattr(self, f"radial_idx{k}")].mean(2) for k in range(4)], 2)
        feats += list(radial[:, 0].unbind(1)) + list(radial[:, 1].unbind(1))

        # nuclei: peaks of smoothed H over a 5 x 5 neighbourhood (separable max)
        smooth = self._blur(h)
        local_max = F.max_pool2d(smooth[:, None], kernel_size=(1, 5), stride=1, padding=(0, 2))
        local_max = F.max_pool2d(local_max, kernel_size=(5, 1), stride=1, padding=(2, 0))[:, 0]
        peaks = ((smooth >= local_max) & (smooth > _PEAK_MIN_H)).float().reshape(b, -1)
        feats += [peaks.sum(1) / 30.0, peaks[:, self.ring_idx].sum(1) / 20.0]

        disk_h, disk_e = disk_feats[0], disk_feats[5]
        ring_h, ring_e = ring_feats[0], ring_feats[5]
        feats += [
            disk_h / (disk_h + disk_e + 1e-3),
            ring_h / (ring_h + ring_e + 1e-3),
            disk_h - ring_h,
            d.reshape(b, -1).mean(1),
        ]
        out = torch.stack(feats, 1)
        return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).float()


assert len(FEATURE_NAMES) == 88
