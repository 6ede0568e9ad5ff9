// SPDX-License-Identifier: Apache-2.0
/// \file cuda/encode.cuh
/// The encoder on the GPU: `pre [B, F] = ReLU((x - b_dec) W_enc^T + b_enc)` and its
/// sorted top-k, mirroring cpu/encode.hpp.
///
/// Per call: b' = b_enc - W_enc b_dec (fp32 GEMV on the master weights; the GEMM then
/// reads x directly), one cuBLASLt GEMM with the bias and ReLU fused in its epilogue
/// (fp32 accumulation; x, W_enc's storage copy and pre in T), then the top-k kernel
/// (cuda/topk.cuh), which reads `pre` once. Where cuBLASLt has no algorithm for the
/// shape or alignment, cublasGemmEx plus an elementwise bias/ReLU kernel do the same.
#pragma once

#include <cstddef>
#include <type_traits>

#include "../config.hpp"
#include "../error.hpp"
#include "backend.cuh"
#include "detail/encode.cuh"
#include "detail/types.cuh"
#include "memory.cuh"
#include "model.cuh"
#include "topk.cuh"

HSAE_NAMESPACE_BEGIN

/// Scratch of the encoder, reused across calls (grows only; no allocation once shapes
/// are stable).
template <class T>
  requires cuda_storage<T>
struct encode_workspace {
  device_buffer<float> bias;    ///< b_enc - W_enc b_dec, fp32 [F]
  device_buffer<T> bias_s;      ///< the same in T for the cuBLASLt epilogue (T != float)
  device_buffer<unsigned char> lt_workspace;
  /// False forces the cublasGemmEx + bias/ReLU kernel path (tests use it to cover both).
  bool use_cublaslt = true;
  /// Set by each call: whether cuBLASLt's fused epilogue ran.
  bool used_cublaslt = false;
};

namespace cuda::detail {

template <class T, int F>
void check_encode_args(const device_sae<T, F>& m, device_matrix_view<const T> x, int k) {
  m.check_shapes();
  ::hsae::detail::expects<shape_error>(x.cols == m.d_model(), "cuda encode: the batch has width ", x.cols,
                                       ", expected d_model=", m.d_model(), " (batch shape [", x.rows, ", ", x.cols,
                                       "])");
  ::hsae::detail::expects<shape_error>(x.rows >= 1, "cuda encode: the batch is empty");
  ::hsae::detail::expects<shape_error>(x.data != nullptr, "cuda encode: the batch pointer is null");
  ::hsae::detail::expects<config_error>(k >= 1 && k <= m.d_sae(), "cuda encode: k=", k, " must be in [1, d_sae=",
                                        m.d_sae(), "]");
  ::hsae::detail::expects<config_error>(k <= topk_max_k, "cuda encode: k=", k, " exceeds the GPU top-k's maximum ",
                                        topk_max_k);
}

/// pre = ReLU((x - b_dec) W_enc^T + b_enc) into `pre` (resized).
template <class T, int F>
void pre_activations(const cuda_backend& be, const device_sae<T, F>& m, device_matrix_view<const T> x,
                     device_matrix<T>& pre, encode_workspace<T>& ws) {
  const int d_sae = m.d_sae(), d_model = m.d_model();
  pre.resize(be, x.rows, d_sae);
  ws.bias.resize(be, std::size_t(d_sae));
  fold_decoder_bias(be.cublas(), be.stream(), m.W_enc.data(), m.b_enc.data(), m.b_dec.data(), d_sae, d_model,
                    ws.bias.data());
  ws.used_cublaslt = false;
  if (ws.use_cublaslt) {
    const T* bias_s = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      bias_s = ws.bias.data();
    } else {
      ws.bias_s.resize(be, std::size_t(d_sae));
      convert(ws.bias.data(), ws.bias_s.data(), std::size_t(d_sae), be.stream());
      bias_s = ws.bias_s.data();
    }
    ws.lt_workspace.resize(be, encoder_lt_workspace_bytes);
    ws.used_cublaslt = encoder_gemm_lt(be.cublaslt(), be.stream(), m.enc_storage(), x.data, bias_s, pre.data(),
                                       x.rows, d_model, d_sae, ws.lt_workspace.data(), ws.lt_workspace.size());
  }
  if (!ws.used_cublaslt) {
    encoder_gemm(be.cublas(), m.enc_storage(), x.data, pre.data(), x.rows, d_model, d_sae);
    bias_relu(pre.data(), ws.bias.data(), x.rows, d_sae, be.stream());
  }
}

}  // namespace cuda::detail

/// Pre-activations `pre [B, F] = ReLU((x - b_dec) W_enc^T + b_enc)` (resized), fp32
/// accumulation, stored in T. Asynchronous on be.stream().
/// \throws hsae::shape_error if x is not [B >= 1, d_model] or the model's tensors
///         disagree.
template <class T, int F>
void pre_activations(const cuda_backend& be, const device_sae<T, F>& m, device_matrix_view<const T> x,
                     device_matrix<T>& pre, encode_workspace<T>& ws) {
  cuda::detail::check_encode_args(m, x, 1);
  cuda::detail::pre_activations(be, m, x, pre, ws);
}

/// Encodes `x [B, d_model]` (storage type T): pre-activations into `pre` [B, F] (kept:
/// AuxK reads them) and their sorted top-k into `code` ([B, k], order as cpu/topk.hpp).
/// Asynchronous on be.stream(); allocates only when `pre`, `code` or `ws` must grow.
/// The top-k is deterministic; the GEMM is cuBLAS's (deterministic for a fixed
/// algorithm and device).
/// \throws hsae::shape_error on a wrong batch width, hsae::config_error unless
///         1 <= k <= min(d_sae, cuda_topk_max_k).
template <class T, int F>
void encode(const cuda_backend& be, const device_sae<T, F>& m, device_matrix_view<const T> x, int k,
            device_code& code, device_matrix<T>& pre, encode_workspace<T>& ws) {
  cuda::detail::check_encode_args(m, x, k);
  cuda::detail::pre_activations(be, m, x, pre, ws);
  topk(be, std::as_const(pre).view(), k, code);
}

/// As above with scratch from the backend's stream-ordered pool (cached by the pool:
/// no driver allocation once shapes are stable).
template <class T, int F>
void encode(const cuda_backend& be, const device_sae<T, F>& m, device_matrix_view<const T> x, int k,
            device_code& code, device_matrix<T>& pre) {
  encode_workspace<T> ws;
  encode(be, m, x, k, code, pre, ws);
}

HSAE_NAMESPACE_END
