"""Loaders and data transforms of the apps, on synthetic files; corrupt data gets a clear error."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from torchddn.apps._common import AppError, format_table, write_results
from torchddn.apps.data import (SHAPE_CLASSES, add_outliers, load_fashion_mnist, load_image_folder,
                                load_modelnet_h5, procedural_shapes)


# ---------------------------------------------------------------------------------------------------- shapes
def test_procedural_shapes_normalised_and_deterministic():
    x, y, names = procedural_shapes(2, 64, seed=3)
    assert len(names) == len(SHAPE_CLASSES) >= 10
    assert x.shape == (2 * len(names), 64, 3) and y.tolist() == sorted(y.tolist())
    norms = x.norm(dim=-1)
    assert torch.allclose(norms.amax(dim=1), torch.ones(len(x)), atol=1e-5)  # unit sphere
    assert x.mean(dim=1).abs().max() < 1e-5  # centred
    x2, _, _ = procedural_shapes(2, 64, seed=3)
    assert torch.equal(x, x2)
    x3, _, _ = procedural_shapes(2, 64, seed=4)
    assert not torch.equal(x, x3)


def test_add_outliers_replaces_exact_fraction_inside_unit_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.full((5, 40, 3), 7.0)  # far outside the unit ball, so replaced points are recognisable
    out = add_outliers(x, 0.25, g)
    replaced = (out != 7.0).all(dim=-1)
    assert replaced.sum(dim=1).tolist() == [10] * 5
    assert out[replaced].norm(dim=-1).max() <= 1.0 + 1e-6
    assert torch.equal(add_outliers(x, 0.0, g), x)
    assert torch.equal(x, torch.full((5, 40, 3), 7.0))  # input untouched
    with pytest.raises(AppError, match="outlier fraction"):
        add_outliers(x, 1.5, g)


# ---------------------------------------------------------------------------------------------------- ModelNet40
def _write_h5(path, n=6, p=32, labels=None, **extra):
    import h5py

    with h5py.File(path, "w") as f:
        if "data" not in extra:
            f["data"] = np.random.default_rng(0).normal(size=(n, p, 3)).astype(np.float32) * 3 + 1
        else:
            f["data"] = extra.pop("data")
        if labels is not False:
            f["label"] = (np.arange(n) % 3 if labels is None else labels).reshape(-1, 1).astype(np.uint8)


def test_modelnet_h5_reads_and_normalises(tmp_path):
    _write_h5(tmp_path / "ply_data_train0.h5")
    _write_h5(tmp_path / "ply_data_train1.h5", n=4)
    _write_h5(tmp_path / "ply_data_test0.h5", n=3)
    x, y = load_modelnet_h5(tmp_path, "train", n_points=16)
    assert x.shape == (10, 16, 3) and y.shape == (10,) and y.dtype == torch.int64
    assert torch.allclose(x.norm(dim=-1).amax(dim=1), torch.ones(10), atol=1e-5)
    xt, yt = load_modelnet_h5(tmp_path, "test")
    assert xt.shape == (3, 32, 3) and yt.tolist() == [0, 1, 2]


def test_modelnet_h5_errors(tmp_path):
    with pytest.raises(AppError, match="does not exist"):
        load_modelnet_h5(tmp_path / "missing", "train")
    with pytest.raises(AppError, match="no ply_data_train"):
        load_modelnet_h5(tmp_path, "train")
    (tmp_path / "ply_data_train0.h5").write_bytes(b"this is not hdf5")
    with pytest.raises(AppError, match="not a readable HDF5"):
        load_modelnet_h5(tmp_path, "train")
    _write_h5(tmp_path / "ply_data_train0.h5", labels=False)
    with pytest.raises(AppError, match="'data' and 'label'"):
        load_modelnet_h5(tmp_path, "train")
    _write_h5(tmp_path / "ply_data_train0.h5", data=np.zeros((4, 8, 2), np.float32), labels=np.arange(4))
    with pytest.raises(AppError, match=r"\(N, P, 3\)"):
        load_modelnet_h5(tmp_path, "train")
    _write_h5(tmp_path / "ply_data_train0.h5", n=4, labels=np.arange(3))
    with pytest.raises(AppError, match="'label' has 3"):
        load_modelnet_h5(tmp_path, "train")
    bad = np.zeros((2, 8, 3), np.float32)
    bad[1, 3, 0] = np.nan
    _write_h5(tmp_path / "ply_data_train0.h5", data=bad, labels=np.arange(2))
    with pytest.raises(AppError, match="NaN"):
        load_modelnet_h5(tmp_path, "train")


# ---------------------------------------------------------------------------------------------------- images
def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:2])
    assert load_fashion_mnist(tmp_path) is None  # a file is missing -> caller falls back
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 4]))
    xtr, ytr, xte, yte, names = load_fashion_mnist(tmp_path)
    assert xtr.shape == (5, 1, 28, 28) and len(names) == 10
    assert torch.allclose(xtr[:, 0] * 255, torch.tensor(imgs, dtype=torch.float32))
    assert yte.tolist() == [3, 4]
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x01")
    with pytest.raises(AppError, match="truncated"):
        load_fashion_mnist(tmp_path)


def _write_images(root, classes, n, size=(10, 12)):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=size, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_split_and_train_test(tmp_path):
    _write_images(tmp_path / "flat", ["a", "b", "c"], 5)
    xtr, ytr, xte, yte, names = load_image_folder(tmp_path / "flat", size=8, seed=0)
    assert names == ["a", "b", "c"] and len(ytr) + len(yte) == 15 and len(yte) == 3
    assert xtr.shape[1:] == (1, 8, 8) and 0 <= xtr.min() and xtr.max() <= 1
    _write_images(tmp_path / "tt" / "train", ["x", "y"], 3)
    _write_images(tmp_path / "tt" / "test", ["x", "y"], 2)
    xtr, ytr, xte, yte, names = load_image_folder(tmp_path / "tt", size=6, grayscale=False)
    assert xtr.shape == (6, 3, 6, 6) and xte.shape == (4, 3, 6, 6) and names == ["x", "y"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(AppError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(AppError, match="not a folder"):
        load_image_folder(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AppError, match="one sub-folder per class"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(AppError, match="no image files"):
        load_image_folder(tmp_path / "noimg")
    _write_images(tmp_path / "broken", ["a"], 2)
    (tmp_path / "broken" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AppError, match="cannot read image"):
        load_image_folder(tmp_path / "broken")
    _write_images(tmp_path / "mismatch" / "train", ["a", "b"], 2)
    _write_images(tmp_path / "mismatch" / "test", ["a", "c"], 2)
    with pytest.raises(AppError, match="differ"):
        load_image_folder(tmp_path / "mismatch")


# ---------------------------------------------------------------------------------------------------- results
def test_write_results_json_csv_and_table(tmp_path):
    import csv
    import json

    rows = [{"method": "max", "test_accuracy": 0.5}, {"method": "huber", "test_accuracy": 0.75, "extra": 1}]
    write_results(tmp_path / "o", {"seed": 0, "path": tmp_path}, rows)
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["rows"] == rows and data["config"]["seed"] == 0
    with open(tmp_path / "o" / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["method"] for r in got] == ["max", "huber"] and got[1]["extra"] == "1" and got[0]["extra"] == ""
    table = format_table(rows)
    assert "huber" in table and "0.7500" in table
