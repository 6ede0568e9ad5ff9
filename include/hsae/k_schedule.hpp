// SPDX-License-Identifier: Apache-2.0
/// \file k_schedule.hpp
/// k-schedules: the prefix sizes (with weights) that the HierarchicalTopK loss averages.
///
/// A schedule is a list of levels `(k_l, w_l)` with `1 <= k_1 < ... < k_m = k_max` and
/// `w_l > 0` (docs/OBJECTIVE.md). Two forms share one concept, `k_schedule_like`:
///  - compile time: `k_schedule<8, 16, 32, 64>` (uniform weights),
///    `weighted_k_schedule<Weights, Ks...>` (weights from a `constexpr std::array`),
///    and the aliases `all_prefixes<K>`, `top_k<K>`, `multi_topk<k>`; violations are
///    `static_assert`s;
///  - run time: `dynamic_k_schedule`, validated on construction (throws
///    hsae::config_error), for schedules read from config files.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "error.hpp"

HSAE_NAMESPACE_BEGIN

/// One level of a schedule: the prefix size `k` and its weight.
struct schedule_level {
  int k;
  double weight;
  friend bool operator==(const schedule_level&, const schedule_level&) = default;
};

/// What the loss needs of a schedule: `size()` levels, `k(l)`, `weight(l)`, `k_max()`.
template <class S>
concept k_schedule_like = requires(const S& s, std::size_t l) {
  { s.size() } -> std::convertible_to<std::size_t>;
  { s.k(l) } -> std::convertible_to<int>;
  { s.weight(l) } -> std::convertible_to<double>;
  { s.k_max() } -> std::convertible_to<int>;
};

/// k_max of a schedule known at compile time (`S::k_max()` is a constant expression, as
/// for k_schedule, weighted_k_schedule and their aliases), 0 for a run-time schedule.
template <class S>
inline constexpr int static_k_max = 0;
template <class S>
  requires requires { typename std::integral_constant<int, S::k_max()>; }
inline constexpr int static_k_max<S> = S::k_max();

/// Whether a schedule `S` fits a dictionary of compile-time width `F`: false only when
/// both are fixed at compile time and k_max > F. The trainer and both train_steps
/// static_assert it, so `trainer<float, 32, k_schedule<8, 64>>` is a compile error rather
/// than a config_error at run time.
template <class S, int F>
inline constexpr bool schedule_fits_width = F == dynamic || static_k_max<S> <= F;

namespace detail {

template <std::size_t N>
constexpr bool strictly_increasing(const std::array<int, N>& a) {
  for (std::size_t i = 1; i < N; ++i)
    if (a[i] <= a[i - 1]) return false;
  return true;
}

/// True when `w` is positive and finite (NaN fails both comparisons). Usable in constant
/// expressions, unlike std::isfinite.
constexpr bool positive_finite(double w) { return w > 0 && w <= std::numeric_limits<double>::max(); }

template <class Array>
constexpr bool all_positive_finite(const Array& a) {
  for (auto w : a)
    if (!positive_finite(double(w))) return false;
  return true;
}

/// The normalisation `w_l / W`, W = sum_l w_l, of positive finite weights. When W
/// overflows (weights near DBL_MAX: {1e308, 1e308} would give {0, 0}), every weight is
/// first divided by the largest one, so that the total lies in [1, levels]; otherwise
/// the division is the plain w_l / W (`scale` = 1 divides exactly).
struct weight_normalizer {
  double scale = 1;  ///< each weight is divided by this before the total
  double total = 0;  ///< the sum of the scaled weights

