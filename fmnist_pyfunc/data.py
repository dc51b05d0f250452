"""Fashion-MNIST: find the four IDX files, verify them, load them as arrays, split, augment.

Source order: $FMNIST_DATA_DIR, Debian's `dataset-fashion-mnist`, the local cache, torchvision's
download into the cache. numpy only (torch is imported just for the download), so the web UI can read
sample images without torch; `augment.py` turns the arrays into tensors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "FMNIST_DATA_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist-pyfunc"
# torchvision.datasets.FashionMNIST(root=CACHE_DIR, download=True) writes the files here.
CACHE_RAW_DIR = CACHE_DIR / "FashionMNIST" / "raw"

# SHA-256 of each file's *decompressed* bytes: the content is what matters, and it survives
# re-compression (Debian's .gz files differ byte-wise from the upstream ones, their content does not).
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
IMAGE_SIZE = 28
IDX_IMAGE_HEADER_BYTES = 16  # magic, count, rows, cols (4 x int32)
IDX_LABEL_HEADER_BYTES = 8   # magic, count
NUM_CLASSES = 10
# Pixel statistics of the training images on the 0-1 scale, for input normalisation.
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

FIX_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), point "
    f"{DATA_DIR_ENV} at a folder holding the four .gz files, or run with internet access once "
    f"so torchvision can download them into {CACHE_RAW_DIR}."
)


class DataError(RuntimeError):
    """The dataset is missing or corrupt; the message names the file and the fix."""


@dataclass(frozen=True)
class FashionMNIST:
    train_images: np.ndarray  # (60000, 28, 28) uint8, light garment on dark background
    train_labels: np.ndarray  # (60000,) int64
    test_images: np.ndarray   # (10000, 28, 28) uint8
    test_labels: np.ndarray   # (10000,) int64
    source: Path              # folder the files were read from
    checksum: str             # SHA-256 over the four files' content hashes


def _has_all_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name, _ in FILES.values())


def find_data_dir(download: bool = True) -> Path:
    """Return the first folder in the source order that holds all four files."""
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        folder = Path(explicit)
        missing = [name for name, _ in FILES.values() if not (folder / name).is_file()]
        if missing:
            raise DataError(f"{DATA_DIR_ENV}={folder} lacks {', '.join(missing)}. {FIX_HINT}")
        return folder
    for folder in (DEBIAN_DIR, CACHE_DIR, CACHE_RAW_DIR):
        if _has_all_files(folder):
            return folder
    if not download:
        raise DataError(f"Fashion-MNIST not found in {DEBIAN_DIR} or {CACHE_DIR}. {FIX_HINT}")
    return _download()


def _download() -> Path:
    try:
        from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

        TorchvisionFashionMNIST(root=str(CACHE_DIR), download=True)
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise DataError(f"Fashion-MNIST not found locally and the download failed ({exc}). {FIX_HINT}") from exc
    return CACHE_RAW_DIR


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); it is corrupt. Delete it. {FIX_HINT}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected_sha256:
        raise DataError(f"{path} has SHA-256 {digest[:12]}..., expected {expected_sha256[:12]}...: "
                        f"the file is corrupt or not Fashion-MNIST. Delete it. {FIX_HINT}")
    return raw


def load(data_dir: Path | None = None, download: bool = True) -> FashionMNIST:
    """Load and verify all four files; raise DataError naming the file and the fix."""
    folder = Path(data_dir) if data_dir else find_data_dir(download=download)
    arrays, digests = {}, []
    for key, (name, sha256) in FILES.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing. {FIX_HINT}")
        raw = _read_verified(path, sha256)
        digests.append(sha256)
        if key.endswith("images"):
            pixels = np.frombuffer(raw, np.uint8, offset=IDX_IMAGE_HEADER_BYTES)
            arrays[key] = pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).copy()  # copy: writable, for torch
        else:
            arrays[key] = np.frombuffer(raw, np.uint8, offset=IDX_LABEL_HEADER_BYTES).astype(np.int64)
    checksum = hashlib.sha256("".join(digests).encode()).hexdigest()
    return FashionMNIST(**arrays, source=folder, checksum=checksum)


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of indices into (train, val) with every class equally represented in val."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = val_size // len(classes)
    remainder = val_size - per_class * len(classes)
    val_parts = []
    for i, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == cls))
        val_parts.append(members[: per_class + (1 if i < remainder else 0)])
    val_idx = np.sort(np.concatenate(val_parts))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx

