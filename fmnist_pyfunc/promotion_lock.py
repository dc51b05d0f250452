"""One promotion at a time, across processes and machines: a lock kept in the registry itself.

The lock is a registered model of its own: creating one is atomic in every MLflow store (unique name), local
SQLite and a shared tracking server alike. A lock left by a killed promoter is taken over once stale.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from contextlib import contextmanager

import mlflow
from mlflow.tracking import MlflowClient

from fmnist_pyfunc.config import REGISTERED_MODEL_NAME
from fmnist_pyfunc.registry import PromotionError

LOCK_MODEL_NAME = f"{REGISTERED_MODEL_NAME}.promotion-lock"
LOCK_WAIT_S = 600    # a promotion evaluates two models on the 10k test set: room for a queue of them
LOCK_STALE_S = 900   # a lock this old was left by a killed promoter: taken over
LOCK_POLL_S = 1.0


def _stale_holder(client: MlflowClient) -> str | None:
    """The holder token of the lock if it is stale (its promoter was killed), else None."""
    try:
        tags = client.get_registered_model(LOCK_MODEL_NAME).tags
    except mlflow.exceptions.MlflowException:
        return None  # released meanwhile
    return tags.get("holder", "") if time.time() - float(tags.get("since", "0")) > LOCK_STALE_S else None


def take_over(client: MlflowClient, stale_holder: str) -> bool:
    """Move the stale lock of `stale_holder` aside, atomically: renamed to a tombstone named after that holder.
    Of several waiters that saw the same stale lock only one rename succeeds; a waiter acting late finds the
    tombstone's name taken (or no lock) and fails instead of moving the next holder's fresh lock. Tombstones
    are kept for that reason: one small registered model per killed promoter."""
    try:
        client.rename_registered_model(LOCK_MODEL_NAME, f"{LOCK_MODEL_NAME}.taken-over.{stale_holder}")
        return True
    except mlflow.exceptions.MlflowException:
        return False


@contextmanager
def promotion_lock():
    """Hold the registry's promotion lock: concurrent promoters wait their turn, so each one's gate sees the
    Production version the previous one left, and stages and alias are never written by two at once."""
    client = MlflowClient()
    deadline = time.monotonic() + LOCK_WAIT_S
    holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # unique: tombstones are named so
    while True:
        try:
            client.create_registered_model(LOCK_MODEL_NAME, tags={"since": str(time.time()), "holder": holder},
                                           description=f"Held while a promotion of {REGISTERED_MODEL_NAME} runs.")
            break
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        stale = _stale_holder(client)
        if stale is not None and take_over(client, stale):
            continue
        if time.monotonic() > deadline:
            raise PromotionError(f"another promotion has held {LOCK_MODEL_NAME!r} for over {LOCK_WAIT_S} s; "
                                 f"if none is running, delete that registered model")
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        release(client, holder)


def release(client: MlflowClient, holder: str) -> None:
    """Delete the lock only if it is still ours: if this promotion outlived LOCK_STALE_S and was taken over,
    the lock now belongs to someone else."""
    try:
        if client.get_registered_model(LOCK_MODEL_NAME).tags.get("holder") == holder:
            client.delete_registered_model(LOCK_MODEL_NAME)
    except mlflow.exceptions.MlflowException:
        pass  # gone already
