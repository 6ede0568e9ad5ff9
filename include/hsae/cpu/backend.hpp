// SPDX-License-Identifier: Apache-2.0
/// \file cpu/backend.hpp
/// The CPU backend handle, passed first to every CPU operation (like
/// `thrust::cuda::par.on(stream)` on the GPU side), and the one parallel loop the CPU
/// code uses.
#pragma once

#include <algorithm>
#include <cstddef>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../config.hpp"

HSAE_NAMESPACE_BEGIN

/// The library behind the CPU encoder GEMM (cpu/gemm.hpp).
enum class cpu_gemm {
  automatic,  ///< oneDNN for float where hsae was built with it (HSAE_WITH_ONEDNN), else Eigen
  eigen,      ///< Eigen's own product (always available; the only one for double)
  onednn,     ///< oneDNN's matmul; hsae::config_error in a build without oneDNN
};

/// The operands of the CPU encoder GEMM. The weights stay fp32 masters either way: bf16
/// rounds copies of `x - b_dec` and `W_enc` to bfloat16 for the product (fp32 accumulation);
/// the rest of the step (top-k, loss, backward, Adam) is unchanged.
enum class gemm_precision {
  fp32,  ///< the default
  bf16,  ///< float models only; oneDNN's bf16 matmul where the CPU has one, else emulated
};

/// CPU execution resources.
///
/// Every CPU operation in hsae gives bitwise-identical results for any `num_threads`:
/// work is split so that each output element is produced by one thread in a fixed
/// order, and every reduction sums per-row or per-latent partials in index order. The
/// encoder GEMM (cpu/gemm.hpp) follows its library's rules: identical bits for the same
/// thread count; across thread counts, oneDNN 2.6 gave identical bits at every shape
/// measured (up to B=4096, D=768, F=16384) and Eigen at small ones only (from D=768 on,
/// most entries differ in their last bits). tests/test_determinism.cpp checks the step
/// on 1 and 2 threads at a small shape.
struct cpu_backend {
  /// Threads for hsae's own loops; 0 = OpenMP's default (`omp_get_max_threads()`).
  /// Without OpenMP everything runs on the calling thread.
  int num_threads = 0;
  /// Upper bound on the staging buffer of the decoder-gradient pass (bytes). The
  /// buffer holds one D-vector per (row, rank) pair of a chunk of rows, so peak memory
  /// stays flat in k_max: larger k_max means smaller chunks, not a larger buffer.
  std::size_t scratch_bytes = std::size_t(64) << 20;
  /// The encoder GEMM's library (cpu/gemm.hpp).
  cpu_gemm gemm = cpu_gemm::automatic;
  /// The encoder GEMM's operands: fp32 (default) or bf16 copies of fp32 masters.
  gemm_precision encoder_precision = gemm_precision::fp32;

  int threads() const {
#if defined(_OPENMP)
    return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
    return 1;
#endif
  }
};

namespace cpu::detail {

/// Runs `fn(i)` for i in [0, n) over the backend's threads. `fn` must only write
/// data owned by index i. `Dynamic` selects dynamic scheduling (uneven work per i);
/// the results never depend on the schedule.
template <bool Dynamic = false, class Fn>
void parallel_for(const cpu_backend& be, std::ptrdiff_t n, Fn&& fn) {
  if (n <= 0) return;
#if defined(_OPENMP)
  const int t = int(std::min<std::ptrdiff_t>(be.threads(), n));
  if (t > 1) {
    if constexpr (Dynamic) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(t)
      for (std::ptrdiff_t i = 0; i < n; ++i) fn(i);
    } else {
#pragma omp parallel for schedule(static) num_threads(t)
      for (std::ptrdiff_t i = 0; i < n; ++i) fn(i);
    }
    return;
  }
#else
  (void)be;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) fn(i);
}

/// Runs `fn(begin, end)` over contiguous blocks of [0, n) of at least `grain` items.
template <class Fn>
void parallel_blocks(const cpu_backend& be, std::ptrdiff_t n, std::ptrdiff_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<std::ptrdiff_t>(grain, 1);
  const std::ptrdiff_t blocks = (n + grain - 1) / grain;
  parallel_for(be, blocks, [&](std::ptrdiff_t b) { fn(b * grain, std::min(n, (b + 1) * grain)); });
}

}  // namespace cpu::detail

HSAE_NAMESPACE_END
