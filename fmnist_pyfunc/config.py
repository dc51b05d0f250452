"""Training hyperparameters: the one source of truth.

`entrypoints/train.py` builds its argparse from `TRAIN_DEFAULTS`, the `train` entry point of
`MLproject` repeats them (a unit test checks the two agree), and the sweep overrides a subset.
"""

TRAIN_DEFAULTS = {
    # --- model ---
    "arch": "resnet2",        # "resnet2" (conv-pool-BN-ReLU stages, each + a residual conv): better than "resnet"
                              # (no residual conv at 14x14) on validation and test over 4 seeds, for a little more
                              # time per step (docs/training.md, The model); "cnn" (the plain CNN before both) or
                              # "mlp" (fully connected baseline)
    "width": 32,              # channels of the first conv stage, doubled per stage (cnn); hidden units (mlp)
    "depth": 3,               # conv stages, each halving resolution 28 -> 14 -> 7 -> 3 (cnn); hidden layers (mlp)
    "dropout": 0.0,           # before the classifier; 14 epochs leave the network underfitting, so none (0.1 and
                              # 0.2 lost accuracy: docs/training.md)
    # --- optimisation ---
    "epochs": 14,             # full passes over the 55k training split (time per machine: docs/benchmarks.md)
    "batch_size": 256,        # large enough for BLAS efficiency on CPU, small enough for ~200 steps/epoch
    "lr": 0.2,                # peak learning rate of the one-cycle schedule (SGD, Nesterov momentum 0.9); 0.2
                              # beat 0.1, and 0.3 was no better (docs/training.md)
    "weight_decay": 5e-4,     # L2 on all weights; standard for SGD-trained small CNNs
    "label_smoothing": 0.1,   # shirt/T-shirt/pullover labels are genuinely ambiguous; soft targets help
    "augment": "photo",       # "none", "flip", "shift", "flip_shift" (+ up to 2 px translation: underfits in 14
                              # epochs) or "photo" (flip, and for 30 % of each batch the tilt, scale, shift and
                              # shadow that photos keep after preprocessing: photos then read nearly as well as
                              # raw pixels, for a slight loss on clean test images; docs/training.md)
    "tta": True,              # average predictions over the image and its mirror at evaluation and serving
    "patience": 0,            # early stopping: epochs without a val-accuracy gain before stopping (0 = off)
    # --- data and reproducibility ---
    "val_size": 5000,         # stratified hold-out from the 60k training images, for selection only
    "max_train_samples": 0,   # cap on the training split for smoke tests (0 = all 55k)
    "seed": 0,                # seeds the split, initialisation, shuffling and augmentation
    "feedback": False,        # also train on users' corrections from the prediction log (feedback.py): the
                              # training split only; a share is held out to evaluate on
    "device": "auto",         # "auto" (CUDA when available), "cpu" or "cuda"
    "precision": "auto",      # "auto": bf16 autocast where the device computes bf16 natively (CUDA, CPUs with
                              # AVX512-BF16/AMX: faster at the same accuracy), fp32 elsewhere (emulated bf16 is
                              # slower than fp32); docs/training.md, Precision
}

ARCHS = ("resnet2", "resnet", "cnn", "mlp")
AUGMENTS = ("none", "flip", "shift", "flip_shift", "photo")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")

# The ten Fashion-MNIST classes, in label order.
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

EXPERIMENT_NAME = "fashion-mnist"
# The product's contract names it so (every deployment, URI and dashboard uses it), whatever network it holds:
# a convolutional one, residual since `resnet` (each version's description and its run's `arch` parameter say which).
REGISTERED_MODEL_NAME = "fashion-mnist-cnn"
PRODUCTION_MODEL_URI = f"models:/{REGISTERED_MODEL_NAME}/Production"  # what serving loads by default
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Where the servers listen, on the host and in the image alike. The Makefile, Dockerfile and compose file
# spell these again; tests/test_ship.py checks that they agree.
LOOPBACK = "127.0.0.1"   # every server binds here unless told otherwise: exposing one is a decision
MLFLOW_UI_PORT = 5000    # MLflow's own default, for `mlflow ui` and the team tracking server
SCORING_PORT = 5001      # the scoring server (/invocations), beside MLflow's UI
UI_PORT = 8000           # the upload UI
FOLLOW_INTERVAL_S = 10.0  # the scoring server re-resolves models:/NAME/Production this often: a promotion
                          # reaches users within this, for one registry call per interval per worker
