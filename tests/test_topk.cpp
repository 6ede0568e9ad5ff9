// SPDX-License-Identifier: Apache-2.0
// Sorted per-row top-k (cpu/topk.hpp) against a plain std::sort reference: indices and
// values must match exactly, for float and double, on both the narrow (whole-row) path
// and the wide threshold-filter path, including ties, +-0, +-inf, NaN and adversarial
// (sorted) rows.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using hsae::index_t;

/// The documented order: non-NaN before NaN, larger value first (-0.0 == +0.0), and
/// among equal values (or among NaNs) the lower index first.
template <class T>
bool ranks_before(T a, index_t ia, T b, index_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;
  if (!na && a != b) return a > b;
  return ia < ib;
}

template <class T>
std::vector<index_t> reference_topk(const std::vector<T>& row, index_t k) {
  std::vector<index_t> idx(row.size());
  std::iota(idx.begin(), idx.end(), index_t(0));
  std::sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return ranks_before(row[a], a, row[b], b); });
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// Index of the first rank where (indices, values) differ from the reference, or -1.
template <class T>
long first_mismatch(const std::vector<T>& row, const std::vector<index_t>& ref, const index_t* idx, const T* val) {
  for (std::size_t t = 0; t < ref.size(); ++t)
    if (idx[t] != ref[t] || !same_bits(val[t], row[std::size_t(ref[t])])) return long(t);
  return -1;
}

template <class T>
std::string describe(const std::string& what, const std::vector<T>& row, const std::vector<index_t>& ref,
                     const index_t* idx, const T* val, long t) {
  std::ostringstream os;
  os << what << " n=" << row.size() << " k=" << ref.size();
  if (t >= 0)
    os << ": first mismatch at rank " << t << ": got (" << val[t] << ", #" << idx[t] << "), expected ("
       << row[std::size_t(ref[std::size_t(t)])] << ", #" << ref[std::size_t(t)] << ")";
  return os.str();
}

/// Runs one row through a reused row_selector, a fresh row_selector and topk_rows (as a
/// 1-row matrix map) and compares each with the reference.
template <class T>
void check_row(const std::vector<T>& row, index_t k, const std::string& what) {
  INFO(what);
  const index_t n = index_t(row.size());
  const auto ref = reference_topk(row, k);

  static hsae::cpu::row_selector<T> reused;  // buffer reuse across sizes and paths
  std::vector<T> v(static_cast<std::size_t>(k), T(-12345));
  std::vector<index_t> i(static_cast<std::size_t>(k), -1);
  reused.select(row.data(), n, k, v.data(), i.data());
  long t = first_mismatch(row, ref, i.data(), v.data());
  INFO(describe("row_selector (reused)", row, ref, i.data(), v.data(), t));
  REQUIRE(t == -1);

  hsae::cpu::row_selector<T> fresh;
  std::vector<T> v2(static_cast<std::size_t>(k), T(-12345));
  std::vector<index_t> i2(static_cast<std::size_t>(k), -1);
  fresh.select(row.data(), n, k, v2.data(), i2.data());
  t = first_mismatch(row, ref, i2.data(), v2.data());
  INFO(describe("row_selector (fresh)", row, ref, i2.data(), v2.data(), t));
  REQUIRE(t == -1);

  Eigen::Map<const hsae::row_matrix<T>> x(row.data(), 1, n);
  hsae::row_matrix<T> values;
  hsae::index_matrix indices;
  hsae::cpu::topk_rows<T>(hsae::cpu_backend{}, x, int(k), values, indices);
  REQUIRE(values.rows() == 1);
  REQUIRE(values.cols() == k);
  REQUIRE(indices.rows() == 1);
  REQUIRE(indices.cols() == k);
  t = first_mismatch(row, ref, indices.data(), values.data());
  INFO(describe("topk_rows", row, ref, indices.data(), values.data(), t));
  REQUIRE(t == -1);
}

template <class T>
std::vector<T> normal_row(std::mt19937_64& g, index_t n) {
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> r(static_cast<std::size_t>(n));
  for (auto& x : r) x = T(nd(g));
  return r;
}

