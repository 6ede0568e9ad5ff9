// SPDX-License-Identifier: Apache-2.0
/// \file pareto.hpp
/// The paper's comparison on your own data: with the same token budget per model,
/// train one HierarchicalTopK SAE at K (every prefix 1..K) and one plain TopK SAE at
/// each k of a list (K included), then evaluate every model on the same held-out rows
/// at every k in 1..K. The TopK SAE trained at K, read at k < K, is the "truncated"
/// baseline. The result gives the sparsity-fidelity (FVU against L0) curve of every
/// model, as a CSV and a markdown table.
///
///   pareto_options o;  o.d_sae = 2048; o.k_max = 32; o.ks = {4, 8, 16};  o.train = ...;
///   auto res = pareto_study<float>(be, [&] { return synthetic_source<float>(data, be); }, o);
///   write_pareto_csv("pareto.csv", res);  std::puts(pareto_markdown(res).c_str());
///
/// Every model reads a fresh source from `make_source()`, so with a deterministic
/// source all models see the same held-out rows and the same training stream. The
/// held-out rows are the first `train.eval_rows` rows of that source, which is honest
/// only for a stream that never repeats (synthetic_source); for files, whose epochs
/// repeat, pass `make_held_out()` as well: a fresh source of rows the training source
/// never serves (file_source's row range: the last rows of the files by position).
///
///   auto res = pareto_study<float>(be, [&] { return file_source<float>(files, {.row_end = N - H}); },
///                                  [&] { return file_source<float>(files, {.row_begin = N - H}); }, o);
#pragma once

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/backend.hpp"
#include "detail/files.hpp"
#include "error.hpp"
#include "k_schedule.hpp"
#include "metrics.hpp"
#include "model.hpp"
#include "trainer.hpp"

HSAE_NAMESPACE_BEGIN

struct pareto_options {
  int d_sae = 2048;
  /// K: the HierarchicalTopK model's k_max, and the largest TopK baseline.
  int k_max = 32;
  /// The k of the separately trained TopK SAEs (K is added when missing); each must be
  /// in [1, K].
  std::vector<int> ks{4, 8, 16};
  /// Shared by every model (same tokens, batch, learning rate, init, held-out rows);
  /// `eval_rows` must be > 0.
  trainer_options train{};
  /// Which rows the evaluation uses, in words, for the table (e.g. "the last 16384 rows
  /// of the files by position, never trained on"); empty: not stated.
  std::string held_out_note;

  /// The ks, sorted, unique, with K. \throws hsae::config_error on a k outside [1, K].
  std::vector<int> levels() const {
    std::vector<int> v = ks;
    v.push_back(k_max);
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    for (int k : v)
      detail::expects<config_error>(k >= 1 && k <= k_max, "pareto: k=", k, " is outside [1, k_max=", k_max, "]");
    return v;
  }
  void validate() const {
    detail::expects<config_error>(k_max >= 1 && k_max <= d_sae, "pareto: need 1 <= k_max <= d_sae, got k_max=",
                                  k_max, " d_sae=", d_sae);
    detail::expects<config_error>(train.eval_rows > 0, "pareto: train.eval_rows must be > 0 (held-out rows)");
    (void)levels();
    train.validate();
  }
};

/// One trained model and its metrics at every k in 1..K.
struct pareto_model {
  std::string name;      ///< e.g. "HierarchicalTopK K=32", "TopK k=8"
  bool hierarchical = false;
  int trained_k = 0;     ///< K for the hierarchical model, k for a TopK model
  evaluation eval;       ///< levels 1..K (all prefixes), on the shared held-out rows; MSE in the data's units
  double seconds = 0;    ///< training time
  double final_loss = 0;

  const level_metrics& at(int k) const { return eval.at(k); }
};

struct pareto_result {
  int k_max = 0;
  std::vector<int> ks;               ///< the compared k (sorted, K included)
  std::vector<pareto_model> models;  ///< models[0] is the hierarchical one, then TopK by k
  std::int64_t tokens_per_model = 0;
  std::int64_t held_out_rows = 0;
  std::string held_out_note;  ///< pareto_options::held_out_note

  const pareto_model& hierarchical() const { return models.front(); }
  /// The TopK model trained at k. \throws hsae::config_error when there is none.
  const pareto_model& topk(int k) const {
    for (const auto& m : models)
      if (!m.hierarchical && m.trained_k == k) return m;
    detail::throw_error<config_error>("pareto: no TopK model trained at k=", k);
  }
};