  /// `weight(l)` for l in [0, n): the weights, positive and finite.
  template <class Weight>
  static constexpr weight_normalizer of(std::size_t n, const Weight& weight) {
    constexpr double max = std::numeric_limits<double>::max();
    weight_normalizer r;
    bool overflow = false;
    // Tested before adding: an overflowing sum is not a constant expression.
    for (std::size_t l = 0; l < n && !overflow; ++l) {
      const double w = double(weight(l));
      overflow = w > max - r.total;
      if (!overflow) r.total += w;
    }
    if (overflow) {
      r.scale = 0;
      for (std::size_t l = 0; l < n; ++l) r.scale = std::max(r.scale, double(weight(l)));
      r.total = 0;
      for (std::size_t l = 0; l < n; ++l) r.total += double(weight(l)) / r.scale;
    }
    return r;
  }
  /// The normalised weight of `w`, in (0, 1] unless it underflows to 0 (a weight below
  /// about 5e-324 times the total).
  constexpr double operator()(double w) const { return w / scale / total; }
};

/// True when every weight of `a` is positive, finite, and its normalised weight is not 0.
template <class Array>
constexpr bool normalizable(const Array& a) {
  if (!all_positive_finite(a)) return false;
  const auto norm = weight_normalizer::of(std::size(a), [&](std::size_t l) { return double(a[l]); });
  for (auto w : a)
    if (!(norm(double(w)) > 0)) return false;
  return true;
}

}  // namespace detail

/// Compile-time schedule with uniform weights, e.g. `k_schedule<8, 16, 32, 64>`.
template <int... Ks>
struct k_schedule {
  static_assert(sizeof...(Ks) > 0, "hsae::k_schedule: a schedule needs at least one level");
  static_assert(((Ks >= 1) && ...), "hsae::k_schedule: every prefix size k must be >= 1");
  static_assert(detail::strictly_increasing(std::array<int, sizeof...(Ks)>{Ks...}),
                "hsae::k_schedule: prefix sizes must be strictly increasing");

  HSAE_HOST_DEVICE static constexpr std::size_t size() { return sizeof...(Ks); }
  HSAE_HOST_DEVICE static constexpr int k(std::size_t l) {
    constexpr int ks[] = {Ks...};
    return ks[l];
  }
  HSAE_HOST_DEVICE static constexpr double weight(std::size_t) { return 1.0; }
  HSAE_HOST_DEVICE static constexpr int k_max() { return k(sizeof...(Ks) - 1); }
};

/// Compile-time schedule with explicit weights: `Weights` is a reference to a
/// `constexpr std::array<double, sizeof...(Ks)>` (nvcc rejects class-type template
/// arguments holding arrays, so the array is passed by reference).
///
///     inline constexpr std::array<double, 2> w{1.0, 0.125};
///     using s = hsae::weighted_k_schedule<w, 32, 128>;
template <const auto& Weights, int... Ks>
struct weighted_k_schedule {
  static_assert(sizeof...(Ks) > 0, "hsae::weighted_k_schedule: needs at least one level");
  static_assert(std::size(Weights) == sizeof...(Ks),
                "hsae::weighted_k_schedule: one weight per level is required");
  static_assert(((Ks >= 1) && ...), "hsae::weighted_k_schedule: every k must be >= 1");
  static_assert(detail::strictly_increasing(std::array<int, sizeof...(Ks)>{Ks...}),
                "hsae::weighted_k_schedule: prefix sizes must be strictly increasing");
  static_assert(detail::all_positive_finite(Weights),
                "hsae::weighted_k_schedule: every weight must be positive and finite");
  static_assert(!detail::all_positive_finite(Weights) || detail::normalizable(Weights),
                "hsae::weighted_k_schedule: a weight is negligible next to the largest (its normalised weight "
                "underflows to 0)");

  HSAE_HOST_DEVICE static constexpr std::size_t size() { return sizeof...(Ks); }
  HSAE_HOST_DEVICE static constexpr int k(std::size_t l) {
    constexpr int ks[] = {Ks...};
    return ks[l];
  }
  HSAE_HOST_DEVICE static constexpr double weight(std::size_t l) {
    return weight_at(l, std::make_index_sequence<sizeof...(Ks)>{});
  }
  HSAE_HOST_DEVICE static constexpr int k_max() { return k(sizeof...(Ks) - 1); }

 private:
  // A function-local constant copy: device code may read it (it may not read the
  // host array `Weights` refers to).
  template <std::size_t... I>
  HSAE_HOST_DEVICE static constexpr double weight_at(std::size_t l, std::index_sequence<I...>) {
    constexpr double w[] = {Weights[I]...};
    return w[l];
  }
};