template <class T>
std::vector<T> relu_row(std::mt19937_64& g, index_t n) {
  auto r = normal_row<T>(g, n);
  for (auto& x : r) x = x > T(0) ? x : T(0);
  return r;
}

template <class T>
std::vector<T> levels_row(std::mt19937_64& g, index_t n, const std::vector<T>& levels) {
  std::uniform_int_distribution<std::size_t> pick(0, levels.size() - 1);
  std::vector<T> r(static_cast<std::size_t>(n));
  for (auto& x : r) x = levels[pick(g)];
  return r;
}

// (n, k) pairs covering: the wide filter path (n >= 32k and n >= 256), the narrow
// whole-row path (n < 32k or n < 256), the boundary n = 256 = 32 * 8, widths that are
// not multiples of 16, 64 or k, k == n, and n = k = 1.
const std::vector<std::pair<index_t, index_t>> kShapes = {
    {16384, 1},   {16384, 8},  {16384, 64}, {16384, 255}, {16384, 256}, {16384, 257}, {16384, 512},
    {16384, 513}, {16384, 4096}, {16411, 8}, {16411, 64},  {16411, 300}, {1000, 1},    {1000, 31},
    {1000, 32},   {1000, 64},   {1000, 999}, {1000, 1000}, {300, 299},  {300, 9},     {256, 8},
    {256, 9},     {255, 1},     {255, 7},    {33, 1},      {33, 5},     {33, 33},     {1, 1},
    {8191, 255},  {4097, 128}};

}  // namespace

TEMPLATE_TEST_CASE("topk matches the sort reference on N(0,1) rows", "[topk]", float, double) {
  std::mt19937_64 g(101);
  for (auto [n, k] : kShapes)
    for (int rep = 0; rep < 2; ++rep) check_row(normal_row<TestType>(g, n), k, "normal");
}

TEMPLATE_TEST_CASE("topk matches the sort reference on ReLU'd rows (ties among zeros)", "[topk]", float, double) {
  std::mt19937_64 g(202);
  for (auto [n, k] : kShapes)
    for (int rep = 0; rep < 2; ++rep) check_row(relu_row<TestType>(g, n), k, "relu");
  // k larger than the number of positives (about n/2).
  for (index_t n : {1000, 16384, 2000}) check_row(relu_row<TestType>(g, n), n / 2 + n / 5, "relu, k > #positives");
}

TEMPLATE_TEST_CASE("topk matches the sort reference on rows with many ties", "[topk]", float, double) {
  std::mt19937_64 g(303);
  using T = TestType;
  const std::vector<T> few{T(-1), T(0), T(0.5), T(1), T(2)};
  const std::vector<T> signed_zero{T(-0.0), T(0.0), T(1), T(-1)};
  const std::vector<T> two{T(3), T(3.25)};
  for (auto [n, k] : kShapes) {
    check_row(levels_row<T>(g, n, few), k, "five levels");
    check_row(levels_row<T>(g, n, signed_zero), k, "+-0 and +-1");
    check_row(levels_row<T>(g, n, two), k, "two levels");
  }
}

TEMPLATE_TEST_CASE("topk of constant rows returns the lowest indices", "[topk]", float, double) {
  using T = TestType;
  for (auto [n, k] : kShapes) {
    for (T c : {T(0), T(-0.0), T(3.5), T(-2)}) {
      const std::vector<T> row(static_cast<std::size_t>(n), c);
      check_row(row, k, "constant");
      hsae::cpu::row_selector<T> sel;
      std::vector<T> v(static_cast<std::size_t>(k));
      std::vector<index_t> i(static_cast<std::size_t>(k));
      sel.select(row.data(), n, k, v.data(), i.data());
      for (index_t t = 0; t < k; ++t) {
        if (i[std::size_t(t)] != t || !same_bits(v[std::size_t(t)], c)) FAIL("n=" << n << " k=" << k << " rank " << t);
      }
      CHECK(i.back() == k - 1);
    }
  }
  // Mixed -0.0 / +0.0 (all equal): lowest indices first, each value copied as stored.
  std::vector<T> row(20000);
  for (std::size_t j = 0; j < row.size(); ++j) row[j] = (j % 3 == 0) ? T(-0.0) : T(0.0);
  for (index_t k : {1, 8, 64, 600}) check_row(row, k, "mixed signed zeros");
}

