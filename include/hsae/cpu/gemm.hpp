// SPDX-License-Identifier: Apache-2.0
/// \file cpu/gemm.hpp
/// The CPU encoder GEMM, `pre [B, F] = (x - b_dec) W_enc^T`: 2*B*D*F FLOPs, the step's
/// floor. Two libraries (`cpu_backend::gemm`) and two operand precisions
/// (`cpu_backend::encoder_precision`):
///
/// - Eigen's product: always there, and the only one for double.
/// - oneDNN's matmul (`HSAE_WITH_ONEDNN`, set by CMake where oneDNN is found): the default
///   for float where it is built in. One plan per thread and shape, made on first use:
///   the primitive, its memory objects and its scratchpad, so a step of a settled shape
///   allocates nothing of hsae's own (tests/test_no_alloc.cpp counts what oneDNN's
///   `execute` allocates itself). oneDNN 2's C API: its C++ header does not compile under
///   nvcc, and every translation unit must see the same inline functions.
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
#include <memory>
#include <string>
#include <type_traits>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(HSAE_WITH_ONEDNN)
#include <oneapi/dnnl/dnnl.h>
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

/// Throws hsae::error naming the oneDNN call that failed.
inline void onednn_check(dnnl_status_t st, const char* what) {
  if (st != dnnl_success) throw error(std::string("oneDNN: ") + what + " failed (dnnl_status_t " + std::to_string(int(st)) + ")");
}

/// The process's oneDNN CPU engine.
inline dnnl_engine_t onednn_engine() {
  static const std::unique_ptr<dnnl_engine, dnnl_status_t (*)(dnnl_engine_t)> e = [] {
    dnnl_engine_t h = nullptr;
    onednn_check(dnnl_engine_create(&h, dnnl_cpu, 0), "dnnl_engine_create");
    return std::unique_ptr<dnnl_engine, dnnl_status_t (*)(dnnl_engine_t)>(h, &dnnl_engine_destroy);
  }();
  return e.get();
}

/// A oneDNN handle owned with its destroy function.
template <class H, dnnl_status_t (*Destroy)(H)>
class onednn_handle {
 public:
  onednn_handle() = default;
  ~onednn_handle() { reset(); }
  onednn_handle(const onednn_handle&) = delete;
  onednn_handle& operator=(const onednn_handle&) = delete;
  H get() const { return h_; }
  H* out() {
    reset();
    return &h_;
  }
  void reset() {
    if (h_ != nullptr) Destroy(h_);
    h_ = nullptr;
  }

 private:
  H h_ = nullptr;
};

/// A matmul `dst [B, F] = src [B, D] * W^T` for `W [F, D]` row-major, fp32 or bf16
/// operands, fp32 output; its memory objects are rebound to the caller's buffers each
/// call. oneDNN's C API: its C++ header does not compile under nvcc, and a TU of each
/// compiler must see the same inline functions.
struct onednn_matmul_plan {
  std::int64_t B = -1, D = -1, F = -1;
  int threads = -1;
  bool bf16 = false;
  onednn_handle<dnnl_stream_t, dnnl_stream_destroy> stream;
  onednn_handle<dnnl_primitive_t, dnnl_primitive_destroy> matmul, reorder;
  onednn_handle<dnnl_memory_t, dnnl_memory_destroy> src, weights, dst, scratch, w_f32;
  dnnl_exec_arg_t args[4] = {}, reorder_args[2] = {};

  bool matches(std::int64_t b, std::int64_t d, std::int64_t f, int t, bool h) const {
    return b == B && d == D && f == F && t == threads && h == bf16;
  }

