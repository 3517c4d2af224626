// Fused cautious Adam / Lion / SGD / NAdam / ADOPT / LaProp for the CPU: a count pass then an update pass per tensor.
//
// Built on first use by cautious.backends.torch.fused.cpu (g++ -O3 -march=native, one shared
// object per (parameter, state) storage pair), loaded with ctypes: no torch headers. The
// contract (rules, normalizations, hyperparameter slots, the argument block) is
// cautious/backends/torch/fused/contract.py; the enums and CpuArgs below mirror it field by
// field. See cautious/spec for the algorithm.
//
// Each base rule is a struct with ONE function, direction(), that computes the entry's
// direction u, its new state and the test value whose sign the mask reads; the count pass and
// the update pass both call it (the count pass keeps only the test: the compiler drops the
// rest, so it reads only what the test needs). Adding a rule = one struct + one dispatch line.
//
// Storage codes: 0 float32, 1 float64, 2 bfloat16 (uint16 bit patterns, round to nearest even
// with integer operations), 3 float16 (_Float16, round to nearest even). Compute: float64 if any
// storage is float64, else float32. Counts are int64 (int32 partial sums over 2**20 entries).
// Threads: an OpenMP team bound to torch's libgomp when built with -fopenmp, else std::thread.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// ---------------------------------------------------------------- the contract (contract.py)

enum Rule : int64_t { ADAM = 0, LION = 1, SGD = 2, NADAM = 3, ADOPT = 4, LAPROP = 5 };
enum Norm : int64_t { MEAN_CLAMP = 0, COUNT_PLUS_ONE = 1, EXACT = 2, NONE = 3 };
enum Slot : int {
  COUPLED_DECAY = 0,
  MIX1_OLD = 1,
  MIX1_NEW = 2,
  MIX2_OLD = 3,
  MIX2_NEW = 4,
  EPS = 5,
  ADAM_A = 6,
  ADAM_B = 7,
  ADAM_C = 8,
  DECOUPLED_DECAY = 9,
  LR = 10,
  FLOOR = 11,
  G_COEF = 12,
  M_COEF = 13,
  CLIP = 14,
  STEP_LR = 15,
  N_SLOTS = 16
};

struct CpuArgs {
  int64_t rule;
  int64_t param_code;
  int64_t state_code;
  int64_t maximize;
  int64_t coupled;
  int64_t decoupled;
  int64_t cwd;
  int64_t caution;
  int64_t norm;
  int64_t exact_u;
  int64_t amsgrad;
  int64_t first;
  int64_t nesterov;
  int64_t has_momentum;
  int64_t post_decay;
  int64_t stochastic_rounding;
  uint64_t seed;
  int64_t nthreads;
  int64_t piece;
  int64_t counts_out;  // address of int64[rows], or 0: run the count pass only, write the counts there
  int64_t scales_in;   // address of double[rows], or 0: the update pass alone, with these scales
  int64_t nonzero_out;  // with counts_out: address of int64[rows], or 0: also count g's nonzero entries there
  double lr;
  double hp[N_SLOTS];
};

// ---------------------------------------------------------------- storage

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

// Stochastic rounding: 16 random bits per (stream, tensor, entry); streams 0 p, 1 s1, 2 s2, 3 s3.
static inline uint32_t rand16(uint64_t seed, uint64_t stream, uint64_t tensor, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + (stream << 60) + (tensor << 44) + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (uint32_t)(z & 0xFFFFu);
}

struct Rounding {  // how stores round: nearest even (nosr = all ones) or stochastic
  uint64_t seed, tensor;
  uint32_t nosr;
  inline uint32_t operator()(uint64_t stream, uint64_t i) const { return rand16(seed, stream, tensor, i) | nosr; }
};

// ---------------------------------------------------------------- the mask, count and scale

// The cautious mask from signs: u and g agree strictly, or either is NaN (kept, as the spec).
template <typename CT> static inline bool keep(CT u, CT g) {
  return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | (u != u) | (g != g);
}

