"""Time to accuracy on a GPU: `training.train` with device=cuda (channels_last, bf16 autocast, the whole
training split and its augmentation kept on the GPU, a large batch), airbench-style: a fixed recipe, its
training time and the test accuracy it ends at. Target: >= 95 % test accuracy in <= 60 s on one H100.

    python benchmarks/gpu_train.py                                                    # a CUDA machine
    python benchmarks/gpu_train.py --device cpu --epochs 1 --max-train-samples 2048 \
        --width 8 --batch-size 256 --lr 0.1                                           # the tests' tiny path

Prints the validation accuracy after each epoch with the training time so far, then the test accuracy of
the selected model (evaluated once, through the served inference path) and the total training time.
"""

from __future__ import annotations

import argparse

import torch

from fmnist_pyfunc import config, data, training

# The recipe. Measured on one H200 on 2026-11-28 (docs/training.md#on-a-gpu): 94.42-94.54 % test over three seeds
# in 23-27 s of training; 95 % was not reached by any of 17 variants (12-44 s each).
GPU_SETTINGS = {
    "arch": "resnet",    # the network of the figures above; `train`'s default since, resnet2, is untried on a GPU
    "batch_size": 1024,  # images per step: the CPU's 256 leaves the GPU waiting on kernel launches
    "lr": 0.4,           # peak one-cycle LR, raised with the batch (0.2 did no better)
    "epochs": 40,        # 80 did no better (94.42-94.48 %)
    "width": 128,        # 64 -> 128: +0.7 pt test for 0.4 -> 0.5 s an epoch; 192 did no better
    # `train`'s (photo), so the model reads phone photos too. flip_shift runs 0.3 s an epoch to the same test
    # accuracy, but its validation accuracy was lower (94.44 vs 94.96 %, seed 0).
    "augment": config.TRAIN_DEFAULTS["augment"],
    "seed": config.TRAIN_DEFAULTS["seed"],
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=config.DEVICES, help="(default: %(default)s)")
    for name, default in GPU_SETTINGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                            choices={"arch": config.ARCHS, "augment": config.AUGMENTS}.get(name),
                            help="(default: %(default)s)")
    parser.add_argument("--max-train-samples", type=int, default=0, help="0 = all 55k (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy aimed at (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg = config.validate({"device": args.device, "max_train_samples": args.max_train_samples,
                           **{name: getattr(args, name) for name in GPU_SETTINGS}})
    dataset = data.load()
    device = training.resolve_device(cfg["device"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device={device} ({name}) config={ {k: cfg[k] for k in (*GPU_SETTINGS, 'precision')} }")

    elapsed = []

    def on_epoch(epoch: int, metrics: dict) -> None:
        elapsed.append((elapsed[-1] if elapsed else 0.0) + metrics["epoch_seconds"])
        print(f"epoch {epoch + 1:3d}  {elapsed[-1]:7.1f} s  val {metrics['val_accuracy']:.4f}", flush=True)

    result = training.train(cfg, dataset, on_epoch=on_epoch, progress=False)
    _, test = training.test_scores(result, dataset, cfg["tta"])
    verdict = "target met" if test["accuracy"] >= args.target else "target missed"
    print(f"test accuracy {test['accuracy']:.4f} after {result.train_seconds:.1f} s of training "
          f"({cfg['epochs']} epochs, {len(elapsed)} run): {verdict} ({args.target:.1%})")
    return {"train_seconds": result.train_seconds, "test_accuracy": test["accuracy"], "epoch_seconds": elapsed}


if __name__ == "__main__":
    main()
