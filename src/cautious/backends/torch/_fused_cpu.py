r"""The CPU fast path of the fused cautious update: a native loop, or an exact eager fallback.

A small C++ source (below; no torch headers) is compiled on first use with the system C++
compiler (``$CXX``, else ``g++``/``c++``/``clang++``; ``-O3 -march=native``), one shared object
per (parameter, state) storage-dtype pair, cached under ``$CAUTIOUS_CACHE_DIR`` (default
``~/.cache/cautious``), and called through :mod:`ctypes` with a pointer table. Per call:
with several threads (``torch.get_num_threads()``, at most one per 65536 entries), every
tensor is cut into pieces of at most 65536 entries and each thread owns a contiguous run of
pieces (an equal share of all entries): count pass over its pieces, ONE barrier for the whole
call, update pass over the same pieces in reverse order; with one thread each tensor is
counted then updated at once. Counts are int64; every result is rounded
once to its storage dtype (bfloat16 by integer round-to-nearest-even, or stochastic rounding).

The threads are an OpenMP team (``-fopenmp``) when torch's own ``libgomp.so.1`` is the one GNU
OpenMP runtime mapped in the process and loading the kernel maps no other: the loader binds
the kernel to torch's runtime, so it reuses torch's worker pool instead of competing with its
spinning workers. Otherwise (no such runtime, ``-fopenmp`` fails, or
``CAUTIOUS_FUSED_CPU=threads``) the same split runs on std::threads started per call. The
choice is made at build time (the flags are part of the cache key); results are identical.

Without a compiler (or for a dtype pair the native code does not cover, or
``CAUTIOUS_FUSED_CPU=eager``), :func:`run` uses an eager torch implementation of the same
math, per tensor; it is exact but not fused.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import numpy as np
import torch

__all__ = ["run", "native_available"]

CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
#: (param, state) storage pairs with native code; anything else runs eagerly.
NATIVE_PAIRS = {
    (0, 0): "float",
    (1, 1): "double",
    (2, 0): "float",
    (3, 0): "float",
    (2, 2): "float",
    (3, 3): "float",
}
NORMS = {"mean_clamp": 0, "count_plus_one": 1, "exact": 2, "none": 3}
BIG = 1 << 16
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

SOURCE = r"""
// Fused cautious Adam / Lion / SGD for the CPU: a count pass then an update pass per tensor.
// Built once on first use by cautious.backends.torch._fused_cpu (g++ -O3 -march=native), loaded
// with ctypes: no torch headers. See cautious/spec for the algorithm; see _fused.py for the design.
// Built with -fopenmp (bound to torch's libgomp) when possible, else with std::thread (see drive).
//
// Storage codes: 0 float32, 1 float64, 2 bfloat16 (uint16 bit patterns, round to nearest even
// with integer operations), 3 float16 (_Float16, round to nearest even). Compute: float64 if any
// storage is float64, else float32. Counts are int64 (int32 partial sums over 2**20 entries).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

template <int CODE> struct Io;
template <> struct Io<0> {
  template <typename CT> static inline CT ld(const void* p, int64_t i) { return (CT)((const float*)p)[i]; }
  template <typename CT> static inline void st(void* p, int64_t i, CT x, uint32_t) {
    ((float*)p)[i] = (float)x;
  }
};
template <> struct Io<1> {
  template <typename CT> static inline CT ld(const void* p, int64_t i) { return (CT)((const double*)p)[i]; }
  template <typename CT> static inline void st(void* p, int64_t i, CT x, uint32_t) {
    ((double*)p)[i] = (double)x;
  }
};
template <> struct Io<2> {
  template <typename CT> static inline CT ld(const void* p, int64_t i) {
    uint32_t b = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return (CT)f;
  }
  // rnd: 0xFFFFFFFF = round to nearest even; else the 16 random bits of stochastic rounding
  template <typename CT> static inline void st(void* p, int64_t i, CT x, uint32_t rnd) {
    float f = (float)x;
    uint32_t b;
    std::memcpy(&b, &f, 4);
    uint32_t rne = b + 0x7FFFu + ((b >> 16) & 1u);
    uint32_t r = rnd == 0xFFFFFFFFu ? rne : b + rnd;
    r = ((r & 0x7F800000u) == 0x7F800000u) ? rne : r;  // stochastic rounding never overflows to inf
    r = (f != f) ? (b | 0x400000u) : r;                 // NaN stays NaN
    ((uint16_t*)p)[i] = (uint16_t)(r >> 16);
  }
};
template <> struct Io<3> {
  template <typename CT> static inline CT ld(const void* p, int64_t i) { return (CT)((const _Float16*)p)[i]; }
  template <typename CT> static inline void st(void* p, int64_t i, CT x, uint32_t) {
    ((_Float16*)p)[i] = (_Float16)x;
  }
};

