// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/encode.cuh
/// Encoder pieces on raw device pointers:
///  - `fold_decoder_bias`: b' = b_enc - W_enc b_dec (fp32 GEMV), so the GEMM reads x
///    directly instead of a centred copy: (x - b_dec) W_enc^T + b_enc = x W_enc^T + b'.
///  - `encoder_gemm_lt`: pre = ReLU(x W_enc^T + b') in one cuBLASLt call (epilogue
///    CUBLASLT_EPILOGUE_RELU_BIAS), fp32 compute, inputs and output in T.
///  - `encoder_gemm` + `bias_relu`: the same with cublasGemmEx and an elementwise
///    kernel, used when cuBLASLt offers no algorithm for the shape / alignment.
///
/// Layout: everything row-major. cuBLAS is column-major, so the row-major product
/// pre[B, F] = x[B, D] W[F, D]^T is computed as the column-major pre^T[F, B] =
/// op_T(W as [D, F], ld D) * (x^T as [D, B], ld D), ld(pre^T) = F.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../../config.hpp"
#include "../error.cuh"
#include "types.cuh"

HSAE_NAMESPACE_BEGIN

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// out[f] = b_enc[f] - sum_j W_enc[f, j] b_dec[j] (fp32), on the handle's stream.
inline void fold_decoder_bias(cublasHandle_t h, cudaStream_t stream, const float* W_enc, const float* b_enc,
                              const float* b_dec, int d_sae, int d_model, float* out) {
  HSAE_CUDA_TRY(cudaMemcpyAsync(out, b_enc, std::size_t(d_sae) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
  const float minus_one = -1.0f, one = 1.0f;
  // Column-major view of W_enc: [D, F], ld D; y[F] = A^T b_dec.
  HSAE_CUBLAS_TRY(cublasSgemv(h, CUBLAS_OP_T, d_model, d_sae, &minus_one, W_enc, d_model, b_dec, 1, &one, out, 1));
}

/// pre[B, F] = W x^T product only (no bias, no ReLU), cublasGemmEx, fp32 compute.
template <class T>
void encoder_gemm(cublasHandle_t h, const T* W, const T* x, T* pre, int rows, int d_model, int d_sae) {
  const float alpha = 1.0f, beta = 0.0f;
  constexpr cudaDataType_t t = storage_traits<T>::cuda_type;
  HSAE_CUBLAS_TRY(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, d_sae, rows, d_model, &alpha, W, t, d_model, x, t,
                               d_model, &beta, pre, t, d_sae, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

template <class T>
HSAE_KERNEL void bias_relu_kernel(T* __restrict__ pre, const float* __restrict__ bias, std::size_t total, int d_sae) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const float v = storage_traits<T>::to_float(pre[i]) + bias[i % std::size_t(d_sae)];
    pre[i] = storage_traits<T>::from_float(v < 0.0f ? 0.0f : v);
  }
}

/// pre[b, f] = ReLU(pre[b, f] + bias[f]) in place (fp32 arithmetic).
template <class T>
void bias_relu(T* pre, const float* bias, int rows, int d_sae, cudaStream_t stream) {
  const std::size_t total = std::size_t(rows) * std::size_t(d_sae);
  if (total == 0) return;
  constexpr unsigned block = 256;
  bias_relu_kernel<T><<<grid_for(total, block), block, 0, stream>>>(pre, bias, total, d_sae);
  HSAE_CUDA_CHECK_LAUNCH();
}

/// Largest power of two (<= 256) dividing the address: cuBLASLt's alignment hint.
inline std::uint32_t pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

/// RAII holders for the cuBLASLt descriptors of one call.
struct lt_matmul_desc {
  cublasLtMatmulDesc_t d = nullptr;
  ~lt_matmul_desc() {
    if (d != nullptr) cublasLtMatmulDescDestroy(d);
  }
};
struct lt_layout {
  cublasLtMatrixLayout_t d = nullptr;
  ~lt_layout() {
    if (d != nullptr) cublasLtMatrixLayoutDestroy(d);
  }
};
struct lt_preference {
  cublasLtMatmulPreference_t d = nullptr;
  ~lt_preference() {
    if (d != nullptr) cublasLtMatmulPreferenceDestroy(d);
  }
};

/// Workspace cuBLASLt may use (bytes); 32 MiB suits Hopper, more than Ampere needs.
inline constexpr std::size_t encoder_lt_workspace_bytes = std::size_t(32) << 20;

/// pre = ReLU(x W^T + bias) in one cuBLASLt matmul with the RELU_BIAS epilogue; `bias`
/// [F] in T (the epilogue adds it in fp32). Returns false, having enqueued nothing,
/// when cuBLASLt has no algorithm for these types, shapes and pointer alignments.
template <class T>
bool encoder_gemm_lt(cublasLtHandle_t lt, cudaStream_t stream, const T* W, const T* x, const T* bias, T* pre,
                     int rows, int d_model, int d_sae, void* workspace, std::size_t workspace_bytes) {
  constexpr cudaDataType_t t = storage_traits<T>::cuda_type;
  lt_matmul_desc op;
  HSAE_CUBLAS_TRY(cublasLtMatmulDescCreate(&op.d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  HSAE_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof trans_a));
  HSAE_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof trans_b));
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_RELU_BIAS;
  HSAE_CUBLAS_TRY(cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
  const void* bias_ptr = bias;
  HSAE_CUBLAS_TRY(
      cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof bias_ptr));
  const cudaDataType_t bias_type = t;
  HSAE_CUBLAS_TRY(
      cublasLtMatmulDescSetAttribute(op.d, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));

  lt_layout a, b, c;
  HSAE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&a.d, t, std::uint64_t(d_model), std::uint64_t(d_sae), d_model));
  HSAE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&b.d, t, std::uint64_t(d_model), std::uint64_t(rows), d_model));
  HSAE_CUBLAS_TRY(cublasLtMatrixLayoutCreate(&c.d, t, std::uint64_t(d_sae), std::uint64_t(rows), d_sae));

  lt_preference pref;
  HSAE_CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&pref.d));
  const std::uint64_t ws = workspace_bytes;
  HSAE_CUBLAS_TRY(cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                       sizeof ws));
  const std::uint32_t al_a = pointer_alignment(W), al_b = pointer_alignment(x), al_c = pointer_alignment(pre);
  HSAE_CUBLAS_TRY(
      cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
  HSAE_CUBLAS_TRY(
      cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
  HSAE_CUBLAS_TRY(
      cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c));
  HSAE_CUBLAS_TRY(
      cublasLtMatmulPreferenceSetAttribute(pref.d, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c));

  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t hs =
      cublasLtMatmulAlgoGetHeuristic(lt, op.d, a.d, b.d, c.d, c.d, pref.d, 1, &heuristic, &found);
  if (hs == CUBLAS_STATUS_NOT_SUPPORTED || (hs == CUBLAS_STATUS_SUCCESS && found == 0)) return false;
  HSAE_CUBLAS_TRY(hs);
  const float alpha = 1.0f, beta = 0.0f;
  HSAE_CUBLAS_TRY(cublasLtMatmul(lt, op.d, &alpha, W, a.d, x, b.d, &beta, pre, c.d, pre, c.d, &heuristic.algo,
                                 workspace, workspace_bytes, stream));
  return true;
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

HSAE_NAMESPACE_END