# The prediction log (prediction_log.py): its defaults, here because the scoring server's argparse names them
# before any module that loads prometheus_client may be imported.
PREDICTION_LOG_ENV = "FMNIST_PREDICTION_LOG"  # a SQLAlchemy URL, or "off"
PREDICTION_ID_HEADER = "X-Prediction-Id"      # the answer's: a logged request's id; row i's prediction is "<id>-<i>"
PREDICTION_LOG_OFF = "off"
PREDICTION_LOG_FILE = "predictions.db"  # beside mlflow.db: its own file, so its writes never lock the tracking store
LOG_SAMPLE_RATE = 1.0                   # every request; a busy service logs a share of them
LOG_MAX_ROWS = 1_000_000                # ~1 GB of images and answers: months of a small shop's traffic
LOG_MAX_DAYS = 90.0
# Adaptive batching and admission in the scoring server (batching.py, scoring.py), here for the same reason.
# Rows of one forward pass gathered from concurrent requests: larger batches gain little per image on 2 cores
# (in-process: 1 image 2.7 ms, 256 images 66 ms, EPYC with bf16), and a request behind a full batch waits for it.
BATCH_MAX_ROWS = 256
BATCH_MAX_WAIT_S = 0.002  # a pass waits this long for requests still being parsed: about one single-image pass
# Rows one worker has accepted and not yet answered (queued or in a forward pass): four requests at the row limit
# (contract.MAX_BATCH_ROWS), ~3 s of work for the default model on 2 cores. Admission counts work, not requests:
# a burst of single-image requests waits its turn; a request that would pass this gets 429 and Retry-After.
MAX_QUEUED_ROWS = 4096
SELECTION_METRIC = "best_val_accuracy"  # what the sweep optimises and promote ranks by; never test data
MODEL_URI_TAG = "model_uri"  # run tag: MLflow 3 keeps logged models outside the run's artifacts


def validate(cfg: dict) -> dict:
    """Return `cfg` with defaults filled in, or raise ValueError naming every bad value."""
    unknown = set(cfg) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
    cfg = {**TRAIN_DEFAULTS, **cfg}
    checks = [
        (cfg["arch"] in ARCHS, f"arch must be one of {ARCHS}, got {cfg['arch']!r}"),
        (cfg["augment"] in AUGMENTS, f"augment must be one of {AUGMENTS}, got {cfg['augment']!r}"),
        (cfg["device"] in DEVICES, f"device must be one of {DEVICES}, got {cfg['device']!r}"),
        (cfg["precision"] in PRECISIONS, f"precision must be one of {PRECISIONS}, got {cfg['precision']!r}"),
        (cfg["width"] >= 1, f"width must be >= 1, got {cfg['width']}"),
        (1 <= cfg["depth"] <= 4, f"depth must be in 1..4, got {cfg['depth']}"),
        (0 <= cfg["dropout"] < 1, f"dropout must be in [0, 1), got {cfg['dropout']}"),
        (cfg["epochs"] >= 1, f"epochs must be >= 1, got {cfg['epochs']}"),
        (cfg["batch_size"] >= 1, f"batch_size must be >= 1, got {cfg['batch_size']}"),
        (cfg["lr"] > 0, f"lr must be > 0, got {cfg['lr']}"),
        (cfg["weight_decay"] >= 0, f"weight_decay must be >= 0, got {cfg['weight_decay']}"),
        (0 <= cfg["label_smoothing"] < 1, f"label_smoothing must be in [0, 1), got {cfg['label_smoothing']}"),
        (cfg["patience"] >= 0, f"patience must be >= 0, got {cfg['patience']}"),
        (10 <= cfg["val_size"] <= 30000, f"val_size must be in 10..30000, got {cfg['val_size']}"),
        (cfg["max_train_samples"] >= 0, f"max_train_samples must be >= 0, got {cfg['max_train_samples']}"),
    ]
    errors = [message for ok, message in checks if not ok]
    if errors:
        raise ValueError("; ".join(errors))
    return cfg
