// SPDX-License-Identifier: Apache-2.0
/// \file cpu/encode.hpp
/// Encoder and decoder on the CPU.
#pragma once

#include <algorithm>

#include "../error.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "../sparse_code.hpp"
#include "backend.hpp"
#include "gemm.hpp"
#include "topk.hpp"

HSAE_NAMESPACE_BEGIN

namespace cpu::detail {

template <class T, int F>
void check_batch(const sae<T, F>& m, cref<T> x, const char* what = "batch") {
  m.check_shapes();
  ::hsae::detail::expects<shape_error>(x.cols() == m.d_model(), what, " has width ", x.cols(), ", expected d_model=",
                                       m.d_model(), " (batch shape [", x.rows(), ", ", x.cols(), "])");
  ::hsae::detail::expects<shape_error>(x.rows() >= 1, what, " is empty");
  ::hsae::detail::expects<shape_error>(x.rows() <= std::numeric_limits<index_t>::max() &&
                                           std::int64_t(x.rows()) * m.d_model() > 0,
                                       what, " has too many rows (", x.rows(), ")");
}

/// `pre = (x - b_dec) W_enc^T` (no bias, no ReLU): one GEMM, 2*B*D*F FLOPs (cpu/gemm.hpp).
template <class T, int F>
void encoder_gemm(const cpu_backend& be, const sae<T, F>& m, cref<T> x, row_matrix<T>& pre) {
  encoder_gemm(be, x, m.b_dec, m.W_enc, pre);
}

/// The pass after the GEMM: `pre = ReLU(pre + b_enc)` in place and each row's sorted
/// top-k into `code`, one row at a time while it is in cache.
template <class T, int F>
void bias_relu_topk(const cpu_backend& be, const sae<T, F>& m, int k, sparse_code<T>& code, row_matrix<T>& pre) {
  code.resize(pre.rows(), k);
  reserve_thread_selectors<T>(be, index_t(m.d_sae()), index_t(k), [] {});
  parallel_for<true>(be, pre.rows(), [&](std::ptrdiff_t b) {
    auto r = pre.row(b);
    r = (r + m.b_enc.transpose()).cwiseMax(T(0));
    thread_selector<T>().select(r.data(), index_t(r.size()), index_t(k), code.values.row(b).data(), code.indices.row(b).data());
  });
}

/// The body of `encode` without its checks: the caller has checked the batch
/// (`check_batch`) and 1 <= k <= d_sae.
template <class T, int F>
void encode_unchecked(const cpu_backend& be, const sae<T, F>& m, cref<T> x, int k, sparse_code<T>& code,
                      row_matrix<T>& pre) {
  encoder_gemm(be, m, x, pre);
  bias_relu_topk(be, m, k, code, pre);
}

/// The body of `decode` without its checks: the caller has checked the model's shapes,
/// 1 <= k <= code.k() and every index of the code in [0, d_sae).
template <class T, int F>
void decode_unchecked(const cpu_backend& be, const sae<T, F>& m, const sparse_code<T>& code, int k,
                      row_matrix<T>& out) {
  out.resize(code.rows(), m.d_model());
  parallel_for(be, code.rows(), [&](std::ptrdiff_t b) {
    auto o = out.row(b);
    o = m.b_dec.transpose();
    for (int t = 0; t < k; ++t) {
      const T v = code.values(b, t);
      if (v != T(0)) o.noalias() += v * m.W_dec.row(code.indices(b, t));
    }
  });
}

}  // namespace cpu::detail

/// Pre-activations `pre [B, F] = ReLU((x - b_dec) W_enc^T + b_enc)`.
/// \throws hsae::shape_error if x is not [B, d_model].
template <cpu_scalar T, int F>
void pre_activations(const cpu_backend& be, const sae<T, F>& m, cref<T> x, row_matrix<T>& pre) {
  cpu::detail::check_batch(m, x);
  cpu::detail::encoder_gemm(be, m, x, pre);
  cpu::detail::parallel_for(be, pre.rows(), [&](std::ptrdiff_t b) {
    auto r = pre.row(b);
    r = (r + m.b_enc.transpose()).cwiseMax(T(0));
  });
}

/// Encodes `x [B, d_model]`: pre-activations into `pre [B, F]` (kept: AuxK reads them)
/// and their sorted top-k into `code` ([B, k]). Bias, ReLU and the top-k run in one
/// pass per row while the row is in cache. Deterministic; ties as in cpu/topk.hpp.
/// \throws hsae::shape_error on a wrong batch width, hsae::config_error unless
///         1 <= k <= d_sae.
template <cpu_scalar T, int F>
void encode(const cpu_backend& be, const sae<T, F>& m, cref<T> x, int k, sparse_code<T>& code, row_matrix<T>& pre) {
  cpu::detail::check_batch(m, x);
  hsae::detail::expects<config_error>(k >= 1 && k <= m.d_sae(), "k=", k, " must be in [1, d_sae=", m.d_sae(), "]");
  cpu::detail::encode_unchecked(be, m, x, k, code, pre);
}

/// Convenience overload that allocates.
template <cpu_scalar T, int F>
sparse_code<T> encode(const cpu_backend& be, const sae<T, F>& m, cref<T> x, int k) {
  sparse_code<T> code;
  row_matrix<T> pre;
  encode(be, m, x, k, code, pre);
  return code;
}

/// Decodes the top-`k` prefix of `code`: `out [B, d_model] = b_dec + sum_{t<k} v_t W_dec[i_t]`.
/// Any k in [1, code.k()] is valid (HierarchicalTopK: no retraining, no rescaling).
/// \throws hsae::config_error on k out of range, hsae::shape_error on an index outside
///         [0, d_sae).
template <cpu_scalar T, int F>
void decode(const cpu_backend& be, const sae<T, F>& m, const sparse_code<T>& code, int k, row_matrix<T>& out) {
  m.check_shapes();
  hsae::detail::expects<config_error>(k >= 1 && k <= code.k(), "decode: k=", k, " must be in [1, ", code.k(),
                                      "] (the code's k)");
  hsae::detail::expects<shape_error>((code.indices.array() >= 0).all() && (code.indices.array() < m.d_sae()).all(),
                                     "decode: the code holds a latent index outside [0, d_sae=", m.d_sae(), ")");
  cpu::detail::decode_unchecked(be, m, code, k, out);
}

template <cpu_scalar T, int F>
row_matrix<T> decode(const cpu_backend& be, const sae<T, F>& m, const sparse_code<T>& code, int k) {
  row_matrix<T> out;
  decode(be, m, code, k, out);
  return out;
}

HSAE_NAMESPACE_END
