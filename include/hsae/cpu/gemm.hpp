// SPDX-License-Identifier: Apache-2.0
/// \file cpu/gemm.hpp
/// The CPU encoder GEMM, `pre [B, F] = (x - b_dec) W_enc^T`: 2*B*D*F FLOPs, the step's
/// floor. Two libraries (`cpu_backend::gemm`) and two operand precisions
/// (`cpu_backend::encoder_precision`):
///
/// - Eigen's product: always there, and the only one for double.
/// - oneDNN's matmul (`HSAE_WITH_ONEDNN`, set by CMake where oneDNN is found): the default
///   for float where it is built in. One plan per thread and shape, made on first use:
///   the primitive, its memory objects and a user-owned scratchpad, so a step of a settled
///   shape allocates nothing of hsae's own (oneDNN's `execute` still builds a small
///   argument map: tests/test_no_alloc.cpp counts it).
/// - bf16 operands, fp32 accumulation and fp32 master weights: `x - b_dec` is rounded to
///   bfloat16 (nearest, ties to even) on the way in, `W_enc` by a oneDNN reorder into the
///   blocked layout its bf16 kernel reads. On a CPU without a bf16 matmul (oneDNN creates
///   none: no AVX512-BF16 or AMX) the same numbers come from rounded fp32 copies through the
///   fp32 GEMM: products of two bfloat16 values are exact in fp32, so only the order of the
///   fp32 sums differs. `encoder_gemm_info` says which one runs.
///
/// The GEMM runs on `cpu_backend::threads()` threads (an OpenMP setting scoped to the call).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(HSAE_WITH_ONEDNN)
#include <oneapi/dnnl/dnnl.hpp>
#endif

#include "../detail/half.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "backend.hpp"

HSAE_NAMESPACE_BEGIN

/// Which encoder GEMM a backend runs for scalar T, resolved (see `resolve_encoder_gemm`).
struct encoder_gemm_choice {
  cpu_gemm library = cpu_gemm::eigen;                 ///< eigen or onednn, never automatic
  gemm_precision precision = gemm_precision::fp32;  ///< the operands
  bool emulated_bf16 = false;  ///< bf16 operands through the fp32 GEMM (no bf16 matmul on this CPU)
};

/// True when hsae was built with oneDNN (`HSAE_WITH_ONEDNN`).
constexpr bool onednn_built() noexcept {
#if defined(HSAE_WITH_ONEDNN)
  return true;
#else
  return false;
#endif
}

#if defined(HSAE_WITH_ONEDNN)
namespace cpu::detail {

/// The process's oneDNN CPU engine.
inline dnnl::engine& onednn_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

/// A matmul `dst [B, F] = src [B, D] * W^T` for `W [F, D]` row-major, fp32 or bf16
/// operands, fp32 output; its memory objects are rebound to the caller's buffers each call.
struct onednn_matmul_plan {
  using dims = dnnl::memory::dims;
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;

  std::int64_t B = -1, D = -1, F = -1;
  int threads = -1;
  bool bf16 = false;
  dnnl::stream stream;
  dnnl::matmul prim;
  dnnl::memory src, weights, dst, scratch, w_f32;  ///< w_f32: fp32 W, the bf16 reorder's input
  dnnl::reorder w_reorder;
  std::unordered_map<int, dnnl::memory> args, reorder_args;

  bool matches(std::int64_t b, std::int64_t d, std::int64_t f, int t, bool h) const {
    return b == B && d == D && f == F && t == threads && h == bf16;
  }