namespace detail {
template <class Seq>
struct all_prefixes_impl;
template <int... Is>
struct all_prefixes_impl<std::integer_sequence<int, Is...>> {
  using type = k_schedule<(Is + 1)...>;
};
}  // namespace detail

/// The paper's schedule: every prefix 1..K, uniform weights.
template <int K>
using all_prefixes = typename detail::all_prefixes_impl<std::make_integer_sequence<int, K>>::type;

/// Plain TopK: the single level (K, 1), i.e. ordinary MSE.
template <int K>
using top_k = k_schedule<K>;

/// Weights of Multi-TopK (Gao et al. 2024): (k, 1) and (4k, 1/8).
inline constexpr std::array<double, 2> multi_topk_weights{1.0, 0.125};

/// Largest k of Multi-TopK: its second level 4k must fit in an int.
inline constexpr int multi_topk_max_k = std::numeric_limits<int>::max() / 4;

namespace detail {
template <int K>
struct multi_topk_impl {
  static constexpr bool fits = K >= 1 && K <= multi_topk_max_k;
  static_assert(fits, "hsae::multi_topk: k must be in [1, multi_topk_max_k = INT_MAX / 4] (4k must fit in an int)");
  // 4 * K only when it fits: the static_assert above is then the only error.
  using type = weighted_k_schedule<multi_topk_weights, (fits ? K : 1), (fits ? 4 * K : 4)>;
};
}  // namespace detail

/// Multi-TopK: levels (k, 1), (4k, 1/8); k_max = 4k. `K <= multi_topk_max_k`.
template <int K>
using multi_topk = typename detail::multi_topk_impl<K>::type;

namespace detail {

/// Checks what the loss relies on for any schedule type: at least one level, every k
/// >= 1 and strictly increasing, k_max() the last k, every weight positive and finite,
/// and no normalised weight 0. O(levels). \throws hsae::config_error naming the level.
template <k_schedule_like S>
void check_schedule(const S& s) {
  const std::size_t n = std::size_t(s.size());
  expects<config_error>(n > 0, "k-schedule is empty: it needs at least one (k, weight) level");
  for (std::size_t l = 0; l < n; ++l) {
    const int k = int(s.k(l));
    const double w = double(s.weight(l));
    expects<config_error>(k >= 1, "k-schedule level ", l, " has k=", k, "; every k must be >= 1");
    expects<config_error>(positive_finite(w), "k-schedule level ", l, " (k=", k, ") has weight ", w,
                          "; weights must be positive and finite");
    if (l > 0)
      expects<config_error>(k > int(s.k(l - 1)), "k-schedule is not strictly increasing: level ", l, " has k=", k,
                            " after k=", int(s.k(l - 1)));
  }
  expects<config_error>(int(s.k_max()) == int(s.k(n - 1)), "k-schedule's k_max()=", int(s.k_max()),
                        " differs from its last level's k=", int(s.k(n - 1)));
  const auto norm = weight_normalizer::of(n, [&](std::size_t l) { return double(s.weight(l)); });
  for (std::size_t l = 0; l < n; ++l)
    if (!(norm(double(s.weight(l))) > 0)) [[unlikely]] {
      double largest = 0;
      for (std::size_t i = 0; i < n; ++i) largest = std::max(largest, double(s.weight(i)));
      throw_error<config_error>("k-schedule level ", l, " (k=", int(s.k(l)), ") has weight ", double(s.weight(l)),
                                ", negligible next to the largest weight ", largest,
                                ": its normalised weight underflows to 0");
    }
}

}  // namespace detail

/// Run-time schedule, validated on construction.
class dynamic_k_schedule {
 public:
  /// \throws hsae::config_error if `levels` is empty, a k is < 1, the ks are not
  ///         strictly increasing, a weight is not a positive finite number, or a weight
  ///         is so small next to the largest that its normalised weight is 0.
  explicit dynamic_k_schedule(std::vector<schedule_level> levels) : levels_(std::move(levels)) {
    validate();
  }
  dynamic_k_schedule(std::initializer_list<schedule_level> levels)
      : dynamic_k_schedule(std::vector<schedule_level>(levels)) {}