TEMPLATE_TEST_CASE("rows with fewer than k positives fill with the lowest-index zeros", "[topk]", float, double) {
  using T = TestType;
  std::mt19937_64 g(404);
  const std::vector<std::tuple<index_t, index_t, index_t>> cases = {
      // n, k, number of positives
      {16384, 64, 10}, {16384, 64, 0},   {16384, 256, 255}, {16384, 512, 100}, {16411, 257, 3},
      {1000, 100, 37}, {1000, 1000, 999}, {300, 299, 1},    {33, 33, 5},       {256, 8, 7}};
  for (auto [n, k, p] : cases) {
    std::vector<T> row(std::size_t(n), T(0));
    std::vector<index_t> pos(static_cast<std::size_t>(n));
    std::iota(pos.begin(), pos.end(), index_t(0));
    std::shuffle(pos.begin(), pos.end(), g);
    pos.resize(static_cast<std::size_t>(p));
    std::uniform_real_distribution<double> u(0.1, 5.0);
    for (index_t j : pos) row[std::size_t(j)] = T(u(g));
    // A few negatives (where enough zeros remain to fill the k - p slots): they must
    // rank below every zero.
    if (n - k > n / 97 + 1)
      for (index_t j = 0; j < n; j += 97)
        if (row[std::size_t(j)] == T(0)) row[std::size_t(j)] = T(-1);
    check_row(row, k, "fewer than k positives");

    hsae::cpu::row_selector<T> sel;
    std::vector<T> v(static_cast<std::size_t>(k));
    std::vector<index_t> idx(static_cast<std::size_t>(k));
    sel.select(row.data(), n, k, v.data(), idx.data());
    // All indices distinct and in range.
    std::vector<index_t> sorted(idx);
    std::sort(sorted.begin(), sorted.end());
    CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
    CHECK(sorted.front() >= 0);
    CHECK(sorted.back() < n);
    // The first p slots hold the positives, the rest zeros at the lowest zero indices.
    for (index_t t = 0; t < p; ++t) REQUIRE(v[std::size_t(t)] > T(0));
    std::vector<index_t> zeros;
    for (index_t j = 0; j < n && index_t(zeros.size()) < k - p; ++j)
      if (row[std::size_t(j)] == T(0)) zeros.push_back(j);
    REQUIRE(index_t(zeros.size()) == k - p);
    const std::vector<index_t> tail(idx.begin() + p, idx.end());
    CHECK(tail == zeros);
    for (index_t t = p; t < k; ++t) REQUIRE(v[std::size_t(t)] == T(0));
  }
}

TEMPLATE_TEST_CASE("topk of ascending and descending rows", "[topk]", float, double) {
  using T = TestType;
  const std::vector<std::pair<index_t, index_t>> shapes = {
      {16384, 1},   {16384, 8},  {16384, 64}, {16384, 255}, {16384, 256}, {16384, 257}, {16384, 512},
      {16384, 600}, {16411, 64}, {1000, 64},  {1000, 1000}, {300, 299},   {256, 8},     {33, 33},
      {33, 4},      {1, 1}};
  for (auto [n, k] : shapes) {
    std::vector<T> asc(static_cast<std::size_t>(n)), desc(static_cast<std::size_t>(n)), asc_dup(static_cast<std::size_t>(n)), neg(static_cast<std::size_t>(n));
    for (index_t j = 0; j < n; ++j) {
      asc[std::size_t(j)] = T(j);
      desc[std::size_t(j)] = T(n - j);
      asc_dup[std::size_t(j)] = T(j / 3);  // ascending with runs of three equal values
      neg[std::size_t(j)] = -T(n - j);     // ascending, all negative
    }
    check_row(asc, k, "ascending");
    check_row(desc, k, "descending");
    check_row(asc_dup, k, "ascending with duplicates");
    check_row(neg, k, "ascending negative");
    // Explicitly: the ascending row's top-k are the last k indices, largest first.
    hsae::cpu::row_selector<T> sel;
    std::vector<T> v(static_cast<std::size_t>(k));
    std::vector<index_t> idx(static_cast<std::size_t>(k));
    sel.select(asc.data(), n, k, v.data(), idx.data());
    CHECK(idx.front() == n - 1);
    CHECK(idx.back() == n - k);
  }
}

