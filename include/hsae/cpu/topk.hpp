// SPDX-License-Identifier: Apache-2.0
/// \file cpu/topk.hpp
/// Sorted per-row top-k on the CPU: `topk` (a sparse code, as the GPU's) and
/// `cpu::topk_rows` (values and indices in two matrices).
///
/// Order: values descending; equal values rank by the lower index first; -0.0 equals
/// +0.0; NaN ranks below every number (it is chosen only when a row has fewer than k
/// non-NaN entries). When a row has fewer than k positive entries the result still
/// holds k distinct indices: the zero (or negative) entries with the lowest indices.
///
/// Method (docs/TOPK.md): a row with n >= 32 k and n >= 256 is scanned once with a
/// running threshold. The first threshold is the "delegate" bound, the minimum over k
/// block maxima (at least k entries reach it); survivors go to a candidate buffer of
/// max(8k, 2048) entries that is trimmed back to k by `nth_element` when full, after
/// which the threshold is the current k-th value and the filter is strict. Candidates
/// are 64-bit composite keys (order-preserving value bits, inverted index), so one
/// integer comparison implements the tie rule. Guard: a row whose survivors exceed
/// n/8 + max(8k, 2048) (e.g. an ascending row) switches to one `nth_element` over the whole row, so no
/// input costs more than a constant times a plain selection. Narrow rows (n < 32 k or n < 256)
/// take that path directly. Cost: O(n) per row plus O(k log k) for the final sort.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../config.hpp"
#include "../detail/ordered_key.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "../sparse_code.hpp"
#include "backend.hpp"

HSAE_NAMESPACE_BEGIN

namespace cpu {

namespace detail {

using ::hsae::detail::ordered_key;

/// A candidate: larger compares as better. Float packs value key and inverted index
/// into one 64-bit word; double needs a pair.
template <class T>
struct candidate;

template <>
struct candidate<float> {
  std::uint64_t bits;
  static candidate make(float v, index_t i) {
    return {(std::uint64_t(ordered_key(v)) << 32) | std::uint64_t(0xFFFFFFFFu - std::uint32_t(i))};
  }
  index_t index() const { return index_t(0xFFFFFFFFu - std::uint32_t(bits)); }
  friend bool operator>(const candidate& a, const candidate& b) { return a.bits > b.bits; }
};

template <>
struct candidate<double> {
  std::uint64_t key;
  std::uint32_t inv;
  static candidate make(double v, index_t i) { return {ordered_key(v), 0xFFFFFFFFu - std::uint32_t(i)}; }
  index_t index() const { return index_t(0xFFFFFFFFu - inv); }
  friend bool operator>(const candidate& a, const candidate& b) {
    return a.key > b.key || (a.key == b.key && a.inv > b.inv);
  }
};


/// Bit l of the result is set when x[l] > thr (Strict) or x[l] >= thr, l < 16; NaN
/// never sets a bit. Uses AVX-512, AVX2 or SSE2 where the target has them.
template <bool Strict, class T>
inline std::uint32_t mask16(const T* x, T thr) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 v = _mm512_loadu_ps(x);
    return std::uint32_t(_mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), Strict ? _CMP_GT_OQ : _CMP_GE_OQ));
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 t = _mm256_set1_ps(thr);
    const int lo = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x), t, Strict ? _CMP_GT_OQ : _CMP_GE_OQ));
    const int hi = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + 8), t, Strict ? _CMP_GT_OQ : _CMP_GE_OQ));
    return std::uint32_t(lo) | (std::uint32_t(hi) << 8);
  }
#elif defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m128 t = _mm_set1_ps(thr);
    std::uint32_t m = 0;
    for (int q = 0; q < 4; ++q) {
      const __m128 v = _mm_loadu_ps(x + 4 * q);
      m |= std::uint32_t(_mm_movemask_ps(Strict ? _mm_cmpgt_ps(v, t) : _mm_cmpge_ps(v, t))) << (4 * q);
    }
    return m;
  }
#endif
  std::uint32_t m = 0;
  for (int l = 0; l < 16; ++l) m |= std::uint32_t(Strict ? x[l] > thr : x[l] >= thr) << l;
  return m;
}