  /// Builds the plan. Returns false (the plan empty) when oneDNN has no matmul for it
  /// (bf16 on a CPU without AVX512-BF16 or AMX); throws hsae::error on other failures.
  bool make(std::int64_t b, std::int64_t d, std::int64_t f, int t, bool h) {
    B = -1;
    dnnl_engine_t eng = onednn_engine();
    const dnnl_data_type_t op = h ? dnnl_bf16 : dnnl_f32;
    // W [F, D] row-major is W^T [D, F] in column-major ("ba"); bf16 weights take the
    // layout the kernel prefers ("any"), filled by a reorder from the fp32 masters.
    dnnl_memory_desc_t src_md, w_md, dst_md, w32_md;
    const dnnl_dims_t src_dims = {b, d}, w_dims = {d, f}, dst_dims = {b, f};
    onednn_check(dnnl_memory_desc_init_by_tag(&src_md, 2, src_dims, op, dnnl_ab), "dnnl_memory_desc_init_by_tag");
    onednn_check(dnnl_memory_desc_init_by_tag(&w_md, 2, w_dims, op, h ? dnnl_format_tag_any : dnnl_ba),
                 "dnnl_memory_desc_init_by_tag");
    onednn_check(dnnl_memory_desc_init_by_tag(&dst_md, 2, dst_dims, dnnl_f32, dnnl_ab), "dnnl_memory_desc_init_by_tag");
    dnnl_matmul_desc_t desc;
    onednn_check(dnnl_matmul_desc_init(&desc, &src_md, &w_md, nullptr, &dst_md), "dnnl_matmul_desc_init");
    onednn_handle<dnnl_primitive_attr_t, dnnl_primitive_attr_destroy> attr;
    onednn_check(dnnl_primitive_attr_create(attr.out()), "dnnl_primitive_attr_create");
    onednn_check(dnnl_primitive_attr_set_scratchpad_mode(attr.get(), dnnl_scratchpad_mode_user),
                 "dnnl_primitive_attr_set_scratchpad_mode");
    onednn_handle<dnnl_primitive_desc_t, dnnl_primitive_desc_destroy> pd;
    const dnnl_status_t st = dnnl_primitive_desc_create(pd.out(), &desc, attr.get(), eng, nullptr);
    if (st == dnnl_unimplemented) return false;
    onednn_check(st, "dnnl_primitive_desc_create (matmul)");
    onednn_check(dnnl_primitive_create(matmul.out(), pd.get()), "dnnl_primitive_create (matmul)");
    onednn_check(dnnl_stream_create(stream.out(), eng, dnnl_stream_default_flags), "dnnl_stream_create");
    const dnnl_memory_desc_t* w_chosen = dnnl_primitive_desc_query_md(pd.get(), dnnl_query_weights_md, 0);
    const dnnl_memory_desc_t* scratch_md = dnnl_primitive_desc_query_md(pd.get(), dnnl_query_scratchpad_md, 0);
    // The caller's buffers are bound every call (DNNL_MEMORY_NONE here); oneDNN owns the
    // bf16 operands and the scratchpad.
    onednn_check(dnnl_memory_create(src.out(), &src_md, eng, h ? DNNL_MEMORY_ALLOCATE : DNNL_MEMORY_NONE),
                 "dnnl_memory_create (src)");
    onednn_check(dnnl_memory_create(weights.out(), w_chosen, eng, h ? DNNL_MEMORY_ALLOCATE : DNNL_MEMORY_NONE),
                 "dnnl_memory_create (weights)");
    onednn_check(dnnl_memory_create(dst.out(), &dst_md, eng, DNNL_MEMORY_NONE), "dnnl_memory_create (dst)");
    onednn_check(dnnl_memory_create(scratch.out(), scratch_md, eng, DNNL_MEMORY_ALLOCATE),
                 "dnnl_memory_create (scratchpad)");
    args[0] = {DNNL_ARG_SRC, src.get()};
    args[1] = {DNNL_ARG_WEIGHTS, weights.get()};
    args[2] = {DNNL_ARG_DST, dst.get()};
    args[3] = {DNNL_ARG_SCRATCHPAD, scratch.get()};
    if (h) {
      onednn_check(dnnl_memory_desc_init_by_tag(&w32_md, 2, w_dims, dnnl_f32, dnnl_ba), "dnnl_memory_desc_init_by_tag");
      onednn_check(dnnl_memory_create(w_f32.out(), &w32_md, eng, DNNL_MEMORY_NONE), "dnnl_memory_create (fp32 W)");
      onednn_handle<dnnl_primitive_desc_t, dnnl_primitive_desc_destroy> rpd;
      onednn_check(dnnl_reorder_primitive_desc_create(rpd.out(), &w32_md, eng, w_chosen, eng, nullptr),
                   "dnnl_reorder_primitive_desc_create");
      onednn_check(dnnl_primitive_create(reorder.out(), rpd.get()), "dnnl_primitive_create (reorder)");
      reorder_args[0] = {DNNL_ARG_FROM, w_f32.get()};
      reorder_args[1] = {DNNL_ARG_TO, weights.get()};
    }
    B = b, D = d, F = f, threads = t, bf16 = h;
    return true;
  }

