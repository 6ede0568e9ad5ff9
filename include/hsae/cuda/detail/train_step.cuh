// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/train_step.cuh
/// The two kernels of the CUDA train step that belong to no other facility:
///  - the finite check of the batch: a grid-stride pass over x [B, D] that sets the
///    step's `reject` flag (which the optimizer and the dead-latent update read on the
///    device, so that a rejected step changes nothing) and keeps the flat position of the
///    first non-finite entry (atomicMax of n - i: the largest key is the lowest index);
///  - the gathering of the step's statistics (loss, per-level squared errors, AuxK loss,
///    gradient norm, dead counts, the largest dead-latent counter, the first non-finite
///    entry's value) into one block of
///    device memory, so that the host reads a step's statistics with one copy.
/// Both are stream-ordered and never synchronise.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../../config.hpp"
#include "../error.cuh"
#include "sparse_backward.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// A step's record on the device, followed in memory by the schedule's per-level squared
/// errors (double [levels]). Its header is zeroed at the start of every step.
struct step_record {
  int reject = 0;                  ///< nonzero: the batch held NaN/Inf; the step changed nothing
  int dead_before = 0;             ///< dead latents before the step's update
  int dead_after = 0;              ///< and after it
  float bad_value = 0;             ///< the first non-finite entry (when reject)
  unsigned long long bad_key = 0;  ///< n - (flat index of the first non-finite entry); 0: none
  unsigned long long max_since = 0;  ///< the largest dead-latent counter after the update
  double loss = 0;
  double aux_loss = 0;
  double grad_norm = 0;
};
static_assert(sizeof(step_record) % sizeof(double) == 0, "step_record: the level array must stay aligned");

/// Bytes of a record with `levels` schedule levels.
inline std::size_t step_record_bytes(std::size_t levels) { return sizeof(step_record) + levels * sizeof(double); }

template <class T>
HSAE_KERNEL void __launch_bounds__(256)
    finite_check_kernel(const T* __restrict__ x, std::size_t n, step_record* __restrict__ rec) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (!isfinite(storage_traits<T>::to_float(x[i]))) {
      rec->reject = 1;
      atomicMax(&rec->bad_key, static_cast<unsigned long long>(n - i));
      return;  // this thread's later indices are larger
    }
  }
}

/// Sets `rec->reject` (and `bad_key`) when x [n] holds a NaN or Inf. The header must be
/// zero (train_step clears it first).
template <class T>
void finite_check(const T* x, std::size_t n, step_record* rec, cudaStream_t stream) {
  if (n == 0) return;
  constexpr unsigned block = 256;
  finite_check_kernel<T><<<grid_for(n, block), block, 0, stream>>>(x, n, rec);
  check_launch("finite_check_kernel");
}

/// Inputs of `gather_step_record` (device pointers; `aux_loss` may be null: 0).
template <class T>
struct step_record_sources {
  const double* loss = nullptr;
  const double* level_sse = nullptr;
  int levels = 0;
  const double* aux_loss = nullptr;
  const double* grad_norm = nullptr;
  const int* dead_after = nullptr;
  const unsigned long long* max_since = nullptr;  ///< may be null: 0
  const T* x = nullptr;  ///< the batch (for the first non-finite value)
  std::size_t n = 0;     ///< its entries
};

template <class T>
HSAE_KERNEL void gather_step_record_kernel(step_record_sources<T> s, step_record* __restrict__ rec) {
  double* levels = reinterpret_cast<double*>(rec + 1);
  for (int l = int(threadIdx.x); l < s.levels; l += int(blockDim.x)) levels[l] = s.level_sse[l];
  if (threadIdx.x != 0) return;
  rec->loss = *s.loss;
  rec->aux_loss = s.aux_loss != nullptr ? *s.aux_loss : 0.0;
  rec->grad_norm = *s.grad_norm;
  rec->dead_after = *s.dead_after;
  rec->max_since = s.max_since != nullptr ? *s.max_since : 0ull;
  if (rec->bad_key != 0) rec->bad_value = storage_traits<T>::to_float(s.x[s.n - rec->bad_key]);
}

/// Copies the step's statistics into `rec` (one CTA). Stream-ordered.
template <class T>
void gather_step_record(const step_record_sources<T>& s, step_record* rec, cudaStream_t stream) {
  gather_step_record_kernel<T><<<1, 128, 0, stream>>>(s, rec);
  check_launch("gather_step_record_kernel");
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
