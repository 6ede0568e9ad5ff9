// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/dead_latents.cuh
/// Dead-latent counters on the GPU, matching dead_latents.hpp: every update adds the
/// batch's row count to each latent's tokens-since-fired counter, and a latent that held
/// a positive value among the first k ranks of any row restarts at 0. A latent is dead
/// when its counter is >= dead_after. The update also rebuilds, for the AuxK top-k:
///  - a bitmask, bit (f % 32) of word f / 32 set when latent f is dead;
///  - the dead latents in ascending order (stable cub::DeviceSelect::Flagged) and their
///    count, both on the device.
/// Kernels: mark fired latents (idempotent byte stores, no atomics), one thread per
/// latent for the counters (warp ballot for the mask words), then the selection.
#pragma once

#include <cuda_runtime.h>
#include <thrust/iterator/counting_iterator.h>

#include <cstddef>
#include <cstdint>
#include <cub/device/device_select.cuh>

#include "../../config.hpp"
#include "../error.cuh"
#include "sparse_backward.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// The tracker's device state (all device pointers).
struct dead_latent_state {
  std::int64_t* since = nullptr;  ///< [F] tokens since each latent last fired
  std::uint32_t* mask = nullptr;  ///< [ceil(F / 32)] dead bitmask
  int* dead_list = nullptr;       ///< [F] dead latents, ascending; the first *num_dead are valid
  int* num_dead = nullptr;        ///< [1]
  /// [1] optional: set by every update to the largest counter after it (the host's
  /// bound on the counters, device_dead_latent_tracker::may_have_dead, is tightened from it).
  unsigned long long* max_since = nullptr;
  int F = 0;
  std::int64_t dead_after = 10'000'000;
};

namespace dead_impl {

inline std::size_t select_temp_bytes(int F) {
  std::size_t bytes = 0;
  HSAE_CUDA_TRY(cub::DeviceSelect::Flagged(nullptr, bytes, thrust::counting_iterator<int>(0),
                                           static_cast<const std::uint8_t*>(nullptr), static_cast<int*>(nullptr),
                                           static_cast<int*>(nullptr), F));
  return bytes;
}

/// flags[f] = 1 for every latent with a positive value among the first k ranks of a row.
template <int Dummy = 0>
HSAE_KERNEL void mark_kernel(const float* __restrict__ values, const index_t* __restrict__ indices, int B, int kc,
                             int k, int F, std::uint8_t* __restrict__ flags) {
  const std::int64_t p = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= std::int64_t(B) * k) return;
  const std::int64_t b = p / k, t = p - b * k;
  const std::size_t q = std::size_t(b) * std::size_t(kc) + std::size_t(t);
  if (!(values[q] > 0.f)) return;
  const index_t f = indices[q];
  if (f >= 0 && f < F) flags[f] = 1;
}

/// Counters, dead flags (replacing the fired flags) and mask words, and the largest
/// counter (atomicMax per warp into s.max_since, zeroed before). With `reject` set
/// (nonzero) the counters stay as they are and only the flags and mask are rebuilt.
template <int Dummy = 0>
HSAE_KERNEL void update_kernel(dead_latent_state s, std::int64_t rows, std::uint8_t* __restrict__ flags,
                               const int* __restrict__ reject) {
  const std::int64_t f = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool apply = reject == nullptr || *reject == 0;
  bool dead = false;
  unsigned long long largest = 0;  // counters are >= 0
  if (f < s.F) {
    const std::int64_t since = !apply ? s.since[f] : (flags[f] != 0 ? 0 : s.since[f] + rows);
    s.since[f] = since;
    dead = since >= s.dead_after;
    flags[f] = dead ? 1 : 0;
    largest = static_cast<unsigned long long>(since);
  }
  const unsigned word = __ballot_sync(0xffffffffu, dead);
  if ((threadIdx.x & 31) == 0 && f < s.F) s.mask[f / 32] = word;
  if (s.max_since != nullptr) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const unsigned long long o = __shfl_xor_sync(0xffffffffu, largest, off);
      largest = o > largest ? o : largest;
    }
    if ((threadIdx.x & 31) == 0 && largest != 0) atomicMax(s.max_since, largest);
  }
}

}  // namespace dead_impl

/// Workspace of update_dead_latents for F latents.
inline std::size_t dead_latents_workspace_bytes(int F) {
  grad_workspace_carver c(nullptr);
  c.take<std::uint8_t>(std::size_t(F));
  c.take_bytes(dead_impl::select_temp_bytes(F));
  return c.used();
}

/// Counts `rows` more tokens and restarts the latents that fired in the code
/// (`values`/`indices` [rows, kc], ranks t < k; `values` may be null with rows == 0 to
/// only rebuild the mask and list, e.g. after uploading counters). Stream-ordered.
/// `reject`: optional device flag; nonzero at run time leaves the counters unchanged.
inline void update_dead_latents(const dead_latent_state& s, const float* values, const index_t* indices, int rows,
                                int kc, int k, void* workspace, std::size_t workspace_bytes, cudaStream_t stream,
                                const int* reject = nullptr) {
  ::hsae::detail::expects<config_error>(s.F >= 1 && s.dead_after >= 1, "dead latents: need F >= 1 and dead_after >= 1");
  ::hsae::detail::expects<config_error>(workspace_bytes >= dead_latents_workspace_bytes(s.F),
                                        "dead latents: workspace of ", workspace_bytes, " bytes, need ",
                                        dead_latents_workspace_bytes(s.F));
  ::hsae::detail::expects<shape_error>(rows >= 0 && (rows == 0 || (values && indices && k >= 0 && k <= kc)),
                                       "dead latents: bad code (rows=", rows, ", k=", k, ", kc=", kc, ")");
  grad_workspace_carver c(workspace);
  auto* flags = c.take<std::uint8_t>(std::size_t(s.F));
  std::size_t temp_bytes = dead_impl::select_temp_bytes(s.F);
  void* temp = c.take_bytes(temp_bytes);
  HSAE_CUDA_TRY(cudaMemsetAsync(flags, 0, std::size_t(s.F), stream));
  if (s.max_since != nullptr) HSAE_CUDA_TRY(cudaMemsetAsync(s.max_since, 0, sizeof(*s.max_since), stream));
  const std::int64_t pairs = std::int64_t(rows) * k;
  if (pairs > 0) {
    dead_impl::mark_kernel<<<unsigned((pairs + 255) / 256), 256, 0, stream>>>(values, indices, rows, kc, k, s.F, flags);
    check_launch("dead latents mark_kernel");
  }
  dead_impl::update_kernel<<<unsigned((s.F + 255) / 256), 256, 0, stream>>>(s, rows, flags, reject);
  check_launch("dead latents update_kernel");
  HSAE_CUDA_TRY(cub::DeviceSelect::Flagged(temp, temp_bytes, thrust::counting_iterator<int>(0),
                                           static_cast<const std::uint8_t*>(flags), s.dead_list, s.num_dead, s.F,
                                           stream));
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
