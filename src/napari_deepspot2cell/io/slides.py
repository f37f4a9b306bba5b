"""Open H&E slides as lazy RGB uint8 multiscale pyramids.

TIFF, OME-TIFF and Aperio SVS go through tifffile's zarr store: every pyramid
level is a dask array chunked along the file's tiles (or strips), so the
full-resolution image is never decoded whole. PNG/JPEG and other small formats
are read into memory and wrapped as a single level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from napari_deepspot2cell.errors import InputError, positive_number

log = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CHUNK_TARGET = 1024  # dask chunk side: a whole number of file tiles near this
_SIDECAR_KEYS = ("pixel_size_um_estimated", "pixel_size_um", "um_per_px", "mpp", "pixel_size_um_embedded")
_UNIT_TO_UM = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
    "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6, "Å": 1e-4, "å": 1e-4,
}
_NO_PIXEL_SIZE = "pixel size unknown; pass --um-per-px (e.g. 0.25 for 40x, 0.5 for 20x)"


# ---------------------------------------------------------------- levels


@dataclass(eq=False)
class _Level:
    """One pyramid level in the file's own layout, plus how to turn a window into RGB."""

    raw: Any  # zarr.Array or numpy array, file axis order
    axes: str  # one letter per raw axis; Y, X, "c" (the colour axis), "1" (a singleton)
    convert: Callable[[np.ndarray], np.ndarray] = np.asarray  # (h, w, c) -> (h, w, 3) uint8

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.raw.shape[self.axes.index("Y")]), int(self.raw.shape[self.axes.index("X")])

    @property
    def channels(self) -> int:
        return int(self.raw.shape[self.axes.index("c")]) if "c" in self.axes else 1

    def _index(self, ys: slice, xs: slice) -> tuple:
        return tuple(ys if a == "Y" else xs if a == "X" else slice(None) if a == "c" else 0 for a in self.axes)

    def _perm(self) -> tuple[int, ...]:
        kept = [a for a in self.axes if a != "1"]
        return tuple(kept.index(a) for a in "YXc")

    def window(self, ys: slice, xs: slice) -> np.ndarray:
        block = np.asarray(self.raw[self._index(ys, xs)])
        return self.convert(block.transpose(self._perm()))

    def to_dask(self) -> da.Array:
        raw_chunks = getattr(self.raw, "chunks", None) or self.raw.shape
        chunks = []
        for a, n, c in zip(self.axes, self.raw.shape, raw_chunks):
            if a in "YX":
                c = max(1, min(int(c), n))
                chunks.append(min(n, c * max(1, round(_CHUNK_TARGET / c))))
            else:
                chunks.append(n)  # the colour axis stays whole: conversion needs all channels
        # name given, so dask never tries to hash the zarr store or the pixels
        arr = da.from_array(self.raw, chunks=tuple(chunks), name=f"slide-{uuid.uuid4().hex}", asarray=True)
        arr = arr[self._index(slice(None), slice(None))].transpose(self._perm())
        return arr.map_blocks(self.convert, dtype=np.uint8, chunks=(arr.chunks[0], arr.chunks[1], (3,)),
                              name=f"slide-rgb-{uuid.uuid4().hex}")


# ---------------------------------------------------------------- Slide


