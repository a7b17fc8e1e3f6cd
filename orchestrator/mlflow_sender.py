"""A run's MLflow calls sent from a background thread, so tracking trouble never stops training.

Calls go out in the order they were made. A call that fails stays first in line and is tried
again after a pause that doubles up to ``max_delay_s`` (MLflow's own client retries each HTTP
request for minutes by default; here it is cut to one retry, so the pause is ours). The line holds
at most ``capacity`` calls; when it is full the oldest metric batch is dropped and counted. At the
end, :meth:`MlflowSender.close` waits up to a deadline; what is still unsent is returned, so the
caller can keep the metric values on disk and send them when the server is back
(:func:`save_unsent`, :func:`send_saved`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from core.errors import one_line
from core.names import (
    BEST_CHECKPOINT_FILE,
    CHECKPOINTS_DIRNAME,
    HTTP_RETRIES_ENV,
    RESOLVED_CONFIG_NAME,
    UNSENT_JSON,
    VISUALS_DIRNAME,
)
from orchestrator.mlflow_runs import (
    ARTIFACT_CHECKPOINT,
    ARTIFACT_CONFIG,
    ARTIFACT_VISUALS,
    log_params,
)

ARTIFACT_UPLOAD = "artifact upload"  # the name of a run folder's upload job
IMAGE_KEY = "slots"  # a trial's slot pictures in MLflow's image series (log_image key)


class ArtifactUploader:
    """Uploads a run folder's artifacts to its MLflow run: ``config.yaml``, visualisations not
    uploaded yet and (``checkpoint``) ``checkpoints/best.ckpt``; a file is sent again only when
    it changed. Used by a trial's logger as it trains and by the sweep at its end."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._uploaded: dict[str, tuple[int, int]] = {}  # artifact -> (mtime_ns, size)
        self._listed = False

    def upload(self, client: MlflowClient, run_dir: Path, checkpoint: bool = True) -> None:
        """Raises on the first failed call (a sender's line tries the whole upload again)."""
        run_dir = Path(run_dir)
        if not self._listed:  # a resumed trial: what an earlier process uploaded is there
            listed = client.list_artifacts(self.run_id, ARTIFACT_VISUALS)
            self._listed = True
            self._uploaded.update({info.path: (0, -1) for info in listed})
        files = [(run_dir / RESOLVED_CONFIG_NAME, ARTIFACT_CONFIG)]
        files += [(p, ARTIFACT_VISUALS) for p in sorted((run_dir / VISUALS_DIRNAME).glob("*.png"))]
        if checkpoint:
            best = run_dir / CHECKPOINTS_DIRNAME / BEST_CHECKPOINT_FILE
            files.append((best, ARTIFACT_CHECKPOINT))
        for path, folder in files:
            key = f"{folder}/{path.name}"
            if not path.is_file() or (folder == ARTIFACT_VISUALS and key in self._uploaded):
                continue
            stat = path.stat()
            if self._uploaded.get(key) == (stat.st_mtime_ns, stat.st_size):
                continue
            client.log_artifact(self.run_id, str(path), folder)
            if folder == ARTIFACT_VISUALS and path.stem.startswith("step="):  # an image series too
                _log_image(client, self.run_id, path)
            self._uploaded[key] = (stat.st_mtime_ns, stat.st_size)



@dataclass
class Job:
    """One MLflow call: ``call(client)``. What it carries is kept if it stays unsent, so another
    process can send it: ``metrics`` (values), ``params`` or ``tags`` (name -> value)."""

    what: str
    call: Callable[[MlflowClient], Any]
    metrics: list[Metric] | None = None
    params: dict[str, Any] | None = None
    tags: dict[str, str] | None = None
    number: int | None = None  # its entry in the journal


def _warn(message: str) -> None:
    print(f"slotsweep: warning: {message}", file=sys.stderr, flush=True)