  /// Builds the plan; throws dnnl::error when oneDNN has no kernel (bf16 on a CPU without).
  void make(std::int64_t b, std::int64_t d, std::int64_t f, int t, bool h) {
    *this = onednn_matmul_plan{};
    dnnl::engine& eng = onednn_engine();
    const dt op = h ? dt::bf16 : dt::f32;
    // W [F, D] row-major is W^T [D, F] in column-major ("ba"); bf16 weights take the
    // layout the kernel prefers ("any"), filled by a reorder from the fp32 masters.
    const dnnl::memory::desc src_md(dims{b, d}, op, tag::ab);
    const dnnl::memory::desc w_md(dims{d, f}, op, h ? tag::any : tag::ba);
    const dnnl::memory::desc dst_md(dims{b, f}, dt::f32, tag::ab);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, w_md, dst_md), attr, eng);
    prim = dnnl::matmul(pd);
    stream = dnnl::stream(eng);
    // Placeholders for the caller's buffers (rebound every call); oneDNN owns the rest.
    src = h ? dnnl::memory(pd.src_desc(), eng) : dnnl::memory(pd.src_desc(), eng, DNNL_MEMORY_NONE);
    weights = h ? dnnl::memory(pd.weights_desc(), eng) : dnnl::memory(pd.weights_desc(), eng, DNNL_MEMORY_NONE);
    dst = dnnl::memory(pd.dst_desc(), eng, DNNL_MEMORY_NONE);
    scratch = dnnl::memory(pd.scratchpad_desc(), eng);
    args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}};
    if (h) {
      w_f32 = dnnl::memory(dnnl::memory::desc(dims{d, f}, dt::f32, tag::ba), eng, DNNL_MEMORY_NONE);
      w_reorder = dnnl::reorder(w_f32, weights);
      reorder_args = {{DNNL_ARG_FROM, w_f32}, {DNNL_ARG_TO, weights}};
    }
    B = b, D = d, F = f, threads = t, bf16 = h;
  }
};

/// The calling thread's plan (one per thread: a plan's stream and buffers are not shared).
inline onednn_matmul_plan& thread_matmul_plan() {
  thread_local onednn_matmul_plan p;
  return p;
}

/// True when oneDNN makes a bf16 matmul on this CPU (checked once per process).
inline bool onednn_bf16_available() {
  static const bool ok = [] {
    try {
      onednn_matmul_plan p;
      p.make(16, 32, 64, 1, true);
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return ok;
}

}  // namespace cpu::detail
#endif

/// Resolves `be.gemm` and `be.encoder_precision` for scalar T.
/// \throws hsae::config_error for oneDNN in a build without it, or bf16 operands with a
///         double model.
template <class T>
encoder_gemm_choice resolve_encoder_gemm(const cpu_backend& be) {
  encoder_gemm_choice c;
  detail::expects<config_error>(be.gemm != cpu_gemm::onednn || onednn_built(),
                                "cpu_gemm::onednn: hsae was built without oneDNN (install it, e.g. Debian's "
                                "libdnnl-dev, and reconfigure with HSAE_ONEDNN=AUTO or ON)");
  detail::expects<config_error>(be.encoder_precision == gemm_precision::fp32 || std::is_same_v<T, float>,
                                "gemm_precision::bf16: bf16 encoder operands need a float model (fp32 masters)");
  const bool onednn = std::is_same_v<T, float> && onednn_built() && be.gemm != cpu_gemm::eigen;
  c.library = onednn ? cpu_gemm::onednn : cpu_gemm::eigen;
  c.precision = be.encoder_precision;
  if (c.precision == gemm_precision::bf16) {
#if defined(HSAE_WITH_ONEDNN)
    c.emulated_bf16 = !(onednn && cpu::detail::onednn_bf16_available());
#else
    c.emulated_bf16 = true;
#endif
  }
  return c;
}

/// A one-line description of the encoder GEMM `be` runs for T, for logs and reports,
/// e.g. "oneDNN 2.6.3 matmul, fp32" or "Eigen, bf16 operands emulated (no bf16 matmul on
/// this CPU)".
template <class T>
std::string encoder_gemm_info(const cpu_backend& be) {
  const encoder_gemm_choice c = resolve_encoder_gemm<T>(be);
  std::string s;
  if (c.library == cpu_gemm::onednn) {
#if defined(HSAE_WITH_ONEDNN)
    const dnnl_version_t* v = dnnl_version();
    s = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) +
        " matmul";
#endif
  } else {
    s = "Eigen";
  }
  if (c.precision == gemm_precision::fp32) return s + ", fp32";
  if (c.emulated_bf16) return s + ", bf16 operands emulated (rounded to bf16, fp32 GEMM: no bf16 matmul on this CPU)";
  return s + ", bf16 operands, fp32 accumulation";
}

namespace cpu::detail {

/// Sets the calling thread's OpenMP thread count for a scope (oneDNN and Eigen both read
/// it); 0 leaves it.
class omp_threads_scope {
 public:
  explicit omp_threads_scope([[maybe_unused]] int n) {
#if defined(_OPENMP)
    if (n > 0 && n != omp_get_max_threads()) {
      saved_ = omp_get_max_threads();
      omp_set_num_threads(n);
    }
#endif
  }
  ~omp_threads_scope() {
#if defined(_OPENMP)
    if (saved_ > 0) omp_set_num_threads(saved_);
#endif
  }
  omp_threads_scope(const omp_threads_scope&) = delete;
  omp_threads_scope& operator=(const omp_threads_scope&) = delete;