  /// Converts any compile-time (or other) schedule.
  template <k_schedule_like S>
    requires(!std::same_as<S, dynamic_k_schedule>)
  static dynamic_k_schedule from(const S& s) {
    std::vector<schedule_level> lv;
    for (std::size_t l = 0; l < s.size(); ++l) lv.push_back({int(s.k(l)), double(s.weight(l))});
    return dynamic_k_schedule(std::move(lv));
  }
  /// Every prefix 1..k_max with weight 1 (HierarchicalTopK as in the paper).
  static dynamic_k_schedule all_prefixes(int k_max) {
    detail::expects<config_error>(k_max >= 1, "all_prefixes: k_max must be >= 1, got ", k_max);
    std::vector<schedule_level> lv;
    lv.reserve(std::size_t(k_max));
    for (int k = 1; k <= k_max; ++k) lv.push_back({k, 1.0});
    return dynamic_k_schedule(std::move(lv));
  }
  /// The single level (k, 1): plain TopK.
  static dynamic_k_schedule top_k(int k) { return dynamic_k_schedule({{k, 1.0}}); }
  /// The given prefix sizes with uniform weights, e.g. {8, 16, 32, 64}.
  static dynamic_k_schedule subset(const std::vector<int>& ks) {
    std::vector<schedule_level> lv;
    for (int k : ks) lv.push_back({k, 1.0});
    return dynamic_k_schedule(std::move(lv));
  }
  /// Powers of two from k_min up to k_max (k_max always included), uniform weights.
  static dynamic_k_schedule geometric(int k_min, int k_max) {
    detail::expects<config_error>(k_min >= 1 && k_min <= k_max, "geometric schedule: need 1 <= k_min <= k_max, got k_min=",
                                  k_min, " k_max=", k_max);
    std::vector<int> ks;
    for (long long k = k_min; k < k_max; k *= 2) ks.push_back(int(k));
    ks.push_back(k_max);
    return subset(ks);
  }
  /// Multi-TopK: (k, 1), (4k, 1/8).
  /// \throws hsae::config_error unless 1 <= k <= multi_topk_max_k (4k must fit in an int).
  static dynamic_k_schedule multi_topk(int k) {
    detail::expects<config_error>(k >= 1 && k <= multi_topk_max_k, "multi_topk: k=", k, " must be in [1, ",
                                  multi_topk_max_k, "] (its second level is 4k, which must fit in an int)");
    return dynamic_k_schedule({{k, 1.0}, {4 * k, 0.125}});
  }

  std::size_t size() const { return levels_.size(); }
  int k(std::size_t l) const { return levels_[l].k; }
  double weight(std::size_t l) const { return levels_[l].weight; }
  int k_max() const { return levels_.back().k; }
  const std::vector<schedule_level>& levels() const { return levels_; }

  friend bool operator==(const dynamic_k_schedule&, const dynamic_k_schedule&) = default;

 private:
  void validate() const { detail::check_schedule(*this); }
  std::vector<schedule_level> levels_;
};

/// Per-rank weights `omega_j / W` for j = 1..k_max (stored at [j-1]): the weight of
/// the prefix-j squared error in the loss, normalised by the total weight W (computed
/// without overflow: see detail::weight_normalizer). They sum to 1.
/// \throws hsae::config_error if `s` is not a valid schedule (detail::check_schedule).
/// Into `omega` (resized; no allocation once it has the capacity).
template <class Acc, k_schedule_like S>
void normalized_rank_weights(const S& s, std::vector<Acc>& omega) {
  detail::check_schedule(s);
  omega.assign(std::size_t(s.k_max()), Acc(0));
  const auto norm = detail::weight_normalizer::of(s.size(), [&](std::size_t l) { return double(s.weight(l)); });
  for (std::size_t l = 0; l < s.size(); ++l) omega[std::size_t(s.k(l) - 1)] = Acc(norm(double(s.weight(l))));
}

/// The same weights as a new vector.
template <class Acc, k_schedule_like S>
std::vector<Acc> normalized_rank_weights(const S& s) {
  std::vector<Acc> omega;
  normalized_rank_weights(s, omega);
  return omega;
}

HSAE_NAMESPACE_END
