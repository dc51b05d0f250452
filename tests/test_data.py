"""Data module: verified loading, clear errors, a seeded stratified split, batch augmentation."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from fmnist_pyfunc import augment, data, models
from fmnist_pyfunc.config import AUGMENTS


def test_load_gives_the_real_dataset(dataset):
    """load() returns the real Fashion-MNIST: 60k/10k uint8 28x28 images, 6,000/1,000 per class, with a SHA-256
    checksum."""
    assert dataset.train_images.shape == (60000, 28, 28) and dataset.train_images.dtype == np.uint8
    assert dataset.test_images.shape == (10000, 28, 28)
    assert np.bincount(dataset.train_labels).tolist() == [6000] * 10
    assert np.bincount(dataset.test_labels).tolist() == [1000] * 10
    assert len(dataset.checksum) == 64


def _copy_files(tmp_path):
    for name, _ in data.FILES.values():
        shutil.copy(data.find_data_dir(download=False) / name, tmp_path / name)
    return tmp_path


def test_data_dir_env_is_used_first(tmp_path, monkeypatch):
    """FMNIST_DATA_DIR wins over every other place the data could be found."""
    folder = _copy_files(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(folder))
    assert data.find_data_dir() == folder


def test_missing_file_error_names_the_file_and_the_fix(tmp_path, monkeypatch):
    """A missing IDX file is reported by name, with the command that installs it."""
    folder = _copy_files(tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(folder))
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        data.load()


def test_corrupt_file_is_detected_by_checksum(tmp_path):
    """One changed label in an otherwise valid gzip/IDX file fails the content checksum, naming the file."""
    folder = _copy_files(tmp_path)
    path = folder / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: still a valid gzip and IDX file
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz.*corrupt"):
        data.load(folder)


def test_truncated_gzip_is_reported_as_corrupt(tmp_path):
    """A truncated archive is a DataError naming the file, not a gzip traceback."""
    folder = _copy_files(tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        data.load(folder)


def test_recompressed_files_still_verify(tmp_path, dataset):
    """Checksums cover content, so Debian's and upstream's differently-compressed files both pass."""
    folder = _copy_files(tmp_path)
    for name, _ in data.FILES.values():
        path = folder / name
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1))
    assert data.load(folder).checksum == dataset.checksum


def test_split_is_stratified_disjoint_and_seeded(dataset):
    """The validation split holds 500 images per class, shares none with training, and depends only on the seed."""
    train_idx, val_idx = data.stratified_split(dataset.train_labels, 5000, seed=3)
    assert len(val_idx) == 5000 and len(train_idx) == 55000
    assert not set(train_idx) & set(val_idx)
    assert np.bincount(dataset.train_labels[val_idx]).tolist() == [500] * 10
    again, _ = data.stratified_split(dataset.train_labels, 5000, seed=3)
    other, _ = data.stratified_split(dataset.train_labels, 5000, seed=4)
    assert np.array_equal(train_idx, again) and not np.array_equal(train_idx, other)


def test_augment_keeps_shape_and_content(dataset):
    """Augmentation keeps shapes, 'none' is the identity, 'flip' mirrors about half the images and keeps the rest,
    'shift' moves nearly all of them and never invents brightness."""
    images = models.normalize(dataset.test_images[:64])
    generator = torch.Generator().manual_seed(0)
    for kind in AUGMENTS:
        out = augment.augment(images, kind, generator)
        assert out.shape == images.shape
    assert torch.equal(augment.augment(images, "none", generator), images)
    flipped = augment.augment(images, "flip", generator)
    for original, result in zip(images, flipped, strict=True):
        assert torch.equal(result, original) or torch.equal(result, original.flip(2))
    mirrored = sum(not torch.equal(result, original) for original, result in zip(images, flipped, strict=True))
    assert 10 < mirrored < 54  # each image with probability 1/2: about 32 of 64, never none or all
    shifted = augment.augment(images, "shift", generator)
    moved = sum(not torch.equal(result, original) for original, result in zip(images, shifted, strict=True))
    assert moved >= 48  # 24 of the 25 offsets in [-2, 2]^2 move the image: about 61 of 64
    # A shift moves pixels but never invents brightness beyond the original's.
    assert shifted.max() <= images.max() + 1e-6 and shifted.min() >= augment.NORMALISED_BLACK - 1e-6


def test_photo_augment_warps_its_share_of_the_batch_and_keeps_the_rest(dataset):
    """'photo' tilts, rescales, shifts (and shadows) about PHOTO_SHARE of a batch and only mirrors the rest;
    the background stays black (the warp brings in black, never anything darker)."""
    images = models.normalize(dataset.train_images[:1000])
    out = augment.augment(images, "photo", torch.Generator().manual_seed(0))
    kept = sum(torch.equal(result, original) or torch.equal(result, original.flip(2))
               for original, result in zip(images, out, strict=True))
    assert abs((1000 - kept) / 1000 - augment.PHOTO_SHARE) < 0.05
    assert out.shape == images.shape and out.min() >= augment.NORMALISED_BLACK - 1e-5
