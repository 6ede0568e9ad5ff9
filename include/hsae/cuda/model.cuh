// SPDX-License-Identifier: Apache-2.0
/// \file cuda/model.cuh
/// The SAE on the device: fp32 master weights (what the optimizer updates) plus, for a
/// narrower storage type T, storage copies that the encoder GEMM and the decoder
/// gathers read. Also the device gradients and the device sparse code.
#pragma once

#include <type_traits>

#include "../config.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../model.hpp"
#include "backend.cuh"
#include "detail/types.cuh"
#include "memory.cuh"

HSAE_NAMESPACE_BEGIN

/// SAE parameters on the device (layout as `hsae::sae`: W_enc, W_dec [F, D] row-major,
/// b_enc [F], b_dec [D]).
///
/// \tparam T  storage type of the GEMM / gather copies (float, __half, __nv_bfloat16).
/// \tparam F  compile-time dictionary width or hsae::dynamic (checked on upload).
template <class T = float, int F = dynamic>
  requires cuda_storage<T>
struct device_sae {
  static_assert(F == dynamic || F >= 1, "hsae::device_sae: the dictionary width F must be >= 1 or hsae::dynamic");
  using storage_type = T;
  static constexpr int static_d_sae = F;

  /// fp32 master weights.
  device_matrix<float> W_enc, W_dec;
  device_buffer<float> b_enc, b_dec;
  /// Storage copies in T, kept equal to T(master) by `sync_storage` (empty for float).
  device_matrix<T> W_enc_s, W_dec_s;

  int d_model() const { return int(W_dec.cols()); }
  int d_sae() const { return int(W_dec.rows()); }

  /// W_enc in the storage type ([F, D] row-major).
  const T* enc_storage() const {
    if constexpr (std::is_same_v<T, float>) return W_enc.data();
    else return W_enc_s.data();
  }
  /// W_dec in the storage type ([F, D] row-major).
  const T* dec_storage() const {
    if constexpr (std::is_same_v<T, float>) return W_dec.data();
    else return W_dec_s.data();
  }

  /// Recomputes the storage copies from the master weights (no-op for float). Call after
  /// every update of W_enc / W_dec. Asynchronous on be.stream().
  void sync_storage(const cuda_backend& be) {
    if constexpr (!std::is_same_v<T, float>) {
      W_enc_s.resize(be, W_enc.rows(), W_enc.cols());
      W_dec_s.resize(be, W_dec.rows(), W_dec.cols());
      cuda::detail::convert(W_enc.data(), W_enc_s.data(), W_enc.size(), be.stream());
      cuda::detail::convert(W_dec.data(), W_dec_s.data(), W_dec.size(), be.stream());
    } else {
      (void)be;
    }
  }

  /// Copies `m` to the device (and refreshes the storage copies). Asynchronous.
  /// \throws hsae::shape_error if `m`'s tensors disagree, hsae::config_error if its
  ///         width differs from a fixed F.
  template <int G>
  void upload(const cuda_backend& be, const sae<float, G>& m) {
    m.check_shapes();
    ::hsae::detail::expects<config_error>(F == dynamic || m.d_sae() == F, "device_sae::upload: d_sae=", m.d_sae(),
                                          " differs from the compile-time width F=", F);
    copy_to_device(be, cref<float>(m.W_enc), W_enc);
    copy_to_device(be, cref<float>(m.W_dec), W_dec);
    copy_to_device(be, cvref<float>(m.b_enc), b_enc);
    copy_to_device(be, cvref<float>(m.b_dec), b_dec);
    sync_storage(be);
  }

  /// Copies the fp32 master weights into `m` (resized). Synchronises be.stream().
  template <int G>
  void download(const cuda_backend& be, sae<float, G>& m) const {
    ::hsae::detail::expects<config_error>(G == dynamic || d_sae() == G, "device_sae::download: d_sae=", d_sae(),
                                          " differs from the host model's compile-time width F=", G);
    row_matrix<float> w;
    copy_to_host(be, W_enc, w);
    m.W_enc = w;
    copy_to_host(be, W_dec, w);
    m.W_dec = w;
    vector<float> b;
    copy_to_host(be, b_enc, b);
    m.b_enc = b;
    copy_to_host(be, b_dec, b);
    m.b_dec = b;
  }

  /// \throws hsae::shape_error if the tensors disagree.
  void check_shapes() const {
    const index_t f = W_dec.rows(), d = W_dec.cols();
    ::hsae::detail::expect_shape("device W_enc", W_enc.rows(), W_enc.cols(), f, d);
    ::hsae::detail::expects<shape_error>(b_enc.size() == std::size_t(f), "device b_enc has ", b_enc.size(),
                                         " entries, expected d_sae=", f);
    ::hsae::detail::expects<shape_error>(b_dec.size() == std::size_t(d), "device b_dec has ", b_dec.size(),
                                         " entries, expected d_model=", d);
    ::hsae::detail::expects<shape_error>(F == dynamic || f == F, "device_sae: d_sae=", f,
                                         " differs from the compile-time width F=", F);
    if constexpr (!std::is_same_v<T, float>) {
      ::hsae::detail::expect_shape("device W_enc storage copy", W_enc_s.rows(), W_enc_s.cols(), f, d);
      ::hsae::detail::expect_shape("device W_dec storage copy", W_dec_s.rows(), W_dec_s.cols(), f, d);
    }
  }
};

/// fp32 gradients of every parameter of a `device_sae<T, F>`.
template <int F = dynamic>
struct device_gradients {
  device_matrix<float> W_enc;
  device_buffer<float> b_enc;
  device_matrix<float> W_dec;
  device_buffer<float> b_dec;

  /// Shapes like `m`, every entry zero. Asynchronous.
  template <class T>
  void zeros_like(const cuda_backend& be, const device_sae<T, F>& m) {
    W_enc.resize(be, m.W_enc.rows(), m.W_enc.cols());
    W_dec.resize(be, m.W_dec.rows(), m.W_dec.cols());
    b_enc.resize(be, m.b_enc.size());
    b_dec.resize(be, m.b_dec.size());
    W_enc.zero(be);
    W_dec.zero(be);
    b_enc.zero(be);
    b_dec.zero(be);
  }
};

/// Device sparse code: `values [B, k]` fp32, sorted descending per row, and
/// `indices [B, k]` (distinct latents per row), as `hsae::sparse_code`.
struct device_code {
  device_matrix<float> values;
  device_matrix<index_t> indices;

  index_t rows() const { return values.rows(); }
  int k() const { return int(values.cols()); }
  void resize(const cuda_backend& be, index_t rows, int k) {
    values.resize(be, rows, k);
    indices.resize(be, rows, k);
  }
};

HSAE_NAMESPACE_END
