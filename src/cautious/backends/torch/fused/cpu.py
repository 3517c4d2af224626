r"""The CPU fast path of the fused cautious update: build, load and call the native kernel.

``cpu_kernel.cpp`` (package data next to this module; no torch headers) is compiled on first use
with the system C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``; ``-O3 -march=native``),
one shared object per (parameter, state) storage-dtype pair, cached under ``$CAUTIOUS_CACHE_DIR``
(default ``~/.cache/cautious``) under a key that hashes the source text, the compiler, the CPU
and the flags (so an edited or upgraded kernel is rebuilt), and called through :mod:`ctypes`
with a pointer table and a :class:`~.contract.CpuArgs` block. Per call: with several threads
(``torch.get_num_threads()``, at most one per 65536 entries), every tensor is cut into pieces of
at most 65536 entries and each thread owns a contiguous run of pieces (an equal share of all
entries): count pass over its pieces, ONE barrier for the whole call, update pass over the same
pieces in reverse order; with one thread each tensor is counted then updated at once. Counts
are int64; every result is rounded once to its storage dtype (bfloat16 by integer
round-to-nearest-even, or stochastic rounding).

The threads are an OpenMP team (``-fopenmp``) when torch's own ``libgomp.so.1`` is the one GNU
OpenMP runtime mapped in the process and loading the kernel maps no other: the loader binds
the kernel to torch's runtime, so it reuses torch's worker pool instead of competing with its
spinning workers. Otherwise (no such runtime, ``-fopenmp`` fails, or
``CAUTIOUS_FUSED_CPU=threads``) the same split runs on std::threads started per call. The
choice is made at build time (the flags are part of the cache key); results are identical.

A build says so once, with its seconds and the cache directory (a ``UserWarning``: the first
step of an optimizer that defaults to this path pays it); :func:`build` (public as
:func:`cautious.torch.build_fused`, and ``cautious build`` on the command line) prebuilds.

Without a compiler (or for a dtype pair the native code does not cover, or
``CAUTIOUS_FUSED_CPU=eager``), :func:`run` uses :mod:`.eager`, the same math per tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

import numpy as np
import torch

from cautious.backends.torch.fused import eager
from cautious.backends.torch.fused.contract import STORAGE, CpuArgs, Launch, Slot

__all__ = ["run", "native_available", "build", "source"]

#: (param, state) storage pairs with native code, and their compute type; anything else runs eagerly.
NATIVE_PAIRS = {
    (0, 0): "float",
    (1, 1): "double",
    (2, 0): "float",
    (3, 0): "float",
    (2, 2): "float",
    (3, 3): "float",
}
_NAMES = {0: "float32", 1: "float64", 2: "bfloat16", 3: "float16"}
_PAIR_NAMES = {(pc, sc): _NAMES[pc] if pc == sc else f"{_NAMES[pc]} with {_NAMES[sc]} state" for pc, sc in NATIVE_PAIRS}
PIECE = 1 << 16  # entries per piece of work (and per thread at least)
_FLAGS = [
    "-std=c++17",
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fPIC",
    "-shared",
    "-pthread",
]


def source() -> str:
    """The C++ kernel's source text (package data ``cpu_kernel.cpp``)."""
    return importlib.resources.files(__package__).joinpath("cpu_kernel.cpp").read_text(encoding="utf-8")


