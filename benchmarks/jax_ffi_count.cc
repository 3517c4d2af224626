// Experiment for docs/benchmarks.md (JAX, issue 17): the kept count of cautious.jax as an XLA FFI
// custom call on the CPU, instead of an XLA reduction. Not shipped; bench_jax.py --ffi builds it.
//
// count = #{i : a_i * g_i > 0 (strict sign agreement), or a_i or g_i is NaN}, as _core.kept_count.
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error KeptCount(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::S32> out) {
  const float* pa = a.typed_data();
  const float* pg = g.typed_data();
  const int64_t n = a.element_count();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = pa[i], y = pg[i];
    count += ((x > 0.f) & (y > 0.f)) | ((x < 0.f) & (y < 0.f)) | (x != x) | (y != y);
  }
  *out->typed_data() = static_cast<int32_t>(count);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CautiousKeptCount, KeptCount,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
