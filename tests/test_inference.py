"""The number format follows the hardware, training runs in either format, the CPU-kind runner gives the
kernels and format of slower CPUs, and the GPU benchmark's path works on a CPU with a tiny budget (no test
needs a GPU)."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from fmnist_pyfunc import config, data, inference, training

TINY = {"epochs": 2, "max_train_samples": 2048, "width": 8, "val_size": 500, "lr": 0.1, "augment": "flip"}


def test_precision_resolves_per_device():
    """fp32 and bf16 are what they say; auto is bf16 exactly where the device computes it natively."""
    cpu = torch.device("cpu")
    assert not inference.use_bf16("fp32", cpu) and inference.use_bf16("bf16", cpu)
    assert inference.use_bf16("auto", cpu) == inference.native_bf16(cpu)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_runs_in_either_precision(dataset, precision):
    """A tiny training run in fp32 and under bf16 autocast learns (far above chance) and says which it used."""
    result = training.train(config.validate({**TINY, "precision": precision}), dataset, progress=False)
    assert result.bf16 == (precision == "bf16")
    assert result.best_val_accuracy > 0.4 and 0.05 < result.temperature < 20


def test_selection_score_is_the_served_models_validation_accuracy(dataset):
    """Epochs are compared on the plain image, but the logged best_val_accuracy (what the sweep and promote
    rank by) is the chosen model's validation accuracy exactly as served: mirror-averaged, calibrated."""
    cfg = config.validate({**TINY, "tta": True})
    result = training.train(cfg, dataset, progress=False)
    _, val_idx = data.stratified_split(dataset.train_labels, cfg["val_size"], cfg["seed"])
    logits = inference.logits(result.model, dataset.train_images[val_idx], True, result.bf16)
    served = inference.calibrated(logits, result.temperature)
    assert result.best_val_accuracy == float((served.argmax(1) == dataset.train_labels[val_idx]).mean())


AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"  # what this CPU has, uncapped


@pytest.mark.parametrize("kind, capability", [
    ("avx2", "AVX2"),
    pytest.param("avx512", "AVX512", marks=pytest.mark.skipif(not AVX512, reason="this CPU has AVX2 only"))])
def test_cpu_kind_runner_caps_the_kernels_and_turns_native_bf16_off(kind, capability):
    """benchmarks/cpu_kind/run KIND runs a command with ATen's kernels capped at KIND and no native bf16, so
    precision auto trains in fp32 as it does on such a CPU; an unknown kind is refused."""
    probe = ("import torch; from fmnist_pyfunc import inference; cpu = torch.device('cpu'); "
             "print(torch.backends.cpu.get_cpu_capability(), inference.use_bf16('auto', cpu))")
    runner = REPO / "benchmarks" / "cpu_kind" / "run"
    done = subprocess.run([runner, kind, sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [capability, "False"]
    refused = subprocess.run([runner, "sse", "true"], capture_output=True, text=True)
    assert refused.returncode == 2 and "avx2|avx512" in refused.stderr


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_budget():
    """benchmarks/gpu_train.py's recipe trains, evaluates and reports on a CPU when told to."""
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "benchmarks" / "gpu_train.py")
    gpu_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_train)
    summary = gpu_train.main(["--device", "cpu", "--epochs", "1", "--max-train-samples", "2048", "--width", "8",
                           "--batch-size", "256", "--lr", "0.1"])
    assert len(summary["epoch_seconds"]) == 1 and 0.3 < summary["test_accuracy"] <= 1.0


def test_too_few_steps_is_a_clear_error(dataset):
    """A budget too small for the one-cycle schedule is refused with what to change, not a ZeroDivisionError."""
    with pytest.raises(ValueError, match="raise epochs"):
        training.train(config.validate({**TINY, "max_train_samples": 512}), dataset, progress=False)