  /// dst = src * W^T with the caller's buffers: `src` fp32 (an fp32 plan; a bf16 plan's
  /// source is filled through `bf16_source()` first), `w` the fp32 masters, `out` [B, F].
  void run(const float* src_f32, const float* w, float* out) {
    if (bf16) {
      onednn_check(dnnl_memory_set_data_handle(w_f32.get(), const_cast<float*>(w)), "dnnl_memory_set_data_handle");
      onednn_check(dnnl_primitive_execute(reorder.get(), stream.get(), 2, reorder_args), "dnnl_primitive_execute (reorder)");
    } else {
      onednn_check(dnnl_memory_set_data_handle(src.get(), const_cast<float*>(src_f32)), "dnnl_memory_set_data_handle");
      onednn_check(dnnl_memory_set_data_handle(weights.get(), const_cast<float*>(w)), "dnnl_memory_set_data_handle");
    }
    onednn_check(dnnl_memory_set_data_handle(dst.get(), out), "dnnl_memory_set_data_handle");
    onednn_check(dnnl_primitive_execute(matmul.get(), stream.get(), 4, args), "dnnl_primitive_execute (matmul)");
    onednn_check(dnnl_stream_wait(stream.get()), "dnnl_stream_wait");
  }

  /// The bf16 plan's source buffer [B, D] (bfloat16 bits, row-major).
  std::uint16_t* bf16_source() const {
    void* p = nullptr;
    onednn_check(dnnl_memory_get_data_handle(src.get(), &p), "dnnl_memory_get_data_handle");
    return static_cast<std::uint16_t*>(p);
  }
};

/// The calling thread's plan (one per thread: a plan's stream and buffers are not shared).
inline onednn_matmul_plan& thread_matmul_plan() {
  thread_local onednn_matmul_plan p;
  return p;
}

/// True when oneDNN makes a bf16 matmul on this CPU (checked once per process).
inline bool onednn_bf16_available() {
  static const bool ok = onednn_matmul_plan{}.make(16, 32, 64, 1, true);
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
    const dnnl_version_t* const v = dnnl_version();
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
  eigen_assert(w.cols() == D && w.outerStride() == D && b_dec.size() == D);  // contiguous rows
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
      if (!p.matches(B, D, F, be.threads(), true) && !p.make(B, D, F, be.threads(), true))
        throw error("oneDNN: no bf16 matmul for [" + std::to_string(B) + ", " + std::to_string(D) + "] x [" +
                    std::to_string(D) + ", " + std::to_string(F) + "] on this CPU");
      // x - b_dec rounded straight into the plan's bf16 source.
      std::uint16_t* const s = p.bf16_source();
      parallel_for(be, B, [&](std::ptrdiff_t b) {
        const float* xr = x.row(b).data();
        std::uint16_t* sr = s + b * D;
        for (Eigen::Index d = 0; d < D; ++d) sr[d] = float_to_bfloat16(xr[d] - b_dec[d]);
      });
      p.run(nullptr, w_data, pre.data());
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
      if (!p.matches(B, D, F, be.threads(), false) && !p.make(B, D, F, be.threads(), false))
        throw error("oneDNN: no fp32 matmul for [" + std::to_string(B) + ", " + std::to_string(D) + "] x [" +
                    std::to_string(D) + ", " + std::to_string(F) + "]");
      p.run(buf.xc.data(), w_data, pre.data());
      return;
    }
  }
#endif
  const Eigen::Map<const row_matrix<T>> wm(w_data, F, D);
  pre.noalias() = buf.xc * wm.transpose();
}

}  // namespace cpu::detail

HSAE_NAMESPACE_END
