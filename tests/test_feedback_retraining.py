"""The loop closed, end to end on a real scoring server, prediction log and tracking store: users correct the
served model's answers on uneven-light phone photos that arrive sideways (an app dropped their EXIF
orientation), `mlflow run . -e train -P feedback=true` learns from the
corrections (training split only, logged as dataset inputs), and the promotion gate finds the new model better
on held-out corrections of that kind while it keeps the Fashion-MNIST test accuracy within the margin."""

import json

import mlflow
import pytest
import requests
from conftest import mlflow_run
from PIL import Image

from fmnist_pyfunc import config, feedback, prediction_log, promotion, registry, tracking
from fmnist_testkit import harness, photos

pytestmark = pytest.mark.e2e

PHOTOS = 400              # corrected photos: ~120 held out (feedback.HOLDOUT_SHARE), above feedback.MIN_HOLDOUT
# Trained to near convergence, so that its test accuracy moves by the data, not by chance: the tiny runs of the
# other tests swing by +-2 points between seeds, more than the gate's margin; this one by +-0.3 (measured).
SMALL_TRAIN = {"epochs": 6, "max_train_samples": 20000, "width": 32, "val_size": 1000, "lr": 0.1, "augment": "flip"}
FIRST_IMAGE = 59_000      # training images beyond the 20,000 the runs train on (the split keeps index order)
BATCH = 50
EFFECT = "uneven_light"   # light falling off across the frame ...
# ... and the photo on its side: preprocessing cannot undo that, and a model trained on upright garments reads
# few of them (~10 %; after learning from 280 corrections ~69 %, test accuracy within 0.3 points).
SIDEWAYS = Image.Transpose.ROTATE_90
MIN_GAIN = 0.25           # on held-out corrections: ~30 of ~120 images, against the ~70 gained when measured




def _correct_photos_in_the_served_model(url: str, dataset) -> int:
    """Send PHOTOS photos of training garments, then tell the server each one's true class; returns how many
    the served model had wrong."""
    garments = dataset.train_images[FIRST_IMAGE:FIRST_IMAGE + PHOTOS]
    labels = dataset.train_labels[FIRST_IMAGE:FIRST_IMAGE + PHOTOS]
    wrong = 0
    for start in range(0, PHOTOS, BATCH):
        rows = [{"image": photos.encoded(photos.render(g, EFFECT, FIRST_IMAGE + start + i).transpose(SIDEWAYS))}
                for i, g in enumerate(garments[start:start + BATCH])]
        answer = requests.post(f"{url}/invocations", json={"dataframe_records": rows}, timeout=120)
        assert answer.status_code == 200, answer.text
        request_id = answer.headers[config.PREDICTION_ID_HEADER]
        for row, prediction in enumerate(answer.json()["predictions"]):
            label = int(labels[start + row])
            wrong += prediction["class_index"] != label
            stored = requests.post(f"{url}/feedback", data=json.dumps({"prediction_id": f"{request_id}-{row}",
                                                                       "label": label}),
                                   headers={"Content-Type": "application/json"}, timeout=30)
            assert stored.status_code == 200, stored.text
    return wrong


def test_retraining_on_feedback_learns_the_corrected_kind_and_is_judged_by_the_gate(private_store, tmp_path, dataset,
                                                                               monkeypatch):
    """Baseline (SMALL_TRAIN, seed 0) in Production -> 400 sideways photos served and corrected -> the same training
    with -P feedback=true: its held-out-correction accuracy rises by MIN_GAIN or more, the gate promotes it exactly
    when its test accuracy stays within FEEDBACK_TEST_MARGIN, and the run records the feedback snapshot as dataset
    inputs."""
    log_url = f"sqlite:///{tmp_path}/predictions.db"
    monkeypatch.setenv(prediction_log.PREDICTION_LOG_ENV, log_url)
    mlflow.set_experiment("feedback-baseline")  # of this store: an earlier test's experiment id is not in it
    baseline = tracking.run_training(config.validate(SMALL_TRAIN), dataset, progress=False)
    first = promotion.promote(baseline, dataset, force=True)
    assert first.promoted

    port = harness.free_port()
    url = f"http://127.0.0.1:{port}"
    command = harness.scoring_command(config.PRODUCTION_MODEL_URI, config.LOOPBACK, port)
    with harness.running(command, harness.child_env(private_store), f"{url}/ping", tmp_path / "serve.log"):
        wrong = _correct_photos_in_the_served_model(url, dataset)
    snapshot = feedback.snapshot(log_url)
    assert len(snapshot.train.ids) + len(snapshot.holdout.ids) == PHOTOS
    assert len(snapshot.holdout.ids) >= feedback.MIN_HOLDOUT

    mlflow_run("train", {**SMALL_TRAIN, "feedback": "true"}, private_store, "feedback", tmp_path)
    (run,) = mlflow.search_runs(experiment_names=["feedback"], output_format="list")
    decision = promotion.promote(run.info.run_id, dataset)
    gain = decision.challenger_feedback_accuracy - decision.champion_feedback_accuracy
    print(f"baseline wrong on {wrong}/{PHOTOS} photos; held-out corrections "
          f"{decision.champion_feedback_accuracy:.4f} -> {decision.challenger_feedback_accuracy:.4f}; test "
          f"{decision.champion_accuracy:.4f} -> {decision.challenger_accuracy:.4f}")
    assert gain >= MIN_GAIN, decision.reason
    # The gate's rule, whichever way it falls: the test accuracy moves by -0.7 to +0.3 points between runs (the
    # held-out share is drawn by a hash of random prediction ids; training on 2 cores under load), so it is
    # promoted in most runs and rightly refused in some (CI, 2026-12-07: 90.88 % -> 90.22 %, refused).
    within_margin = decision.challenger_accuracy >= decision.champion_accuracy - promotion.FEEDBACK_TEST_MARGIN
    assert decision.promoted == within_margin, decision.reason
    assert registry.current_production() == (decision.version if decision.promoted else first.version)
    assert run.data.metrics["feedback_holdout_accuracy"] == pytest.approx(decision.challenger_feedback_accuracy)

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"feedback", "feedback-holdout"}
    assert json.loads(inputs["feedback"].dataset.profile)["features_shape"][0] == len(snapshot.train.ids)
    assert inputs["feedback"].dataset.digest and log_url.split("/")[-1] in inputs["feedback"].dataset.source
    assert int(run.data.params["feedback_holdout_rows"]) == len(snapshot.holdout.ids)