template <typename CT> static inline CT nanmax(CT a, CT b) {  // np.maximum: NaN if either is NaN
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

// cautious.Caution.scale, in float64 from the integer count
double scale_of(int64_t count, int64_t n, int64_t norm, double floor_) {
  if (n <= 0) return 1.0;
  double k = (double)count, nf = (double)n;
  if (norm == MEAN_CLAMP) return 1.0 / (k / nf > floor_ ? k / nf : floor_);
  if (norm == COUNT_PLUS_ONE) return nf / (k + 1.0);
  if (norm == EXACT) return nf / (k > 1.0 ? k : 1.0);
  return 1.0;
}

// ---------------------------------------------------------------- base rules

template <typename CT> struct Hp {  // the slots, in the compute dtype
  CT coupled_decay, mix1_old, mix1_new, mix2_old, mix2_new, eps, a, b, c, g_coef, m_coef, clip;
  CT test_mul;  // LaProp: 1, or 0 while its rate STEP_LR is 0 (delta = -STEP_LR m' is then 0 or NaN)
  explicit Hp(const double* hp)
      : coupled_decay((CT)hp[COUPLED_DECAY]), mix1_old((CT)hp[MIX1_OLD]), mix1_new((CT)hp[MIX1_NEW]),
        mix2_old((CT)hp[MIX2_OLD]), mix2_new((CT)hp[MIX2_NEW]), eps((CT)hp[EPS]), a((CT)hp[ADAM_A]),
        b((CT)hp[ADAM_B]), c((CT)hp[ADAM_C]), g_coef((CT)hp[G_COEF]), m_coef((CT)hp[M_COEF]), clip((CT)hp[CLIP]),
        test_mul(hp[STEP_LR] > 0 ? CT(1) : CT(0)) {}
};

// One entry's result: the direction, the value whose sign the mask tests, and the new state.
template <typename CT> struct Entry {
  CT u, test, s1, s2, s3;
};

// Every rule's decoupled decay shrinks p before the move, except LaProp's post_update order.
struct PreDecay {
  static constexpr bool post_decay = false;
};

template <int SC, bool AMS, bool EXACT_U> struct Adam : PreDecay {
  template <typename CT> static inline Entry<CT> direction(const Task& t, int64_t i, CT g, const Hp<CT>& h) {
    Entry<CT> e;
    e.s1 = h.mix1_old * Io<SC>::template ld<CT>(t.s1, i) + h.mix1_new * g;
    e.s2 = h.mix2_old * Io<SC>::template ld<CT>(t.s2, i) + h.mix2_new * (g * g);
    e.s3 = AMS ? nanmax(Io<SC>::template ld<CT>(t.s3, i), e.s2) : e.s2;
    e.u = h.c * ((e.s1 * h.a) / (std::sqrt(e.s3) * h.b + h.eps));
    e.test = EXACT_U ? e.u : e.s1;  // sign(u) == sign(m') unless eps == 0
    return e;
  }
  template <typename CT> static inline void store(const Task& t, int64_t i, const Entry<CT>& e, const Rounding& r) {
    if constexpr (AMS) Io<SC>::template st<CT>(t.s3, i, e.s3, r(3, (uint64_t)i));
    Io<SC>::template st<CT>(t.s1, i, e.s1, r(1, (uint64_t)i));
    Io<SC>::template st<CT>(t.s2, i, e.s2, r(2, (uint64_t)i));
  }
};

template <int SC> struct Lion : PreDecay {
  template <typename CT> static inline Entry<CT> direction(const Task& t, int64_t i, CT g, const Hp<CT>& h) {
    Entry<CT> e;
    CT m = Io<SC>::template ld<CT>(t.s1, i);
    CT cc = h.mix1_old * m + h.mix1_new * g;
    e.u = cc > 0 ? CT(1) : (cc < 0 ? CT(-1) : (cc != cc ? cc : CT(0)));
    e.test = cc;
    e.s1 = h.mix2_old * m + h.mix2_new * g;
    e.s2 = e.s3 = CT(0);
    return e;
  }
  template <typename CT> static inline void store(const Task& t, int64_t i, const Entry<CT>& e, const Rounding& r) {
    Io<SC>::template st<CT>(t.s1, i, e.s1, r(1, (uint64_t)i));
  }
};

template <int SC, bool HASM, bool FIRST, bool NEST> struct Sgd : PreDecay {
  template <typename CT> static inline Entry<CT> direction(const Task& t, int64_t i, CT g, const Hp<CT>& h) {
    Entry<CT> e;
    CT b;
    if constexpr (!HASM || FIRST) b = g;
    else b = h.mix1_old * Io<SC>::template ld<CT>(t.s1, i) + h.mix1_new * g;
    if constexpr (HASM && NEST) e.u = g + h.mix1_old * b;
    else e.u = b;
    e.test = e.u;
    e.s1 = b;
    e.s2 = e.s3 = CT(0);
    return e;
  }
  template <typename CT> static inline void store(const Task& t, int64_t i, const Entry<CT>& e, const Rounding& r) {
    if constexpr (HASM) Io<SC>::template st<CT>(t.s1, i, e.s1, r(1, (uint64_t)i));
  }
};

// NAdam: u is a positive combination of g/d and m'/d, its sign neither's in general: the mask tests u.
template <int SC> struct NAdam : PreDecay {
  template <typename CT> static inline Entry<CT> direction(const Task& t, int64_t i, CT g, const Hp<CT>& h) {
    Entry<CT> e;
    e.s1 = h.mix1_old * Io<SC>::template ld<CT>(t.s1, i) + h.mix1_new * g;
    e.s2 = h.mix2_old * Io<SC>::template ld<CT>(t.s2, i) + h.mix2_new * (g * g);
    const CT d = std::sqrt(e.s2) * h.b + h.eps;
    e.u = h.g_coef * (g / d) + h.m_coef * (e.s1 / d);
    e.test = e.u;
    e.s3 = CT(0);
    return e;
  }
  template <typename CT> static inline void store(const Task& t, int64_t i, const Entry<CT>& e, const Rounding& r) {
    Io<SC>::template st<CT>(t.s1, i, e.s1, r(1, (uint64_t)i));
    Io<SC>::template st<CT>(t.s2, i, e.s2, r(2, (uint64_t)i));
  }
};

// ADOPT: the first step sets v = g^2 and moves nothing; later steps normalize g by the OLD v.
template <int SC, bool FIRST, bool NEST> struct Adopt : PreDecay {
  template <typename CT> static inline Entry<CT> direction(const Task& t, int64_t i, CT g, const Hp<CT>& h) {
    Entry<CT> e;
    e.s3 = CT(0);
    if constexpr (FIRST) {
      e.u = e.test = e.s1 = CT(0);
      e.s2 = g * g;
    } else {
      const CT v = Io<SC>::template ld<CT>(t.s2, i);
      CT n = g / nanmax(std::sqrt(v), h.eps);
      n = n > h.clip ? h.clip : (n < -h.clip ? -h.clip : n);  // NaN stays NaN
      e.s1 = h.mix1_old * Io<SC>::template ld<CT>(t.s1, i) + h.mix1_new * n;
      if constexpr (NEST) e.u = h.mix1_old * e.s1 + h.mix1_new * n;
      else e.u = e.s1;
      e.test = e.u;
      e.s2 = h.mix2_old * v + h.mix2_new * (g * g);
    }
    return e;
  }
  template <typename CT> static inline void store(const Task& t, int64_t i, const Entry<CT>& e, const Rounding& r) {
    if constexpr (!FIRST) Io<SC>::template st<CT>(t.s1, i, e.s1, r(1, (uint64_t)i));
    Io<SC>::template st<CT>(t.s2, i, e.s2, r(2, (uint64_t)i));
  }
};

// LaProp: the gradient is normalized before the momentum, which carries the learning rate; u = m'.
template <int SC, bool POST> struct LaProp {
  static constexpr bool post_decay = POST;
  template <typename CT> static inline Entry<CT> direction(const Task& t, int64_t i, CT g, const Hp<CT>& h) {
    Entry<CT> e;
    e.s2 = h.mix2_old * Io<SC>::template ld<CT>(t.s2, i) + h.mix2_new * (g * g);
    const CT n = g / (std::sqrt(e.s2) * h.b + h.eps);
    e.s1 = h.mix1_old * Io<SC>::template ld<CT>(t.s1, i) + h.mix1_new * n;
    e.u = e.s1;
    e.test = e.s1 * h.test_mul;
    e.s3 = CT(0);
    return e;
  }
  template <typename CT> static inline void store(const Task& t, int64_t i, const Entry<CT>& e, const Rounding& r) {
    Io<SC>::template st<CT>(t.s1, i, e.s1, r(1, (uint64_t)i));
    Io<SC>::template st<CT>(t.s2, i, e.s2, r(2, (uint64_t)i));
  }
};

// ---------------------------------------------------------------- the two passes

template <typename CT, int PC, class R, bool COUPLED, bool CWD> struct Kernel {
  // the gradient the rule consumes: -g under maximize, plus coupled_decay * p under coupled decay
  static inline CT gradient(const Task& t, int64_t i, CT p, CT gsign, const Hp<CT>& h) {
    CT g = gsign * Io<PC>::template ld<CT>(t.g, i);
    if constexpr (COUPLED) g = g + h.coupled_decay * p;
    return g;
  }

  static int64_t count(const Task& t, int64_t s, int64_t e, const CpuArgs& c) {
    const CT gsign = c.maximize ? CT(-1) : CT(1);
    const Hp<CT> h(c.hp);
    auto one = [&](int64_t i) -> int32_t {
      const CT p = COUPLED ? Io<PC>::template ld<CT>(t.p, i) : CT(0);
      const CT g = gradient(t, i, p, gsign, h);
      return (int32_t)keep(R::direction(t, i, g, h).test, g);
    };
    // two halves of the range in one loop: twice the read streams in flight (memory-level
    // parallelism; the count pass is bound by read bandwidth). int32 partial sums over <= 2**20.
    const int64_t half = (e - s) / 2;
    int64_t total = 0;
    for (int64_t s0 = s; s0 < s + half; s0 += (int64_t)1 << 19) {
      const int64_t e0 = s + half < s0 + ((int64_t)1 << 19) ? s + half : s0 + ((int64_t)1 << 19);
      int32_t cnt = 0;
      for (int64_t i = s0; i < e0; ++i) cnt += one(i) + one(i + half);
      total += cnt;
    }
    for (int64_t i = s + 2 * half; i < e; ++i) total += one(i);
    return total;
  }

  // the entries of the consumed gradient that are not 0 (NaN counts): the n of denominator="nonzero"
  static int64_t nonzero(const Task& t, int64_t s, int64_t e, const CpuArgs& c) {
    const CT gsign = c.maximize ? CT(-1) : CT(1);
    const Hp<CT> h(c.hp);
    int64_t total = 0;
    for (int64_t s0 = s; s0 < e; s0 += (int64_t)1 << 20) {
      const int64_t e0 = e < s0 + ((int64_t)1 << 20) ? e : s0 + ((int64_t)1 << 20);
      int32_t cnt = 0;
      for (int64_t i = s0; i < e0; ++i) {
        const CT p = COUPLED ? Io<PC>::template ld<CT>(t.p, i) : CT(0);
        cnt += (int32_t)(gradient(t, i, p, gsign, h) != CT(0));
      }
      total += cnt;
    }
    return total;
  }

  static void update(const Task& t, int64_t s, int64_t e, CT step, CT lr_wd, const CpuArgs& c) {
    const CT gsign = c.maximize ? CT(-1) : CT(1);
    const Hp<CT> h(c.hp);
    // loop-invariant flags are integer masks combined with per-entry masks: a ternary (or |) on an
    // invariant bool becomes a branch in the loop and stops gcc from vectorizing it
    const uint32_t nocaution = c.caution ? 0u : ~0u, nodec = c.decoupled ? 0u : ~0u;
    const Rounding rnd{c.seed, (uint64_t)t.index, c.stochastic_rounding ? 0u : 0xFFFFFFFFu};
    for (int64_t i = s; i < e; ++i) {
      const CT p = Io<PC>::template ld<CT>(t.p, i);
      const CT g = gradient(t, i, p, gsign, h);
      const Entry<CT> en = R::direction(t, i, g, h);
      R::store(t, i, en, rnd);
      const bool k = keep(en.test, g);
      const CT uc = ((0u - (uint32_t)k) | nocaution) ? en.u : CT(0);
      uint32_t zero_d = nodec;  // no decoupled decay: lr_wd * 0 = 0 and p - 0 = p exactly
      if constexpr (CWD) zero_d |= 0u - (uint32_t)(((uc > 0) & (p < 0)) | ((uc < 0) & (p > 0)));
      CT pn;
      if constexpr (R::post_decay) {  // LaProp's post_update: the decay shrinks the moved parameter
        const CT moved = p - step * uc;
        pn = moved - lr_wd * (zero_d ? CT(0) : moved);
      } else {
        pn = (p - lr_wd * (zero_d ? CT(0) : p)) - step * uc;
      }
      Io<PC>::template st<CT>(t.p, i, pn, rnd(0, (uint64_t)i));
    }
  }
};

// ---------------------------------------------------------------- threads

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

template <class K, typename CT> void drive(std::vector<Task>& tasks, const CpuArgs& c) {
  // Sharded tensors (DTensor) take two calls: the count pass alone (counts_out), then, once the
  // caller has summed each tensor's counts over its shards, the update pass with the scales.
  int64_t* counts_out = reinterpret_cast<int64_t*>(c.counts_out);
  const double* scales_in = reinterpret_cast<const double*>(c.scales_in);
  const bool need_count = c.caution && c.norm != NONE && scales_in == nullptr;
  const double floor_ = c.hp[FLOOR], lr_wd = c.lr * c.hp[DECOUPLED_DECAY];
  const double rate = c.rule == LAPROP ? c.hp[STEP_LR] : c.lr;  // the direction's rate (LaProp: lr / lr_avg)
  const int nthreads = c.nthreads < 1 ? 1 : (int)c.nthreads;
  const int T = (int)tasks.size();
  if (counts_out) {
    int64_t* nonzero_out = reinterpret_cast<int64_t*>(c.nonzero_out);
    for (int i = 0; i < T; ++i) {
      counts_out[tasks[i].index] = K::count(tasks[i], 0, tasks[i].n, c);
      if (nonzero_out) nonzero_out[tasks[i].index] = K::nonzero(tasks[i], 0, tasks[i].n, c);
    }
    return;
  }
  std::vector<std::atomic<int64_t>> counts(tasks.size());
  for (auto& x : counts) x.store(0);
  auto step_of = [&](int i) {
    double s = scales_in    ? scales_in[tasks[i].index]
               : need_count ? scale_of(counts[i].load(std::memory_order_relaxed), tasks[i].n, c.norm, floor_)
                            : 1.0;
    return (CT)(rate * s);
  };
  if (nthreads <= 1) {  // one thread: each tensor counted then updated at once (its g, m still cached)
    for (int i = 0; i < T; ++i) {
      if (need_count) counts[i].store(K::count(tasks[i], 0, tasks[i].n, c));
      K::update(tasks[i], 0, tasks[i].n, step_of(i), (CT)lr_wd, c);
    }
    return;
  }
  // Several threads: every tensor is cut into pieces of at most `piece` entries (starts aligned to
  // 64 entries); thread tid owns a contiguous run of pieces holding ~1/nthreads of all entries.
  // Count pass over all its pieces, ONE barrier (every count is then complete), update pass over
  // the same pieces in reverse order (the last pieces counted are still in this core's cache).
  struct Piece {
    int task;
    int64_t s, e;
  };
  const int64_t step_n = c.piece > 64 ? (c.piece + 63) & ~(int64_t)63 : 64;
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

// ---------------------------------------------------------------- dispatch

// Template arguments must be constants: turn a runtime bool into a compile-time one.
template <class F> inline int with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// Decay is rule-independent: coupled L2, or decoupled (optionally cautious); cautious weight
// decay needs decoupled decay, so (coupled, cwd) has three cases.
template <typename CT, int PC, class R> int run_rule(std::vector<Task>& tasks, const CpuArgs& c) {
  if (c.cwd) return drive<Kernel<CT, PC, R, false, true>, CT>(tasks, c), 0;
  if (c.coupled) return drive<Kernel<CT, PC, R, true, false>, CT>(tasks, c), 0;
  return drive<Kernel<CT, PC, R, false, false>, CT>(tasks, c), 0;
}

template <typename CT, int PC, int SC> int by_rule(std::vector<Task>& tasks, const CpuArgs& c) {
  switch (c.rule) {
    case ADAM:
      return with_bool(c.amsgrad, [&](auto AMS) {
        return with_bool(c.exact_u, [&](auto EX) {
          return run_rule<CT, PC, Adam<SC, decltype(AMS)::value, decltype(EX)::value>>(tasks, c);
        });
      });
    case LION:
      return run_rule<CT, PC, Lion<SC>>(tasks, c);
    case SGD:
      if (!c.has_momentum) return run_rule<CT, PC, Sgd<SC, false, true, false>>(tasks, c);
      return with_bool(c.first, [&](auto FIRST) {
        return with_bool(c.nesterov, [&](auto NEST) {
          return run_rule<CT, PC, Sgd<SC, true, decltype(FIRST)::value, decltype(NEST)::value>>(tasks, c);
        });
      });
    case NADAM:
      return run_rule<CT, PC, NAdam<SC>>(tasks, c);
    case ADOPT:
      if (c.first) return run_rule<CT, PC, Adopt<SC, true, false>>(tasks, c);
      return with_bool(c.nesterov, [&](auto NEST) {
        return run_rule<CT, PC, Adopt<SC, false, decltype(NEST)::value>>(tasks, c);
      });
    case LAPROP:  // decay is always decoupled: no coupled variant
      return with_bool(c.post_decay, [&](auto POST) {
        using R = LaProp<SC, decltype(POST)::value>;
        if (c.cwd) return drive<Kernel<CT, PC, R, false, true>, CT>(tasks, c), 0;
        return drive<Kernel<CT, PC, R, false, false>, CT>(tasks, c), 0;
      });
  }
  return -1;
}

}  // namespace

// meta: T rows of 8 int64 (p, g, s1, s2, s3, numel, index, unused); args: see CpuArgs.
// Returns 0, or -1 for an unsupported dtype pair or rule (the caller falls back).
extern "C" int cautious_fused_run(const int64_t* meta, int64_t T, const CpuArgs* args) {
  std::vector<Task> tasks;
  tasks.reserve((size_t)T);
  for (int64_t r = 0; r < T; ++r) {
    const int64_t* m = meta + 8 * r;
    if (m[5] <= 0) continue;
    tasks.push_back(Task{(void*)m[0], (const void*)m[1], (void*)m[2], (void*)m[3], (void*)m[4], m[5], m[6]});
  }
  if (tasks.empty()) return 0;
  // one dtype pair per shared object (compiled on demand: compile time grows with instantiations)
  if (args->param_code == CAUTIOUS_PC && args->state_code == CAUTIOUS_SC)
    return by_rule<CAUTIOUS_CT, CAUTIOUS_PC, CAUTIOUS_SC>(tasks, *args);
  return -1;
}

// step <- step + 1 for n scalar step tensors (code 0: float32, 1: float64), as torch's `step += 1`
// rounds; the new values go to out (one call instead of one torch op per parameter).
extern "C" int cautious_increment_steps(const int64_t* ptrs, int64_t n, int64_t code, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (code == 0) {
      float* s = (float*)ptrs[i];
      *s = *s + 1.0f;
      out[i] = (double)*s;
    } else {
      double* s = (double*)ptrs[i];
      *s = *s + 1.0;
      out[i] = *s;
    }
  }
  return 0;
}
