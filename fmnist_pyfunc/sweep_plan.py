"""What a sweep's time budget buys on this machine: measure it, size the trials to fit, and keep the deadline.

The same preset costs 3-4x more on a 2-core CPU with AVX2 only than on one with native bf16. A fixed trial
shape is a search on one and a single training run past its deadline on the other. So before the first trial
the sweep times a few real training steps and an evaluation pass per candidate width (seconds), and picks
the widest network whose trials still leave room for `min_trials` configurations:

    one trial at full length (the baseline the pruner compares with) + (min_trials - 1) trials that reach
    the earliest epoch the pruner may act at, and are evaluated  <=  90 % of the budget

A trial's cost is its epochs (training plus the validation pass) and its evaluation: the calibration and
out-of-distribution passes, the test set, the logged model. The deadline then holds whatever the estimate:
no trial starts unless it can reach its pruning point and be evaluated, and a running trial ends at an
epoch boundary, keeping its best epoch as a logged candidate, when the next epoch would not end in time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fmnist_pyfunc import data, ood, training

TIMED_STEPS = 10       # training steps timed per width (their median): ~6 s at width 48 on the slowest CPU we know
TIMED_IMAGES = 1000    # images of the evaluation pass timed per width
EVALUATION_FACTOR = 1.6  # a trial's evaluation also fits and scores the detector and draws its reports: 1.6x its
                         # timed passes (the default network's trial on the AVX2-only EPYC: 55 s against 31 s)
LOGGING_S = 5.0        # a trial's model files and tracking calls: ~3-5 s on 2 cores, whatever the width
TEST_IMAGES = 10_000   # the test set every trial is scored on
PLAN_SHARE = 0.9       # of the budget the trials are sized to: a shared 2-core machine's speed drifts by ~10 % over
                       # half an hour (the same epoch measured 50 and 56 s an hour apart), and the baseline trial
                       # must end its schedule, not be cut before it; what is left goes to more trials


class BudgetTooSmall(ValueError):
    """Not even the smallest network's shortest useful trials fit the budget on this machine."""


@dataclass(frozen=True)
class Cost:
    """What one trial of a given width costs on this machine, in seconds."""
    epoch_s: float       # one epoch: the training steps and the validation pass
    evaluation_s: float  # after training: calibration, the out-of-distribution fit, the test set, logging

    def trial_s(self, epochs: int) -> float:
        return epochs * self.epoch_s + self.evaluation_s


def shortest_trial_s(cost: Cost, epochs: int, warmup_epochs: int) -> float:
    """What a trial must be able to spend: the epochs before the pruner may act, and its evaluation should it
    not be pruned there. A trial the pruner ends sooner costs less, and leaves the time to the next."""
    return cost.trial_s(min(epochs, warmup_epochs + 1))


def pruned_trial_s(cost: Cost, epochs: int, warmup_epochs: int) -> float:
    """The least a trial costs: its epochs up to the pruner's first chance, unevaluated; or all of it when the
    pruner never has a chance. How many trials a budget may hold counts these: the deadline ends it sooner when
    later trials are not pruned."""
    first_chance = warmup_epochs + 1
    return first_chance * cost.epoch_s if first_chance < epochs else cost.trial_s(epochs)


@dataclass(frozen=True)
class Plan:
    width: int
    epochs: int
    n_trials: int       # trials the study aims for (the deadline may end it sooner)
    min_trials: int     # configurations the budget leaves room for
    cost: Cost          # of one trial at this width, measured
    warmup_epochs: int  # the pruner's: a trial runs at least this many epochs + 1
    budget_s: float

    def shortest_trial_s(self) -> float:
        return shortest_trial_s(self.cost, self.epochs, self.warmup_epochs)

    def trials(self) -> str:
        span = f"{self.min_trials}-{self.n_trials}" if self.n_trials > self.min_trials else f"{self.n_trials}"
        return f"{span} trial{'s' if self.n_trials > 1 else ''}"

    def describe(self) -> str:
        trial = self.cost.trial_s(self.epochs) / 60
        pruned = pruned_trial_s(self.cost, self.epochs, self.warmup_epochs) / 60
        return (f"[sweep] {self.budget_s / 60:.1f} min of the budget left after measuring this machine "
                f"(width {self.width}: "
                f"{self.cost.epoch_s:.0f} s an epoch, {self.cost.evaluation_s:.0f} s to evaluate): "
                f"{self.trials()} of {self.epochs} epochs at width {self.width}, "
                f"~{trial:.1f} min each in full, ~{pruned:.1f} min when pruned. No trial starts unless it can reach "
                "its pruning point and be evaluated before the deadline; a running one that would not end in time "
                "stops at an epoch boundary and is evaluated with its best epoch")


