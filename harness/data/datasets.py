"""Built-in datasets. Each is called as `Dataset(path=<cached file or directory>, split="train" | "val")`.

Owns the file formats: the shipped digits (.npz), MNIST's idx files, CIFAR-10's python batches and a
folder of images per class. Fetching and verifying the files is `cache.py`'s job; these classes
only read what it hands them. All return (float image C x H x W in [0, 1], int64 label).
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val")

Sample = tuple[torch.Tensor, torch.Tensor]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")


class Digits(Dataset[Sample]):
    """The 8x8 handwritten digits: 1 x 8 x 8 float images in [0, 1], integer labels 0-9.

    The file is an .npz with x_train/y_train/x_val/y_val (uint8); the split is fixed and stratified.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        _check_split(split)
        with np.load(path) as arrays:
            x = arrays[f"x_{split}"]
            y = arrays[f"y_{split}"]
        self.images = torch.from_numpy(x.astype(np.float32) / 16.0).unsqueeze(1)
        self.labels = torch.from_numpy(y.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return self.images[index], self.labels[index]


class _Tensors(Dataset[Sample]):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        return self.images[index], self.labels[index]


# ---------------------------------------------------------------------------------------------
# MNIST: idx files

_IDX_TYPES: dict[int, type | str] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (LeCun's format; gzipped when the name ends in .gz) as an array."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: shape {shape} needs {expected} bytes of data, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no {name}.gz or {name}")


class MNIST(_Tensors):
    """MNIST from its four idx files (a directory; `data=mnist` fetches them): 1 x 28 x 28 images.

    split="train" is the 60,000 training images, "val" the 10,000 test images.
    """

    def __init__(self, path: str | Path, split: str = "train") -> None:
        _check_split(split)
        images_name, labels_name = MNIST_FILES[split]
        images = read_idx(_find(Path(path), images_name))
        labels = read_idx(_find(Path(path), labels_name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{path}: {images_name} has shape {images.shape} and {labels_name} {labels.shape}; "
                             f"expected (N, H, W) and (N,)")
        super().__init__(torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1),
                         torch.from_numpy(labels.astype(np.int64)))


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python pickles, read straight from the tarball (or from an extracted directory)

CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; anything else is refused, so a
    file in CIFAR's format cannot run code (its sha256 may have been waived)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset batch")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module.startswith("numpy") and name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray  # numpy >= 2, where numpy.core is a deprecated alias
            except ImportError:
                from numpy.core import multiarray  # type: ignore[no-redef]
            return getattr(multiarray, name)
        return getattr(np, name)


def _load_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except KeyError as exc:
        raise ValueError(f"{where}: a CIFAR-10 batch needs 'data' and 'labels', it has {sorted(batch)}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{where}: data has shape {data.shape} and labels {labels.shape}; "
                         f"expected (N, 3072) and (N,)")
    return data, labels


def _cifar_batches(path: Path, names: Sequence[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    if path.is_dir():
        for name in names:
            hits = [p for p in (path / name, path / "cifar-10-batches-py" / name) if p.is_file()]
            if hits:
                found[name] = hits[0].read_bytes()
    else:
        with tarfile.open(path) as tar:  # one sequential pass: random access into a .gz re-reads it
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isreg() and base in names and base not in found:
                    f = tar.extractfile(member)
                    assert f is not None
                    found[base] = f.read()
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"{path}: no CIFAR-10 batch {', '.join(missing)}")
    return found


class CIFAR10(_Tensors):
    """CIFAR-10 from the python-pickle tarball (cifar-10-python.tar.gz, or its extracted directory):
    3 x 32 x 32 images. split="train" is data_batch_1..5 (50,000), "val" is test_batch (10,000)."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        _check_split(split)
        names = CIFAR_BATCHES[split]
        raw = _cifar_batches(Path(path), names)
        parts = [_load_batch(raw[name], f"{path}:{name}") for name in names]
        data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([lab for _, lab in parts])
        super().__init__(torch.from_numpy(data.astype(np.float32) / 255.0), torch.from_numpy(labels))


# ---------------------------------------------------------------------------------------------
# ImageFolder: <root>/<class>/<image>, or <root>/train|val/<class>/<image>

NUMPY_EXTENSIONS = (".npy",)
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _descend(root: Path) -> Path:
    """An archive often wraps everything in one folder: look inside while that is all there is."""
    while True:
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and any(c.is_dir() for c in entries[0].iterdir()):
            root = entries[0]
        else:
            return root


def _is_val(i: int, fraction: float) -> bool:
    """Evenly spaced: exactly floor(n * fraction) of n sorted files per class go to val."""
    return int((i + 1) * fraction) > int(i * fraction)


class ImageFolder(Dataset[Sample]):
    """One folder per class, labels in sorted folder order; images are .npy arrays (H x W or
    H x W x C; uint8 scaled to [0, 1]) or, with Pillow, .png/.jpg/... files.

    With `train/` and `val/` folders inside, those are the splits; otherwise `val_fraction` of each
    class (evenly spaced in sorted order, the same on every run and rank) is the val split. `size`
    ([H, W]) resizes every image, `channels` (1 or 3) converts them, so that they can be batched.
    """

    def __init__(self, path: str | Path | None, split: str = "train", *, val_fraction: float = 0.2,
                 size: Sequence[int] | None = None, channels: int | None = None) -> None:
        _check_split(split)
        if path is None:
            raise ValueError("ImageFolder needs a directory: set data.url=file:///path/to/folders, or an archive "
                             "URL with data.sha256")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels={channels} must be 1, 3 or null")
        root = _descend(Path(path))
        presplit = (root / "train").is_dir() and (root / "val").is_dir()
        base = root / split if presplit else root
        self.classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"{base}: no class folders (expected <class>/<image> inside)")
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            files = sorted(f for f in (base / cls).rglob("*")
                           if f.is_file() and f.suffix.lower() in NUMPY_EXTENSIONS + PIL_EXTENSIONS)
            for i, f in enumerate(files):
                if presplit or _is_val(i, val_fraction) == (split == "val"):
                    self.samples.append((f, label))
        if not self.samples:
            raise FileNotFoundError(f"{base}: no images for split {split!r} "
                                    f"({', '.join(NUMPY_EXTENSIONS + PIL_EXTENSIONS)})")
        self.size = tuple(size) if size is not None else None
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.samples[index]
        image = _load_image(path)
        if self.channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        elif self.channels == 1 and image.shape[0] == 3:
            image = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        if self.size is not None and tuple(image.shape[1:]) != self.size:
            image = torch.nn.functional.interpolate(image.unsqueeze(0), size=self.size, mode="bilinear",
                                                    antialias=True, align_corners=False).squeeze(0)
        return image.contiguous(), torch.tensor(label, dtype=torch.int64)


def _load_image(path: Path) -> torch.Tensor:
    """C x H x W float in [0, 1]."""
    if path.suffix.lower() in NUMPY_EXTENSIONS:
        array = np.load(path, allow_pickle=False)
    else:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError(f"{path}: reading {path.suffix} images needs Pillow (pip install pillow); "
                              f".npy arrays need nothing") from None
        with Image.open(path) as img:
            array = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{path}: image of shape {array.shape}; expected H x W or H x W x 1/3/4")
    array = array[:, :, :3]
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32) / scale)