TEMPLATE_TEST_CASE("topk with +inf, -inf and NaN", "[topk]", float, double) {
  using T = TestType;
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::mt19937_64 g(505);

  SECTION("a few specials in random rows") {
    for (auto [n, k] : kShapes) {
      auto row = normal_row<T>(g, n);
      std::uniform_int_distribution<index_t> pos(0, n - 1);
      for (int c = 0; c < 3; ++c) row[std::size_t(pos(g))] = nan;
      for (int c = 0; c < 2; ++c) row[std::size_t(pos(g))] = inf;
      for (int c = 0; c < 2; ++c) row[std::size_t(pos(g))] = -inf;
      check_row(row, k, "random with specials");
    }
  }
  SECTION("NaN in the first entries and in every 16-wide block") {
    for (auto [n, k] : kShapes) {
      auto row = relu_row<T>(g, n);
      row[0] = nan;
      for (index_t j = 5; j < n; j += 16) row[std::size_t(j)] = nan;
      check_row(row, k, "NaN every 16");
    }
  }
  SECTION("rows that are NaN except fewer than k entries") {
    const std::vector<std::tuple<index_t, index_t, index_t>> cases = {
        {16384, 64, 20}, {16384, 256, 255}, {16384, 8, 0}, {1000, 64, 10}, {300, 299, 5}, {33, 33, 32}, {1, 1, 0}};
    for (auto [n, k, m] : cases) {
      std::vector<T> row(std::size_t(n), nan);
      std::vector<index_t> pos(static_cast<std::size_t>(n));
      std::iota(pos.begin(), pos.end(), index_t(0));
      std::shuffle(pos.begin(), pos.end(), g);
      std::normal_distribution<double> nd;
      for (index_t c = 0; c < m; ++c) row[std::size_t(pos[std::size_t(c)])] = T(nd(g));
      check_row(row, k, "mostly NaN");
      // The numbers come first, then the lowest-index NaNs.
      hsae::cpu::row_selector<T> sel;
      std::vector<T> v(static_cast<std::size_t>(k));
      std::vector<index_t> idx(static_cast<std::size_t>(k));
      sel.select(row.data(), n, k, v.data(), idx.data());
      for (index_t t = 0; t < k; ++t) REQUIRE(std::isnan(v[std::size_t(t)]) == (t >= m));
    }
  }
  SECTION("infinities only, and -inf blocks") {
    for (auto [n, k] : kShapes) {
      std::vector<T> row(std::size_t(n), -inf);
      check_row(row, k, "all -inf");
      auto r2 = normal_row<T>(g, n);
      for (index_t j = 0; j < n / 2; ++j) r2[std::size_t(j)] = -inf;  // first half -inf
      check_row(r2, k, "first half -inf");
      auto r3 = levels_row<T>(g, n, {inf, -inf, T(0), nan});
      check_row(r3, k, "levels +inf/-inf/0/NaN");
    }
  }
}

TEMPLATE_TEST_CASE("topk with duplicates of the maximum", "[topk]", float, double) {
  using T = TestType;
  std::mt19937_64 g(606);
  for (auto [n, k] : kShapes) {
    auto row = normal_row<T>(g, n);
    const T mx = T(10);
    std::uniform_int_distribution<index_t> pos(0, n - 1);
    const int dups = std::max(2, int(std::min<index_t>(n, 100)));
    for (int c = 0; c < dups; ++c) row[std::size_t(pos(g))] = mx;
    row[std::size_t(n - 1)] = mx;  // one in the last position too
    check_row(row, k, "duplicated maximum");
  }
}