struct Task {
  void* p;
  const void* g;
  void* s1;
  void* s2;
  void* s3;
  int64_t n;
  int64_t index;  // position in the caller's list (random stream)
};

struct Ctx {
  const double* hp;
  int maximize, decoupled, cwd, caution, norm, nesterov, sr;
  uint64_t seed;
  double lr;
};

template <typename CT> static inline bool keep(CT u, CT g) {
  return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | (u != u) | (g != g);
}

template <typename CT> static inline CT nanmax(CT a, CT b) {  // np.maximum: NaN if either is NaN
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

static inline uint32_t rand16(uint64_t seed, uint64_t stream, uint64_t tensor, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + (stream << 60) + (tensor << 44) + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (uint32_t)(z & 0xFFFFu);
}

double scale_of(int64_t count, int64_t n, int norm, double floor_) {
  if (n <= 0) return 1.0;
  double k = (double)count, nf = (double)n;
  if (norm == 0) return 1.0 / (k / nf > floor_ ? k / nf : floor_);
  if (norm == 1) return nf / (k + 1.0);
  if (norm == 2) return nf / (k > 1.0 ? k : 1.0);
  return 1.0;
}

// RULE 0 adam, 1 lion, 2 sgd. Structural flags (what is read) are template parameters.
template <typename CT, int PC, int SC, int RULE, bool AMS, bool EXACT, bool COUPLED, bool HASM, bool FIRST,
          bool NEST, bool CWD>
struct Kernel {
  static int64_t count(const Task& t, int64_t s, int64_t e, const Ctx& c) {
    const CT gsign = c.maximize ? CT(-1) : CT(1);
    const CT wdc = (CT)c.hp[0], h1 = (CT)c.hp[1], h2 = (CT)c.hp[2], h3 = (CT)c.hp[3], h4 = (CT)c.hp[4];
    const CT eps = (CT)c.hp[5], A = (CT)c.hp[6], B = (CT)c.hp[7], C = (CT)c.hp[8];
    auto one = [&](int64_t i) -> int32_t {
      CT g = gsign * Io<PC>::template ld<CT>(t.g, i);
      if constexpr (COUPLED) g = g + wdc * Io<PC>::template ld<CT>(t.p, i);
      CT d;
      if constexpr (RULE == 0) {
        d = h1 * Io<SC>::template ld<CT>(t.s1, i) + h2 * g;
        if constexpr (EXACT) {
          CT v = h3 * Io<SC>::template ld<CT>(t.s2, i) + h4 * (g * g);
          if constexpr (AMS) v = nanmax(Io<SC>::template ld<CT>(t.s3, i), v);
          d = C * ((d * A) / (std::sqrt(v) * B + eps));
        }
      } else if constexpr (RULE == 1) {
        d = h1 * Io<SC>::template ld<CT>(t.s1, i) + h2 * g;
      } else {
        CT b;
        if constexpr (!HASM || FIRST) b = g;
        else b = h1 * Io<SC>::template ld<CT>(t.s1, i) + h2 * g;
        if constexpr (HASM && NEST) d = g + h1 * b;
        else d = b;
      }
      return (int32_t)keep(d, g);
    };
    // two halves of the range in one loop: twice the read streams in flight (memory-level
    // parallelism; the count pass is bound by read bandwidth). int32 partial sums over <= 2**20.
    const int64_t h = (e - s) / 2;
    int64_t total = 0;
    for (int64_t s0 = s; s0 < s + h; s0 += (int64_t)1 << 19) {
      const int64_t e0 = s + h < s0 + ((int64_t)1 << 19) ? s + h : s0 + ((int64_t)1 << 19);
      int32_t cnt = 0;
      for (int64_t i = s0; i < e0; ++i) cnt += one(i) + one(i + h);
      total += cnt;
    }
    for (int64_t i = s + 2 * h; i < e; ++i) total += one(i);
    return total;
  }

  static void update(const Task& t, int64_t s, int64_t e, CT step, CT lr_wd, const Ctx& c) {
    const CT gsign = c.maximize ? CT(-1) : CT(1);
    const CT wdc = (CT)c.hp[0], h1 = (CT)c.hp[1], h2 = (CT)c.hp[2], h3 = (CT)c.hp[3], h4 = (CT)c.hp[4];
    const CT eps = (CT)c.hp[5], A = (CT)c.hp[6], B = (CT)c.hp[7], C = (CT)c.hp[8];
    // loop-invariant flags are integer masks combined with per-entry masks: a ternary (or |) on an
    // invariant bool becomes a branch in the loop and stops gcc from vectorizing it
    const uint32_t nocaution = c.caution ? 0u : ~0u, nodec = c.decoupled ? 0u : ~0u;
    const uint32_t nosr = c.sr ? 0u : 0xFFFFFFFFu;
    const uint64_t seed = c.seed, ti = (uint64_t)t.index;
    for (int64_t i = s; i < e; ++i) {
      const uint64_t ui = (uint64_t)i;
      CT p = Io<PC>::template ld<CT>(t.p, i);
      CT g = gsign * Io<PC>::template ld<CT>(t.g, i);
      if constexpr (COUPLED) g = g + wdc * p;
      CT u;
      bool k;
      if constexpr (RULE == 0) {
        CT mn = h1 * Io<SC>::template ld<CT>(t.s1, i) + h2 * g;
        CT vn = h3 * Io<SC>::template ld<CT>(t.s2, i) + h4 * (g * g);
        CT vu = vn;
        if constexpr (AMS) {
          vu = nanmax(Io<SC>::template ld<CT>(t.s3, i), vn);
          Io<SC>::template st<CT>(t.s3, i, vu, rand16(seed, 3, ti, ui) | nosr);
        }
        u = C * ((mn * A) / (std::sqrt(vu) * B + eps));
        k = EXACT ? keep(u, g) : keep(mn, g);  // sign(u) == sign(m_new): the count pass's test
        Io<SC>::template st<CT>(t.s1, i, mn, rand16(seed, 1, ti, ui) | nosr);
        Io<SC>::template st<CT>(t.s2, i, vn, rand16(seed, 2, ti, ui) | nosr);
      } else if constexpr (RULE == 1) {
        CT m = Io<SC>::template ld<CT>(t.s1, i);
        CT cc = h1 * m + h2 * g;
        u = cc > 0 ? CT(1) : (cc < 0 ? CT(-1) : (cc != cc ? cc : CT(0)));
        k = keep(cc, g);
        Io<SC>::template st<CT>(t.s1, i, h3 * m + h4 * g, rand16(seed, 1, ti, ui) | nosr);
      } else {
        CT b;
        if constexpr (!HASM || FIRST) b = g;
        else b = h1 * Io<SC>::template ld<CT>(t.s1, i) + h2 * g;
        if constexpr (HASM && NEST) u = g + h1 * b;
        else u = b;
        k = keep(u, g);
        if constexpr (HASM) Io<SC>::template st<CT>(t.s1, i, b, rand16(seed, 1, ti, ui) | nosr);
      }
      CT uc = ((0u - (uint32_t)k) | nocaution) ? u : CT(0);
      uint32_t zero_d = nodec;  // no decoupled decay: lr_wd * 0 = 0 and p - 0 = p exactly
      if constexpr (CWD) zero_d |= 0u - (uint32_t)(((uc > 0) & (p < 0)) | ((uc < 0) & (p > 0)));
      CT d = zero_d ? CT(0) : p;
      CT pn = (p - lr_wd * d) - step * uc;
      Io<PC>::template st<CT>(t.p, i, pn, rand16(seed, 0, ti, ui) | nosr);
    }
  }
};

struct Barrier {  // spin briefly, then yield: the machine may be shared
  std::atomic<int> arrived{0};
  std::atomic<int> gen{0};
  int n;
  explicit Barrier(int n_) : n(n_) {}
  void wait() {
    int g = gen.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spin = 0; gen.load(std::memory_order_acquire) == g; ++spin) {
      if (spin < 2000) __builtin_ia32_pause();
      else std::this_thread::yield();
    }
  }
};

