import os
import stat

import pytest

from napari_deepspot2cell.io.atomic import atomic_path, atomic_write_text


def test_success_moves_into_place_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "cells.h5ad"
    target.write_text("earlier")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".h5ad" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["cells.h5ad"]