@dataclass(eq=False)
class Slide:
    """A lazy RGB uint8 pyramid; level 0 is full resolution."""

    path: Path
    levels: list[da.Array]
    um_per_px: float
    _readers: list[_Level] = field(default_factory=list, repr=False)
    _handle: Any = field(default=None, repr=False)  # keeps the TiffFile (and its store) open

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    @property
    def downsamples(self) -> list[float]:
        h0, w0 = self.shape
        return [float(np.mean((h0 / lv.shape[0], w0 / lv.shape[1]))) for lv in self.levels]

    def read_region(self, y0: int, x0: int, y1: int, x1: int, level: int = 0, fill: int = 255) -> np.ndarray:
        """The window [y0, y1) x [x0, x1) of ``level`` as (h, w, 3) uint8, padded with ``fill`` outside.

        Reads the file's array directly rather than through dask: for tile-sized
        windows that is about twice as fast, and only overlapping chunks decode.
        """
        y0, x0, y1, x1 = (int(v) for v in (y0, x0, y1, x1))
        if y1 < y0 or x1 < x0:
            raise ValueError(f"empty or inverted window ({y0}, {x0}, {y1}, {x1})")
        out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=np.uint8)
        reader = self._readers[level]
        h, w = reader.shape
        oy0, ox0, oy1, ox1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if oy0 < oy1 and ox0 < ox1:
            out[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0] = reader.window(slice(oy0, oy1), slice(ox0, ox1))
        return out

    def identity(self) -> dict:
        """What identifies this slide's pixels: the embedding cache's signature."""
        resolved = self.path.resolve()
        stat = resolved.stat()
        return {
            "path": str(resolved),
            "size": int(stat.st_size),
            "mtime_ns": int(stat.st_mtime_ns),
            # reliability: os.utime can put an edited file's mtime back, not its ctime (changed by any
            # write) or its inode (new for a file replaced by a copy); a false miss only recomputes
            "ctime_ns": int(stat.st_ctime_ns),
            "inode": int(stat.st_ino),
            "shape": list(self.shape),
            "level_shapes": [list(lv.shape[:2]) for lv in self.levels],
            "um_per_px": float(self.um_per_px),
            "pixel_sha256": self._pixel_hash(),
        }

    def _pixel_hash(self, grid: int = 4, side: int = 32) -> str:
        # a grid of small windows on level 0 plus the lowest level (whole when small):
        # a re-saved or edited slide changes the hash while reading stays cheap
        digest = hashlib.sha256()
        h, w = self.shape
        for i in range(grid):
            for j in range(grid):
                y, x = int((i + 0.5) * h / grid) - side // 2, int((j + 0.5) * w / grid) - side // 2
                digest.update(self.read_region(y, x, y + side, x + side).tobytes())
        last = len(self.levels) - 1
        lh, lw = self._readers[last].shape
        if last > 0 and lh * lw <= 2048 * 2048:
            digest.update(self.read_region(0, 0, lh, lw, level=last).tobytes())
        return digest.hexdigest()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_thumbnail(slide: Slide, max_side: int = 2048) -> np.ndarray:
    """An RGB uint8 overview whose longer side is at most ``max_side`` (for plots).

    Starts from the smallest level still bigger than ``max_side`` and averages
    blocks chunk by chunk, so even a flat slide never sits whole in memory.
    """
    bigger = [i for i, lv in enumerate(slide.levels) if max(lv.shape[:2]) > max_side]
    level = slide.levels[bigger[-1]] if bigger else slide.levels[0]
    factor = math.ceil(max(level.shape[:2]) / max_side)
    if factor <= 1:
        return np.asarray(level.compute())
    level = level.rechunk({0: _multiple(level.chunks[0][0], factor), 1: _multiple(level.chunks[1][0], factor)})
    small = da.coarsen(np.mean, level, {0: factor, 1: factor}, trim_excess=True)
    return np.clip(np.rint(small.compute()), 0, 255).astype(np.uint8)


