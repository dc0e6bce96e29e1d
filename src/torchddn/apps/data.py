"""Data for the apps: procedural 3D shapes, ModelNet40 (HDF5), Fashion-MNIST (IDX), scikit-learn digits, ImageFolder.

Nothing here downloads. Loaders raise :class:`~torchddn.apps._common.AppError` with the offending path on missing or
malformed data.

The default point-cloud data is a *procedural* dataset (:func:`procedural_shapes`), not ModelNet40: twelve classes of
shapes sampled from surfaces (trimesh primitives and parametric families) with random proportions, random scale and
random rotation about the up (z) axis, centred and normalised to the unit sphere.
"""
from __future__ import annotations

import glob
import gzip
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from torchddn.apps._common import AppError

# ----------------------------------------------------------------------------------------------------------------
# procedural shapes
# ----------------------------------------------------------------------------------------------------------------


def _sample_mesh(mesh, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform on a triangle mesh's surface (area-weighted triangle, uniform barycentric)."""
    tris = np.asarray(mesh.triangles, dtype=np.float64)
    area = np.asarray(mesh.area_faces, dtype=np.float64)
    idx = rng.choice(len(tris), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    t = tris[idx]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def _sphere(rng, n):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=2)
    return _sample_mesh(m, n, rng) * rng.uniform(0.9, 1.1, size=3)


def _box(rng, n):
    import trimesh

    return _sample_mesh(trimesh.creation.box(extents=rng.uniform(0.4, 1.6, size=3)), n, rng)


def _cylinder(rng, n):
    import trimesh

    return _sample_mesh(trimesh.creation.cylinder(radius=rng.uniform(0.25, 0.5), height=rng.uniform(1.2, 2.0)), n, rng)


def _cone(rng, n):
    import trimesh

    return _sample_mesh(trimesh.creation.cone(radius=rng.uniform(0.4, 0.8), height=rng.uniform(1.0, 2.0)), n, rng)


def _capsule(rng, n):
    import trimesh

    return _sample_mesh(trimesh.creation.capsule(radius=rng.uniform(0.25, 0.45), height=rng.uniform(0.6, 1.6)), n, rng)


def _annulus(rng, n):
    import trimesh

    r_max = rng.uniform(0.8, 1.0)
    m = trimesh.creation.annulus(r_min=r_max * rng.uniform(0.4, 0.7), r_max=r_max, height=rng.uniform(0.1, 0.3))
    return _sample_mesh(m, n, rng)


def _pyramid(rng, n):
    import trimesh

    a, b, h = rng.uniform(0.6, 1.2), rng.uniform(0.6, 1.2), rng.uniform(0.8, 1.6)
    pts = np.array([[-a, -b, 0], [a, -b, 0], [a, b, 0], [-a, b, 0], [0, 0, h]], dtype=np.float64)
    return _sample_mesh(trimesh.convex.convex_hull(pts), n, rng)


def _torus(rng, n):
    R, r = rng.uniform(0.7, 1.0), rng.uniform(0.15, 0.35)
    u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    return np.stack([(R + r * np.cos(v)) * np.cos(u), (R + r * np.cos(v)) * np.sin(u), r * np.sin(v)], 1)


def _bowl(rng, n):
    # a hemisphere shell, opening upwards, of random depth
    theta = np.arccos(rng.uniform(0, 1, n))  # area-uniform on the half sphere
    phi = rng.uniform(0, 2 * np.pi, n)
    depth = rng.uniform(0.5, 1.0)
    return np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), -depth * np.cos(theta)], 1)


def _saddle(rng, n):
    a = rng.uniform(0.5, 1.0)
    x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    return np.stack([x, y, a * (x**2 - y**2)], 1)


def _helix(rng, n):
    turns, R, r, pitch = rng.uniform(2, 4), rng.uniform(0.5, 0.8), rng.uniform(0.06, 0.12), rng.uniform(0.3, 0.6)
    t, s = rng.uniform(0, 2 * np.pi * turns, n), rng.uniform(0, 2 * np.pi, n)
    return np.stack([(R + r * np.cos(s)) * np.cos(t), (R + r * np.cos(s)) * np.sin(t),
                     pitch * t / (2 * np.pi) + r * np.sin(s)], 1)


def _mobius(rng, n):
    w = rng.uniform(0.25, 0.45)
    u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(-w, w, n)
    return np.stack([(1 + v * np.cos(u / 2)) * np.cos(u), (1 + v * np.cos(u / 2)) * np.sin(u), v * np.sin(u / 2)], 1)


