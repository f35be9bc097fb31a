"""The Ray executor: one actor per worker holds the loaded model; each configuration is a method call on it.

Every worker declares its resources to Ray: ``cpus_per_task`` CPUs (torch uses that many threads),
``gpus_per_task`` GPUs and the memory the model needs (``memory_per_worker``: the models.py pre-flight
for the float32 base plus one compressed copy), so Ray places workers only where they fit. A worker loads
the model once, by name, and then runs tasks by name (tasks.py) on plain-data payloads; results come
back in completion order (``ray.wait``). Workers stay up between calls of ``map`` on the same model (a
second sweep does not reload it) until ``release`` or ``close``. A task whose worker dies (killed, out of
memory, node lost) or that raises is reported and run once more, on a fresh worker if the old one is gone.

Ray is imported only when this executor is used: the serial path and the app work without it.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lmcompress_core.execute.base import RETRIES, Outcome
from lmcompress_core.execute.tasks import task_function

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.5      # how often a waiting sweep checks should_stop
SHIPPED_EXCLUDES = [".venv", ".git", "tests", "bench", "**/__pycache__"]   # not uploaded to a remote cluster


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("the Ray backend needs the ray package: pip install ray==2.60.0") from None
    return ray


def ray_imported() -> bool:
    import sys

    return "ray" in sys.modules


def memory_per_worker(loaded) -> int:
    """Bytes one worker needs: the float32 pre-flight estimate for the base model plus the compressed copy."""
    from lmcompress_core.models.loading import count_params, estimate_memory_bytes

    return estimate_memory_bytes(loaded.model.config) + 4 * count_params(loaded.model.config)


class ModelWorker:
    """A Ray actor's body: loads the model once, then runs named tasks on plain-data payloads."""

    def __init__(self, model_name: str, threads: int):
        import torch

        from lmcompress_core.models.loading import load_model

        # Ray sets OMP_NUM_THREADS from the declared CPUs; torch's own pool is sized from it explicitly.
        torch.set_num_threads(max(1, threads))
        self.loaded = load_model(model_name)

    def pid(self) -> int:
        return os.getpid()

    def run(self, task: str, payload: dict, options: dict) -> dict:
        return {"pid": os.getpid(), "result": task_function(task)(self.loaded, payload, **options)}


def _start_local(**init_kwargs) -> threading.Event | None:
    """ray.init, from a thread that lives until the returned Event is set when called off the main thread.

    A local Ray's own processes (GCS, raylet) die with the *thread* that started them (Linux's parent-death
    signal follows the thread), so starting it from a Streamlit script run, a thread that ends with the run,
    would take the cluster down with it. On the main thread (the CLI) ray.init runs as usual."""
    ray = _ray()
    if threading.current_thread() is threading.main_thread():
        ray.init(**init_kwargs)
        return None
    started, stop, failure = threading.Event(), threading.Event(), []

    def keep():
        try:
            ray.init(**init_kwargs)
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)
        started.set()
        stop.wait()

    threading.Thread(target=keep, name="ray-local-keeper", daemon=True).start()
    started.wait()
    if failure:
        stop.set()
        raise failure[0]
    return stop


@functools.lru_cache(maxsize=1)
def _actor_class():
    return _ray().remote(ModelWorker)


