"""Encoders: the offline default, the preset registry, weights loading and Hub errors.

No test touches the network: weights are written by the tests themselves, Hub
failures are the real huggingface_hub exception classes raised by a replaced
download function, or the real download in HF_HUB_OFFLINE mode on an empty cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from napari_deepspot2cell.encoders import (
    DEFAULT_ENCODER,
    PRESETS,
    Encoder,
    OfflineEncoder,
    build_encoder,
    describe_encoders,
    get_encoder,
)
from napari_deepspot2cell.encoders import registry as R
from napari_deepspot2cell.encoders import weights as W
from napari_deepspot2cell.encoders.offline import FEATURE_NAMES
from napari_deepspot2cell.errors import InputError

TOKEN = "hf_SECRETtoken1234567890abcdef"
TINY = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Hash sidecar and Hugging Face cache inside tmp_path; never the user's."""
    monkeypatch.setenv("NAPARI_DEEPSPOT2CELL_CACHE", str(tmp_path / "ds2c-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# =========================================================================== offline encoder


def _tissue(rng, *, size, n_nuclei, background, nucleus, white_fraction=0.0, radius=(3, 6)):
    """A synthetic H&E field: a stained background, round nuclei, optional glass."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = background
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    if white_fraction:
        n_holes = max(1, int(white_fraction * 20))
        for _ in range(n_holes):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(0.1, 0.2) * size
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 0.95
    for _ in range(n_nuclei):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(*radius)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[disk] = np.asarray(nucleus, np.float32) + rng.normal(0, 0.04, (disk.sum(), 3)).astype(np.float32)
    return np.clip(img, 0, 1)


def _crops(img, rng, n, side=64):
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - side, 2)
        out.append(img[y : y + side, x : x + side])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def test_offline_contract():
    enc = get_encoder()
    assert isinstance(enc, OfflineEncoder) and isinstance(enc, Encoder)
    assert isinstance(get_encoder("offline"), OfflineEncoder) and DEFAULT_ENCODER == "offline"
    assert enc.id == "offline-he-v1" and enc.weights_hash == ""
    assert enc.input_size == 64 and enc.dim == len(FEATURE_NAMES) == 88
    assert len(set(FEATURE_NAMES)) == enc.dim
    assert not enc.training and list(enc.parameters()) == []
    x = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    assert out.shape == (5, enc.dim) and out.dtype == torch.float32
    assert torch.equal(out, enc(x.clone())) and torch.equal(out, OfflineEncoder()(x))
    assert enc(torch.zeros(0, 3, 64, 64)).shape == (0, enc.dim)
    with pytest.raises(ValueError):
        enc(torch.rand(2, 1, 64, 64))


def test_offline_batch_independence():
    enc = get_encoder()
    gen = torch.Generator().manual_seed(1)
    batch = torch.rand(37, 3, 64, 64, generator=gen)
    batch[5] = 1.0  # a blank tile next to tissue-like ones
    together = enc(batch)
    for i in (0, 5, 17, 36):
        alone = enc(batch[i : i + 1].clone())
        assert torch.equal(alone[0], together[i]), i
    assert torch.equal(enc(batch[10:20]), together[10:20])


@pytest.mark.parametrize(
    "tile",
    [
        torch.ones(1, 3, 64, 64),  # white glass
        torch.zeros(1, 3, 64, 64),  # black
        torch.full((1, 3, 64, 64), 0.5),  # constant grey
        torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 64, 64),  # saturated magenta
        torch.linspace(-3, 3, 3 * 64 * 64).view(1, 3, 64, 64),  # out of range
        torch.full((1, 3, 64, 64), float("nan")),
    ],
    ids=["white", "black", "grey", "saturated", "out-of-range", "nan"],
)
def test_offline_finite_on_extreme_tiles(tile):
    out = get_encoder()(tile.contiguous())
    assert out.shape == (1, 88) and torch.isfinite(out).all()


def test_offline_other_sizes_and_half_precision():
    enc = get_encoder()
    gen = torch.Generator().manual_seed(2)
    big = torch.rand(3, 3, 128, 128, generator=gen)
    out = enc(big)
    assert out.shape == (3, 88) and torch.isfinite(out).all()
    x = torch.rand(4, 3, 64, 64, generator=gen)
    half = enc(x.to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, enc(x.to(torch.bfloat16).float()))


def test_offline_white_tile_is_background_and_nucleus_is_seen():
    enc = get_encoder()
    names = list(FEATURE_NAMES)
    white = enc(torch.ones(1, 3, 64, 64))[0]
    assert white[names.index("disk_background_fraction")] > 0.99
    assert white[names.index("disk_nuclear_fraction")] < 0.01
    rng = np.random.default_rng(3)
    field = _tissue(rng, size=64, n_nuclei=0, background=(0.9, 0.6, 0.78), nucleus=(0.3, 0.2, 0.5))
    with_nucleus = field.copy()
    yy, xx = np.mgrid[:64, :64]
    with_nucleus[(yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 12**2] = (0.3, 0.2, 0.5)
    a, b = enc(torch.from_numpy(np.stack([field, with_nucleus])).permute(0, 3, 1, 2).contiguous())
    for name in ("disk_h_mean", "disk_nuclear_fraction", "disk_ring_h_contrast", "disk_h_ratio"):
        i = names.index(name)
        assert b[i] > a[i] + 0.3, name
    i = names.index("ring_nuclear_fraction")
    assert abs(float(b[i] - a[i])) < 0.05


def test_offline_separates_tissue_types():
    enc = get_encoder()
    rng = np.random.default_rng(4)
    dense = _tissue(rng, size=320, n_nuclei=700, background=(0.72, 0.52, 0.74), nucleus=(0.28, 0.18, 0.48))
    sparse = _tissue(rng, size=320, n_nuclei=25, background=(0.93, 0.62, 0.76), nucleus=(0.35, 0.25, 0.55),
                     white_fraction=0.3)
    fd, fs = enc(_crops(dense, rng, 6)), enc(_crops(sparse, rng, 6))
    dd, ss, ds = torch.cdist(fd, fd), torch.cdist(fs, fs), torch.cdist(fd, fs)
    pairs = torch.triu_indices(6, 6, 1)
    within = torch.cat([dd[pairs[0], pairs[1]], ss[pairs[0], pairs[1]]])
    assert ds.min() > within.max(), (float(ds.min()), float(within.max()))  # every cross pair is farther
    assert ds.mean() > 2 * within.mean(), (float(ds.mean()), float(within.mean()))


# =========================================================================== registry


def test_presets_and_descriptions():
    assert set(PRESETS) == {"uni", "hoptimus0", "phikonv2"}
    listed = describe_encoders()
    assert listed[0][0] == "offline"
    assert [n for n, _ in listed[1:]] == list(PRESETS)
    for name, desc in listed:
        assert isinstance(desc, str) and desc and "\n" not in desc
    uni, hopt, phikon = PRESETS["uni"], PRESETS["hoptimus0"], PRESETS["phikonv2"]
    assert (uni.timm_name, uni.repo_id, uni.dim, uni.input_size) == ("vit_large_patch16_224", "MahmoodLab/UNI", 1024, 224)
    assert uni.timm_kwargs["init_values"] == 1e-5 and uni.timm_kwargs["dynamic_img_size"] is True
    assert uni.mean == (0.485, 0.456, 0.406) and uni.std == (0.229, 0.224, 0.225)
    assert (hopt.timm_name, hopt.repo_id, hopt.dim) == ("vit_giant_patch14_reg4_dinov2", "bioptimus/H-optimus-0", 1536)
    assert hopt.timm_kwargs["img_size"] == 224 and hopt.timm_kwargs["dynamic_img_size"] is False
    assert hopt.mean == (0.707223, 0.578729, 0.703617) and hopt.std == (0.211883, 0.230117, 0.177517)
    assert (phikon.repo_id, phikon.dim, phikon.key_format) == ("owkin/phikon-v2", 1024, "hf-dinov2")
    for p in PRESETS.values():
        assert p.timm_kwargs["num_classes"] == 0


def test_uni_architecture():
    m = R.build_model("uni", device="meta")
    assert isinstance(m, timm.models.vision_transformer.VisionTransformer)
    assert tuple(m.patch_embed.proj.weight.shape) == (1024, 3, 16, 16) and len(m.blocks) == 24
    assert tuple(m.pos_embed.shape) == (1, 197, 1024) and m.reg_token is None and m.dynamic_img_size
    assert tuple(m.blocks[0].ls1.gamma.shape) == (1024,) and m.num_features == 1024
    assert isinstance(m.head, torch.nn.Identity) and m.global_pool == "token"


def test_hoptimus0_architecture_by_construction():
    m = R.build_model("hoptimus0", device="meta")
    assert isinstance(m, timm.models.vision_transformer.VisionTransformer)
    assert tuple(m.patch_embed.proj.weight.shape) == (1536, 3, 14, 14) and len(m.blocks) == 40
    assert tuple(m.reg_token.shape) == (1, 4, 1536) and tuple(m.pos_embed.shape) == (1, 256, 1536)  # 16 x 16 patches
    assert not m.dynamic_img_size and isinstance(m.head, torch.nn.Identity)
    assert tuple(m.blocks[0].mlp.fc1.weight.shape) == (8192, 1536)  # SwiGLU packed, 2 x 4096
    assert tuple(m.blocks[0].ls1.gamma.shape) == (1536,)
    shapes = R.expected_shapes("hoptimus0")
    n_params = sum(math.prod(s) for s in shapes.values())
    assert 1.1e9 < n_params < 1.2e9
    # the state dict published in timm layout, and in the original DINOv2 layout, are both recognised
    timm_layout = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert R.guess_architecture(timm_layout)[0] == "hoptimus0"
    dinov2_layout = {}
    for k, s in shapes.items():
        k = k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        if k == "reg_token":
            k = "register_tokens"
        if k == "pos_embed":
            s = (1, 257, 1536)
        dinov2_layout[k] = torch.empty(s, device="meta")
    dinov2_layout["mask_token"] = torch.empty((1, 1536), device="meta")
    assert R.guess_architecture(dinov2_layout)[0] == "hoptimus0"


def test_name_parsing_errors():
    with pytest.raises(InputError, match="is not an encoder"):
        get_encoder("definitely-not-a-model")
    with pytest.raises(InputError, match="not a model timm knows"):
        get_encoder("timm:definitely_not_a_model")
    with pytest.raises(InputError, match="takes no weights"):
        get_encoder("offline", weights="x.pth")
    with pytest.raises(InputError, match="no such weights file"):
        get_encoder("/no/such/file.pth")
    with pytest.raises(InputError, match="no such weights file"):
        get_encoder("uni", weights="/no/such/folder")


# =========================================================================== local weights


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False, num_classes=0).eval()


def _tiny_expected(model, x):
    with torch.no_grad():
        return model((x - 0.5) / 0.5)  # vit_tiny's timm data config: mean = std = 0.5


def _save(sd, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("layout", ["w.pth", "w.pt", "w.bin", "w.safetensors", "dir/pytorch_model.bin",
                                    "dir/model.safetensors"])
def test_timm_local_roundtrip(tiny_model, tmp_path, layout):
    path = tmp_path / layout
    path.parent.mkdir(exist_ok=True)
    _save(tiny_model.state_dict(), path)
    target = path.parent if layout.startswith("dir/") else path
    enc = get_encoder(f"timm:{TINY}", weights=target)
    assert enc.id == f"timm:{TINY}" and enc.dim == 192 and enc.input_size == 224
    assert enc.weights_hash == _sha256(path) and enc.source == str(path)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = enc(x)
    assert out.dtype == torch.float32 and torch.equal(out, _tiny_expected(tiny_model, x))
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: stays in eval mode


def test_bare_timm_name_and_resizing(tiny_model, tmp_path):
    path = _save(tiny_model.state_dict(), tmp_path / "w.safetensors")
    enc = get_encoder(TINY, weights=path)
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(6))
    big = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        assert torch.equal(enc(x), enc(big))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {f"model.backbone.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model": dict(sd), "optimizer_lr": torch.tensor(0.1)},
        lambda sd: {**{f"backbone.{k}": v for k, v in sd.items()}, "head.weight": torch.zeros(10, 192),
                    "head.bias": torch.zeros(10)},
    ],
    ids=["module", "model.backbone", "lightning", "nested-model", "with-classifier-head"],
)
def test_prefix_stripping(tiny_model, tmp_path, wrap):
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(tiny_model.state_dict()), path)
    enc = get_encoder(f"timm:{TINY}", weights=path)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(enc(x), _tiny_expected(tiny_model, x))


def test_mismatched_weights_message(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    del sd["norm.weight"]
    sd["foo.bar"] = torch.zeros(3)
    path = _save(sd, tmp_path / "broken.pth")
    with pytest.raises(InputError) as err:
        get_encoder(f"timm:{TINY}", weights=path)
    msg = str(err.value)
    assert err.value.source == str(path) and "\n" not in msg
    assert f"do not fit the timm:{TINY} architecture" in msg
    assert "1 keys missing (e.g. norm.weight)" in msg and "1 unexpected (e.g. foo.bar)" in msg
    assert "name the architecture" in msg
    # a whole other architecture: the uni preset refuses ViT-Tiny weights and says why
    path = _save(tiny_model.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(InputError, match=r"do not fit the uni architecture: \d+ keys missing .*wrong shape"):
        get_encoder("uni", weights=path)


def test_unguessable_weights_and_timm_config_folder(tiny_model, tmp_path):
    path = _save(tiny_model.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(InputError, match=r"cannot tell which encoder.*patch 16, width 192, 12 blocks"):
        get_encoder(path)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    _save(tiny_model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architecture": TINY, "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]},
    }))
    enc = get_encoder(folder)
    assert enc.id == f"timm:{TINY}" and "config.json" in enc.note
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.equal(enc(x), tiny_model((x - mean) / std))


def test_unreadable_files(tmp_path):
    import argparse

    pickled = tmp_path / "objects.pth"
    torch.save({"thing": argparse.Namespace(a=1), "w": torch.zeros(2)}, pickled)
    with pytest.raises(InputError, match="was not unpickled"):
        get_encoder("uni", weights=pickled)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00not a torch file" * 10)
    with pytest.raises(InputError, match="not a readable PyTorch weights file"):
        get_encoder("uni", weights=garbage)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"1234567890")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        get_encoder("uni", weights=bad_st)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no weights file"):
        get_encoder("uni", weights=empty)
    wrong_suffix = tmp_path / "w.txt"
    wrong_suffix.write_text("x")
    with pytest.raises(InputError, match="is not a weights file"):
        get_encoder("uni", weights=wrong_suffix)
    no_tensors = tmp_path / "none.pth"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(InputError, match="holds no tensors"):
        get_encoder("uni", weights=no_tensors)


def test_sha256_sidecar(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc" * 1000)
    first = W.sha256_file(f, chunk_size=7)
    assert first == _sha256(f)
    assert W._hash_cache_file().is_file()
    assert W.sha256_file(f) == first  # from the sidecar
    f.write_bytes(b"abd" * 1001)  # size and mtime change
    assert W.sha256_file(f) == _sha256(f) != first
    W._hash_cache_file().write_text("{not json")
    assert W.sha256_file(f) == _sha256(f)
    # edited in place, same size, mtime put back: the ctime still tells
    st = f.stat()
    second = W.sha256_file(f)
    time.sleep(0.01)
    f.write_bytes(b"abe" * 1001)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert W.sha256_file(f) == _sha256(f) != second


# --------------------------------------------------------------------------- uni, full size


def _random_state_dict(shapes, seed, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=gen) * 0.02
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight")):
            t += 1.0
        sd[k] = t.to(dtype)
    return sd


@pytest.mark.slow
def test_uni_local_weights_roundtrip_and_guess(tmp_path):
    sd = _random_state_dict(R.expected_shapes("uni"), seed=9)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    with torch.device("meta"):
        ref = timm.create_model("vit_large_patch16_224", init_values=1e-5, num_classes=0, dynamic_img_size=True)
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    ref.eval()
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(10))
    mean, std = torch.tensor(PRESETS["uni"].mean).view(1, 3, 1, 1), torch.tensor(PRESETS["uni"].std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref((x - mean) / std)
        named = get_encoder("uni", weights=path)
        assert (named.id, named.dim, named.input_size) == ("uni", 1024, 224)
        assert named.weights_hash == _sha256(path)
        assert torch.equal(named(x), expected)
        del named
        guessed = get_encoder(str(path))
        assert guessed.id == "uni" and "uni architecture" in guessed.note
        assert torch.equal(guessed(x), expected)


# =========================================================================== phikon-v2 (transformers Dinov2 layout)


def _hf_dinov2_shapes(dim, depth, patch, image, mlp_ratio=4):
    """Key names and shapes of a transformers Dinov2Model (use_mask_token, no SwiGLU),
    spelled out from transformers/models/dinov2/modeling_dinov2.py."""
    n = (image // patch) ** 2
    shapes = {
        "embeddings.cls_token": (1, 1, dim),
        "embeddings.mask_token": (1, dim),
        "embeddings.position_embeddings": (1, n + 1, dim),
        "embeddings.patch_embeddings.projection.weight": (dim, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": (dim,),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for name in ("norm1", "norm2"):
            shapes[p + f"{name}.weight"] = (dim,)
            shapes[p + f"{name}.bias"] = (dim,)
        for name in ("query", "key", "value"):
            shapes[p + f"attention.attention.{name}.weight"] = (dim, dim)
            shapes[p + f"attention.attention.{name}.bias"] = (dim,)
        shapes[p + "attention.output.dense.weight"] = (dim, dim)
        shapes[p + "attention.output.dense.bias"] = (dim,)
        shapes[p + "layer_scale1.lambda1"] = (dim,)
        shapes[p + "layer_scale2.lambda1"] = (dim,)
        shapes[p + "mlp.fc1.weight"] = (dim * mlp_ratio, dim)
        shapes[p + "mlp.fc1.bias"] = (dim * mlp_ratio,)
        shapes[p + "mlp.fc2.weight"] = (dim, dim * mlp_ratio)
        shapes[p + "mlp.fc2.bias"] = (dim,)
    shapes["layernorm.weight"] = (dim,)
    shapes["layernorm.bias"] = (dim,)
    return shapes


def _hf_dinov2_reference(sd, x, *, heads, eps=1e-6):
    """Dinov2Model's pooler output (CLS after the final layernorm), in plain torch,
    following the transformers implementation (separate q/k/v, layer scale, GELU,
    bicubic position-embedding interpolation for another grid)."""
    sd = {k: v.float() for k, v in sd.items()}
    w = sd["embeddings.patch_embeddings.projection.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    t = F.conv2d(x, w, sd["embeddings.patch_embeddings.projection.bias"], stride=patch).flatten(2).transpose(1, 2)
    b, n, _ = t.shape
    pos = sd["embeddings.position_embeddings"]
    if pos.shape[1] - 1 != n:
        side, new = int(round((pos.shape[1] - 1) ** 0.5)), x.shape[-1] // patch
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1)
    t = torch.cat([sd["embeddings.cls_token"].expand(b, -1, -1), t], 1) + pos
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    hd = dim // heads
    for i in range(depth):
        p = f"encoder.layer.{i}."
        h = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        q, k, v = (
            F.linear(h, sd[p + f"attention.attention.{s}.weight"], sd[p + f"attention.attention.{s}.bias"])
            .view(b, -1, heads, hd).transpose(1, 2)
            for s in ("query", "key", "value")
        )
        att = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(b, -1, dim), sd[p + "attention.output.dense.weight"],
                       sd[p + "attention.output.dense.bias"])
        t = t + att * sd[p + "layer_scale1.lambda1"]
        h = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + h * sd[p + "layer_scale2.lambda1"]
    return F.layer_norm(t, (dim,), sd["layernorm.weight"], sd["layernorm.bias"], eps)[:, 0]


@pytest.mark.parametrize("image", [224, 112], ids=["same-grid", "resampled-grid"])
def test_hf_dinov2_mapping_matches_reference(image):
    """A small Dinov2-layout state dict mapped onto the equivalent timm ViT gives
    the transformers output (also when its position grid must be resampled)."""
    sd = _random_state_dict(_hf_dinov2_shapes(64, 2, 16, image), seed=11, dtype=torch.float32)
    sd = {k: (v * 20 if "position" in k or "cls" in k else v) for k, v in sd.items()}
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4, init_values=1e-5, num_classes=0
    ).eval()
    fitted, fmt = R.fit_state_dict(sd, model, arch="small-dinov2", source="test")
    assert fmt == "hf-dinov2" and set(fitted) == set(model.state_dict())
    model.load_state_dict(fitted, strict=True)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        out = model(x)
        ref = _hf_dinov2_reference(sd, x, heads=4)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(out, model(x))  # deterministic


def test_phikonv2_layout_fits_with_no_missing_or_unexpected_keys():
    hf = {k: torch.empty(s, device="meta") for k, s in _hf_dinov2_shapes(1024, 24, 16, 224).items()}
    mapped = W.hf_dinov2_to_timm(hf)
    assert "mask_token" not in " ".join(mapped)
    missing, unexpected, wrong = W.mismatch(R.expected_shapes("phikonv2"), mapped)
    assert (missing, unexpected, wrong) == ([], [], [])
    arch, why = R.guess_architecture(hf)
    assert arch == "phikonv2" and "Dinov2" in why
    # the same shapes in timm layout are taken for UNI (the timm-layout ViT-L/16 preset)
    assert R.guess_architecture({k: torch.empty(s, device="meta") for k, s in R.expected_shapes("uni").items()})[0] == "uni"


@pytest.mark.slow
def test_phikonv2_folder_loads_and_matches_reference(tmp_path):
    from safetensors.torch import save_file

    sd = _random_state_dict(_hf_dinov2_shapes(1024, 24, 16, 224), seed=13)
    folder = tmp_path / "phikon-v2"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["Dinov2Model"], "model_type": "dinov2",
                                                    "hidden_size": 1024, "patch_size": 16, "image_size": 224}))
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(14))
    mean, std = torch.tensor(PRESETS["phikonv2"].mean).view(1, 3, 1, 1), torch.tensor(PRESETS["phikonv2"].std).view(1, 3, 1, 1)
    with torch.no_grad():
        enc = get_encoder("phikonv2", weights=folder)
        assert (enc.id, enc.dim, enc.input_size) == ("phikonv2", 1024, 224)
        out = enc(x)
        assert torch.equal(out, enc(x))
        torch.testing.assert_close(out, _hf_dinov2_reference(sd, (x - mean) / std, heads=16), rtol=1e-3, atol=1e-4)
        del enc
        guessed = get_encoder(folder)
        assert guessed.id == "phikonv2" and torch.equal(guessed(x), out)


# =========================================================================== the Hub


def _response(status):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


def _gated_errors():
    from huggingface_hub import errors as E

    return [
        E.GatedRepoError(f"403 gated; token={TOKEN}", response=_response(403)),
        E.RepositoryNotFoundError(f"401 Repository Not Found Authorization: Bearer {TOKEN}", response=_response(401)),
        E.HfHubHTTPError(f"401 Unauthorized {TOKEN}", response=_response(401)),
        E.LocalTokenNotFoundError("no token"),
    ]


def _offline_errors():
    import httpx2
    from huggingface_hub import errors as E

    return [
        E.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
        E.OfflineModeIsEnabled("offline"),
        httpx2.ConnectError(f"connect failed {TOKEN}"),
        E.HfHubHTTPError("503 Service Unavailable", response=_response(503)),
    ]


def _raiser(exc, calls):
    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise exc

    return fake_download


@pytest.mark.parametrize("exc", _gated_errors(), ids=lambda e: type(e).__name__)
def test_gated_errors_never_show_the_token(monkeypatch, caplog, exc):
    calls = []
    monkeypatch.setattr(W, "hf_hub_download", _raiser(exc, calls))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InputError) as err:
        get_encoder("uni", token=TOKEN)
    e = err.value
    assert e.source == "MahmoodLab/UNI"
    assert "is gated: request access at https://huggingface.co/MahmoodLab/UNI" in str(e)
    assert "hf auth login" in str(e) and "token in the widget" in str(e)
    assert calls and calls[0][0] == "MahmoodLab/UNI" and calls[0][2]["token"] == TOKEN  # the token is passed on
    for text in (str(e), repr(e), e.problem, caplog.text, repr(e.__cause__), repr(e.__context__)):
        assert TOKEN not in text
    assert e.__cause__ is None


@pytest.mark.parametrize("exc", _offline_errors(), ids=lambda e: type(e).__name__)
def test_offline_errors_point_to_local_files(monkeypatch, exc):
    monkeypatch.setattr(W, "hf_hub_download", _raiser(exc, []))
    with pytest.raises(InputError) as err:
        get_encoder("hoptimus0", token=TOKEN)
    msg = str(err.value)
    assert err.value.source == "bioptimus/H-optimus-0"
    assert "not in the local Hugging Face cache" in msg and "cannot reach the Hub" in msg
    assert "--encoder PATH" in msg and TOKEN not in msg and TOKEN not in repr(err.value)


@pytest.mark.parametrize("name", ["uni", "phikonv2", f"timm:{TINY}"])
def test_real_offline_mode_with_empty_cache(monkeypatch, tmp_path, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        get_encoder(name)


def test_hub_cache_is_used_offline(monkeypatch, tmp_path, tiny_model):
    """A file already in huggingface_hub's cache loads with the Hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-home" / "hub"
    repo = R._meta_model(f"timm:{TINY}").pretrained_cfg["hf_hub_id"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    path = _save(tiny_model.state_dict(), snap / "model.safetensors")
    enc = get_encoder(f"timm:{TINY}")
    assert enc.source == repo and enc.weights_hash == _sha256(path)
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        assert torch.equal(enc(x), _tiny_expected(tiny_model, x))


def test_hub_download_success_and_fallback(monkeypatch, tmp_path, tiny_model):
    from huggingface_hub import constants
    from huggingface_hub import errors as E

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    path = _save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if filename == "model.safetensors":
            raise E.RemoteEntryNotFoundError("404 entry not found", response=_response(404))
        return str(path)

    monkeypatch.setattr(W, "hf_hub_download", fake_download)
    enc = get_encoder(f"timm:{TINY}", token=TOKEN)
    repo = R._meta_model(f"timm:{TINY}").pretrained_cfg["hf_hub_id"]
    assert [c[:2] for c in calls] == [(repo, "model.safetensors"), (repo, "pytorch_model.bin")]
    assert all(c[2]["token"] == TOKEN and c[2]["local_files_only"] is False for c in calls)
    assert calls[0][2]["cache_dir"] == str(tmp_path / "hf-home" / "hub")
    assert enc.weights_hash == _sha256(path)
    for text in (repr(enc), str(vars(enc)), enc.note, enc.source):
        assert TOKEN not in text


def test_hub_file_missing_everywhere(monkeypatch):
    from huggingface_hub import errors as E

    monkeypatch.setattr(W, "hf_hub_download",
                        _raiser(E.RemoteEntryNotFoundError("404", response=_response(404)), []))
    with pytest.raises(InputError, match="has none of the weights files model.safetensors, pytorch_model.bin"):
        get_encoder("phikonv2")


def test_non_hub_exception_is_not_hidden(monkeypatch):
    def broken(repo_id, filename, **kwargs):
        raise ZeroDivisionError("a bug, not the user's fault")

    monkeypatch.setattr(W, "hf_hub_download", broken)
    with pytest.raises(ZeroDivisionError):
        get_encoder("uni")


def test_random_weights_encoder_for_benchmarks():
    enc = build_encoder(f"timm:{TINY}")
    assert enc.dim == 192 and len(enc.weights_hash) == 64
    assert build_encoder(f"timm:{TINY}").weights_hash != enc.weights_hash  # another random init
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        out = enc(x)
    assert out.shape == (3, 192) and torch.isfinite(out).all()


def test_half_precision_weights_run_as_they_are(tiny_model, tmp_path):
    # gpu.py measures an encoder whose weights are cast to bf16: float32 tiles must not
    # fail on a dtype mismatch, and an autocast around it (embed.py's, which on CUDA
    # lifts LayerNorm to float32) must be off inside
    enc = get_encoder(f"timm:{TINY}", weights=_save(tiny_model.state_dict(), tmp_path / "w.pth"))
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = enc(x)
        enc.model.to(torch.bfloat16)
        half = enc(x)
        seen = []
        hook = enc.model.blocks[0].norm1.register_forward_hook(
            lambda m, i, o: seen.append((o.dtype, torch.is_autocast_enabled("cpu"))))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc(x)
        hook.remove()
    assert half.dtype == torch.float32 and seen == [(torch.bfloat16, False)]
    r = np.corrcoef(half.numpy().ravel(), full.numpy().ravel())[0, 1]
    assert r > 0.99