@dataclass(frozen=True)
class Deadline:
    """This worker's end of the budget, and what each trial must leave to the configurations still owed."""
    at: float  # time.time() at which the budget ends
    plan: Plan

    def left_s(self) -> float:
        return self.at - time.time()

    def may_start(self) -> bool:
        return self.left_s() >= self.plan.shortest_trial_s()

    def ends_after(self, epoch: int, epoch_s: float, slot: int) -> bool:
        """Whether the trial in budget slot `slot` (0-based) stops after `epoch` (0-based), `epoch_s` long: one
        more epoch and the evaluation would not end before the deadline, less the time the configurations
        still owed to min_trials need."""
        owed = max(0, self.plan.min_trials - 1 - slot)
        end = self.at - owed * self.plan.shortest_trial_s()
        return epoch + 1 < self.plan.epochs and time.time() + epoch_s + self.plan.cost.evaluation_s > end


def measure(cfg: dict, dataset: data.FashionMNIST) -> Cost:
    """One trial's cost for `cfg` (its width, batch size, data and precision) on this machine."""
    step_s, image_s = training.measure(cfg, dataset, TIMED_STEPS, TIMED_IMAGES)
    train_images = len(dataset.train_labels) - cfg["val_size"]
    if cfg["max_train_samples"]:
        train_images = min(train_images, cfg["max_train_samples"])
    views = 2 if cfg["tta"] else 1  # the mirror doubles every evaluation pass
    evaluated = views * (cfg["val_size"] + TEST_IMAGES + min(ood.FIT_IMAGES, train_images) + cfg["val_size"])
    return Cost(epoch_s=train_images // cfg["batch_size"] * step_s + cfg["val_size"] * image_s,
                evaluation_s=evaluated * image_s * EVALUATION_FACTOR + LOGGING_S)


def plan(budget_s: float, costs: dict[int, Cost], epochs: tuple[int, int], min_trials: int, max_trials: int,
         warmup_epochs: int) -> Plan:
    """The widest network of `costs` (one trial's cost per width, widest first) whose trials, of at least
    epochs[0] and at most epochs[1] epochs, leave room for `min_trials` configurations within PLAN_SHARE of
    `budget_s`; failing that, the narrowest with the epochs that fit."""
    low, high = epochs
    for width, cost in costs.items():  # noqa: B007 (the loop stops at the width it picks)
        fitting = _epochs_that_fit(budget_s * PLAN_SHARE, cost, high, min_trials, warmup_epochs)
        if fitting >= low:
            break
    if fitting < 1:
        need = cost.trial_s(1) * min_trials / PLAN_SHARE
        raise BudgetTooSmall(f"{budget_s / 60:.1f} min do not fit {min_trials} one-epoch trials of the narrowest "
                             f"network (width {width}: {cost.epoch_s:.0f} s an epoch, {cost.evaluation_s:.0f} s to "
                             f"evaluate) on this machine: give the sweep a budget of at least "
                             f"{math.ceil(need / 60)} min")
    n_trials = 1 + int((budget_s - cost.trial_s(fitting)) // pruned_trial_s(cost, fitting, warmup_epochs))
    return Plan(width=width, epochs=fitting, n_trials=max(min_trials, min(max_trials, n_trials)),
                min_trials=min_trials, cost=cost, warmup_epochs=warmup_epochs, budget_s=budget_s)


def _epochs_that_fit(budget_s: float, cost: Cost, most: int, min_trials: int, warmup_epochs: int) -> int:
    """The most epochs (up to `most`) for which one full trial and min_trials - 1 pruned ones fit the budget."""
    for epochs in range(most, 0, -1):
        if cost.trial_s(epochs) + (min_trials - 1) * shortest_trial_s(cost, epochs, warmup_epochs) <= budget_s:
            return epochs
    return 0