TEMPLATE_TEST_CASE("adversarial guard: an ascending row of 2^20 stays correct", "[topk]", float, double) {
  using T = TestType;
  const index_t n = index_t(1) << 20;
  std::vector<T> asc(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) asc[std::size_t(j)] = T(j);  // exact in float (< 2^24)
  for (index_t k : {64, 512}) {
    hsae::cpu::row_selector<T> sel;
    std::vector<T> v(static_cast<std::size_t>(k));
    std::vector<index_t> idx(static_cast<std::size_t>(k));
    sel.select(asc.data(), n, k, v.data(), idx.data());
    bool ok = true;
    for (index_t t = 0; t < k; ++t)
      ok = ok && idx[std::size_t(t)] == n - 1 - t && v[std::size_t(t)] == T(n - 1 - t);
    INFO("k=" << k);
    CHECK(ok);
  }
  // Nearly sorted: ascending with a little noise; compared with the full reference.
  std::mt19937_64 g(707);
  std::normal_distribution<double> nd(0.0, 4.0);
  std::vector<T> noisy(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) noisy[std::size_t(j)] = T(double(j) + nd(g));
  check_row(noisy, 64, "noisy ascending 2^20");
}

TEMPLATE_TEST_CASE("topk_rows: many rows, 1 and 2 threads give identical results", "[topk]", float, double) {
  using T = TestType;
  std::mt19937_64 g(808);
  const index_t B = 48, n = 4133;
  hsae::row_matrix<T> x(B, n);
  for (index_t b = 0; b < B; ++b) {
    std::vector<T> row;
    switch (b % 4) {
      case 0: row = normal_row<T>(g, n); break;
      case 1: row = relu_row<T>(g, n); break;
      case 2: row = levels_row<T>(g, n, {T(0), T(1), T(2)}); break;
      default:
        row.resize(static_cast<std::size_t>(n));
        for (index_t j = 0; j < n; ++j) row[std::size_t(j)] = T(j);
    }
    for (index_t j = 0; j < n; ++j) x(b, j) = row[std::size_t(j)];
  }
  for (int k : {1, 64, 129, 300}) {
    hsae::row_matrix<T> v1, v2;
    hsae::index_matrix i1, i2;
    hsae::cpu::topk_rows<T>(hsae::cpu_backend{.num_threads = 1}, x, k, v1, i1);
    hsae::cpu::topk_rows<T>(hsae::cpu_backend{.num_threads = 2}, x, k, v2, i2);
    REQUIRE(v1.rows() == B);
    REQUIRE(v1.cols() == k);
    REQUIRE(i1.rows() == B);
    REQUIRE(i1.cols() == k);
    CHECK(i1 == i2);
    CHECK(std::memcmp(v1.data(), v2.data(), sizeof(T) * std::size_t(v1.size())) == 0);
    for (index_t b = 0; b < B; ++b) {
      const std::vector<T> row(x.row(b).data(), x.row(b).data() + n);
      const auto ref = reference_topk(row, k);
      const long t = first_mismatch(row, ref, i1.row(b).data(), v1.row(b).data());
      INFO("row " << b << " k=" << k);
      REQUIRE(t == -1);
    }
  }
  // A strided view (left columns of the matrix) works the same as a copy.
  const int k = 40;
  const auto view = x.leftCols(n - 37);
  const hsae::row_matrix<T> copy = view;
  hsae::row_matrix<T> vv, vc;
  hsae::index_matrix iv, ic;
  hsae::cpu::topk_rows<T>(hsae::cpu_backend{.num_threads = 2}, view, k, vv, iv);
  hsae::cpu::topk_rows<T>(hsae::cpu_backend{.num_threads = 1}, copy, k, vc, ic);
  CHECK(iv == ic);
  CHECK(vv == vc);
  // Output matrices of the wrong size are resized.
  hsae::row_matrix<T> small(1, 1);
  hsae::index_matrix small_i(3, 7);
  hsae::cpu::topk_rows<T>(hsae::cpu_backend{}, copy, k, small, small_i);
  CHECK(small.rows() == B);
  CHECK(small.cols() == k);
  CHECK(small_i == ic);
}