namespace detail {

/// The study, with the held-out rows from `make_held_out()` when it is not null.
template <cpu_scalar T, class MakeSource, class MakeHeldOut>
pareto_result pareto_run(const cpu_backend& be, MakeSource& make_source, MakeHeldOut* make_held_out,
                         const pareto_options& o, const std::function<void(const pareto_model&)>& on_trained) {
  o.validate();
  pareto_result res;
  res.k_max = o.k_max;
  res.ks = o.levels();
  res.tokens_per_model = o.train.total_tokens;
  res.held_out_rows = o.train.eval_rows;
  res.held_out_note = o.held_out_note;
  const dynamic_k_schedule every_prefix = dynamic_k_schedule::all_prefixes(o.k_max);

  auto run = [&](std::string name, bool hier, int k, const dynamic_k_schedule& schedule) {
    auto source = make_source();
    trainer tr(be, sae<T>(source.d_model(), o.d_sae), schedule, o.train);
    const auto t0 = std::chrono::steady_clock::now();
    train_summary sum;
    if constexpr (std::is_null_pointer_v<MakeHeldOut>) {
      sum = tr.fit(source);
    } else {
      auto held_out = (*make_held_out)();
      sum = tr.fit(source, held_out);
    }
    pareto_model pm;
    pm.name = std::move(name);
    pm.hierarchical = hier;
    pm.trained_k = k;
    pm.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    pm.final_loss = sum.final_loss;
    pm.eval = tr.evaluate_held_out(every_prefix).in_input_units(sum.input_scale);  // MSE in the data's units
    if (on_trained) on_trained(pm);
    res.models.push_back(std::move(pm));
  };
  run(concat("HierarchicalTopK K=", o.k_max), true, o.k_max, every_prefix);
  for (int k : res.ks) run(concat("TopK k=", k), false, k, dynamic_k_schedule::top_k(k));
  return res;
}

}  // namespace detail

/// Runs the study. `make_source()` returns a fresh batch source (see trainer.hpp) whose
/// first `train.eval_rows` rows are held out; `on_trained(model)` is called after each
/// model is trained and evaluated.
template <cpu_scalar T, class MakeSource>
pareto_result pareto_study(const cpu_backend& be, MakeSource&& make_source, const pareto_options& o,
                           const std::function<void(const pareto_model&)>& on_trained = {}) {
  return detail::pareto_run<T>(be, make_source, static_cast<std::nullptr_t*>(nullptr), o, on_trained);
}

/// The same with the held-out rows read from a fresh `make_held_out()` source for each
/// model (trainer::fit(source, held_out)).
template <cpu_scalar T, class MakeSource, std::invocable MakeHeldOut>
pareto_result pareto_study(const cpu_backend& be, MakeSource&& make_source, MakeHeldOut&& make_held_out,
                           const pareto_options& o, const std::function<void(const pareto_model&)>& on_trained = {}) {
  return detail::pareto_run<T>(be, make_source, &make_held_out, o, on_trained);
}

/// One row per (model, k in 1..K): model,hierarchical,trained_k,k,l0,fvu,mse.
/// Written atomically (temporary file + rename).
inline void write_pareto_csv(const std::filesystem::path& path, const pareto_result& r) {
  std::ostringstream os;
  os.precision(8);
  os << "model,hierarchical,trained_k,k,l0,fvu,mse\n";
  for (const auto& m : r.models)
    for (const auto& l : m.eval.levels)
      os << '"' << m.name << "\"," << (m.hierarchical ? 1 : 0) << ',' << m.trained_k << ',' << l.k << ',' << l.l0
         << ',' << l.fvu << ',' << l.mse << '\n';
  detail::write_file_atomically(path, os.str(), "pareto: CSV");
}

/// The comparison at each compared k: the hierarchical model's FVU, the TopK SAE
/// trained at that k, and the TopK SAE trained at K truncated to k, with ratios.
inline std::string pareto_markdown(const pareto_result& r) {
  const pareto_model& h = r.hierarchical();
  const pareto_model& big = r.topk(r.k_max);
  std::ostringstream os;
  char buf[256];
  os << "| k | HierarchicalTopK K=" << r.k_max << " | TopK trained at k | TopK K=" << r.k_max
     << " truncated to k | Hier / TopK@k | Hier / truncated |\n";
  os << "|---|---|---|---|---|---|\n";
  for (int k : r.ks) {
    const double fh = h.at(k).fvu, ft = r.topk(k).at(k).fvu, fb = big.at(k).fvu;
    std::snprintf(buf, sizeof buf, "| %d | %.4f | %.4f | %.4f | %.3f | %.3f |\n", k, fh, ft, fb, fh / ft, fh / fb);
    os << buf;
  }
  std::snprintf(buf, sizeof buf, "\nFVU on %lld held-out rows", (long long)r.held_out_rows);
  os << buf;
  if (!r.held_out_note.empty()) os << " (" << r.held_out_note << ")";
  std::snprintf(buf, sizeof buf, "; lower is better; every model trained on %lld tokens.\n",
                (long long)r.tokens_per_model);
  os << buf;
  return os.str();
}

HSAE_NAMESPACE_END
