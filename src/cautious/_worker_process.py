"""One framework per process: the job protocol shared by ``cautious compare`` and ``cautious research``.

The parent writes a job as JSON, starts ``python -m <module> --worker job.json out.json`` with the
framework's environment (:func:`worker_env`), and reads the result JSON back; the worker module
ends with ``sys.exit(serve(worker))``. Frameworks never share a process (TensorFlow aborts when it
is imported before triton or torch's inductor; JAX's float64 switch is per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["worker_env", "start_worker", "finish_worker", "run_worker", "serve", "caution_from", "framework_version"]

#: Environment variables that make BLAS/OpenMP/XLA/TensorFlow use one thread.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}


def worker_env(framework: str, dtype: str | None, *, one_thread: bool = False) -> dict[str, str]:
    """The environment a worker for ``framework`` runs in (float64 JAX needs ``JAX_ENABLE_X64``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if one_thread:
        env.update(ONE_THREAD)
    if framework == "jax":
        env["JAX_ENABLE_X64"] = "1" if dtype == "float64" else "0"
    if framework == "tensorflow":
        env["KERAS_BACKEND"] = "tensorflow"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def start_worker(
    module: str, name: str, job: dict[str, Any], tmp: str, *, one_thread: bool = False, **popen: Any
) -> tuple[subprocess.Popen, str]:
    """Write ``job`` to ``tmp/<name>.job.json`` and start its worker; returns the process and the result path."""
    inp, out = os.path.join(tmp, f"{name}.job.json"), os.path.join(tmp, f"{name}.out.json")
    with open(inp, "w") as f:
        json.dump(job, f)
    env = worker_env(job.get("framework", name), job.get("dtype"), one_thread=one_thread)
    proc = subprocess.Popen([sys.executable, "-m", module, "--worker", inp, out], env=env, **popen)
    return proc, out


def finish_worker(proc: subprocess.Popen, out: str) -> tuple[dict[str, Any] | None, str]:
    """Wait for a worker; its result, or None and why not (the worker's one-line error when it wrote one)."""
    code = proc.wait()
    if not os.path.exists(out):
        return None, f"worker exited with status {code}"
    with open(out) as f:
        res = json.load(f)
    if "error" in res or code != 0:
        return None, res.get("error", f"worker exited with status {code}")
    return res, ""


def run_worker(module: str, name: str, job: dict[str, Any], tmp: str) -> tuple[dict[str, Any] | None, str]:
    """Run one worker to completion, its output going to this process's stdout/stderr."""
    return finish_worker(*start_worker(module, name, job, tmp))


def serve(
    worker: Callable[[dict[str, Any]], dict[str, Any]], argv: list[str] | None = None, *, traceback: bool = False
) -> int | str:
    """The worker side: ``--worker job.json out.json`` -> ``worker(job)`` written to ``out.json``.

    An exception is written as ``{"error": "<type>: <first line>"}`` (exit status 1) for the parent
    to print as one line; ``traceback=True`` also prints the traceback to stderr (a log file).
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "--worker":
        return "usage: python -m <worker module> --worker job.json out.json"
    with open(argv[1]) as fh:
        job = json.load(fh)
    try:
        result = worker(job)
    except Exception as e:
        if traceback:
            import traceback as tb

            tb.print_exc()
        result = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    with open(argv[2], "w") as fh:
        json.dump(result, fh)
    return 1 if "error" in result else 0


def caution_from(config: dict[str, Any] | None) -> Any:
    """A job's caution entry (keyword arguments of ``Caution`` or None) as the optimizers' argument."""
    from cautious._caution import Caution

    return Caution(**config) if config else False


def framework_version(framework: str) -> str:
    """The imported framework's ``__version__`` (``"?"`` when it is not imported)."""
    return str(getattr(sys.modules.get(framework), "__version__", "?"))
