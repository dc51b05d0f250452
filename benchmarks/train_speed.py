"""Epoch time and time-to-accuracy: our tensor pipeline vs. the naive DataLoader pipeline.

Both train the same network (the default CNN) with the same optimiser, schedule and seed; they differ
only in how batches are made:
  * ours:  the whole split is one normalised tensor; flips are applied to whole batches;
  * naive: torchvision-style Dataset of PIL images, per-image RandomHorizontalFlip/ToTensor/Normalize,
           DataLoader with default workers (the tutorial pipeline).

    python benchmarks/train_speed.py                # 2 epochs each, target 88 % validation accuracy
    python benchmarks/train_speed.py --epochs 1     # quicker
Prints one line per pipeline and the ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fmnist_pyfunc import augment, config, data, models, training


class NaiveDataset(Dataset):
    """What most tutorials do: one PIL image and one transform chain per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                             transforms.Normalize((data.PIXEL_MEAN,), (data.PIXEL_STD,))])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def _fit(make_batches, steps_per_epoch: int, cfg: dict, x_val, y_val, target: float) -> dict:
    training.seed_everything(cfg["seed"])
    model = models.build("cnn", cfg["width"], cfg["depth"], cfg["dropout"]).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=training.MOMENTUM, nesterov=True,
                                weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], pct_start=training.WARMUP_FRACTION,
                                                   total_steps=cfg["epochs"] * steps_per_epoch)
    epoch_seconds, time_to_target, elapsed, val_acc = [], None, 0.0, 0.0
    for _ in range(cfg["epochs"]):
        model.train()
        start = time.perf_counter()
        for inputs, labels in make_batches():
            loss = F.cross_entropy(model(inputs.contiguous(memory_format=torch.channels_last)), labels,
                                   label_smoothing=cfg["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        epoch_seconds.append(time.perf_counter() - start)
        elapsed += epoch_seconds[-1]
        val_acc = training.evaluate(model, x_val, y_val, tta=False)["accuracy"]
        if time_to_target is None and val_acc >= target:
            time_to_target = elapsed
    return {"epoch_s": float(np.mean(epoch_seconds)), "time_to_target_s": time_to_target, "val_acc": val_acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per pipeline (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.88,
                        help="validation accuracy for time-to-accuracy (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = {**config.TRAIN_DEFAULTS, "epochs": args.epochs, "augment": "flip"}
    ds = data.load()
    train_idx, val_idx = data.stratified_split(ds.train_labels, cfg["val_size"], cfg["seed"])
    x_val, y_val = models.normalize(ds.train_images[val_idx]), torch.from_numpy(ds.train_labels[val_idx])
    x_train, y_train = models.normalize(ds.train_images[train_idx]), torch.from_numpy(ds.train_labels[train_idx])
    batch, steps = cfg["batch_size"], len(train_idx) // cfg["batch_size"]
    generator = torch.Generator().manual_seed(cfg["seed"])

    def tensor_batches():
        order = torch.randperm(len(x_train), generator=generator)
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            yield augment.augment(x_train[idx], "flip", generator), y_train[idx]

    loader = DataLoader(NaiveDataset(ds.train_images[train_idx], ds.train_labels[train_idx]),
                        batch_size=batch, shuffle=True, drop_last=True)
    results = {"ours (tensor batches)": _fit(tensor_batches, steps, cfg, x_val, y_val, args.target),
               "naive (DataLoader+PIL)": _fit(lambda: iter(loader), steps, cfg, x_val, y_val, args.target)}
    print(f"threads={args.threads} epochs={args.epochs} target_val_acc={args.target}")
    for name, r in results.items():
        ttt = f"{r['time_to_target_s']:.1f}s" if r["time_to_target_s"] else "not reached"
        print(f"{name:24s} epoch {r['epoch_s']:7.1f}s  time-to-{args.target:.0%} {ttt:>12s}  "
              f"val_acc {r['val_acc']:.4f}")
    ours, naive = results.values()
    print(f"speed-up: epoch {naive['epoch_s'] / ours['epoch_s']:.1f}x", end="")
    if ours["time_to_target_s"] and naive["time_to_target_s"]:
        print(f", time-to-accuracy {naive['time_to_target_s'] / ours['time_to_target_s']:.1f}x", end="")
    print()


if __name__ == "__main__":
    main()