template <class K, typename CT>
void drive(std::vector<Task>& tasks, const Ctx& c, int nthreads, int64_t big) {
  const bool need_count = c.caution && c.norm != 3;
  const double floor_ = c.hp[15], lr_wd = c.lr * c.hp[13];
  const int T = (int)tasks.size();
  std::vector<std::atomic<int64_t>> counts(tasks.size());
  for (auto& x : counts) x.store(0);
  auto step_of = [&](int i) {
    double s = need_count ? scale_of(counts[i].load(std::memory_order_relaxed), tasks[i].n, c.norm, floor_) : 1.0;
    return (CT)(c.lr * s);
  };
  if (nthreads <= 1) {  // one thread: each tensor counted then updated at once (its g, m still cached)
    for (int i = 0; i < T; ++i) {
      if (need_count) counts[i].store(K::count(tasks[i], 0, tasks[i].n, c));
      K::update(tasks[i], 0, tasks[i].n, step_of(i), (CT)lr_wd, c);
    }
    return;
  }
  // Several threads: every tensor is cut into pieces of at most `big` entries (starts aligned to
  // 64 entries); thread tid owns a contiguous run of pieces holding ~1/nthreads of all entries.
  // Count pass over all its pieces, ONE barrier (every count is then complete), update pass over
  // the same pieces in reverse order (the last pieces counted are still in this core's cache).
  struct Piece {
    int task;
    int64_t s, e;
  };
  const int64_t step_n = big > 64 ? (big + 63) & ~(int64_t)63 : 64;
  std::vector<Piece> pieces;
  int64_t total = 0;
  for (int i = 0; i < T; ++i) {
    for (int64_t s = 0; s < tasks[i].n; s += step_n)
      pieces.push_back(Piece{i, s, s + step_n < tasks[i].n ? s + step_n : tasks[i].n});
    total += tasks[i].n;
  }
  std::vector<size_t> lo((size_t)nthreads + 1, pieces.size());
  lo[0] = 0;
  {
    int64_t acc = 0;
    int next = 1;
    for (size_t k = 0; k < pieces.size() && next < nthreads; ++k) {
      while (next < nthreads && acc >= (total * next) / nthreads) lo[(size_t)next++] = k;
      acc += pieces[k].e - pieces[k].s;
    }
  }
  auto count_share = [&](int w) {
    for (size_t k = lo[(size_t)w]; k < lo[(size_t)w + 1]; ++k) {
      const Piece& q = pieces[k];
      counts[q.task].fetch_add(K::count(tasks[q.task], q.s, q.e, c), std::memory_order_relaxed);
    }
  };
  auto update_share = [&](int w) {
    for (size_t k = lo[(size_t)w + 1]; k > lo[(size_t)w]; --k) {
      const Piece& q = pieces[k - 1];
      K::update(tasks[q.task], q.s, q.e, step_of(q.task), (CT)lr_wd, c);
    }
  };
#ifdef _OPENMP
  // One team from the OpenMP runtime torch already loaded (the same libgomp, so the same idle
  // worker pool: no second set of threads spinning against torch's). Share w = tid is this
  // thread's; if the runtime grants fewer threads, each takes shares tid, tid + nt, ... (the
  // results do not depend on who runs a share: counts are integer sums, updates are per entry).
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    if (need_count) {
      for (int w = tid; w < nthreads; w += nt) count_share(w);
#pragma omp barrier
    }
    for (int w = tid; w < nthreads; w += nt) update_share(w);
  }
