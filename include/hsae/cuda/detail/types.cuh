// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/types.cuh
/// Storage precisions of the CUDA backend (float, __half, __nv_bfloat16): conversions to
/// and from fp32 (all arithmetic is fp32), their cuBLAS type tags, and an elementwise
/// conversion kernel.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <library_types.h>

#include "../../config.hpp"
#include "../error.cuh"
#include "kernel.cuh"

HSAE_NAMESPACE_BEGIN

/// Storage types the CUDA backend accepts for activations and weight copies.
template <class T>
concept cuda_storage = std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <class T>
struct storage_traits;

template <>
struct storage_traits<float> {
  static constexpr cudaDataType_t cuda_type = CUDA_R_32F;
  static constexpr const char* name = "float";
  __host__ __device__ static float to_float(float v) { return v; }
  __host__ __device__ static float from_float(float v) { return v; }
};

template <>
struct storage_traits<__half> {
  static constexpr cudaDataType_t cuda_type = CUDA_R_16F;
  static constexpr const char* name = "half";
  __host__ __device__ static float to_float(__half v) { return __half2float(v); }
  /// Round to nearest even.
  __host__ __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct storage_traits<__nv_bfloat16> {
  static constexpr cudaDataType_t cuda_type = CUDA_R_16BF;
  static constexpr const char* name = "bfloat16";
  __host__ __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  /// Round to nearest even.
  __host__ __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// Grid size for a grid-stride loop over n items: enough blocks to fill the device, at
/// most 65535 * 32 (the loops stride, so any n is covered).
inline unsigned grid_for(std::size_t n, unsigned block) {
  const std::size_t want = (n + block - 1) / block;
  const std::size_t cap = std::size_t(65535) * 32;
  return unsigned(want == 0 ? 1 : (want < cap ? want : cap));
}

template <class Src, class Dst>
HSAE_KERNEL void convert_kernel(const Src* __restrict__ src, Dst* __restrict__ dst, std::size_t n) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    dst[i] = storage_traits<Dst>::from_float(storage_traits<Src>::to_float(src[i]));
}

/// dst[i] = Dst(Src(src[i])) for i < n, on `stream` (fp32 round trip; round to nearest
/// even when narrowing).
template <class Src, class Dst>
void convert(const Src* src, Dst* dst, std::size_t n, cudaStream_t stream) {
  if (n == 0) return;
  constexpr unsigned block = 256;
  convert_kernel<Src, Dst><<<grid_for(n, block), block, 0, stream>>>(src, dst, n);
  HSAE_CUDA_CHECK_LAUNCH();
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
