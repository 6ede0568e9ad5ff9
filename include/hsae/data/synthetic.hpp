// SPDX-License-Identifier: Apache-2.0
/// \file data/synthetic.hpp
/// Synthetic activations drawn from a known dictionary, for tests, the demo, and
/// checking that training recovers the true atoms.
///
/// x = sum_j a_j d_j + noise over a sparse set of true atoms d_j (unit norm).
/// - Power-law frequencies: root atom j (j < n_atoms) is active with probability
///   proportional to (j + 1)^(-zipf_exponent), scaled so that on average `mean_active`
///   roots are active per row; magnitudes a_j = 1 + magnitude_std * |N(0, 1)|.
/// - Parent/child features: each root has `children_per_atom` children (atoms
///   n_atoms + j * children_per_atom + c). A child can only fire in a row where its
///   parent fires, then with probability `child_prob`, with magnitude child_magnitude
///   times a parent-like draw: children are rarer and weaker than their parent, so a
///   good code lists the parent first and the prefix order carries the hierarchy.
///
/// Rows are generated in parallel; row r of the stream (counting from the start) uses
/// its own generator seeded from (seed, r), so the stream is the same for any thread
/// count and any batch size.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../config.hpp"
#include "../cpu/backend.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../rng.hpp"

HSAE_NAMESPACE_BEGIN

struct synthetic_options {
  int d_model = 64;
  /// Root atoms (the whole dictionary when children_per_atom = 0).
  int n_atoms = 128;
  /// Expected number of active root atoms per row.
  double mean_active = 4.0;
  /// Power-law exponent of root atom frequencies (0: uniform).
  double zipf_exponent = 0.5;
  /// Magnitudes are 1 + magnitude_std * |N(0, 1)|.
  double magnitude_std = 0.5;
  /// Gaussian noise added to every entry.
  double noise_std = 0.0;
  /// Children per root atom, the probability that a child fires given its parent fires,
  /// and the children's magnitude relative to a parent's.
  int children_per_atom = 0;
  double child_prob = 0.25;
  double child_magnitude = 0.6;
  std::uint64_t seed = 1;

  /// The built-in demo data of hsae-train --synthetic, hsae_demo and hsae_pareto:
  /// d_model 128, 256 parent features with power-law frequencies (exponent 0.7, 6 active
  /// per row on average), each with 3 children that fire only with their parent (1024
  /// true features), noise 0.01.
  static synthetic_options demo(std::uint64_t seed = 1) {
    synthetic_options d;
    d.d_model = 128;
    d.n_atoms = 256;
    d.children_per_atom = 3;
    d.child_prob = 0.3;
    d.child_magnitude = 0.6;
    d.mean_active = 6;
    d.zipf_exponent = 0.7;
    d.noise_std = 0.01;
    d.seed = seed;
    return d;
  }

  /// All atoms: roots and children.
  int total_atoms() const { return n_atoms * (1 + children_per_atom); }

  void validate() const {
    detail::expects<config_error>(d_model >= 1 && n_atoms >= 1, "synthetic: d_model and n_atoms must be >= 1");
    detail::expects<config_error>(mean_active > 0 && mean_active <= n_atoms, "synthetic: mean_active=", mean_active,
                                  " must be in (0, n_atoms]");
    detail::expects<config_error>(zipf_exponent >= 0 && magnitude_std >= 0 && noise_std >= 0,
                                  "synthetic: exponents and standard deviations must be >= 0");
    detail::expects<config_error>(children_per_atom >= 0 && children_per_atom <= 1024,
                                  "synthetic: children_per_atom=", children_per_atom, " must be in [0, 1024]");
    detail::expects<config_error>(child_prob >= 0 && child_prob <= 1, "synthetic: child_prob=", child_prob,
                                  " must be in [0, 1]");
    detail::expects<config_error>(child_magnitude > 0, "synthetic: child_magnitude=", child_magnitude,
                                  " must be > 0");
  }
};

/// A stream of synthetic activation batches with a known dictionary.
template <cpu_scalar T>
class synthetic_source {
 public:
  explicit synthetic_source(const synthetic_options& opt, const cpu_backend& be = {})
      : opt_(opt), be_(be) {
    opt_.validate();
    rng gen(opt_.seed);
    atoms_.resize(opt_.total_atoms(), opt_.d_model);
    for (Eigen::Index j = 0; j < atoms_.rows(); ++j) {
      for (Eigen::Index d = 0; d < atoms_.cols(); ++d) atoms_(j, d) = T(gen.normal());
      atoms_.row(j).normalize();
    }
    prob_.resize(std::size_t(opt_.n_atoms));
    double s = 0;
    for (int j = 0; j < opt_.n_atoms; ++j) s += (prob_[std::size_t(j)] = std::pow(double(j + 1), -opt_.zipf_exponent));
    for (auto& p : prob_) p = std::min(1.0, p * opt_.mean_active / s);
    stream_seed_ = gen();
  }