#else
  Barrier bar(nthreads);
  auto work = [&](int tid) {
    if (need_count) {
      count_share(tid);
      bar.wait();  // acq_rel: every thread's counts are visible after it
    }
    update_share(tid);
  };
  std::vector<std::thread> threads;
  for (int tid = 1; tid < nthreads; ++tid) threads.emplace_back(work, tid);
  work(0);
  for (auto& th : threads) th.join();
#endif
}

template <typename CT, int PC, int SC, int RULE, bool AMS, bool EXACT, bool COUPLED, bool HASM, bool FIRST,
          bool NEST, bool CWD>
void go(std::vector<Task>& tasks, const Ctx& c, int nthreads, int64_t big) {
  drive<Kernel<CT, PC, SC, RULE, AMS, EXACT, COUPLED, HASM, FIRST, NEST, CWD>, CT>(tasks, c, nthreads, big);
}

template <typename CT, int PC, int SC>
int by_rule(int rule, bool ams, bool exact, bool coupled, bool hasm, bool first, bool nest, bool cwd,
            std::vector<Task>& tasks, const Ctx& c, int nthreads, int64_t big) {
  // every (rule, structural flags) combination, spelled out: template arguments must be constants
#define CAUTIOUS_GO(...) return go<CT, PC, SC, __VA_ARGS__>(tasks, c, nthreads, big), 0
  if (rule == 0 && cwd == false && ams == false && exact == false && coupled == false)
    CAUTIOUS_GO(0, false, false, false, true, false, false, false);
  if (rule == 0 && cwd == false && ams == false && exact == false && coupled == true)
    CAUTIOUS_GO(0, false, false, true, true, false, false, false);
  if (rule == 0 && cwd == false && ams == false && exact == true && coupled == false)
    CAUTIOUS_GO(0, false, true, false, true, false, false, false);
  if (rule == 0 && cwd == false && ams == false && exact == true && coupled == true)
    CAUTIOUS_GO(0, false, true, true, true, false, false, false);
  if (rule == 0 && cwd == false && ams == true && exact == false && coupled == false)
    CAUTIOUS_GO(0, true, false, false, true, false, false, false);
  if (rule == 0 && cwd == false && ams == true && exact == false && coupled == true)
    CAUTIOUS_GO(0, true, false, true, true, false, false, false);
  if (rule == 0 && cwd == false && ams == true && exact == true && coupled == false)
    CAUTIOUS_GO(0, true, true, false, true, false, false, false);
  if (rule == 0 && cwd == false && ams == true && exact == true && coupled == true)
    CAUTIOUS_GO(0, true, true, true, true, false, false, false);
  if (rule == 1 && cwd == false) CAUTIOUS_GO(1, false, false, false, true, false, false, false);
  if (rule == 2 && cwd == false && !hasm && coupled == false)
    CAUTIOUS_GO(2, false, false, false, false, true, false, false);
  if (rule == 2 && cwd == false && hasm && coupled == false && first == false && nest == false)
    CAUTIOUS_GO(2, false, false, false, true, false, false, false);
  if (rule == 2 && cwd == false && hasm && coupled == false && first == false && nest == true)
    CAUTIOUS_GO(2, false, false, false, true, false, true, false);
  if (rule == 2 && cwd == false && hasm && coupled == false && first == true && nest == false)
    CAUTIOUS_GO(2, false, false, false, true, true, false, false);
  if (rule == 2 && cwd == false && hasm && coupled == false && first == true && nest == true)
    CAUTIOUS_GO(2, false, false, false, true, true, true, false);
  if (rule == 2 && cwd == false && !hasm && coupled == true)
    CAUTIOUS_GO(2, false, false, true, false, true, false, false);
  if (rule == 2 && cwd == false && hasm && coupled == true && first == false && nest == false)
    CAUTIOUS_GO(2, false, false, true, true, false, false, false);
  if (rule == 2 && cwd == false && hasm && coupled == true && first == false && nest == true)
    CAUTIOUS_GO(2, false, false, true, true, false, true, false);
  if (rule == 2 && cwd == false && hasm && coupled == true && first == true && nest == false)
    CAUTIOUS_GO(2, false, false, true, true, true, false, false);
  if (rule == 2 && cwd == false && hasm && coupled == true && first == true && nest == true)
    CAUTIOUS_GO(2, false, false, true, true, true, true, false);
  if (rule == 0 && cwd == true && ams == false && exact == false && coupled == false)
    CAUTIOUS_GO(0, false, false, false, true, false, false, true);
  if (rule == 0 && cwd == true && ams == false && exact == true && coupled == false)
    CAUTIOUS_GO(0, false, true, false, true, false, false, true);
  if (rule == 0 && cwd == true && ams == true && exact == false && coupled == false)
    CAUTIOUS_GO(0, true, false, false, true, false, false, true);
  if (rule == 0 && cwd == true && ams == true && exact == true && coupled == false)
    CAUTIOUS_GO(0, true, true, false, true, false, false, true);
  if (rule == 1 && cwd == true) CAUTIOUS_GO(1, false, false, false, true, false, false, true);
  if (rule == 2 && cwd == true && !hasm && coupled == false)
    CAUTIOUS_GO(2, false, false, false, false, true, false, true);
  if (rule == 2 && cwd == true && hasm && coupled == false && first == false && nest == false)
    CAUTIOUS_GO(2, false, false, false, true, false, false, true);
  if (rule == 2 && cwd == true && hasm && coupled == false && first == false && nest == true)
    CAUTIOUS_GO(2, false, false, false, true, false, true, true);
  if (rule == 2 && cwd == true && hasm && coupled == false && first == true && nest == false)
    CAUTIOUS_GO(2, false, false, false, true, true, false, true);
  if (rule == 2 && cwd == true && hasm && coupled == false && first == true && nest == true)
    CAUTIOUS_GO(2, false, false, false, true, true, true, true);
#undef CAUTIOUS_GO
  return -1;
}

}  // namespace