/// max(x[0, n)) ignoring NaN; -inf when n == 0 or all NaN.
template <class T>
inline T max_ignoring_nan(const T* x, index_t n) {
  index_t i = 0;
  T r = -std::numeric_limits<T>::infinity();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 m = _mm512_set1_ps(r);
    // NaN in x yields m. (The masked form avoids _mm512_undefined_ps, which trips GCC 12.)
    for (; i + 16 <= n; i += 16) m = _mm512_mask_max_ps(m, __mmask16(0xFFFF), _mm512_loadu_ps(x + i), m);
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, m);
    for (float v : lanes) r = v > r ? v : r;
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    __m256 m = _mm256_set1_ps(r);
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(_mm256_loadu_ps(x + i), m);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float v : lanes) r = v > r ? v : r;
  }
#elif defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    __m128 m = _mm_set1_ps(r);
    for (; i + 4 <= n; i += 4) m = _mm_max_ps(_mm_loadu_ps(x + i), m);
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, m);
    for (float v : lanes) r = v > r ? v : r;
  }
#endif
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

}  // namespace detail

/// Reusable per-thread state for `select_row`; holds the candidate buffer so that
/// repeated calls do not allocate.
template <cpu_scalar T>
class row_selector {
 public:
  /// Makes room for any row of up to `n` entries and k <= `k`, so that `select` on such
  /// rows never allocates.
  void reserve(index_t n, index_t k) {
    buf_.reserve(std::max({std::size_t(n), std::size_t(8) * std::size_t(k), std::size_t(2048)}));
  }

  /// Writes the k largest entries of `row[0, n)` to `values[0, k)` / `indices[0, k)`,
  /// sorted as documented in this file. Requires 1 <= k <= n.
  void select(const T* row, index_t n, index_t k, T* values, index_t* indices) {
    const auto better = [](const cand& a, const cand& b) { return a > b; };
    if (!(std::int64_t(n) >= 32 * std::int64_t(k) && n >= 256) || !filter(row, n, k)) {
      // Whole-row selection: n composite keys, nth_element, sort the first k.
      buf_.resize(std::size_t(n));
      for (index_t i = 0; i < n; ++i) buf_[std::size_t(i)] = cand::make(row[i], i);
      count_ = std::size_t(n);
    }
    if (count_ > std::size_t(k)) std::nth_element(buf_.begin(), buf_.begin() + (k - 1), buf_.begin() + count_, better);
    std::sort(buf_.begin(), buf_.begin() + k, better);
    for (index_t t = 0; t < k; ++t) {
      const index_t i = buf_[std::size_t(t)].index();
      indices[t] = i;
      values[t] = row[i];
    }
  }

 private:
  using cand = detail::candidate<T>;

  /// Threshold filter; false when the row needs the whole-row path (NaN blocks or the
  /// adversarial guard), true with >= k candidates in buf_[0, count_) otherwise.
  bool filter(const T* row, index_t n, index_t k) {
    const auto better = [](const cand& a, const cand& b) { return a > b; };
    // Delegate bound: the minimum of k block maxima.
    T thr = std::numeric_limits<T>::infinity();
    const index_t bs = n / k;
    for (index_t b = 0; b < k; ++b) {
      const index_t lo = b * bs, hi = (b + 1 == k) ? n : lo + bs;
      const T m = block_max(row + lo, hi - lo);
      thr = m < thr ? m : thr;
    }
    if (!(thr > -std::numeric_limits<T>::infinity())) return false;  // a block of NaN / -inf only

    const std::size_t cap = std::max<std::size_t>(std::size_t(8) * std::size_t(k), 2048);
    const std::size_t guard = std::size_t(n) / 8 + cap;
    buf_.resize(cap);
    count_ = 0;
    std::size_t appended = 0;
    bool strict = false;
    auto append = [&](index_t i) -> bool {  // false: the guard tripped
      buf_[count_++] = cand::make(row[i], i);
      if (count_ < cap) return true;
      appended += cap - std::size_t(k);
      if (appended > guard) return false;
      std::nth_element(buf_.begin(), buf_.begin() + (k - 1), buf_.end(), better);
      count_ = std::size_t(k);
      // buf_[k-1] is now the k-th best so far; later entries have higher indices, so
      // they rank above it only with a strictly larger value.
      thr = row[buf_[std::size_t(k - 1)].index()];
      strict = true;
      return true;
    };
    index_t i0 = 0;
    for (; i0 + 16 <= n; i0 += 16) {
      std::uint32_t mask = strict ? detail::mask16<true>(row + i0, thr) : detail::mask16<false>(row + i0, thr);
      while (mask) {
        const index_t i = i0 + index_t(std::countr_zero(mask));
        mask &= mask - 1;
        // The threshold may have risen inside this block: re-test.
        if ((strict ? row[i] > thr : row[i] >= thr) && !append(i)) return false;
      }
    }
    for (; i0 < n; ++i0)
      if ((strict ? row[i0] > thr : row[i0] >= thr) && !append(i0)) return false;
    return count_ >= std::size_t(k);
  }