#: class name -> sampler ``(rng, n) -> (n, 3)``
SHAPE_CLASSES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sphere": _sphere, "box": _box, "cylinder": _cylinder, "cone": _cone, "capsule": _capsule,
    "annulus": _annulus, "pyramid": _pyramid, "torus": _torus, "bowl": _bowl, "saddle": _saddle,
    "helix": _helix, "mobius": _mobius,
}


def normalise_cloud(points: np.ndarray) -> np.ndarray:
    """Centre a cloud ``(n, 3)`` at its centroid and scale it into the unit sphere (max norm 1)."""
    points = points - points.mean(axis=0, keepdims=True)
    return points / max(np.linalg.norm(points, axis=1).max(), 1e-12)


def procedural_shapes(n_per_class: int, n_points: int, seed: int, classes: int | None = None
                      ) -> tuple[Tensor, Tensor, list[str]]:
    """A procedural point-cloud dataset (NOT ModelNet40).

    Args:
        n_per_class: clouds per class.
        n_points: points per cloud.
        seed: the dataset's seed (use different seeds for train and test).
        classes: use only the first ``classes`` classes of :data:`SHAPE_CLASSES` (default: all 12).

    Returns:
        ``points`` (N, n_points, 3) float32, ``labels`` (N,) int64, class names. Each cloud is sampled from a shape
        with random proportions, scaled by a random factor, rotated by a random angle about z, then centred and
        normalised to the unit sphere.
    """
    names = list(SHAPE_CLASSES)[: classes or len(SHAPE_CLASSES)]
    rng = np.random.default_rng(seed)
    clouds, labels = [], []
    for label, name in enumerate(names):
        for _ in range(n_per_class):
            p = SHAPE_CLASSES[name](rng, n_points) * rng.uniform(0.5, 2.0)
            a = rng.uniform(0, 2 * np.pi)
            rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
            clouds.append(normalise_cloud(p @ rot.T))
            labels.append(label)
    return (torch.tensor(np.stack(clouds), dtype=torch.float32), torch.tensor(labels, dtype=torch.int64), names)