_libs: dict = {}
_step_fns: list = []  # cautious_increment_steps of every loaded kernel (any one will do)
_lock = threading.Lock()
_warned = False


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> str:
    base = os.environ.get("CAUTIOUS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cautious")
    path = os.path.join(base, "fused_cpu")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = os.path.join(tempfile.gettempdir(), f"cautious-fused-cpu-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(path, exist_ok=True)
    return path


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _gomp_mapped() -> set[str]:
    """Paths of the GNU OpenMP runtimes mapped into this process (empty where /proc is missing)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return set()
    return {x for x in paths if os.path.basename(x).startswith("libgomp")}


def _build(pc: int, sc: int):
    """Compile (once, cached on disk) and load the shared object for one dtype pair; None on failure.

    The OpenMP build is used only when exactly one ``libgomp.so.1`` (torch's) is already mapped and
    loading ours maps no other: the loader then binds ours to torch's runtime and its thread pool.
    Otherwise (or if ``-fopenmp`` fails, or ``CAUTIOUS_FUSED_CPU=threads``) the std::thread build.
    """
    cxx = _compiler()
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gomp = _gomp_mapped()
    if (
        os.environ.get("CAUTIOUS_FUSED_CPU", "") != "threads"
        and len(gomp) == 1
        and os.path.basename(next(iter(gomp))) == "libgomp.so.1"
    ):
        fn = _compile_and_load(cxx, version, pc, sc, ["-fopenmp"], quiet=True)
        if fn is not None and _gomp_mapped() == gomp:
            return fn
    return _compile_and_load(cxx, version, pc, sc, [], quiet=False)


def _compile_and_load(cxx: str, version: str, pc: int, sc: int, extra: list[str], *, quiet: bool):
    defs = [f"-DCAUTIOUS_PC={pc}", f"-DCAUTIOUS_SC={sc}", f"-DCAUTIOUS_CT={NATIVE_PAIRS[(pc, sc)]}"]
    flags = [*_FLAGS, *extra]
    text = source()
    key = hashlib.sha256("\0".join([text, cxx, version, _cpu_id(), *flags, *defs]).encode()).hexdigest()[:20]
    directory = _cache_dir()
    so = os.path.join(directory, f"cautious_fused_{pc}{sc}_{key}.so")
    if not os.path.exists(so):
        src = os.path.join(directory, f"cautious_fused_{key}.cpp")
        with open(src + f".{os.getpid()}", "w") as f:
            f.write(text)
        os.replace(src + f".{os.getpid()}", src)
        tmp = so + f".{os.getpid()}.tmp"
        start = time.perf_counter()
        proc = subprocess.run([cxx, *flags, *defs, src, "-o", tmp], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            if not quiet:
                warnings.warn(
                    f"cautious: building the native fused CPU kernel failed; using the eager "
                    f"fallback.\n{proc.stderr[-2000:]}",
                    RuntimeWarning,
                    stacklevel=5,
                )
            return None
        os.replace(tmp, so)  # atomic: concurrent builders agree
        warnings.warn(
            f"cautious: compiled the native fused CPU kernel ({_PAIR_NAMES[(pc, sc)]}) once in {seconds:.1f} s; "
            f"cached in {directory}",
            UserWarning,
            stacklevel=5,
        )
    try:
        lib = ctypes.CDLL(so)
    except OSError:
        return None
    fn = lib.cautious_fused_run
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(CpuArgs)]
    steps = lib.cautious_increment_steps
    steps.restype = ctypes.c_int
    steps.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    _step_fns.append(steps)
    return fn


def _native(pc: int, sc: int):
    if os.environ.get("CAUTIOUS_FUSED_CPU", "") == "eager" or (pc, sc) not in NATIVE_PAIRS:
        return None
    with _lock:
        if (pc, sc) not in _libs:
            _libs[(pc, sc)] = _build(pc, sc)
        return _libs[(pc, sc)]


def native_available(dtype: torch.dtype = torch.float32, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the native kernel exists (building it if needed) for this dtype pair."""
    return _native(STORAGE[dtype], STORAGE[state_dtype or dtype]) is not None


def build() -> dict[str, bool]:
    """Build (or find in the cache) the native kernel for every supported dtype pair.

    Returns ``{"float32": True, "bfloat16 with float32 state": True, ...}``: whether each pair
    has native code now. A later first step then pays no compile time.
    """
    return {_PAIR_NAMES[pair]: _native(*pair) is not None for pair in NATIVE_PAIRS}


def increment_steps_(state_steps: list[torch.Tensor]) -> np.ndarray | None:
    """``step += 1`` in place for CPU float32 (or float64) scalar step tensors, in one native call.

    Returns the new values (float64), or ``None`` (nothing changed) when no kernel is loaded or
    the steps are not all one-element CPU tensors of one of those dtypes.
    """
    if not _step_fns or not state_steps:
        return None
    dtypes = {s.dtype for s in state_steps}
    if len(dtypes) != 1 or (dtype := dtypes.pop()) not in (torch.float32, torch.float64):
        return None
    if any(s.device.type != "cpu" or s.numel() != 1 or s.requires_grad for s in state_steps):
        return None
    ptrs = np.fromiter((s.data_ptr() for s in state_steps), dtype=np.int64, count=len(state_steps))
    out = np.empty(len(state_steps), dtype=np.float64)
    _step_fns[0](ptrs.ctypes.data, len(state_steps), STORAGE[dtype], out.ctypes.data)
    return out


def run(
    launch: Launch, params, grads, s1, s2, s3, *, native: bool = True, counts_out=None, scales=None, nonzero_out=None
) -> None:
    """One step over one dtype group of contiguous CPU tensors (``launch.hp[Slot.LR]`` is the lr).

    Sharded tensors, telemetry and ``denominator="nonzero"`` take two calls: with ``counts_out``
    (int64 zeros, one per tensor) only the count pass runs and writes the kept counts there (and
    the gradients' nonzero entries to ``nonzero_out`` when given); with ``scales`` (float64, one
    per tensor) the update pass runs with them instead of counting.
    """
    numels = [int(p.numel()) for p in params]
    total = sum(numels)
    if total == 0:
        return
    pc = STORAGE[params[0].dtype]
    state0 = next((x for x in (*s1, *s2, *s3) if x is not None), None)
    sc = STORAGE[state0.dtype] if state0 is not None else pc
    fn = _native(pc, sc) if native and STORAGE[grads[0].dtype] == pc else None
    if fn is not None:
        meta = np.zeros((len(params), 8), dtype=np.int64)
        for j, col in enumerate((params, grads, s1, s2, s3)):
            meta[:, j] = [0 if x is None else x.data_ptr() for x in col]
        meta[:, 5] = numels
        meta[:, 6] = np.arange(len(params))
        args = CpuArgs(
            rule=launch.rule,
            param_code=pc,
            state_code=sc,
            maximize=launch.maximize,
            coupled=launch.coupled,
            decoupled=launch.decoupled,
            cwd=launch.cwd,
            caution=launch.caution is not None,
            norm=launch.norm,
            exact_u=launch.exact_u,
            amsgrad=launch.amsgrad,
            first=launch.first,
            nesterov=launch.nesterov,
            has_momentum=launch.has_momentum,
            post_decay=launch.post_decay,
            stochastic_rounding=launch.stochastic_rounding,
            seed=int(launch.seed) & 0x7FFFFFFFFFFFFFFF,
            nthreads=max(1, min(torch.get_num_threads(), total // PIECE)),
            piece=PIECE,
            counts_out=0 if counts_out is None else counts_out.data_ptr(),
            scales_in=0 if scales is None else scales.data_ptr(),
            nonzero_out=0 if nonzero_out is None else nonzero_out.data_ptr(),
            lr=launch.hp[Slot.LR],
        )
        args.hp[:] = launch.hp
        if fn(meta.ctypes.data, len(params), ctypes.byref(args)) == 0:
            return
    global _warned
    if native and not _warned and os.environ.get("CAUTIOUS_FUSED_CPU", "") != "eager":
        _warned = True
        warnings.warn(
            "cautious: no native fused CPU kernel for this configuration; using the slower eager implementation",
            RuntimeWarning,
            stacklevel=4,
        )
    for i in range(len(params)):
        if not numels[i]:
            continue
        if counts_out is not None:
            counts_out[i] = eager.count(launch, params[i], grads[i], s1[i], s2[i], s3[i])
            if nonzero_out is not None:
                nonzero_out[i] = eager.nonzero(launch, params[i], grads[i], s1[i], s2[i], s3[i])
        else:
            scale = None if scales is None else float(scales[i])
            eager.step(launch, params[i], grads[i], s1[i], s2[i], s3[i], index=i, scale=scale)
