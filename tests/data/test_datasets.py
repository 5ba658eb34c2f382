"""harness.data.datasets on files generated in each format (MNIST idx, CIFAR-10 pickles, image folders),
and the built-in data configs end to end through the cache and a local server."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.config import conf_dir, register_configs, to_config
from harness.data import datasets
from harness.data.cache import fetch
from harness.data.datasets import CIFAR10, MNIST, ImageFolder, read_idx
from tests.data.httpd import Server


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def mnist_files(n_train: int = 12, n_val: int = 6) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        out[f"{prefix}-images-idx3-ubyte.gz"] = gzip.compress(idx_bytes(rng.integers(0, 256, (n, 28, 28), np.uint8)))
        out[f"{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    return out


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    for name, payload in mnist_files().items():
        (tmp_path / name).write_bytes(payload)
    train, val = MNIST(tmp_path, "train"), MNIST(tmp_path, "val")
    assert (len(train), len(val)) == (12, 6)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.item() == 3 and y.dtype == torch.int64
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    assert torch.equal(x, torch.from_numpy(np.frombuffer(raw, np.uint8, 784, 16 + 3 * 784).reshape(1, 28, 28) / 255.0)
                       .float())
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="needs 5 bytes of data, the file has 3"):
        read_idx(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "junk")


def cifar_tarball(path: Path, per_batch: int = 4) -> Path:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w:gz") as tar:
        for name in [*datasets.CIFAR_BATCHES["train"], "test_batch", "batches.meta"]:
            batch = {"data": rng.integers(0, 256, (per_batch, 3072), np.uint8),
                     "labels": [int(v) for v in rng.integers(0, 10, per_batch)], "batch_label": name}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_cifar10_from_the_tarball_and_from_a_directory(tmp_path: Path) -> None:
    tgz = cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    train, val = CIFAR10(tgz, "train"), CIFAR10(tgz, "val")
    assert (len(train), len(val)) == (20, 4)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y.item() < 10
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    assert torch.equal(CIFAR10(tmp_path / "x", "train").images, train.images)


def test_cifar10_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not allowed"):
        CIFAR10(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batch data_batch_1"):
        CIFAR10(tmp_path, "train")


def image_tree(root: Path, per_class: int = 5) -> Path:
    from PIL import Image

    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (6, 8, 3), np.uint8)
            if cls == "cat":
                np.save(root / cls / f"{i}.npy", pixels)
            else:
                Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_splits_classes_and_reads_npy_and_png(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "pets")
    train, val = ImageFolder(root, "train"), ImageFolder(root, "val")
    assert train.classes == ["cat", "dog"] and (len(train), len(val)) == (8, 2)  # 1 of 5 per class
    assert {p for p, _ in train.samples}.isdisjoint(p for p, _ in val.samples)
    assert sorted(label for _, label in val.samples) == [0, 1]
    for dataset in (train, val):
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == (3, 6, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    grey = ImageFolder(root, "train", size=[4, 4], channels=1)
    assert grey[0][0].shape == (1, 4, 4)


def test_imagefolder_with_train_and_val_folders_and_errors(tmp_path: Path) -> None:
    image_tree(tmp_path / "data" / "train")
    image_tree(tmp_path / "data" / "val", per_class=2)
    assert (len(ImageFolder(tmp_path / "data", "train")), len(ImageFolder(tmp_path / "data", "val"))) == (10, 4)
    with pytest.raises(ValueError, match="data.url=file:///path/to/folders"):
        ImageFolder(None, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolder(tmp_path / "empty", "train")


def _compose(overrides: list[str]) -> object:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_builtin_configs_carry_the_published_checksums() -> None:
    mnist = to_config(_compose(["data=mnist"])).data  # type: ignore[arg-type]
    assert mnist.url.startswith("https://") and sorted(mnist.files) == sorted(mnist_files())
    assert mnist.files["train-images-idx3-ubyte.gz"].startswith("440fcabf73cc546f")
    cifar = to_config(_compose(["data=cifar10"])).data  # type: ignore[arg-type]
    assert cifar.url.endswith("/cifar-10-python.tar.gz") and cifar.sha256.startswith("6d958be074577803")
    folder = to_config(_compose(["data=imagefolder"])).data  # type: ignore[arg-type]
    assert folder.extract and folder.url == ""


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_builtin_configs_end_to_end_through_a_local_server(name: str, server: Server, tmp_path: Path) -> None:
    """The shipped configs with only the URL (and digests) pointed at generated files on 127.0.0.1."""
    overrides = [f"data={name}", f"data.root={tmp_path / 'cache'}"]
    if name == "mnist":
        files = mnist_files()
        for file, payload in files.items():
            server.add(f"mnist/{file}", payload)
        overrides += [f"data.url={server.url('mnist/')}"]
    else:
        if name == "cifar10":
            payload = cifar_tarball(tmp_path / "c.tgz").read_bytes()
        else:
            tgz = tmp_path / "pets.tgz"
            with tarfile.open(tgz, "w:gz") as tar:
                tar.add(image_tree(tmp_path / "pets"), arcname="pets")
            payload = tgz.read_bytes()
        overrides += [f"data.url={server.add('data.tgz', payload)}",
                      f"data.sha256={hashlib.sha256(payload).hexdigest()}"]
    cfg = _compose(overrides)
    if name == "mnist":  # file names with dots cannot be override keys; swap the digests in directly
        cfg.data.files = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}  # type: ignore[attr-defined]
    c = to_config(cfg).data  # type: ignore[arg-type]
    path = fetch(c.url, c.sha256, c.root, files=c.files, extract=c.extract, verify=c.verify)
    from hydra.utils import instantiate

    dataset = instantiate(OmegaConf.select(cfg, "data.dataset"), path=str(path), split="val")
    x, y = dataset[0]
    assert x.ndim == 3 and y.dtype == torch.int64
