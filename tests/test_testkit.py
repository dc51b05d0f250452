"""The test kit's own judgements, which other tests lean on: how alike two seen images are, and the one
environment every child process gets."""

import os

import numpy as np

from fmnist_testkit import harness
from fmnist_testkit.images import correlation


def test_correlation_finds_the_same_picture_shifted_and_never_in_a_blank_one(dataset):
    """A test image against itself moved by a pixel correlates ~1; against a blank (uniform) image, or a blank
    one against anything, it is 0, not NaN: a decoder that returns a uniform image must not pass for one that
    read the picture."""
    image = dataset.test_images[0].astype(float)
    assert correlation(np.roll(image, 1, axis=1), image) > 0.99
    blank = np.full_like(image, 200.0)
    assert correlation(blank, image) == 0.0 and correlation(image, blank) == 0.0
    assert correlation(dataset.test_images[1].astype(float), image) < 0.85


def test_child_env_drops_this_processs_run_and_names_the_store(monkeypatch):
    """A child process gets the venv's bin/ first on PATH, the given tracking store, and none of this process's
    MLflow experiment or run (which would make its runs children of ours)."""
    for name in harness.INHERITED_MLFLOW_VARS:
        monkeypatch.setenv(name, "inherited")
    env = harness.child_env("sqlite:///x.db", EXTRA="1")
    assert not set(harness.INHERITED_MLFLOW_VARS) & set(env)
    assert env["PATH"].split(os.pathsep)[0] == str(harness.BIN)
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db" and env["EXTRA"] == "1"