class MlflowSender:
    """The background line of one run's MLflow calls (see the module docstring)."""

    capacity = 10_000
    max_delay_s = 30.0

    def __init__(self, tracking_uri: str, run_id: str,
                 client: MlflowClient | None = None) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = client
        self._jobs: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._hurry = False  # closing: retry every second until the deadline, not on back-off
        self._thread: threading.Thread | None = None
        self.dropped = 0  # metric values dropped because the line was full
        # metric batches written here as they are queued and again when sent: what a killed
        # process had queued but not sent is read back by the run's next process
        self.journal: Path | None = None
        self._numbered = 0
        self.failing_since: float | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def submit(self, what: str, call: Callable[[MlflowClient], Any],
               metrics: list[Metric] | None = None, params: dict[str, Any] | None = None,
               tags: dict[str, str] | None = None) -> None:
        """Queue ``call`` (carrying ``metrics``, ``params`` or ``tags``); returns at once."""
        with self._cond:
            if len(self._jobs) >= self.capacity:
                oldest = next((j for j in self._jobs if j.metrics is not None), None)
                if oldest is None:
                    return  # a line full of non-metric calls: this one is the one to drop
                self._jobs.remove(oldest)
                self.dropped += len(oldest.metrics or [])
            job = Job(what, call, metrics, params, tags)
            if self.journal is not None and metrics is not None:
                self._numbered += 1
                job.number = self._numbered
                self._note({"queued": job.number, "metrics": _metric_dicts(metrics)})
            self._jobs.append(job)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"mlflow-{self.run_id[:8]}")
                self._thread.start()

    def _run(self) -> None:
        os.environ.setdefault(HTTP_RETRIES_ENV, "1")  # the line retries, not each call
        delay = 0.0
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs[0]
            try:
                job.call(self.client)
            except Exception as exc:
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    _warn(f"MLflow {job.what} failed for run {self.run_id} ({one_line(exc)}); "
                          "training continues, calls are kept and sent when it answers")
                delay = 1.0 if self._hurry else min(max(1.0, 2 * delay), self.max_delay_s)
                with self._cond:
                    if not self._hurry:
                        self._cond.wait(timeout=delay)
                if self._hurry:  # woken by close(): a short pause, outside the lock
                    time.sleep(delay)
                continue
            with self._cond:
                if self._jobs and self._jobs[0] is job:
                    self._jobs.popleft()
                if job.number is not None:
                    self._note({"sent": job.number})
                self._cond.notify_all()
            if self.failing_since is not None:
                _warn(f"MLflow answers again for run {self.run_id} after "
                      f"{time.monotonic() - self.failing_since:.0f} s: kept calls sent")
                self.failing_since = None
            delay = 0.0

    def _note(self, entry: dict[str, Any]) -> None:
        """One journal line (called under the line's lock; a failed write only loses safety)."""
        try:
            with open(self.journal, "a") as f:  # type: ignore[arg-type]
                f.write(json.dumps(entry) + "\n")
        except OSError:
            self.journal = None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued call is sent (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._jobs:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=min(left, 0.5))
        return True

    def close(self, timeout: float) -> list[Job]:
        """Send what is queued within ``timeout`` seconds; return the calls left unsent."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()  # a line waiting out a long back-off tries again now
        self.wait_idle(timeout)
        with self._cond:
            self._closing = True
            unsent = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        return unsent


def _metric_dicts(metrics: list[Metric]) -> list[dict[str, Any]]:
    return [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
            for m in metrics]


def save_unsent(run_dir: Path, run_id: str, unsent: list[Job], dropped: int = 0) -> str:
    """Keep unsent metric values in ``<run_dir>/mlflow_unsent.json`` (added to any kept before);
    returns one line saying what the run misses."""
    path = Path(run_dir) / UNSENT_JSON
    kept = json.loads(path.read_text()) if path.is_file() else {}
    for key, empty in (("metrics", []), ("other", []), ("params", {}), ("tags", {})):
        kept.setdefault(key, empty)
    for job in unsent:
        if job.metrics is not None:
            kept["metrics"] += _metric_dicts(job.metrics)
        elif job.params is not None:
            kept["params"].update(job.params)
        elif job.tags is not None:
            kept["tags"].update(job.tags)
        elif job.what not in kept["other"]:
            kept["other"].append(job.what)
    kept["run_id"], kept["dropped"] = run_id, kept.get("dropped", 0) + dropped
    path.write_text(json.dumps(kept, indent=1, default=str))
    return describe_unsent(kept)


def describe_unsent(kept: dict[str, Any]) -> str:
    """``12 metric values (steps 4-12), artifacts config.yaml`` and the like."""
    parts = []
    if kept["metrics"]:
        steps = [m["step"] for m in kept["metrics"]]
        parts.append(f"{len(steps)} metric values (steps {min(steps)}-{max(steps)})")
    if kept.get("dropped"):
        parts.append(f"{kept['dropped']} metric values dropped (the line was full)")
    if kept.get("params"):
        parts.append(f"{len(kept['params'])} params")
    if kept.get("tags"):
        parts.append(f"tags {', '.join(sorted(kept['tags']))}")
    if kept["other"]:
        parts.append(", ".join(dict.fromkeys(kept["other"])))
    return "; ".join(parts) or "nothing"


def send_saved(client: MlflowClient, run_dir: Path,
               upload: Callable[[], None] | None = None) -> str | None:
    """Send what ``run_dir`` keeps from :func:`save_unsent`: metric values, params, tags and
    (``upload``: the run folder's uploader) the artifacts. Returns None when there was nothing or
    all went out, else what the run still misses (kept for the next try)."""
    path = Path(run_dir) / UNSENT_JSON
    if not path.is_file():
        return None
    kept = json.loads(path.read_text())
    while kept["metrics"]:
        batch = kept["metrics"][:1000]
        try:
            client.log_batch(kept["run_id"], metrics=[Metric(**m) for m in batch])
        except Exception:
            path.write_text(json.dumps(kept, indent=1, default=str))  # only what is still unsent
            return describe_unsent(kept)
        kept["metrics"] = kept["metrics"][1000:]
    try:
        if kept.get("params"):
            log_params(client, kept["run_id"], kept["params"])
            kept["params"] = {}
        for key, value in dict(kept.get("tags", {})).items():
            client.set_tag(kept["run_id"], key, value)
            del kept["tags"][key]
        if upload is not None and ARTIFACT_UPLOAD in kept["other"]:
            upload()
            kept["other"] = [w for w in kept["other"] if w != ARTIFACT_UPLOAD]
    except Exception:
        pass  # said below, kept for the next try
    if kept["other"] or kept.get("dropped") or kept.get("params") or kept.get("tags"):
        path.write_text(json.dumps(kept, indent=1, default=str))
        return describe_unsent(kept)
    path.unlink()
    return None


def journal_pending(path: Path) -> list[Metric]:
    """Metric values a journal records as queued and never as sent (its process died first)."""
    if not path.is_file():
        return []
    queued: dict[int, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # the last line of a process killed mid-write
            continue
        if "queued" in entry:
            queued[entry["queued"]] = entry["metrics"]
        elif "sent" in entry:
            queued.pop(entry["sent"], None)
    return [Metric(**m) for batch in queued.values() for m in batch]


def _log_image(client: MlflowClient, run_id: str, path: Path) -> None:
    """``visualizations/step=N.png`` as step N of the run's ``IMAGE_KEY`` images (the UI's Image
    grid compares them across runs)."""
    from PIL import Image

    from core.names import step_of

    with Image.open(path) as image:
        client.log_image(run_id, image.convert("RGB"), key=IMAGE_KEY, step=step_of(path))


@contextlib.contextmanager
def short_http_retries() -> Iterator[None]:
    """One HTTP retry per MLflow call inside the block (MLflow's default backs off for minutes
    on a dead server); a value the user set wins."""
    added = HTTP_RETRIES_ENV not in os.environ
    os.environ.setdefault(HTTP_RETRIES_ENV, "1")
    try:
        yield
    finally:
        if added:
            os.environ.pop(HTTP_RETRIES_ENV, None)
