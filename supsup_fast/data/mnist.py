"""MNIST from IDX files (raw or .gz; a flat folder or torchvision's ``MNIST/raw/``), an embedded
subset shipped with the package, and a checksum-verified download. No torchvision."""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

MEAN, STD = 0.1307, 0.3081
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# md5 of the uncompressed files (the standard MNIST release).
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/")
EMBEDDED = "mnist_subset.npz"


class DataError(ValueError):
    """A data root or file that cannot be used; the message says what to fix."""


@dataclass
class MNIST:
    """uint8 images [N, 28, 28] and int64 labels [N] for both splits."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged deflate stream
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if data[:2] == b"\x1f\x8b":
        raise DataError(f"{path} is gzip-compressed but not named .gz: rename it to {path.name}.gz")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    named = re.search(r"-idx(\d)-", path.name)  # MNIST's names give the dimensions: idx3 images, idx1 labels
    if named and int(named.group(1)) != ndim and ndim not in (1, 3):  # a swap of the two is named below, by shape
        raise DataError(f"{path}: its header gives {ndim} dimensions where its name (idx{named.group(1)}) promises "
                        f"{named.group(1)}: the file is damaged or not what its name says")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header)")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    count = 1
    for size in shape:  # Python ints: a header of huge sizes must not overflow into a plausible count
        count *= size
    if len(data) != header + count:
        raise DataError(f"{path} holds {len(data) - header} bytes of data, expected {count} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Optional[Path]:
    """The file of ``stem`` in ``root`` (raw or .gz, flat or MNIST/raw/). Where there are several,
    the one with MNIST's md5 (a download beside another file of the name, e.g. Fashion-MNIST's),
    naming the one left; else the first."""
    found = [folder / name for folder in (root, root / "MNIST" / "raw", root / "raw")
             for name in (stem, stem + ".gz") if (folder / name).is_file()]
    if len(found) > 1:
        genuine = [path for path in found if _md5_of(path) == MD5[stem]]
        if genuine and genuine[0] != found[0]:
            warnings.warn(f"{found[0]} is not MNIST's {stem} (its md5 differs): reading {genuine[0]}", stacklevel=4)
            return genuine[0]
    return found[0] if found else None


def load_mnist_folder(root: Union[str, Path]) -> MNIST:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder; point it at a folder with the four MNIST IDX files "
                        f"(or MNIST/raw/ inside it), or use --download")
    found = {stem: _find(root, stem) for stem in FILES.values()}
    arrays = {}
    for key, stem in FILES.items():
        path = found[stem]
        if path is None:
            raise DataError(f"--data-root {root} has no {stem}[.gz] (looked in {root}, {root}/MNIST/raw, {root}/raw); "
                            f"use --download to fetch MNIST there")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        paths = {key: found[FILES[key]] for key in (f"{split}_images", f"{split}_labels")}
        if imgs.ndim != 3 or imgs.shape[1:] != (28, 28):
            raise DataError(f"{paths[f'{split}_images']} is not an MNIST image file: it holds an array of shape "
                            f"{imgs.shape}, expected [N, 28, 28] (a labels file under an images file's name?)")
        if labels.ndim != 1:
            raise DataError(f"{paths[f'{split}_labels']} is not an MNIST label file: it holds an array of shape "
                            f"{labels.shape}, expected [N] (an images file under a labels file's name?)")
        if len(imgs) != len(labels):
            raise DataError(f"MNIST {split} files in {root} do not match: {len(imgs)} images, {len(labels)} labels")
        if len(labels) == 0:
            raise DataError(f"MNIST {split} files in {root} hold no images")
        if labels.max() > 9:
            raise DataError(f"MNIST {split} labels in {root} exceed 9")
    if (len(arrays["train_labels"]), len(arrays["test_labels"])) == (10000, 60000):
        raise DataError(f"MNIST files in {root}: the train- files hold the 10,000 test images and the t10k- files the "
                        f"60,000 training images: they are swapped")
    t = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return MNIST(t["train_images"], t["train_labels"].long(), t["test_images"], t["test_labels"].long(), str(root))


def load_embedded() -> MNIST:
    """The MNIST subset shipped inside the package (demo and quick tests)."""
    with resources.files("supsup_fast.data").joinpath(EMBEDDED).open("rb") as fh:
        z = np.load(fh)
        arrays = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    return MNIST(arrays["train_images"], arrays["train_labels"].long(), arrays["test_images"],
                 arrays["test_labels"].long(), "embedded")


def download_mnist(root: Union[str, Path]) -> Path:
    """Fetch the four files into ``root`` (md5 verified, written atomically). A file there under an
    MNIST name that fails the check stays; the reader prefers the verified one (``_find``)."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for stem, md5 in MD5.items():
        target = root / (stem + ".gz")
        present = _find(root, stem)  # raw or .gz, flat or MNIST/raw/: a verified copy is not fetched again
        if present is not None and _md5_of(present) == md5:
            continue
        errors = []
        for mirror in MIRRORS:
            try:
                with urllib.request.urlopen(mirror + stem + ".gz", timeout=30) as resp:
                    blob = resp.read()
                digest = hashlib.md5(gzip.decompress(blob)).hexdigest()
            except (OSError, EOFError, zlib.error) as exc:  # also an HTML page or a cut body: try the next
                errors.append(f"{mirror}: {exc}")
                continue
            if digest != md5:
                errors.append(f"{mirror}: checksum mismatch")
                continue
            tmp = target.with_suffix(".gz.part")
            tmp.write_bytes(blob)
            os.replace(tmp, target)
            break
        else:
            raise DataError(f"could not download {stem} ({'; '.join(errors)}). Without internet, copy the four "
                            f"MNIST IDX files into a folder and pass it with --data-root")
    return root


def _md5_of(path: Path) -> str:
    """md5 of an IDX file's uncompressed bytes ("" if it cannot be read)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            return hashlib.md5(fh.read()).hexdigest()
    except (OSError, EOFError, zlib.error):
        return ""


def load_mnist(data_root: Optional[Union[str, Path]] = None, download: bool = False) -> MNIST:
    """MNIST from ``data_root`` (downloading first if asked), or the embedded subset if None."""
    if data_root is None:
        if download:
            raise DataError("--download needs --data-root (the folder to download into)")
        return load_embedded()
    if download:
        download_mnist(data_root)
    return load_mnist_folder(data_root)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 784], (x/255 - 0.1307) / 0.3081."""
    return ((images.reshape(len(images), -1).float() / 255.0) - MEAN) / STD