// meta: T rows of 8 int64 (p, g, s1, s2, s3, numel, index, unused).
// iflags: rule, pc, sc, maximize, coupled, decoupled, cwd, caution, norm, exact_u, amsgrad,
//         (unused), first, nesterov, has_momentum, sr, seed, nthreads, big.
// hp: 16 float64 hyperparameters (see _fused.py); lr passed separately.
// Returns 0, or -1 for an unsupported dtype pair (the caller falls back).
extern "C" int cautious_fused_run(const int64_t* meta, int64_t T, const double* hp, double lr,
                                  const int64_t* f) {
  std::vector<Task> tasks;
  tasks.reserve((size_t)T);
  for (int64_t r = 0; r < T; ++r) {
    const int64_t* m = meta + 8 * r;
    if (m[5] <= 0) continue;
    tasks.push_back(Task{(void*)m[0], (const void*)m[1], (void*)m[2], (void*)m[3], (void*)m[4], m[5], m[6]});
  }
  if (tasks.empty()) return 0;
  Ctx c{hp, (int)f[3], (int)f[5], (int)f[6], (int)f[7], (int)f[8], (int)f[13], (int)f[15],
        (uint64_t)f[16], lr};
  const int rule = (int)f[0], pc = (int)f[1], sc = (int)f[2];
  const bool coupled = f[4], exact = f[9], ams = f[10], first = f[12], hasm = f[14];
  int nthreads = (int)f[17];
  if (nthreads < 1) nthreads = 1;
  const int64_t big = f[18];
  // one dtype pair per shared object (compiled on demand: compile time grows with instantiations)
  if (pc == CAUTIOUS_PC && sc == CAUTIOUS_SC)
    return by_rule<CAUTIOUS_CT, CAUTIOUS_PC, CAUTIOUS_SC>(rule, ams, exact, coupled, hasm, first, (bool)f[13],
                                                          (bool)f[6], tasks, c, nthreads, big);
  return -1;
}
"""

_libs: dict = {}
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
    key = hashlib.sha256("\0".join([SOURCE, cxx, version, _cpu_id(), *flags, *defs]).encode()).hexdigest()[:20]
    directory = _cache_dir()
    so = os.path.join(directory, f"cautious_fused_{pc}{sc}_{key}.so")
    if not os.path.exists(so):
        src = os.path.join(directory, f"cautious_fused_{key}.cpp")
        with open(src + f".{os.getpid()}", "w") as f:
            f.write(SOURCE)
        os.replace(src + f".{os.getpid()}", src)
        tmp = so + f".{os.getpid()}.tmp"
        proc = subprocess.run([cxx, *flags, *defs, src, "-o", tmp], capture_output=True, text=True)
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
    try:
        lib = ctypes.CDLL(so)
    except OSError:
        return None
    fn = lib.cautious_fused_run
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_void_p]
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
    return _native(CODES[dtype], CODES[state_dtype or dtype]) is not None


def run(
    rule,
    params,
    grads,
    s1,
    s2,
    s3,
    *,
    native: bool = True,
    hp,
    caution,
    maximize,
    coupled,
    decoupled,
    cwd,
    exact_u=False,
    amsgrad=False,
    corrected=True,
    first=False,
    nesterov=False,
    has_momentum=True,
    stochastic_rounding=False,
    seed=0,
) -> None:
    """One step over one dtype group of CPU tensors (same arguments as ``_fused_triton.run``)."""
    numels = [int(p.numel()) for p in params]
    total = sum(numels)
    if total == 0:
        return
    pc = CODES[params[0].dtype]
    state0 = next((x for x in (*s1, *s2, *s3) if x is not None), None)
    sc = CODES[state0.dtype] if state0 is not None else pc
    hp = [float(x) for x in hp]
    if caution is not None:
        hp[15] = caution.floor
    if rule == 0:  # unified Adam form: u = C * ((m * A) / (sqrt(v) * B + eps))
        hp[6], hp[7], hp[8] = (hp[6], hp[7], 1.0) if corrected else (1.0, 1.0, hp[8])
    fn = _native(pc, sc) if native and CODES[grads[0].dtype] == pc else None
    if fn is not None:
        meta = np.zeros((len(params), 8), dtype=np.int64)
        for j, col in enumerate((params, grads, s1, s2, s3)):
            meta[:, j] = [0 if x is None else x.data_ptr() for x in col]
        meta[:, 5] = numels
        meta[:, 6] = np.arange(len(params))
        nthreads = max(1, min(torch.get_num_threads(), total // BIG))
        flags = np.array(
            [
                rule,
                pc,
                sc,
                maximize,
                coupled,
                decoupled,
                cwd,
                caution is not None,
                NORMS[caution.normalize] if caution is not None else 3,
                exact_u,
                amsgrad,
                0,
                first,
                nesterov,
                has_momentum,
                stochastic_rounding,
                int(seed) & 0x7FFFFFFFFFFFFFFF,
                nthreads,
                BIG,
            ],
            dtype=np.int64,
        )
        hp_arr = np.asarray(hp, dtype=np.float64)
        rc = fn(meta.ctypes.data, len(params), hp_arr.ctypes.data, hp[14], flags.ctypes.data)
        if rc == 0:
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
        if numels[i]:
            _eager(
                rule,
                params[i],
                grads[i],
                s1[i],
                s2[i],
                s3[i],
                hp=hp,
                caution=caution,
                maximize=maximize,
                coupled=coupled,
                decoupled=decoupled,
                cwd=cwd,
                exact_u=exact_u,
                amsgrad=amsgrad,
                first=first,
                nesterov=nesterov,
                has_momentum=has_momentum,
                stochastic_rounding=stochastic_rounding,
                seed=seed,
                index=i,
            )


def _round_store(dst: torch.Tensor, x: torch.Tensor, sr: bool, gen: torch.Generator | None) -> None:
    """Round the compute-dtype ``x`` once into ``dst`` (torch casts round to nearest even)."""
    if sr and dst.dtype == torch.bfloat16:
        x32 = x.to(torch.float32)
        bits = x32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        r = torch.randint(0, 1 << 16, bits.shape, generator=gen, dtype=torch.int64)
        rne = bits + 0x7FFF + ((bits >> 16) & 1)
        out = bits + r
        out = torch.where((out & 0x7F800000) == 0x7F800000, rne, out)
        out = torch.where(torch.isnan(x32), bits | 0x400000, out)
        hi = ((out >> 16) & 0xFFFF).to(torch.int32)
        hi = torch.where(hi >= 1 << 15, hi - (1 << 16), hi).to(torch.int16)
        dst.copy_(hi.view(torch.bfloat16))
    else:
        dst.copy_(x)


def _keep(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | torch.isnan(u) | torch.isnan(g)


def _eager(
    rule,
    p,
    g,
    s1,
    s2,
    s3,
    *,
    hp,
    caution,
    maximize,
    coupled,
    decoupled,
    cwd,
    exact_u,
    amsgrad,
    first,
    nesterov,
    has_momentum,
    stochastic_rounding,
    seed,
    index,
) -> None:
    """The same math with torch ops on one tensor (compute float32, or float64 if anything is)."""
    dts = [x.dtype for x in (p, g, s1, s2, s3) if x is not None]
    ct = torch.float64 if torch.float64 in dts else torch.float32
    gen = None
    if stochastic_rounding:
        gen = torch.Generator().manual_seed((int(seed) * 1000003 + index) & 0x7FFFFFFFFFFFFFFF)
    pp = p.to(ct)
    gg = g.to(ct)
    if maximize:
        gg = -gg
    if coupled:
        gg = gg + hp[0] * pp
    if rule == 0:
        mn = hp[1] * s1.to(ct) + hp[2] * gg
        vn = hp[3] * s2.to(ct) + hp[4] * (gg * gg)
        vu = torch.maximum(s3.to(ct), vn) if amsgrad else vn
        u = hp[8] * ((mn * hp[6]) / (torch.sqrt(vu) * hp[7] + hp[5]))
        keep = _keep(u, gg) if exact_u else _keep(mn, gg)
        news = [(s1, mn), (s2, vn)] + ([(s3, vu)] if amsgrad else [])
    elif rule == 1:
        m = s1.to(ct)
        c = hp[1] * m + hp[2] * gg
        u = torch.where(torch.isnan(c), c, torch.sign(c))
        keep = _keep(c, gg)
        news = [(s1, hp[3] * m + hp[4] * gg)]
    else:
        if has_momentum:
            b = gg.clone() if first else hp[1] * s1.to(ct) + hp[2] * gg
            u = gg + hp[1] * b if nesterov else b
            news = [(s1, b)]
        else:
            u, news = gg, []
        keep = _keep(u, gg)
    step = hp[14]
    if caution is not None:
        if caution.normalize != "none":
            step = hp[14] * caution.scale(int(keep.sum()), int(p.numel()))
        u = torch.where(keep, u, torch.zeros((), dtype=ct))
    if decoupled:
        d = pp
        if cwd:
            d = torch.where(((u > 0) & (pp < 0)) | ((u < 0) & (pp > 0)), torch.zeros((), dtype=ct), pp)
        pn = (pp - (hp[14] * hp[13]) * d) - step * u
    else:
        pn = pp - step * u
    for dst, val in news:
        _round_store(dst, val, stochastic_rounding, gen)
    _round_store(p, pn, stochastic_rounding, gen)
