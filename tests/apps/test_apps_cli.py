"""Each subcommand's quick path end to end at a tiny size, through the ``torchddn`` command line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from torchddn.cli import main as cli

FAST = ["--no-progress", "--seed", "0"]


def _results(out: Path, pngs: list[str]) -> dict:
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"config", "rows"} and data["rows"]
    assert (out / "results.csv").read_text().startswith("method") or "method" in (out / "results.csv").read_text()
    for row in data["rows"]:
        assert "method" in row and 0.0 <= row["test_accuracy"] <= 1.0
    for p in pngs:
        assert (out / p).stat().st_size > 1000
    assert data["config"]["seed"] == 0
    return data


def test_pointcloud_tiny(tmp_path, capsys):
    out = tmp_path / "pc"
    rc = cli(["pointcloud", "--quick", "--epochs", "1", "--n-train", "24", "--n-test", "12", "--points", "32",
              "--classes", "3", "--methods", "max", "huber", "--fractions", "0", "0.5", "--out", str(out), *FAST])
    assert rc == 0
    data = _results(out, ["accuracy.png"])
    rows = data["rows"]
    assert {(r["method"], r["outlier_fraction"]) for r in rows} == {("max", 0.0), ("max", 0.5), ("huber", 0.0),
                                                                    ("huber", 0.5)}
    assert all(r["protocol"] == "both" for r in rows)
    assert "not ModelNet40" in data["config"]["data_name"]
    assert "test_accuracy" in capsys.readouterr().out


def test_pointcloud_test_protocol_one_model_per_method(tmp_path):
    out = tmp_path / "pc"
    rc = cli(["pointcloud", "--protocol", "test", "--epochs", "1", "--n-train", "12", "--n-test", "6", "--points",
              "16", "--classes", "2", "--methods", "max", "welsch", "--fractions", "0", "0.9", "--out", str(out),
              *FAST])
    assert rc == 0
    rows = _results(out, ["accuracy.png"])["rows"]
    assert len(rows) == 4 and all(r["protocol"] == "test" for r in rows)
    # clean training: one model per method, so its training time is shared by its two fractions
    for m in ("max", "welsch"):
        assert len({r["train_seconds"] for r in rows if r["method"] == m}) == 1


def test_pointcloud_modelnet_h5(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        with h5py.File(tmp_path / f"ply_data_{split}0.h5", "w") as f:
            f["data"] = rng.normal(size=(n, 20, 3)).astype(np.float32)
            f["label"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    out = tmp_path / "o"
    rc = cli(["pointcloud", "--data", str(tmp_path), "--epochs", "1", "--points", "16", "--methods", "max",
              "--fractions", "0.3", "--out", str(out), *FAST])
    assert rc == 0
    data = _results(out, ["accuracy.png"])
    assert data["config"]["data_name"] == "modelnet40-hdf5" and data["config"]["n_train"] == 8


def test_pointcloud_bad_data_is_a_clear_error(tmp_path, capsys):
    rc = cli(["pointcloud", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "ply_data_train0.h5").write_text("garbage")
    rc = cli(["pointcloud", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2
    assert "not a readable HDF5" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_pointcloud_help_says_not_modelnet(capsys):
    with pytest.raises(SystemExit):
        cli(["pointcloud", "--help"])
    assert "NOT ModelNet40" in capsys.readouterr().out


def test_image_tiny_digits_fallback(tmp_path, capsys):
    out = tmp_path / "img"
    rc = cli(["image", "--fashion-dir", str(tmp_path / "absent"), "--epochs", "1", "--n-train", "64", "--n-test",
              "32", "--width", "4", "--methods", "none", "l2_sphere", "--out", str(out), *FAST])
    assert rc == 0
    assert "using scikit-learn's 8x8 digits" in capsys.readouterr().out
    rows = _results(out, ["reliability.png", "accuracy.png"])["rows"]
    assert [r["method"] for r in rows] == ["none", "l2_sphere"]
    for r in rows:
        for k in ("top5_accuracy", "ece", "noise_accuracy", "occlusion_accuracy"):
            assert 0.0 <= r[k] <= 1.0
        assert r["top5_accuracy"] >= r["test_accuracy"]


def test_image_folder_and_layout_error(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "o"
    rc = cli(["image", "--data", str(tmp_path / "imgs"), "--image-size", "8", "--epochs", "1", "--width", "4",
              "--methods", "l1_ball", "--out", str(out), *FAST])
    assert rc == 0
    assert _results(out, ["reliability.png"])["config"]["classes"] == ["cat", "dog"]
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    rc = cli(["image", "--data", str(tmp_path / "flat"), "--out", str(out), *FAST])
    assert rc == 2 and "one sub-folder per class" in capsys.readouterr().err


def test_ensemble_tiny(tmp_path):
    out = tmp_path / "ens"
    rc = cli(["ensemble", "--quick", "--epochs", "30", "--members", "5", "--fractions", "0", "0.3", "--methods",
              "mean", "welsch", "--out", str(out), *FAST])
    assert rc == 0
    rows = _results(out, ["accuracy.png"])["rows"]
    assert {r["method"] for r in rows} == {"mean", "welsch", "logistic_regression"}
    assert {r["corrupted_features"] for r in rows} == {0.0, 0.3}


def test_bilevel_tiny(tmp_path):
    out = tmp_path / "bl"
    rc = cli(["bilevel", "--quick", "--trials", "2", "--n", "8", "--outliers", "2", "--iters", "60", "--methods",
              "mean", "pseudo_huber_node", "huber", "--out", str(out), *FAST])
    assert rc == 0
    rows = {r["method"]: r for r in _results(out, ["trajectories.png"])["rows"]}
    assert rows["mean"]["test_accuracy"] == 1.0 and rows["pseudo_huber_node"]["test_accuracy"] == 1.0
    assert rows["huber"]["outlier_movement"] < 0.1 * rows["mean"]["outlier_movement"]


def test_demo_prints_table(capsys):
    assert cli(["demo", "--n", "10", "--outliers", "2"]) == 0
    text = capsys.readouterr().out
    assert "pseudo-Huber (DeclarativeNode)" in text and "iterations" in text
