"""Networks map (N, 1, 28, 28) images to (N, 10) logits for every supported shape."""

import pytest
import torch

from fmnist_pyfunc import config, models


@pytest.mark.parametrize("arch, width, depth", [("resnet2", 8, 1), ("resnet2", 32, 3), ("resnet2", 4, 4),
                                                ("resnet", 8, 1), ("resnet", 8, 2), ("resnet", 32, 3), ("resnet", 4, 4),
                                                ("cnn", 8, 1), ("cnn", 8, 2), ("cnn", 32, 3), ("cnn", 4, 4),
                                                ("mlp", 64, 1), ("mlp", 128, 3)])
def test_output_shape(arch, width, depth):
    """Every architecture, width and depth maps (N, 1, 28, 28) to (N, 10) logits."""
    model = models.build(arch, width, depth, dropout=0.1).eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_default_network_is_small():
    """The default network stays a small CNN (~300k parameters) so that it trains in minutes on a CPU."""
    cfg = config.TRAIN_DEFAULTS
    network = models.build(cfg["arch"], cfg["width"], cfg["depth"], cfg["dropout"])
    assert 100_000 < models.count_parameters(network) < 500_000


def _weight_shapes(arch: str) -> list[tuple[str, tuple]]:
    state = models.build(arch, 32, 3, 0.1).state_dict()
    return [(k, tuple(v.shape)) for k, v in state.items() if k.endswith("weight")]


def test_networks_registered_before_keep_their_layout():
    """The earlier defaults' state-dict layouts (the plain CNN, the residual CNN with residual convs at 7x7 and
    3x3) are unchanged, so registered versions trained with them still load (the promotion gate scores the
    current champion with today's code)."""
    assert _weight_shapes("cnn") == [
        ("0.weight", (32, 1, 3, 3)), ("1.weight", (32,)), ("4.weight", (64, 32, 3, 3)), ("5.weight", (64,)),
        ("8.weight", (128, 64, 3, 3)), ("9.weight", (128,)), ("14.weight", (10, 1152))]
    assert _weight_shapes("resnet") == [
        ("0.weight", (32, 1, 3, 3)), ("2.weight", (32,)), ("4.weight", (64, 32, 3, 3)), ("6.weight", (64,)),
        ("8.body.0.weight", (64, 64, 3, 3)), ("8.body.1.weight", (64,)), ("9.weight", (128, 64, 3, 3)),
        ("11.weight", (128,)), ("13.body.0.weight", (128, 128, 3, 3)), ("13.body.1.weight", (128,)),
        ("16.weight", (10, 1152))]


def test_default_network_has_a_residual_conv_at_every_stage():
    """`resnet2` adds the 14x14 residual conv to `resnet`: one `Residual` per stage, at every depth."""
    for depth in (1, 3, 4):
        network = models.build("resnet2", 8, depth, 0.0)
        assert sum(isinstance(layer, models.Residual) for layer in network) == depth


def test_width_scales_capacity():
    """Doubling the CNN's width multiplies its parameters by more than 3 (conv weights grow with width squared)."""
    small, large = (models.count_parameters(models.build("cnn", w, 3, 0.0)) for w in (8, 16))
    assert large > 3 * small


def test_every_configurable_architecture_is_built():
    """The architectures `train` accepts (config.ARCHS, kept free of torch) are exactly the ones models builds."""
    assert set(config.ARCHS) == set(models.ARCHITECTURES)