  /// The true dictionary [total_atoms, d_model], unit rows: roots, then children
  /// grouped by parent.
  const row_matrix<T>& atoms() const { return atoms_; }
  /// Activation probability of each root atom.
  const std::vector<double>& frequencies() const { return prob_; }
  /// Activation probability of every atom (children: parent's times child_prob).
  std::vector<double> atom_frequencies() const {
    std::vector<double> f(prob_);
    for (int j = 0; j < opt_.n_atoms; ++j)
      for (int c = 0; c < opt_.children_per_atom; ++c) f.push_back(prob_[std::size_t(j)] * opt_.child_prob);
    return f;
  }
  /// The parent of atom j, or -1 for a root.
  int parent(int j) const { return j < opt_.n_atoms ? -1 : (j - opt_.n_atoms) / opt_.children_per_atom; }
  const synthetic_options& options() const { return opt_; }
  int d_model() const { return opt_.d_model; }
  /// Rows generated so far (the stream position).
  std::int64_t position() const { return pos_; }
  /// Moves the stream to row `pos` (rows are independent: this is O(1)).
  void seek(std::int64_t pos) { pos_ = pos; }

  /// Checkpoint support (checkpoint.hpp): the stream position and what identifies the
  /// stream. \throws hsae::io_error on load when the checkpoint came from another stream.
  template <class State>
  void save_state(State& st) const {
    st.set("source.kind", std::string("synthetic"));
    st.set("source.position", std::int64_t(pos_));
    st.set("source.stream_seed", std::uint64_t(stream_seed_));
    st.set("source.d_model", std::int64_t(opt_.d_model));
  }
  template <class State>
  void load_state(const State& st) {
    st.expects(st.text("source.kind") == "synthetic", "the data source was '", st.text("source.kind"),
               "', not a synthetic_source");
    st.expects(st.get_uint("source.stream_seed") == stream_seed_ && st.get_int("source.d_model") == opt_.d_model,
               "the synthetic source has other options (seed or d_model) than the one the checkpoint was written "
               "with");
    // Row positions are added to as int64: keep far from overflow.
    pos_ = st.get_int("source.position", 0, std::int64_t(1) << 62);
  }

  /// Fills `x` with the next `rows` rows of the stream.
  void next(Eigen::Index rows, row_matrix<T>& x) {
    x.setZero(rows, opt_.d_model);
    const std::int64_t base = pos_;
    const int c = opt_.children_per_atom;
    cpu::detail::parallel_blocks(be_, rows, 64, [&](std::ptrdiff_t lo, std::ptrdiff_t hi) {
      for (std::ptrdiff_t b = lo; b < hi; ++b) {
        rng gen(stream_seed_ ^ (std::uint64_t(base + b) * 0x9E3779B97F4A7C15ull));
        auto row = x.row(b);
        for (int j = 0; j < opt_.n_atoms; ++j) {
          if (gen.uniform() >= prob_[std::size_t(j)]) continue;
          row.noalias() += T(1.0 + opt_.magnitude_std * std::abs(gen.normal())) * atoms_.row(j);
          for (int ch = 0; ch < c; ++ch) {
            if (gen.uniform() >= opt_.child_prob) continue;
            const double a = opt_.child_magnitude * (1.0 + opt_.magnitude_std * std::abs(gen.normal()));
            row.noalias() += T(a) * atoms_.row(opt_.n_atoms + j * c + ch);
          }
        }
        if (opt_.noise_std > 0)
          for (int d = 0; d < opt_.d_model; ++d) row(d) += T(opt_.noise_std * gen.normal());
      }
    });
    pos_ += rows;
  }
  row_matrix<T> next(Eigen::Index rows) {
    row_matrix<T> x;
    next(rows, x);
    return x;
  }

 private:
  synthetic_options opt_;
  cpu_backend be_;
  row_matrix<T> atoms_;
  std::vector<double> prob_;
  std::uint64_t stream_seed_ = 0;
  std::int64_t pos_ = 0;
};

/// For every true atom (row of `truth` [n, D]) its best cosine similarity with any
/// learned decoder row (`learned` [F, D]).
template <cpu_scalar T>
std::vector<double> best_cosines(const cpu_backend& be, cref<T> learned, cref<T> truth) {
  detail::expects<shape_error>(learned.cols() == truth.cols(), "best_cosines: the learned and true dictionaries have different widths (", learned.cols(),
                               " vs ", truth.cols(), ")");
  const Eigen::MatrixXd a = learned.template cast<double>().rowwise().normalized();
  const Eigen::MatrixXd b = truth.template cast<double>().rowwise().normalized();
  std::vector<double> best(std::size_t(b.rows()), -1.0);
  cpu::detail::parallel_for(be, b.rows(), [&](std::ptrdiff_t j) {
    best[std::size_t(j)] = (a * b.row(j).transpose()).maxCoeff();
  });
  return best;
}

/// Mean over true atoms of the best cosine similarity with any learned decoder row:
/// 1 means every true atom is matched exactly. `learned` [F, D], `truth` [n, D].
template <cpu_scalar T>
double mean_max_cosine(const cpu_backend& be, cref<T> learned, cref<T> truth) {
  const std::vector<double> best = best_cosines<T>(be, learned, truth);
  double s = 0;
  for (double v : best) s += v;
  return s / double(best.size());
}

HSAE_NAMESPACE_END