def _multiple(chunk: int, factor: int) -> int:
    return max(factor, (chunk // factor) * factor)


# ---------------------------------------------------------------- open


def open_slide(path, um_per_px: float | None = None) -> Slide:
    """Open an H&E slide as a lazy RGB uint8 pyramid with its pixel size in um/px.

    Pixel size: ``um_per_px`` if given; else the file's OME PhysicalSizeX, the
    Aperio ``MPP``, the TIFF resolution tags (inch or cm; a bare 72 dpi is
    ignored); else a JSON sidecar (``X.json`` beside ``X.jpg``) with
    ``pixel_size_um_estimated`` / ``pixel_size_um`` / ``um_per_px`` / ``mpp``.
    Every problem with the file is an :class:`InputError`.
    """
    path = Path(path)
    if um_per_px is not None:
        um_per_px = positive_number(path, um_per_px, "--um-per-px")
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise InputError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    if head.startswith(_TIFF_MAGIC):
        readers, file_mpp, handle = _open_tiff(path)
    else:
        readers, file_mpp, handle = _open_small_image(path, head), None, None
    try:
        mpp = um_per_px or file_mpp or _sidecar_pixel_size(path)
        if mpp is None:
            raise InputError(path, _NO_PIXEL_SIZE)
        levels = [r.to_dask() for r in readers]
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    return Slide(path=path, levels=levels, um_per_px=float(mpp), _readers=readers, _handle=handle)


# ---------------------------------------------------------------- TIFF


def open_tiff(path: Path):
    """The TiffFile of `path`, or one InputError when it cannot be read or holds no image."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many kinds for damaged files
        raise InputError(path, f"not a readable TIFF ({_short(exc)})") from exc
    if not tif.series:
        tif.close()
        raise InputError(path, "the TIFF holds no image")
    return tif


def _open_tiff(path: Path) -> tuple[list[_Level], float | None, Any]:
    import zarr

    tif = open_tiff(path)
    try:
        series = tif.series[0]
        levels = list(series.levels)
        stores = [series.aszarr(level=i) for i in range(len(levels))]
        extra = _svs_overview(tif, series)
        if extra is not None:
            levels.append(extra)
            stores.append(extra.aszarr())
        readers = [_Level(zarr.open_array(store, mode="r"), _axes(path, lv.axes, lv.shape))
                   for store, lv in zip(stores, levels)]
        _check_complete(path, levels)
        with _decoding(path):
            convert = _converter(path, series.dtype, readers[0].channels, _tiff_bits(series), readers[-1])
            for reader in readers:
                reader.convert = convert
            _probe(readers[0])
        return readers, _tiff_pixel_size(tif, series), tif
    except BaseException:
        tif.close()
        raise


def _svs_overview(tif, series):
    """A flat SVS (one level) keeps a downsampled copy of its baseline as the thumbnail: use it as level 1."""
    if not tif.is_svs or len(series.levels) > 1:
        return None
    for other in tif.series[1:]:
        if other.name.lower() != "thumbnail" or len(other.shape) != len(series.shape):
            continue
        (h0, w0), (h1, w1) = series.shape[:2], other.shape[:2]
        if h1 < h0 and abs((h0 / h1) / (w0 / w1) - 1) < 0.02:  # same picture, only smaller
            return other
    return None


def _tiff_bits(series) -> int | None:
    try:
        return int(series.keyframe.bitspersample)
    except Exception:
        return None


def _check_complete(path: Path, levels) -> None:
    """Compare the tile table with the file size: JPEG decoders pad cut-off tiles silently."""
    size = path.stat().st_size
    for level in levels:
        for page in level.pages:
            if page is None:
                continue
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                raise InputError(path, f"the file is truncated: its image data runs to byte {max(ends)} "
                                       f"but the file has {size} bytes")


def _probe(reader: _Level) -> None:
    """Decode the first and last pixel: a truncated file fails here, not deep in a job."""
    h, w = reader.shape
    reader.window(slice(0, 1), slice(0, 1))
    reader.window(slice(h - 1, h), slice(w - 1, w))


@contextlib.contextmanager
def _decoding(path: Path):
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # codecs and tifffile raise many kinds for damaged data
        raise InputError(path, f"the image data cannot be decoded; is the file truncated? ({_short(exc)})") from exc


def _tiff_pixel_size(tif, series) -> float | None:
    page = series.keyframe
    return _ome_pixel_size(tif) or _aperio_pixel_size(tif, page) or _resolution_pixel_size(page)


def _ome_pixel_size(tif) -> float | None:
    if not tif.ome_metadata:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and el.get("PhysicalSizeX"):
            try:
                value = float(el.get("PhysicalSizeX"))
            except ValueError:
                return None
            factor = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"))
            return value * factor if factor and value > 0 else None
    return None


def _aperio_pixel_size(tif, page) -> float | None:
    if not tif.is_svs:
        return None
    match = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", page.description or "")
    value = float(match.group(1)) if match else 0.0
    return value if value > 0 else None


def _resolution_pixel_size(page) -> float | None:
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(int(unit.value))  # inch, cm, mm, um
    num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
    if um_per_unit is None or not num or not den:
        return None
    px_per_unit = num / den
    if int(unit.value) == 2 and px_per_unit <= 600:
        return None  # screen or print dpi (72, 96, 300): a writer's default, not a microscope
    return um_per_unit / px_per_unit


# ---------------------------------------------------------------- PNG / JPEG / others


def _open_small_image(path: Path, head: bytes) -> list[_Level]:
    arr = _read_small(path, head)
    if arr.ndim not in (2, 3):
        raise InputError(path, f"unexpected image array of shape {arr.shape}")
    level = _Level(arr, "YX" if arr.ndim == 2 else "YX1" if arr.shape[2] == 1 else "YXc")
    level.convert = _converter(path, arr.dtype, level.channels, None, level)
    return [level]


def _read_small(path: Path, head: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if head.startswith(_PNG_MAGIC) and _png_bit_depth(path) == 16:
        return _read_png16(path)  # PIL drops 16-bit RGB PNGs to 8 bits
    try:
        with _no_bomb_check(Image), Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "CMYK" or im.mode.startswith("YCbCr"):
                im = im.convert("RGB")
            return np.array(im)
    except UnidentifiedImageError as exc:
        raise InputError(path, "not an image this reader knows (expected TIFF/SVS/OME-TIFF, PNG or JPEG)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(path, f"the image cannot be decoded; is the file truncated? ({_short(exc)})") from exc


@contextlib.contextmanager
def _no_bomb_check(image_module):
    """The user's own slide, not an upload: PIL's decompression-bomb limit would refuse a large JPEG."""
    saved, image_module.MAX_IMAGE_PIXELS = image_module.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        image_module.MAX_IMAGE_PIXELS = saved


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as fh:
        ihdr = fh.read(26)
    return ihdr[24] if len(ihdr) >= 26 else 8


def _read_png16(path: Path) -> np.ndarray:
    import imagecodecs

    try:
        return imagecodecs.png_decode(path.read_bytes())
    except Exception as exc:
        raise InputError(path, f"the PNG cannot be decoded; is the file truncated? ({_short(exc)})") from exc


# ---------------------------------------------------------------- layout and colour


def _axes(path: Path, file_axes: str, shape) -> str:
    """Map tifffile's axes (e.g. YXS, SYX, TCZYX) to Y, X, c (colour) and 1 (singleton)."""
    out = []
    for a, n in zip(file_axes, shape):
        out.append(a if a in "YX" else "1" if n == 1 else "c")
    axes = "".join(out)
    if "Y" not in axes or "X" not in axes:
        raise InputError(path, f"the image has axes {file_axes}, not a 2-D picture")
    if axes.count("c") > 1:
        raise InputError(path, f"the image has axes {file_axes} with shape {tuple(shape)}; expected one RGB plane")
    return axes


def _converter(path: Path, dtype, channels: int, bits: int | None, smallest: _Level) -> Callable:
    """Check the colour layout once and return the per-window conversion to RGB uint8."""
    dtype = np.dtype(dtype)
    if channels in (1, 2):
        raise InputError(path, "grayscale image (one channel); DeepSpot2Cell needs an RGB H&E slide")
    if channels > 4:
        raise InputError(path, f"the image has {channels} channels; DeepSpot2Cell needs an RGB H&E slide")
    if dtype == np.uint8:
        scale = None
    elif dtype == np.uint16:
        scale = 255.0 / _uint16_max(bits, smallest)
        warnings.warn(f"{path.name}: 16-bit image scaled to 8 bits (x {scale:.5g})", stacklevel=3)
    else:
        raise InputError(path, f"pixel type {dtype} is not supported; expected 8- or 16-bit RGB")
    if channels == 4:
        warnings.warn(f"{path.name}: alpha channel dropped (transparent pixels composited on white)", stacklevel=3)

    def convert(block: np.ndarray) -> np.ndarray:
        rgb = block[..., :3].astype(np.float32) * scale if scale is not None else block[..., :3]
        if channels == 4:
            alpha = block[..., 3:4].astype(np.float32) * (scale or 1.0) / 255.0
            rgb = rgb * alpha + 255.0 * (1.0 - alpha)
        if rgb.dtype != np.uint8:
            rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(rgb)

    return convert


def _uint16_max(bits: int | None, smallest: _Level) -> float:
    """The full-scale value of a 16-bit container: 12-bit cameras store 0..4095."""
    if bits and 8 < bits < 16:
        return float(2**bits - 1)
    h, w = smallest.shape
    if h * w <= 2048 * 2048:  # the lowest level is cheap to scan
        peak = int(smallest.window(slice(None), slice(None))[..., :3].max())
        depth = max(8, int(peak).bit_length())
        return float(2**depth - 1) if depth < 16 else 65535.0
    return 65535.0


def _sidecar_pixel_size(path: Path) -> float | None:
    """HEST-style metadata beside the image: X.json for X.jpg (or X.ome.tif)."""
    candidates = {path.with_suffix(".json"), path.parent / (path.name.split(".")[0] + ".json")}
    for side in sorted(candidates):
        if not side.is_file():
            continue
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable sidecar %s: %s", side, exc)
            continue
        if not isinstance(meta, dict):
            continue
        for key in _SIDECAR_KEYS:
            try:
                value = float(meta.get(key))
            except (TypeError, ValueError):
                continue
            if math.isfinite(value) and value > 0:
                log.info("%s: pixel size %.4g um/px from %s (%s)", path.name, value, side.name, key)
                return value
    return None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]
