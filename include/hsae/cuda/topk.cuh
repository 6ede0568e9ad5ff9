// SPDX-License-Identifier: Apache-2.0
/// \file cuda/topk.cuh
/// Sorted per-row top-k on the GPU, with the CPU's order (cpu/topk.hpp): values
/// descending, equal values by lower index, -0.0 == +0.0, NaN below every number. The
/// design (one CTA per row, one read of the row, shared-memory candidate buffer) is
/// described in detail/topk.cuh; the tiled variant of its streaming filter in
/// detail/topk_tiled.cuh.
#pragma once

#include <cstdint>

#include "../config.hpp"
#include "../error.hpp"
#include "backend.cuh"
#include "detail/topk.cuh"
#include "detail/topk_tiled.cuh"
#include "detail/types.cuh"
#include "memory.cuh"
#include "model.cuh"

HSAE_NAMESPACE_BEGIN

/// Largest k (and k_aux) the GPU top-k accepts.
inline constexpr int cuda_topk_max_k = cuda::detail::topk_max_k;
inline constexpr int cuda_topk_max_k_aux = cuda::detail::topk_max_k_aux;

/// Which kernel computes the top-k; all give the same result bit for bit.
///  - `automatic` (default): `tiled`, except `streaming` for 2-byte values (bf16, half)
///    when n * k >= 2^24 (`automatic_topk_kernel`): the faster of the two in each of the
///    24 shapes measured on an H200 (B = 4096, n = 16384-131072, k = 32-256, fp32 and
///    bf16; bench/RESULTS.md).
///  - `streaming`: one 16-byte vector per thread and step; tested and benchmarked on an
///    H100 and an H200.
///  - `tiled`: 16 keys per thread and tile, a float comparison per key in the common
///    case, one barrier per tile. Tested on an H200 (bit for bit equal to the CPU);
///    1.02-1.48x faster than `streaming` except for bf16 at large k and n, where it is
///    4-13 % slower (docs/TOPK.md).
enum class cuda_topk_kernel { automatic, streaming, tiled };

namespace cuda::detail {

/// The kernel `cuda_topk_kernel::automatic` runs for rows of `n` values of T at `k`.
/// On the H200 the tiled kernel's time grows with k faster than the streaming kernel's,
/// and for 2-byte values the crossing lies between n k = 2^23 (n = 65536, k = 128:
/// tiled 691 against 724 us) and 2^24 (n = 65536, k = 256: 914 against 799 us;
/// n = 131072, k = 128: 1213 against 1103 us). For fp32 tiled was faster in all 12 shapes.
template <class T>
constexpr cuda_topk_kernel automatic_topk_kernel(std::int64_t n, std::int64_t k) {
  return sizeof(T) == 2 && n * k >= (std::int64_t(1) << 24) ? cuda_topk_kernel::streaming : cuda_topk_kernel::tiled;
}

template <cuda_topk_kernel Kernel, class T>
void run_topk_rows(const topk_args<T>& a, int rows, cudaStream_t stream) {
  if constexpr (Kernel == cuda_topk_kernel::tiled) {
    topk_rows_tiled(a, rows, stream);
  } else if constexpr (Kernel == cuda_topk_kernel::streaming) {
    topk_rows(a, rows, stream);
  } else {
    if (automatic_topk_kernel<T>(a.n, a.k) == cuda_topk_kernel::tiled) topk_rows_tiled(a, rows, stream);
    else topk_rows(a, rows, stream);
  }
}

template <class T>
void check_topk_input(device_matrix_view<const T> pre, int k, const char* what) {
  ::hsae::detail::expects<shape_error>(pre.rows >= 0 && pre.cols >= 1, what, ": the input has shape [", pre.rows, ", ",
                                       pre.cols, "], expected at least one column");
  ::hsae::detail::expects<shape_error>(pre.rows == 0 || pre.data != nullptr, what, ": the input pointer is null");
  ::hsae::detail::expects<config_error>(k >= 1 && k <= pre.cols, what, ": k=", k, " must be in [1, ", pre.cols,
                                        "] (the row width)");
  ::hsae::detail::expects<config_error>(k <= topk_max_k, what, ": k=", k, " exceeds the GPU top-k's maximum ",
                                        topk_max_k);
}

}  // namespace cuda::detail

