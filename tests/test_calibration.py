"""Temperature scaling and the calibration error it is judged by."""

import numpy as np
import pytest
import torch

from fmnist_pyfunc import calibration


def _sampled(temperature: float, n: int = 20_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits / temperature): a model whose right T is known."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=generator) * 3
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature):
    """On labels sampled from softmax(z / T), the fitted temperature is T within 5 %."""
    logits, labels = _sampled(true_temperature)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_fitted_temperature_removes_the_calibration_error():
    """An under-confident model (logits shrunk 3x) has a large ECE that dividing by the fitted T removes."""
    logits, labels = _sampled(1.0)
    shrunk = logits / 3
    raw = calibration.expected_calibration_error(shrunk.softmax(1).numpy(), labels.numpy())
    t = calibration.fit_temperature(shrunk, labels)
    fixed = calibration.expected_calibration_error((shrunk / t).softmax(1).numpy(), labels.numpy())
    assert raw > 0.1 and fixed < 0.015


def test_ece_of_a_known_case():
    """Always 90 % sure, right half the time: ECE is exactly 0.4; right 90 % of the time: 0."""
    probabilities = np.full((10, 10), 0.1 / 9)
    probabilities[:, 0] = 0.9
    half_right = np.array([0] * 5 + [1] * 5)
    ninety_right = np.array([0] * 9 + [1])
    assert calibration.expected_calibration_error(probabilities, half_right) == pytest.approx(0.4)
    assert calibration.expected_calibration_error(probabilities, ninety_right) == pytest.approx(0.0, abs=1e-9)


def test_reliability_bins_cover_every_image_once():
    """The reliability table's counts add up to the number of images, one bin per 1/15 of confidence."""
    logits, labels = _sampled(1.0, n=1000)
    table = calibration.reliability(logits.softmax(1).numpy(), labels.numpy())
    assert len(table) == calibration.ECE_BINS and sum(row["count"] for row in table) == 1000
