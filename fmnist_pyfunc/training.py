"""The training loop: one readable pass from config to a trained network, with no MLflow in it.

Callers (the `train` entry point, the sweep) observe progress through `on_epoch`, which may raise to
abandon training (Optuna pruning does) or return True to end it after that epoch (the sweep's deadline does).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fmnist_pyfunc import augment, calibration, data, inference, models, monitor, ood

MOMENTUM = 0.9           # SGD Nesterov momentum; the usual value, not worth searching
WARMUP_FRACTION = 0.25   # share of steps spent raising the LR in the one-cycle schedule
MIN_STEPS = int(1 / WARMUP_FRACTION) + 1  # fewer leaves the schedule's warm-up or decay without a step


@dataclass
class TrainResult:
    model: torch.nn.Module
    device: torch.device
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    best_epoch: int = 0
    best_val_accuracy: float = 0.0  # the chosen epoch's as served (with `tta`); the history's are the plain image's
    train_seconds: float = 0.0
    bf16: bool = False          # trained (and evaluated) under bf16 autocast
    temperature: float = 1.0    # fitted on the validation split after training: divides the logits
    val_ece_raw: float = 0.0    # validation ECE before and after dividing by the temperature
    val_ece: float = 0.0
    train_indices: np.ndarray | None = None  # the training split as trained on, and the validation split
    val_indices: np.ndarray | None = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def scores(logits: torch.Tensor, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """Loss, accuracy, ECE and the probabilities the served model would give, from `inference.logits`."""
    probabilities = inference.calibrated(logits, temperature)
    return {
        "loss": F.cross_entropy(logits / temperature, torch.from_numpy(labels).long()).item(),
        "accuracy": float((probabilities.argmax(1) == labels).mean()),
        "ece": calibration.expected_calibration_error(probabilities, labels),
        "probabilities": probabilities,
    }


def test_scores(result: TrainResult, dataset: data.FashionMNIST, tta: bool,
                detector: ood.Detector | None = None) -> tuple[dict, dict]:
    """Scores on the 10k test set exactly as the served model gives them (on the CPU, in serving's precision),
    before and after the calibration temperature; with a detector, also the share of test garments it accepts."""
    outputs = inference.forward(result.model.to("cpu"), dataset.test_images, tta, inference.serving_bf16())
    labels = dataset.test_labels
    raw, test = scores(outputs.logits, labels), scores(outputs.logits, labels, result.temperature)
    if detector is not None:
        test["ood_accepted"] = float(ood.in_distribution(detector.score(outputs)).mean())
    return raw, test


def validation_outputs(result: TrainResult, dataset: data.FashionMNIST, tta: bool) -> inference.Outputs:
    """The validation split through the network as the served model scores it (on the CPU, in serving's
    precision): what the detector's scales and the drift reference are taken from."""
    images = dataset.train_images[result.val_indices]
    return inference.forward(result.model.to("cpu"), images, tta, inference.serving_bf16())


def fit_ood(result: TrainResult, dataset: data.FashionMNIST, tta: bool, seed: int,
            val: inference.Outputs | None = None) -> ood.Detector:
    """The out-of-distribution detector, fitted as the served model scores (on the CPU, in serving's precision):
    its Gaussians on up to ood.FIT_IMAGES images of the training split, its scales and threshold on the
    validation split (`val`, `validation_outputs`, computed here if not given). Test images are never seen."""
    fit_indices = np.random.default_rng(seed).permutation(result.train_indices)[:ood.FIT_IMAGES]
    train = inference.forward(result.model.to("cpu"), dataset.train_images[fit_indices], tta,
                              inference.serving_bf16())
    val = val if val is not None else validation_outputs(result, dataset, tta)
    return ood.fit(train, dataset.train_labels[fit_indices], val, result.temperature)


def accuracy(result: TrainResult, images: np.ndarray, labels: np.ndarray, tta: bool) -> float:
    """Accuracy on `images` as the served model scores them (on the CPU, in serving's precision)."""
    logits = inference.logits(result.model.to("cpu"), images, tta, inference.serving_bf16())
    return float((logits.argmax(1).numpy() == labels).mean())


def reference_profile(result: TrainResult, dataset: data.FashionMNIST, val: inference.Outputs,
                      detector: ood.Detector) -> dict:
    """The validation split as the served model sees and answers it (`val`: `validation_outputs`): what drift is
    measured against (monitor.py)."""
    probabilities = inference.calibrated(val.logits, result.temperature)
    return monitor.profile(dataset.train_images[result.val_indices], probabilities, detector.score(val))


def optimiser(model: torch.nn.Module, cfg: dict, steps_per_epoch: int):
    """SGD with Nesterov momentum and the one-cycle schedule over the whole run (stepped once per batch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=MOMENTUM, nesterov=True,
                                weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], pct_start=WARMUP_FRACTION,
                                                   total_steps=cfg["epochs"] * steps_per_epoch)
    return optimizer, schedule


def train_step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer, schedule,
         label_smoothing: float, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step; returns the batch's loss (detached) and logits."""
    with inference.autocast(inputs.device, bf16):
        logits = model(inputs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss.detach(), logits


def measure(cfg: dict, dataset: data.FashionMNIST, steps: int, images: int) -> tuple[float, float]:
    """Seconds per training step and per evaluated image for `cfg`'s network, batch size, augmentation and
    precision on this machine: the median of `steps` real steps on training images (a shared machine's odd
    slow step does not count), then one evaluation pass over `images` images, each after an untimed warm-up
    (the first call allocates and picks kernels)."""
    device = resolve_device(cfg["device"])
    bf16 = inference.use_bf16(cfg["precision"], device)
    model = models.build(cfg["arch"], cfg["width"], cfg["depth"], cfg["dropout"])
    model = model.to(device, memory_format=models.memory_format(cfg["arch"]))
    optimizer, schedule = optimiser(model, {**cfg, "epochs": 1}, steps + 1)
    x = models.normalize(dataset.train_images[:cfg["batch_size"]]).to(device)
    y = torch.from_numpy(dataset.train_labels[:cfg["batch_size"]]).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    step_seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(model, augment.augment(x, cfg["augment"], generator), y, optimizer, schedule, cfg["label_smoothing"],
                   bf16)
        _synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    model.eval()
    inference.forward(model, dataset.train_images[:cfg["batch_size"]], tta=False, bf16=bf16)  # warm-up, untimed
    start = time.perf_counter()
    inference.forward(model, dataset.train_images[:images], tta=False, bf16=bf16)
    return float(np.median(step_seconds[1:])), (time.perf_counter() - start) / images


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: time what it did, not what it was given
        torch.cuda.synchronize()


def train(cfg: dict, dataset: data.FashionMNIST,
          on_epoch: Callable[[int, dict], bool | None] | None = None, progress: bool = True,
          extra: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train on the stratified training split (plus `extra` images and labels, users' corrections: training
    only); select the epoch with the best validation accuracy."""
    generator = seed_everything(cfg["seed"])
    device = resolve_device(cfg["device"])
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick the fastest kernels
    train_idx, val_idx = data.stratified_split(dataset.train_labels, cfg["val_size"], cfg["seed"])
    if cfg["max_train_samples"]:
        train_idx = train_idx[: cfg["max_train_samples"]]
    train_images, train_labels = dataset.train_images[train_idx], dataset.train_labels[train_idx]
    if extra is not None:
        train_images, train_labels = np.concatenate([train_images, extra[0]]), np.concatenate([train_labels, extra[1]])
    x_train = models.normalize(train_images).to(device)
    y_train = torch.from_numpy(train_labels).to(device)
    x_val, y_val = dataset.train_images[val_idx], dataset.train_labels[val_idx]
    bf16 = inference.use_bf16(cfg["precision"], device)

    fmt = models.memory_format(cfg["arch"])
    model = models.build(cfg["arch"], cfg["width"], cfg["depth"], cfg["dropout"]).to(device, memory_format=fmt)
    batch_size = min(cfg["batch_size"], len(x_train))
    steps_per_epoch = len(x_train) // batch_size  # drop the ragged last batch: BatchNorm needs >1 sample
    if cfg["epochs"] * steps_per_epoch < MIN_STEPS:
        raise ValueError(f"{cfg['epochs']} epoch(s) of {steps_per_epoch} batch(es) of {batch_size} are fewer than "
                         f"the {MIN_STEPS} steps the one-cycle schedule needs: raise epochs or the training samples, "
                         "or lower batch_size")
    optimizer, schedule = optimiser(model, cfg, steps_per_epoch)
    aug_generator = torch.Generator(device=device).manual_seed(cfg["seed"])

    result = TrainResult(model=model, device=device, bf16=bf16, train_indices=train_idx, val_indices=val_idx)
    best_state, best_epoch_accuracy, epochs_without_gain = None, 0.0, 0
    start = time.perf_counter()
    bar = tqdm(range(cfg["epochs"]), desc="train", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            inputs = augment.augment(x_train[idx], cfg["augment"], aug_generator)
            loss, logits = train_step(model, inputs, y_train[idx], optimizer, schedule, cfg["label_smoothing"], bf16)
            loss_sum += loss
            correct += (logits.argmax(1) == y_train[idx]).sum()

        # Each epoch scores the image alone (no mirror average): enough to compare epochs, at half the cost
        # (docs/benchmarks.md). The chosen epoch is scored as served once, below.
        val = scores(inference.logits(model, x_val, tta=False, bf16=bf16), y_val)
        metrics = {
            "train_loss": loss_sum.item() / steps_per_epoch,
            "train_accuracy": correct.item() / (steps_per_epoch * batch_size),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": schedule.get_last_lr()[0],
            "epoch_seconds": time.perf_counter() - start - result.train_seconds,
        }
        result.train_seconds = time.perf_counter() - start
        result.history.append(metrics)
        bar.set_postfix(val_acc=f"{val['accuracy']:.4f}", loss=f"{metrics['train_loss']:.3f}")
        if best_state is None or val["accuracy"] > best_epoch_accuracy:
            result.best_epoch, best_epoch_accuracy = epoch, val["accuracy"]
            best_state, epochs_without_gain = copy.deepcopy(model.state_dict()), 0
        else:
            epochs_without_gain += 1
        if on_epoch is not None and on_epoch(epoch, metrics):
            break  # the caller's deadline: the best epoch so far is the result
        if cfg["patience"] and epochs_without_gain >= cfg["patience"]:
            break

    model.load_state_dict(best_state)
    model.eval()
    val_logits = inference.logits(model, x_val, cfg["tta"], bf16)
    result.temperature = calibration.fit_temperature(val_logits, torch.from_numpy(y_val))
    raw = scores(val_logits, y_val)
    result.best_val_accuracy, result.val_ece_raw = raw["accuracy"], raw["ece"]
    result.val_ece = scores(val_logits, y_val, result.temperature)["ece"]
    return result