/// Sorted top-k of every row of `pre` [B, n] into `out` (resized to [B, k]): fp32
/// values (the inputs converted exactly) and int32 indices. Reads `pre` once.
/// Asynchronous on be.stream(); allocates only when `out` must grow.
/// `Kernel` picks the implementation (cuda_topk_kernel; the result does not depend on it).
/// \throws hsae::config_error unless 1 <= k <= min(n, cuda_topk_max_k),
///         hsae::shape_error on an empty row width.
template <cuda_topk_kernel Kernel = cuda_topk_kernel::automatic, class T>
  requires cuda_storage<T>
void topk(const cuda_backend& be, device_matrix_view<const T> pre, int k, device_code& out) {
  cuda::detail::check_topk_input(pre, k, "cuda topk");
  out.resize(be, pre.rows, k);
  cuda::detail::topk_args<T> a;
  a.in = pre.data;
  a.ld = pre.cols;
  a.n = pre.cols;
  a.k = k;
  a.values = out.values.data();
  a.indices = out.indices.data();
  cuda::detail::run_topk_rows<Kernel>(a, pre.rows, be.stream());
}

/// Top-k as `topk`, plus in the same read the top-`k_aux` among dead latents (AuxK)
/// into `aux` ([B, k_aux], same order). `dead_mask` holds ceil(n / 32) words; bit
/// (i % 32) of word (i / 32) set marks latent i dead. When a row has fewer than k_aux
/// dead latents the remaining slots hold index -1 and value 0 (callers that know the
/// dead count pass k_aux = min(k_aux, n_dead) to avoid them).
/// \throws as `topk`, and hsae::config_error unless 1 <= k_aux <= min(n,
///         cuda_topk_max_k_aux), hsae::shape_error if the mask is too short.
template <cuda_topk_kernel Kernel = cuda_topk_kernel::automatic, class T>
  requires cuda_storage<T>
void topk_with_auxk(const cuda_backend& be, device_matrix_view<const T> pre, int k,
                    const device_buffer<std::uint32_t>& dead_mask, int k_aux, device_code& out, device_code& aux) {
  cuda::detail::check_topk_input(pre, k, "cuda topk_with_auxk");
  ::hsae::detail::expects<config_error>(k_aux >= 1 && k_aux <= pre.cols && k_aux <= cuda_topk_max_k_aux,
                                        "cuda topk_with_auxk: k_aux=", k_aux, " must be in [1, min(n=", pre.cols,
                                        ", ", cuda_topk_max_k_aux, ")]");
  const std::size_t words = (std::size_t(pre.cols) + 31) / 32;
  ::hsae::detail::expects<shape_error>(dead_mask.size() >= words, "cuda topk_with_auxk: the dead-latent mask has ",
                                       dead_mask.size(), " words, expected ceil(n/32)=", words);
  out.resize(be, pre.rows, k);
  aux.resize(be, pre.rows, k_aux);
  cuda::detail::topk_args<T> a;
  a.in = pre.data;
  a.ld = pre.cols;
  a.n = pre.cols;
  a.k = k;
  a.values = out.values.data();
  a.indices = out.indices.data();
  a.dead_mask = dead_mask.data();
  a.k_aux = k_aux;
  a.aux_values = aux.values.data();
  a.aux_indices = aux.indices.data();
  cuda::detail::run_topk_rows<Kernel>(a, pre.rows, be.stream());
}

/// `topk` on an owning matrix.
template <cuda_topk_kernel Kernel = cuda_topk_kernel::automatic, class T>
  requires cuda_storage<T>
void topk(const cuda_backend& be, const device_matrix<T>& pre, int k, device_code& out) {
  topk<Kernel>(be, pre.view(), k, out);
}

/// `topk_with_auxk` on an owning matrix.
template <cuda_topk_kernel Kernel = cuda_topk_kernel::automatic, class T>
  requires cuda_storage<T>
void topk_with_auxk(const cuda_backend& be, const device_matrix<T>& pre, int k,
                    const device_buffer<std::uint32_t>& dead_mask, int k_aux, device_code& out, device_code& aux) {
  topk_with_auxk<Kernel>(be, pre.view(), k, dead_mask, k_aux, out, aux);
}

HSAE_NAMESPACE_END
