// SPDX-License-Identifier: Apache-2.0
/// \file cuda/error.cuh
/// `hsae::cuda_error` and the macros that wrap every CUDA runtime and cuBLAS call.
#pragma once

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../config.hpp"
#include "../error.hpp"

HSAE_NAMESPACE_BEGIN

/// A CUDA runtime, driver or cuBLAS call failed. The message names the call, the
/// library's error string, and the file and line of the call.
class cuda_error : public error {
 public:
  using error::error;
};

namespace cuda::detail {

inline const char* cublas_status_string(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw cuda_error(::hsae::detail::concat("hsae: CUDA call ", call, " failed: ", cudaGetErrorName(e), " (",
                                          cudaGetErrorString(e), ") at ", file, ":", line));
}

[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw cuda_error(::hsae::detail::concat("hsae: cuBLAS call ", call, " failed: ", cublas_status_string(s), " (",
                                          int(s), ") at ", file, ":", line));
}

}  // namespace cuda::detail

HSAE_NAMESPACE_END

/// Evaluates a CUDA runtime call; throws hsae::cuda_error unless it returns cudaSuccess.
#define HSAE_CUDA_TRY(expr)                                                       \
  do {                                                                            \
    const cudaError_t hsae_cuda_try_status_ = (expr);                             \
    if (hsae_cuda_try_status_ != cudaSuccess) [[unlikely]]                        \
      ::hsae::cuda::detail::throw_cuda(hsae_cuda_try_status_, #expr, __FILE__, __LINE__); \
  } while (0)

/// Evaluates a cuBLAS / cuBLASLt call; throws hsae::cuda_error unless it returns
/// CUBLAS_STATUS_SUCCESS.
#define HSAE_CUBLAS_TRY(expr)                                                       \
  do {                                                                              \
    const cublasStatus_t hsae_cublas_try_status_ = (expr);                          \
    if (hsae_cublas_try_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]              \
      ::hsae::cuda::detail::throw_cublas(hsae_cublas_try_status_, #expr, __FILE__, __LINE__); \
  } while (0)

/// Checks the launch of the kernel just enqueued (configuration errors; asynchronous
/// execution errors surface at the next synchronising call).
#define HSAE_CUDA_CHECK_LAUNCH() HSAE_CUDA_TRY(cudaGetLastError())
