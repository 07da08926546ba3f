"""Run metrics for node_exporter's textfile collector: one file, kept up to date by every script's runs.

Every metric is a gauge. Those labelled `component` and `operation` describe the last run of that
operation (`backup`, `restore`, `verify`, ...) of that component (`config`, `code`, `db`):

    rollback_last_run_timestamp_seconds      when the last run ended (Unix time), whatever its outcome
    rollback_last_success_timestamp_seconds  when the last successful run ended (moves only on success)
    rollback_last_run_ok                     1 if the last run exited 0, else 0
    rollback_duration_seconds                how long the last run took
    rollback_verify_ok                       verify only: 1 if it found nothing, 0 if it found a problem or drift

Those labelled `component` only describe the component:

    rollback_backup_count                    backups in the component's store after the last recorded run
    rollback_newest_backup_bytes             payload bytes of the component's newest backup
    rollback_rto_seconds                     the recovery time objective of a restore or rollback, so an alert
                                             can compare: rollback_duration_seconds > on(component) group_left
                                             rollback_rto_seconds

Each run replaces the samples of its own (component, operation) and keeps every other sample in the file,
so the file gathers all three components' runs. A component-only value not given to a run is kept as it was.
Writes are atomic (a whole new file renamed over the old one) and serialized with an flock on a sibling
`<file>.lock`, which the textfile collector ignores since it reads only `*.prom` files. Both are 0644
whatever the umask: node_exporter must read them, others must not write them. Metrics are best effort:
a lock that stays taken (anyone who can read the lock file can hold it) is waited for a few seconds at
most (METRICS_LOCK_WAIT_SECONDS), then the run is not recorded and says so, rather than hang after its
work is done.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from common.files import atomic_write

METRICS_LOCK_WAIT_SECONDS = 5.0
PUBLIC_READ = 0o644  # what node_exporter (another user) needs to read; nobody else may write
_POLL_SECONDS = 0.05


class MetricSpec(NamedTuple):
    """A metric's labels and the help text written with it."""

    labels: tuple[str, ...]
    help: str


RUN_LABELS = ("component", "operation")
COMPONENT_LABELS = ("component",)

METRICS: dict[str, MetricSpec] = {
    "rollback_last_run_timestamp_seconds": MetricSpec(
        RUN_LABELS, "When the last run of this operation ended, successful or not (Unix time)."),
    "rollback_last_success_timestamp_seconds": MetricSpec(
        RUN_LABELS, "When the last successful run (exit 0) of this operation ended (Unix time)."),
    "rollback_last_run_ok": MetricSpec(
        RUN_LABELS, "1 if the last run of this operation exited 0, else 0."),
    "rollback_duration_seconds": MetricSpec(
        RUN_LABELS, "How long the last run of this operation took, in seconds."),
    "rollback_verify_ok": MetricSpec(
        RUN_LABELS, "1 if the last verify found no problem, 0 if it found one (exit 3)."),
    "rollback_backup_count": MetricSpec(
        COMPONENT_LABELS, "Backups in the component's store after its last recorded run."),
    "rollback_newest_backup_bytes": MetricSpec(
        COMPONENT_LABELS, "Payload size in bytes of the component's newest backup."),
    "rollback_rto_seconds": MetricSpec(
        COMPONENT_LABELS, "The component's recovery time objective in seconds: a restore or rollback should "
                          "take no longer."),
}

# (metric name, label values in the metric's label order) -> value
Samples = dict[tuple[str, tuple[str, ...]], float]


def record_run(
    path: Path | str,
    component: str,
    operation: str,
    ok: bool,
    duration_seconds: float,
    backup_count: int | None = None,
    newest_backup_bytes: int | None = None,
    verify_ok: bool | None = None,
    rto_seconds: float | None = None,
) -> None:
    """Record one run in the textfile at `path`, keeping the samples of every other (component, operation).

    Raises OSError or WriteFailed when the file or its lock cannot be written, TimeoutError when the lock
    stays taken.
    """
    from prometheus_client import generate_latest  # here, so that `--help` does not pay for the import

    path = Path(path)
    run = (component, operation)
    with _exclusive(path):
        samples = _read_samples(path)
        last_success = samples.get(("rollback_last_success_timestamp_seconds", run))
        samples = {key: value for key, value in samples.items() if key[1] != run}
        now = time.time()
        per_run = {
            "rollback_last_run_timestamp_seconds": now,
            "rollback_last_success_timestamp_seconds": now if ok else last_success,
            "rollback_last_run_ok": 1.0 if ok else 0.0,
            "rollback_duration_seconds": duration_seconds,
            "rollback_verify_ok": None if verify_ok is None else float(verify_ok),
        }
        per_component = {
            "rollback_backup_count": backup_count,
            "rollback_newest_backup_bytes": newest_backup_bytes,
            "rollback_rto_seconds": rto_seconds,
        }
        for name, value in per_run.items():
            if value is not None:
                samples[(name, run)] = float(value)
        for name, value in per_component.items():
            if value is not None:
                samples[(name, (component,))] = float(value)
        atomic_write(path, generate_latest(_Collector(samples)), mode=PUBLIC_READ)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    # A sibling file, not the metrics file itself: that one is replaced by a rename on every write, so a
    # lock taken on it would be on an inode the next writer no longer opens.
    # Read-only: a lock file another user made (0644) can still be locked through it.
    fd = os.open(f"{path}.lock", os.O_RDONLY | os.O_CREAT, PUBLIC_READ)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, PUBLIC_READ)  # the umask had a say when it was made
        deadline = time.monotonic() + METRICS_LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path}.lock stayed locked by another process for "
                                       f"{METRICS_LOCK_WAIT_SECONDS:g} s") from None
                time.sleep(_POLL_SECONDS)  # flock has no timeout; a writer holds it for milliseconds
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_samples(path: Path) -> Samples:
    """The samples of this module's metrics already in the file; none if it is missing or unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                spec = METRICS.get(sample.name)
                if spec is None or set(sample.labels) != set(spec.labels):
                    continue  # not one of ours, or written with other labels: it has no place in the new file
                samples[(sample.name, tuple(sample.labels[label] for label in spec.labels))] = sample.value
    except ValueError:
        # A damaged file would otherwise stop every later run from recording; the other components'
        # samples come back with their next runs.
        return {}
    return samples


class _Collector:
    """Hands the samples to prometheus_client's writer as one gauge family per metric."""

    def __init__(self, samples: Samples):
        self.samples = samples

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        for name, spec in METRICS.items():
            family = GaugeMetricFamily(name, spec.help, labels=spec.labels)
            for (metric, labels), value in sorted(self.samples.items()):
                if metric == name:
                    family.add_metric(labels, value)
            if family.samples:
                yield family