def add_outliers(points: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace ``round(fraction * n)`` random points of each cloud ``(b, n, 3)`` by points uniform in the unit ball."""
    if not 0.0 <= fraction <= 1.0:
        raise AppError(f"outlier fraction must be in [0, 1], got {fraction}")
    b, n, _ = points.shape
    k = int(round(fraction * n))
    if k == 0:
        return points
    kw = dict(device=points.device, generator=generator)
    idx = torch.rand(b, n, **kw).argsort(dim=1)[:, :k]  # k distinct indices per cloud
    direction = torch.randn(b, k, 3, dtype=points.dtype, **kw)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    radius = torch.rand(b, k, 1, dtype=points.dtype, **kw).pow(1.0 / 3.0)
    out = points.clone()
    out.scatter_(1, idx.unsqueeze(-1).expand(b, k, 3), direction * radius)
    return out


# ----------------------------------------------------------------------------------------------------------------
# ModelNet40 (HDF5)
# ----------------------------------------------------------------------------------------------------------------


def load_modelnet_h5(path: str | os.PathLike, split: str, n_points: int | None = None) -> tuple[Tensor, Tensor]:
    """Read ModelNet40 in its HDF5 layout: files ``ply_data_{split}*.h5`` in ``path``, each with datasets ``data``
    (N, P, 3) and ``label`` (N,) or (N, 1).

    Returns ``points`` (N, n_points or P, 3) float32 (each cloud centred and normalised to the unit sphere) and
    ``labels`` (N,) int64.
    """
    import h5py

    root = Path(path)
    if not root.exists():
        raise AppError(f"--data: {root} does not exist")
    if not root.is_dir():
        raise AppError(f"--data: {root} is not a folder of ply_data_*.h5 files")
    files = sorted(glob.glob(str(root / f"ply_data_{split}*.h5")))
    if not files:
        raise AppError(f"--data: no ply_data_{split}*.h5 files in {root}")
    datas, labels = [], []
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                if "data" not in h or "label" not in h:
                    raise AppError(f"{f}: expected datasets 'data' and 'label', found {sorted(h.keys())}")
                d, lab = np.asarray(h["data"]), np.asarray(h["label"])
        except OSError as exc:
            raise AppError(f"{f}: not a readable HDF5 file ({exc})") from exc
        if d.ndim != 3 or d.shape[2] != 3:
            raise AppError(f"{f}: 'data' must have shape (N, P, 3), got {d.shape}")
        lab = lab.reshape(-1)
        if lab.shape[0] != d.shape[0]:
            raise AppError(f"{f}: 'label' has {lab.shape[0]} entries but 'data' has {d.shape[0]} clouds")
        if not np.isfinite(d).all():
            raise AppError(f"{f}: 'data' contains NaN or Inf")
        datas.append(d[:, :n_points] if n_points else d)
        labels.append(lab)
    pts = np.concatenate(datas).astype(np.float64)
    pts = pts - pts.mean(axis=1, keepdims=True)
    pts = pts / np.maximum(np.linalg.norm(pts, axis=2).max(axis=1), 1e-12)[:, None, None]
    return torch.tensor(pts, dtype=torch.float32), torch.tensor(np.concatenate(labels), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise AppError(f"{path}: not an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise AppError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise AppError(f"{path}: truncated IDX file")
    return data.reshape(dims)


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR):
    """Fashion-MNIST from IDX files (gzipped or not) in ``root``; None if they are absent.

    Returns ``(x_train, y_train, x_test, y_test, class_names)`` with images (N, 1, 28, 28) float32 in [0, 1].
    """
    root = Path(root)
    out = []
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        cands = [root / (stem + ".gz"), root / stem]
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            return None
        out.append(_read_idx(found))
    xtr, ytr, xte, yte = out
    f = lambda x: torch.tensor(x, dtype=torch.float32).div_(255.0).unsqueeze(1)  # noqa: E731
    return f(xtr), torch.tensor(ytr, dtype=torch.int64), f(xte), torch.tensor(yte, dtype=torch.int64), \
        list(FASHION_MNIST_CLASSES)


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """scikit-learn's bundled 8x8 digits, split into train/test; images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target)
    t = torch.tensor
    return t(xtr), t(ytr, dtype=torch.int64), t(xte), t(yte, dtype=torch.int64), [str(i) for i in range(10)]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def _read_class_folders(root: Path, size: int, classes: list[str] | None, grayscale: bool):
    from PIL import Image, UnidentifiedImageError

    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise AppError(f"ImageFolder {root}: expected one sub-folder per class, found none")
    if classes is not None and found != classes:
        raise AppError(f"ImageFolder {root}: class folders {found} differ from {classes}")
    images, labels = [], []
    for label, name in enumerate(found):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise AppError(f"ImageFolder {root / name}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        for p in files:
            try:
                with Image.open(p) as im:
                    im = im.convert("L" if grayscale else "RGB").resize((size, size))
                    images.append(np.asarray(im, dtype=np.float32) / 255.0)
            except (UnidentifiedImageError, OSError) as exc:
                raise AppError(f"ImageFolder: cannot read image {p}: {exc}") from exc
            labels.append(label)
    x = np.stack(images)
    x = x[:, None] if grayscale else x.transpose(0, 3, 1, 2)
    return torch.tensor(x), torch.tensor(labels, dtype=torch.int64), found


def load_image_folder(path: str | os.PathLike, size: int = 28, seed: int = 0, grayscale: bool = True,
                      test_fraction: float = 0.2):
    """An ImageFolder tree read with pillow: ``path/train/<class>/*.png`` and ``path/test/<class>/*.png``, or
    ``path/<class>/*.png`` split at random (seeded) into train and test.

    Images are converted to grayscale (or RGB), resized to ``size`` x ``size`` and scaled to [0, 1].
    Returns ``(x_train, y_train, x_test, y_test, class_names)``.
    """
    root = Path(path)
    if not root.exists():
        raise AppError(f"--data: {root} does not exist")
    if not root.is_dir():
        raise AppError(f"--data: {root} is not a folder (expected an ImageFolder tree)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        xtr, ytr, names = _read_class_folders(root / "train", size, None, grayscale)
        xte, yte, _ = _read_class_folders(root / "test", size, names, grayscale)
        return xtr, ytr, xte, yte, names
    x, y, names = _read_class_folders(root, size, None, grayscale)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = max(1, int(round(test_fraction * len(y))))
    if n_test >= len(y):
        raise AppError(f"ImageFolder {root}: too few images ({len(y)}) to split into train and test")
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te], names
