"""Run archive items on ``dask.distributed``: a local cluster by default, or an existing one by address.

The archive's main process keeps the manifest (SQLite is not for many writers on a shared file system): it
claims an item, submits it here, and records what comes back. A dask worker loads the model once, enhances the
item into the item's private staging folder in the destination and renames it into place when complete (the
same :func:`pipelines.worker.process` the other engines run), so a worker that dies mid-item leaves no
half-written output: the scheduler reports the task lost (``KilledWorker``; retries inside dask are switched off
for the local cluster so the manifest counts every attempt) and the archive queues the item again.

An existing cluster (``--scheduler tcp://HOST:PORT``) must see the destination folder, the model file and the
medsr code at the same paths as the main process, and for DICOMweb sources the credentials in its workers'
environment (they are never sent over the wire).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from medsr.errors import MedsrError
from pipelines.worker import _STATE, WorkerSettings, init_worker

__all__ = ["DaskExecutor", "run_on_worker"]

log = logging.getLogger("pipelines.archive")


def run_on_worker(fn: Callable[[dict[str, Any]], dict[str, Any]], settings: WorkerSettings,
                  task: dict[str, Any]) -> dict[str, Any]:
    """Runs on a dask worker: load the model the first time (or when the settings change), then ``fn(task)``."""
    if _STATE.get("settings") != settings:  # also ties this worker process's life to its parent's (the nanny)
        init_worker(settings)
    return fn(task)


class DaskExecutor(Executor):
    """A ``concurrent.futures`` face on a dask client, so the archive's loop runs unchanged on a cluster.

    Args:
        settings: what every worker needs (model, sampling, formats, torch threads).
        workers: worker processes of the local cluster (1 thread each); ignored with ``scheduler``.
        scheduler: address of an existing scheduler (``tcp://HOST:PORT``); "" starts a local cluster on
            127.0.0.1 that ends with this executor.
    """

    def __init__(self, settings: WorkerSettings, workers: int, scheduler: str = "") -> None:
        try:
            import dask
            from distributed import Client, LocalCluster
        except ImportError:
            raise MedsrError("--engine dask needs dask.distributed: pip install 'dask[distributed]'") from None
        self.settings = settings
        self.cluster = None
        try:
            if scheduler:
                self.client = Client(scheduler, timeout="60s")
            else:
                with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                    self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                host="127.0.0.1", dashboard_address=None,
                                                silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
            self.client.wait_for_workers(1, timeout=120)
        except (OSError, TimeoutError) as exc:
            self._close()
            where = scheduler or "a local cluster"
            raise MedsrError(f"dask: cannot reach {where} ({type(exc).__name__}: {exc})") from None
        self._pending: dict[Any, Future[Any]] = {}  # dask futures are cancelled once nobody holds them
        self._guard = threading.Lock()

    @property
    def slots(self) -> int:
        """Items worth having in flight: one per worker thread in the cluster now."""
        workers = self.client.scheduler_info().get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_running_or_notify_cancel()
        remote = self.client.submit(run_on_worker, fn, self.settings, *args, pure=False, **kwargs)
        with self._guard:
            self._pending[remote.key] = done

        def relay(fut: Any) -> None:
            with self._guard:
                self._pending.pop(fut.key, None)
            try:
                done.set_result(fut.result())
            except BaseException as exc:  # KilledWorker, CancelledError, a worker-side crash
                done.set_exception(exc)

        remote.add_done_callback(relay)
        done._medsr_remote = remote  # type: ignore[attr-defined]  # held until the result is taken
        return done

    def memory(self) -> dict[str, int]:
        """Resident memory (bytes) of every worker process, by worker address."""
        import psutil

        def rss() -> int:
            return int(psutil.Process().memory_info().rss)

        return {str(k): int(v) for k, v in self.client.run(rss).items()}

    def _close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.cluster is not None:
            self.cluster.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            with self._guard:
                futures = [f._medsr_remote for f in self._pending.values() if hasattr(f, "_medsr_remote")]
            if futures:
                self.client.cancel(futures)
        self._close()