  /// Maximum of x[0, n) ignoring NaN (-inf when none).
  static T block_max(const T* x, index_t n) { return detail::max_ignoring_nan(x, n); }

  std::vector<cand> buf_;
  std::size_t count_ = 0;
};

namespace detail {

/// The calling thread's row_selector (one per thread and T, kept across calls).
template <class T>
row_selector<T>& thread_selector() {
  thread_local row_selector<T> sel;
  return sel;
}

/// Sizes every thread's row_selector (and anything `also` sizes per thread) for rows
/// of up to `n` entries and k <= `k` before a dynamically scheduled loop, in which a
/// thread may see its first row only in a later call: then no call allocates once the
/// shapes settle.
template <class T, class Also>
void reserve_thread_selectors(const cpu_backend& be, index_t n, index_t k, Also&& also) {
  parallel_for(be, be.threads(), [&](std::ptrdiff_t) {
    thread_selector<T>().reserve(n, k);
    also();
  });
  thread_selector<T>().reserve(n, k);  // the calling thread (one-thread runs)
  also();
}

/// The body of `topk_rows` without its check: requires 1 <= k <= x.cols().
template <class T>
void topk_rows_unchecked(const cpu_backend& be, cref<T> x, int k, row_matrix<T>& values, index_matrix& indices) {
  values.resize(x.rows(), k);
  indices.resize(x.rows(), k);
  parallel_for<true>(be, x.rows(), [&](std::ptrdiff_t r) {
    thread_local row_selector<T> sel;
    sel.select(x.row(r).data(), index_t(x.cols()), index_t(k), values.row(r).data(), indices.row(r).data());
  });
}

}  // namespace detail

/// Sorted top-k of every row of `x` [rows, n] into `values` / `indices` [rows, k]
/// (resized if needed). Rows run in parallel over the backend's threads.
///
/// \throws hsae::config_error unless 1 <= k <= n.
template <cpu_scalar T>
void topk_rows(const cpu_backend& be, cref<T> x, int k, row_matrix<T>& values, index_matrix& indices) {
  ::hsae::detail::expects<config_error>(k >= 1 && k <= x.cols(), "top-k: k=", k, " must be in [1, ", x.cols(),
                                        "] (the row width)");
  detail::topk_rows_unchecked<T>(be, x, k, values, indices);
}

}  // namespace cpu

/// Sorted top-k of every row of `pre` [B, n] into `out` (resized to [B, k]), as the
/// GPU's `topk` (cuda/topk.cuh) computes it: the values as they are (no ReLU) and their
/// indices, in this file's order (values descending, equal values by lower index,
/// -0.0 == +0.0, NaN below every number). Rows run in parallel over the backend's
/// threads; the result does not depend on their number. An input with no rows gives
/// an empty [0, k] code.
/// \throws hsae::config_error unless 1 <= k <= n, hsae::shape_error on an empty row
///         width (n = 0).
template <cpu_scalar T>
void topk(const cpu_backend& be, cref<std::type_identity_t<T>> pre, int k, sparse_code<T>& out) {
  ::hsae::detail::expects<shape_error>(pre.cols() >= 1, "cpu topk: the input has shape [", pre.rows(), ", ",
                                       pre.cols(), "], expected at least one column");
  ::hsae::detail::expects<config_error>(k >= 1 && k <= pre.cols(), "cpu topk: k=", k, " must be in [1, ",
                                        pre.cols(), "] (the row width)");
  cpu::detail::topk_rows_unchecked<T>(be, pre, k, out.values, out.indices);
}

HSAE_NAMESPACE_END
