// SPDX-License-Identifier: Apache-2.0
/// \file model.hpp
/// The SAE parameters and their gradients, shared by every backend; the settings of the
/// initialisation recipe of docs/OBJECTIVE.md (`init_options`; the recipe: cpu/init.hpp).
///
/// Layout (docs/OBJECTIVE.md notation): `W_enc [F, D]` (row f = latent f's encoder vector),
/// `b_enc [F]`, `W_dec [F, D]` (row f = atom e_f, unit L2 norm), `b_dec [D]`.
/// Forward: `pre = ReLU((x - b_dec) W_enc^T + b_enc)`, sorted top-k, and
/// `x_hat = b_dec + sum_t v_t W_dec[i_t]` (see cpu/encode.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "matrix.hpp"

HSAE_NAMESPACE_BEGIN

/// The parameters of one sparse autoencoder.
///
/// \tparam T  storage and arithmetic precision on the CPU (float or double).
/// \tparam F  dictionary width d_sae fixed at compile time, or hsae::dynamic. A fixed
///            width becomes the compile-time row count of the weight matrices.
template <cpu_scalar T, int F = dynamic>
struct sae {
  static_assert(F == dynamic || F >= 1, "hsae::sae: the dictionary width F must be >= 1 or hsae::dynamic");
  using scalar = T;
  static constexpr int static_d_sae = F;
  /// [F, D] row-major.
  using weight_matrix = row_matrix<T, F>;

  weight_matrix W_enc;
  vector<T> b_enc;
  weight_matrix W_dec;
  vector<T> b_dec;

  sae() = default;
  /// Zero-initialised parameters; see `init` for the training recipe.
  /// \throws hsae::config_error on a non-positive width, or d_sae != F for a fixed F.
  explicit sae(int d_model, int d_sae = F) { resize(d_model, d_sae); }

  void resize(int d_model, int d_sae = F) {
    detail::expects<config_error>(d_model >= 1, "d_model must be >= 1, got ", d_model);
    detail::expects<config_error>(d_sae >= 1, "d_sae must be >= 1, got ", d_sae);
    detail::expects<config_error>(F == dynamic || d_sae == F, "d_sae=", d_sae,
                                  " differs from the compile-time dictionary width F=", F);
    W_enc.setZero(d_sae, d_model);
    W_dec.setZero(d_sae, d_model);
    b_enc.setZero(d_sae);
    b_dec.setZero(d_model);
  }

  int d_model() const { return int(W_dec.cols()); }
  int d_sae() const {
    if constexpr (F != dynamic) return F;
    else return int(W_dec.rows());
  }

  /// \throws hsae::shape_error if the four tensors do not agree.
  void check_shapes() const {
    const auto f = W_dec.rows(), d = W_dec.cols();
    detail::expect_shape("W_enc", W_enc.rows(), W_enc.cols(), f, d);
    detail::expects<shape_error>(b_enc.size() == f, "b_enc has ", b_enc.size(), " entries, expected d_sae=", f);
    detail::expects<shape_error>(b_dec.size() == d, "b_dec has ", b_dec.size(), " entries, expected d_model=", d);
  }
};

/// Gradients of the loss with respect to every parameter of an `sae<T, F>`.
template <cpu_scalar T, int F = dynamic>
struct sae_gradients {
  typename sae<T, F>::weight_matrix W_enc;
  vector<T> b_enc;
  typename sae<T, F>::weight_matrix W_dec;
  vector<T> b_dec;

  /// Shapes like `m`, every entry zero (on the calling thread; the CPU step zeroes its
  /// workspace over the backend's threads: zero_gradients, cpu/loss.hpp).
  void zeros_like(const sae<T, F>& m) {
    W_enc.setZero(m.W_enc.rows(), m.W_enc.cols());
    W_dec.setZero(m.W_dec.rows(), m.W_dec.cols());
    b_enc.setZero(m.b_enc.size());
    b_dec.setZero(m.b_dec.size());
  }
};

/// How `init` chooses b_dec.
enum class decoder_bias_init { geometric_median, mean, zero };

struct init_options {
  std::uint64_t seed = 0;
  decoder_bias_init b_dec = decoder_bias_init::geometric_median;
  /// Weiszfeld iterations and relative tolerance for the geometric median.
  int median_max_iter = 100;
  double median_tol = 1e-7;
};

HSAE_NAMESPACE_END