 private:
  int saved_ = 0;
};

/// `v` rounded to the nearest bfloat16 (ties to even), as a float.
inline float round_to_bfloat16(float v) noexcept { return bfloat16_to_float(float_to_bfloat16(v)); }

/// Per-thread buffers of the encoder GEMM, kept so that steps of one shape never allocate.
template <class T>
struct gemm_buffers {
  row_matrix<T> xc;      ///< x - b_dec (fp32 / double), or its bf16 rounding (emulated bf16)
  row_matrix<T> w_bf16;  ///< W_enc rounded to bf16, as T (emulated bf16 only)
};
template <class T>
gemm_buffers<T>& thread_gemm_buffers() {
  thread_local gemm_buffers<T> b;
  return b;
}

/// `pre [B, F] = (x - b_dec) W^T` for `W [F, D]` (contiguous row-major: a model's W_enc or
/// a shard's rows of it). Centring before the product (rather than subtracting W b_dec
/// after it) avoids cancellation when the activations have a large mean.
template <class T, class Bias, class W>
void encoder_gemm(const cpu_backend& be, cref<T> x, const Bias& b_dec, const W& w, row_matrix<T>& pre) {
  const encoder_gemm_choice c = resolve_encoder_gemm<T>(be);
  const Eigen::Index B = x.rows(), D = x.cols(), F = w.rows();
  eigen_assert(w.cols() == D && b_dec.size() == D);
  pre.resize(B, F);
  if (F == 0 || B == 0) return;
  omp_threads_scope scope(be.num_threads);
  auto& buf = thread_gemm_buffers<T>();
  const T* w_data = w.data();
  const bool bf16 = c.precision == gemm_precision::bf16;
#if defined(HSAE_WITH_ONEDNN)
  if constexpr (std::is_same_v<T, float>) {
    if (c.library == cpu_gemm::onednn && bf16 && !c.emulated_bf16) {
      auto& p = thread_matmul_plan();
      if (!p.matches(B, D, F, be.threads(), true)) p.make(B, D, F, be.threads(), true);
      // x - b_dec rounded straight into the plan's bf16 source.
      auto* s = static_cast<std::uint16_t*>(p.src.get_data_handle());
      parallel_for(be, B, [&](std::ptrdiff_t b) {
        const float* xr = x.row(b).data();
        std::uint16_t* sr = s + b * D;
        for (Eigen::Index d = 0; d < D; ++d) sr[d] = float_to_bfloat16(xr[d] - b_dec[d]);
      });
      p.w_f32.set_data_handle(const_cast<float*>(w_data));
      p.w_reorder.execute(p.stream, p.reorder_args);
      p.dst.set_data_handle(pre.data());
      p.prim.execute(p.stream, p.args);
      p.stream.wait();
      return;
    }
  }
#endif
  buf.xc.resize(B, D);
  if (bf16) {
    parallel_for(be, B, [&](std::ptrdiff_t b) {
      for (Eigen::Index d = 0; d < D; ++d) buf.xc(b, d) = round_to_bfloat16(x(b, d) - b_dec[d]);
    });
    buf.w_bf16.resize(F, D);
    parallel_for(be, F, [&](std::ptrdiff_t f) {
      for (Eigen::Index d = 0; d < D; ++d) buf.w_bf16(f, d) = round_to_bfloat16(w_data[f * D + d]);
    });
    w_data = buf.w_bf16.data();
  } else {
    buf.xc.noalias() = x.rowwise() - b_dec.transpose();
  }
#if defined(HSAE_WITH_ONEDNN)
  if constexpr (std::is_same_v<T, float>) {
    if (c.library == cpu_gemm::onednn) {
      auto& p = thread_matmul_plan();
      if (!p.matches(B, D, F, be.threads(), false)) p.make(B, D, F, be.threads(), false);
      p.src.set_data_handle(buf.xc.data());
      p.weights.set_data_handle(const_cast<float*>(w_data));
      p.dst.set_data_handle(pre.data());
      p.prim.execute(p.stream, p.args);
      p.stream.wait();
      return;
    }
  }
#endif
  const Eigen::Map<const row_matrix<T>> wm(w_data, F, D);
  pre.noalias() = buf.xc * wm.transpose();
}

}  // namespace cpu::detail

HSAE_NAMESPACE_END