TEMPLATE_TEST_CASE("topk_rows rejects k < 1 and k > n", "[topk][errors]", float, double) {
  using T = TestType;
  const hsae::row_matrix<T> x = hsae::row_matrix<T>::Ones(3, 10);
  hsae::row_matrix<T> v;
  hsae::index_matrix i;
  const hsae::cpu_backend be{};
  for (int k : {0, -1, 11, 1000}) {
    INFO("k=" << k);
    CHECK_THROWS_AS(hsae::cpu::topk_rows<T>(be, x, k, v, i), hsae::config_error);
    CHECK_THROWS_WITH(hsae::cpu::topk_rows<T>(be, x, k, v, i), Catch::Contains("k=" + std::to_string(k)));
  }
  CHECK_NOTHROW(hsae::cpu::topk_rows<T>(be, x, 10, v, i));
  CHECK_NOTHROW(hsae::cpu::topk_rows<T>(be, x, 1, v, i));
}

// The public hsae::topk (the GPU topk's CPU twin): a sparse code [B, k] with the values
// as they are (no ReLU) and the sort reference's order.
TEMPLATE_TEST_CASE("topk into a sparse code matches the sort reference", "[topk]", float, double) {
  using T = TestType;
  std::mt19937_64 g(4242);
  const hsae::cpu_backend be{};
  for (index_t n : {1, 7, 300, 5000}) {
    const index_t B = 9;
    hsae::row_matrix<T> x(B, n);
    for (index_t b = 0; b < B; ++b) {
      std::vector<T> row;
      switch (b % 3) {
        case 0: row = normal_row<T>(g, n); break;                          // negatives kept: no ReLU
        case 1: row = levels_row<T>(g, n, {T(-1), T(0), T(2)}); break;     // ties
        default: row = relu_row<T>(g, n);                                  // ties among zeros
      }
      for (index_t j = 0; j < n; ++j) x(b, j) = row[std::size_t(j)];
    }
    std::vector<int> ks{1, int(n)};
    if (n > 2) ks.push_back(int(n / 2));
    for (int k : ks) {
      hsae::sparse_code<T> code;
      hsae::topk<T>(be, x, k, code);
      REQUIRE(code.rows() == B);
      REQUIRE(code.k() == k);
      REQUIRE(code.indices.rows() == B);
      REQUIRE(code.indices.cols() == k);
      for (index_t b = 0; b < B; ++b) {
        const std::vector<T> row(x.row(b).data(), x.row(b).data() + n);
        const auto ref = reference_topk(row, k);
        INFO("n=" << n << " k=" << k << " row " << b);
        REQUIRE(first_mismatch(row, ref, code.indices.row(b).data(), code.values.row(b).data()) == -1);
      }
    }
  }
  // Deduces T from the code; an empty batch gives an empty code.
  const hsae::row_matrix<T> none(0, 5);
  hsae::sparse_code<T> code;
  hsae::topk(be, none, 3, code);
  CHECK(code.rows() == 0);
  CHECK(code.k() == 3);
}

TEMPLATE_TEST_CASE("topk into a sparse code rejects a bad k and an empty row width", "[topk][errors]", float, double) {
  using T = TestType;
  const hsae::row_matrix<T> x = hsae::row_matrix<T>::Ones(3, 10);
  hsae::sparse_code<T> code;
  const hsae::cpu_backend be{};
  for (int k : {0, -1, 11}) {
    INFO("k=" << k);
    CHECK_THROWS_AS(hsae::topk(be, x, k, code), hsae::config_error);
    CHECK_THAT(hsae_test::message_of<hsae::config_error>([&] { hsae::topk(be, x, k, code); }),
               Catch::Contains(hsae_test::numbered("cpu topk: k=", k, " must")));
  }
  const hsae::row_matrix<T> empty(3, 0);
  CHECK_THAT(hsae_test::message_of<hsae::shape_error>([&] { hsae::topk(be, empty, 1, code); }),
             Catch::Contains("expected at least one column"));
}