class RayExecutor:
    name = "ray"
    remote = True

    def __init__(self, address: str | None = None, num_cpus: int | None = None, cpus_per_task: int = 1,
                 gpus_per_task: float = 0.0, max_workers: int | None = None):
        """``address``: None starts a local Ray on this machine with ``num_cpus`` CPUs (default: all cores);
        "auto" or "ray://host:10001" joins an existing cluster (which has its own CPUs)."""
        if address is not None and num_cpus is not None:
            raise ValueError("num_cpus sizes a local Ray; a cluster given by address has its own CPUs")
        if num_cpus is not None and num_cpus < 1:
            raise ValueError(f"num_cpus must be at least 1; got {num_cpus}")
        if cpus_per_task < 1:
            raise ValueError(f"cpus_per_task must be at least 1 (torch needs a thread); got {cpus_per_task}")
        if gpus_per_task < 0:
            raise ValueError(f"gpus_per_task cannot be negative; got {gpus_per_task}")
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be at least 1; got {max_workers}")
        self.address, self.num_cpus = address or None, num_cpus
        self.cpus_per_task, self.gpus_per_task, self.max_workers = int(cpus_per_task), gpus_per_task, max_workers
        self._started = False
        self._workers: list = []
        self._pid_refs: dict = {}
        self._worker_key = None     # (model name, resources) the current workers were started for
        self._keeper = None         # set to end the thread that started a local Ray

    def describe(self) -> str:
        where = f"cluster at {self.address}" if self.address else \
            f"local Ray on this machine ({self.num_cpus or os.cpu_count()} CPUs)"
        gpus = f", {self.gpus_per_task:g} GPU" if self.gpus_per_task else ""
        return f"ray ({where}; {self.cpus_per_task} CPU{gpus} per worker)"

    # ---------------------------------------------------------------- connection
    def start(self) -> None:
        """Connect to Ray (or start a local one) unless this process is already connected."""
        ray = _ray()
        if ray.is_initialized():
            return
        if self.address:
            runtime_env = {"working_dir": str(ROOT), "excludes": SHIPPED_EXCLUDES}
            ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            # address "local": a new Ray even when a `ray start` cluster on this machine would be found;
            # workers' own output (transformers' load bars) stays in Ray's logs: progress comes from the results
            self._keeper = _start_local(address="local", num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False,
                                        log_to_driver=False, logging_level=logging.WARNING,
                                        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        self._started = True

    def close(self) -> None:
        """Stop the workers; shut Ray down if this executor started it (someone else's connection stays)."""
        if ray_imported() and _ray().is_initialized():
            self.release()
        if self._started:
            _ray().shutdown()
            self._started = False
        if self._keeper is not None:
            self._keeper.set()
            self._keeper = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- workers
    def task_resources(self, loaded) -> dict:
        """What each worker declares to Ray: CPUs, GPUs and memory bytes."""
        return {"num_cpus": self.cpus_per_task, "num_gpus": self.gpus_per_task, "memory": memory_per_worker(loaded)}

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (waits until each has loaded its model)."""
        ray = _ray()
        return [ray.get(self._pid_refs[w]) for w in self._workers if w in self._pid_refs]

    def _worker_count(self, tasks: int, resources: dict) -> int:
        ray = _ray()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = [n for n in nodes if n.get("memory", 0) >= resources["memory"]
                and n.get("CPU", 0) >= resources["num_cpus"] and n.get("GPU", 0) >= resources["num_gpus"]]
        if not fits:
            raise ValueError(
                f"no Ray node can hold a worker: each needs {resources['num_cpus']} CPU, {resources['num_gpus']:g} "
                f"GPU and {resources['memory'] / 2**30:.2f} GiB of memory (model pre-flight + one compressed copy)")
        per_node = [min(n.get("CPU", 0) // resources["num_cpus"], n.get("memory", 0) // resources["memory"],
                        n.get("GPU", 0) // resources["num_gpus"] if resources["num_gpus"] else float("inf"))
                    for n in fits]
        return int(max(1, min(sum(per_node), tasks, self.max_workers or tasks)))

    def _spawn(self, model_name: str, resources: dict):
        # restarts are ours (a fresh worker and one retry), so a lost task is seen and reported
        actor = _actor_class().options(max_restarts=0, max_task_retries=0, **resources)
        worker = actor.remote(model_name, self.cpus_per_task)
        self._workers.append(worker)
        self._pid_refs[worker] = worker.pid.remote()
        return worker

    def _retire(self, worker) -> None:
        ray = _ray()
        ray.kill(worker, no_restart=True)
        self._workers.remove(worker)
        self._pid_refs.pop(worker, None)

    # ---------------------------------------------------------------- running
    def map(self, loaded, task: str, payloads: Sequence[dict], options: dict | None = None,
            should_stop: Callable[[], bool] | None = None) -> Iterator[Outcome]:
        from lmcompress_core.compress import Cancelled

        ray = _ray()
        task_function(task)  # an unknown name fails here, before any worker starts
        self.start()
        resources = self.task_resources(loaded)
        idle = self._workers_for(loaded.name, resources, self._worker_count(len(payloads), resources))
        queue, running = deque((i, 1) for i in range(len(payloads))), {}
        try:
            while queue or running:
                while queue and idle:
                    worker, (index, attempt) = idle.pop(), queue.popleft()
                    running[worker.run.remote(task, payloads[index], options or {})] = (worker, index, attempt)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                if should_stop is not None and should_stop():
                    raise Cancelled(f"stopped with {len(queue) + len(running)} of {len(payloads)} tasks unfinished")
                for ref in ready:
                    worker, index, attempt = running.pop(ref)
                    outcome, alive = self._collect(ref, index, attempt)
                    if not alive:
                        self._retire(worker)
                        worker = self._spawn(loaded.name, resources)
                    idle.append(worker)
                    if outcome.retrying:
                        queue.appendleft((index, attempt + 1))
                    yield outcome
        except BaseException:  # stopped, interrupted or abandoned: busy workers are stopped, idle ones kept
            for worker, _, _ in running.values():
                self._retire(worker)
            raise

    def _workers_for(self, model_name: str, resources: dict, count: int) -> list:
        """``count`` workers holding ``model_name``: kept from the previous map when they match, else new."""
        key = (model_name, tuple(sorted(resources.items())))
        if key != self._worker_key:
            self.release()
            self._worker_key = key
        while len(self._workers) < count:
            self._spawn(model_name, resources)
        self._wait_loaded(self._workers, model_name)
        return list(self._workers[:count])

    def release(self) -> None:
        """Stop this executor's workers (their CPUs, GPUs and memory go back to Ray); Ray itself keeps running."""
        for worker in list(self._workers):
            self._retire(worker)
        self._worker_key = None

    def _wait_loaded(self, workers: list, model_name: str) -> None:
        """Fail fast, with the worker's reason, when the model cannot load on a worker."""
        ray = _ray()
        try:
            ray.get([self._pid_refs[w] for w in workers])
        except ray.exceptions.RayError as exc:
            self.release()
            raise ValueError(f"a Ray worker could not load {model_name!r}: {_cause(exc)}") from None

    def _collect(self, ref, index: int, attempt: int) -> tuple[Outcome, bool]:
        """The Outcome of a finished call, and whether its worker is still alive."""
        ray = _ray()
        retry = attempt <= RETRIES
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:     # the task raised; the worker is fine
            return Outcome(index, None, _cause(exc), attempt, retry, "ray worker"), True
        except ray.exceptions.RayError as exc:         # the worker died: killed, out of memory, node lost
            return Outcome(index, None, f"worker died: {_cause(exc)}", attempt, retry, "ray worker"), False
        return Outcome(index, value["result"], "", attempt, False, f"ray worker pid {value['pid']}"), True


def _cause(exc: BaseException) -> str:
    """One line: the original exception inside Ray's wrapper when there is one."""
    cause = getattr(exc, "cause", None) or exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    return f"{type(cause).__name__}: {text}"[:300]
