// SPDX-License-Identifier: Apache-2.0
/// \file data/synthetic.hpp
/// Synthetic activations drawn from a known dictionary, for tests, the demo, and
/// checking that training recovers the true atoms.
///
/// x = sum_j a_j d_j over a sparse set of true atoms d_j (unit norm, [n_atoms, D]),
/// atom j active with probability proportional to (j + 1)^(-zipf_exponent) (power-law
/// feature frequencies, scaled so that on average `mean_active` atoms are active), and
/// magnitudes a_j = 1 + magnitude_std * |N(0, 1)| drawn per activation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../cpu/backend.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../rng.hpp"

HSAE_NAMESPACE_BEGIN

struct synthetic_options {
  int d_model = 64;
  int n_atoms = 128;
  /// Expected number of active atoms per row.
  double mean_active = 4.0;
  /// Power-law exponent of atom frequencies (0: uniform).
  double zipf_exponent = 0.5;
  /// Magnitudes are 1 + magnitude_std * |N(0, 1)|.
  double magnitude_std = 0.5;
  /// Gaussian noise added to every entry.
  double noise_std = 0.0;
  std::uint64_t seed = 1;

  void validate() const {
    detail::expects<config_error>(d_model >= 1 && n_atoms >= 1, "synthetic: d_model and n_atoms must be >= 1");
    detail::expects<config_error>(mean_active > 0 && mean_active <= n_atoms, "synthetic: mean_active=", mean_active,
                                  " must be in (0, n_atoms]");
    detail::expects<config_error>(zipf_exponent >= 0 && magnitude_std >= 0 && noise_std >= 0,
                                  "synthetic: exponents and standard deviations must be >= 0");
  }
};

/// A stream of synthetic activation batches with a known dictionary.
template <cpu_scalar T>
class synthetic_source {
 public:
  explicit synthetic_source(const synthetic_options& opt) : opt_(opt), gen_(opt.seed) {
    opt_.validate();
    atoms_.resize(opt_.n_atoms, opt_.d_model);
    for (Eigen::Index j = 0; j < atoms_.rows(); ++j) {
      for (Eigen::Index d = 0; d < atoms_.cols(); ++d) atoms_(j, d) = T(gen_.normal());
      atoms_.row(j).normalize();
    }
    prob_.resize(std::size_t(opt_.n_atoms));
    double s = 0;
    for (int j = 0; j < opt_.n_atoms; ++j) s += (prob_[std::size_t(j)] = std::pow(double(j + 1), -opt_.zipf_exponent));
    for (auto& p : prob_) p = std::min(1.0, p * opt_.mean_active / s);
  }

  /// The true dictionary [n_atoms, d_model], unit rows.
  const row_matrix<T>& atoms() const { return atoms_; }
  /// Activation probability of each atom.
  const std::vector<double>& frequencies() const { return prob_; }
  int d_model() const { return opt_.d_model; }

  /// Fills `x` with `rows` fresh rows.
  void next(Eigen::Index rows, row_matrix<T>& x) {
    x.setZero(rows, opt_.d_model);
    for (Eigen::Index b = 0; b < rows; ++b) {
      for (int j = 0; j < opt_.n_atoms; ++j) {
        if (gen_.uniform() >= prob_[std::size_t(j)]) continue;
        const T a = T(1.0 + opt_.magnitude_std * std::abs(gen_.normal()));
        x.row(b).noalias() += a * atoms_.row(j);
      }
      if (opt_.noise_std > 0)
        for (int d = 0; d < opt_.d_model; ++d) x(b, d) += T(opt_.noise_std * gen_.normal());
    }
  }
  row_matrix<T> next(Eigen::Index rows) {
    row_matrix<T> x;
    next(rows, x);
    return x;
  }

 private:
  synthetic_options opt_;
  rng gen_;
  row_matrix<T> atoms_;
  std::vector<double> prob_;
};

/// Mean over true atoms of the best cosine similarity with any learned decoder row:
/// 1 means every true atom is matched exactly. `learned` [F, D], `truth` [n, D].
template <cpu_scalar T>
double mean_max_cosine(const cpu_backend& be, cref<T> learned, cref<T> truth) {
  detail::expects<shape_error>(learned.cols() == truth.cols(), "mean_max_cosine: widths differ (", learned.cols(),
                               " vs ", truth.cols(), ")");
  const Eigen::MatrixXd a = learned.template cast<double>().rowwise().normalized();
  const Eigen::MatrixXd b = truth.template cast<double>().rowwise().normalized();
  std::vector<double> best(std::size_t(b.rows()), -1.0);
  cpu::detail::parallel_for(be, b.rows(), [&](std::ptrdiff_t j) {
    best[std::size_t(j)] = (a * b.row(j).transpose()).maxCoeff();
  });
  double s = 0;
  for (double v : best) s += v;
  return s / double(best.size());
}

HSAE_NAMESPACE_END
