// SPDX-License-Identifier: Apache-2.0
// k-schedules (k_schedule.hpp): compile-time schedules and their aliases, the
// k_schedule_like concept, dynamic_k_schedule's factories and validation, and
// normalized_rank_weights.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace {

inline constexpr std::array<double, 3> kWeights{2.0, 0.5, 0.25};
using weighted3 = hsae::weighted_k_schedule<kWeights, 4, 16, 64>;

inline constexpr std::array<double, 1> kSingle{3.0};

inline constexpr double kMax = std::numeric_limits<double>::max();
inline constexpr std::array<double, 2> kHuge{1e308, 1e308};
using huge2 = hsae::weighted_k_schedule<kHuge, 2, 5>;
inline constexpr std::array<double, 3> kMaxes{kMax, kMax, kMax};
using maxes3 = hsae::weighted_k_schedule<kMaxes, 1, 2, 3>;
using weighted1 = hsae::weighted_k_schedule<kSingle, 7>;

/// A user-defined schedule type: satisfies the concept without being one of hsae's.
struct user_schedule {
  std::size_t size() const { return 2; }
  int k(std::size_t l) const { return l == 0 ? 3 : 9; }
  double weight(std::size_t l) const { return l == 0 ? 1.0 : 3.0; }
  int k_max() const { return 9; }
};

/// A user-defined schedule whose levels the test sets: anything, valid or not.
struct raw_schedule {
  std::vector<hsae::schedule_level> levels;
  int top = 0;  ///< what k_max() reports
  std::size_t size() const { return levels.size(); }
  int k(std::size_t l) const { return levels[l].k; }
  double weight(std::size_t l) const { return levels[l].weight; }
  int k_max() const { return top; }
};

struct not_a_schedule {
  std::size_t size() const { return 1; }
  int k(std::size_t) const { return 1; }
  // no weight(), no k_max()
};

template <class S>
constexpr double total_weight(const S& s) {
  double w = 0;
  for (std::size_t l = 0; l < s.size(); ++l) w += s.weight(l);
  return w;
}

template <class S>
std::vector<int> ks_of(const S& s) {
  std::vector<int> ks;
  for (std::size_t l = 0; l < s.size(); ++l) ks.push_back(s.k(l));
  return ks;
}

template <class S>
std::vector<double> weights_of(const S& s) {
  std::vector<double> w;
  for (std::size_t l = 0; l < s.size(); ++l) w.push_back(s.weight(l));
  return w;
}

std::string message_of(const std::vector<hsae::schedule_level>& levels) {
  try {
    hsae::dynamic_k_schedule s(levels);
  } catch (const hsae::config_error& e) {
    return e.what();
  }
  return "<no exception>";
}

}  // namespace

TEST_CASE("k_schedule<8, 16, 32, 64> at compile time", "[k_schedule]") {
  using S = hsae::k_schedule<8, 16, 32, 64>;
  STATIC_REQUIRE(S::size() == 4);
  STATIC_REQUIRE(S::k(0) == 8);
  STATIC_REQUIRE(S::k(1) == 16);
  STATIC_REQUIRE(S::k(2) == 32);
  STATIC_REQUIRE(S::k(3) == 64);
  STATIC_REQUIRE(S::k_max() == 64);
  STATIC_REQUIRE(S::weight(0) == 1.0);
  STATIC_REQUIRE(S::weight(3) == 1.0);
  STATIC_REQUIRE(total_weight(S{}) == 4.0);
  // Usable through an instance as well as statically.
  constexpr S s{};
  STATIC_REQUIRE(s.k_max() == 64);
  CHECK(ks_of(s) == std::vector<int>{8, 16, 32, 64});
  CHECK(weights_of(s) == std::vector<double>{1, 1, 1, 1});
}

TEST_CASE("static_k_max and schedule_fits_width: the compile-time width check", "[k_schedule]") {
  using hsae::dynamic;
  STATIC_REQUIRE(hsae::static_k_max<hsae::k_schedule<8, 16, 32, 64>> == 64);
  STATIC_REQUIRE(hsae::static_k_max<hsae::all_prefixes<5>> == 5);
  STATIC_REQUIRE(hsae::static_k_max<hsae::multi_topk<8>> == 32);
  STATIC_REQUIRE(hsae::static_k_max<hsae::weighted_k_schedule<kWeights, 2, 4, 9>> == 9);
  STATIC_REQUIRE(hsae::static_k_max<hsae::dynamic_k_schedule> == 0);  // known at run time only
  // Both fixed: the width decides.
  STATIC_REQUIRE(hsae::schedule_fits_width<hsae::k_schedule<8, 64>, 64>);
  STATIC_REQUIRE_FALSE(hsae::schedule_fits_width<hsae::k_schedule<8, 64>, 63>);
  STATIC_REQUIRE_FALSE(hsae::schedule_fits_width<hsae::multi_topk<8>, 31>);
  // Either one dynamic: left to the run-time check (config_error naming k_max and d_sae).
  STATIC_REQUIRE(hsae::schedule_fits_width<hsae::k_schedule<8, 64>, dynamic>);
  STATIC_REQUIRE(hsae::schedule_fits_width<hsae::dynamic_k_schedule, 4>);
}

TEST_CASE("all_prefixes<5>, top_k<32>, multi_topk<8>", "[k_schedule]") {
  using P = hsae::all_prefixes<5>;
  STATIC_REQUIRE(std::is_same_v<P, hsae::k_schedule<1, 2, 3, 4, 5>>);
  STATIC_REQUIRE(P::size() == 5);
  STATIC_REQUIRE(P::k(0) == 1);
  STATIC_REQUIRE(P::k(4) == 5);
  STATIC_REQUIRE(P::k_max() == 5);
  STATIC_REQUIRE(P::weight(2) == 1.0);
  CHECK(ks_of(P{}) == std::vector<int>{1, 2, 3, 4, 5});

  using P1 = hsae::all_prefixes<1>;
  STATIC_REQUIRE(P1::size() == 1);
  STATIC_REQUIRE(P1::k_max() == 1);

  using P64 = hsae::all_prefixes<64>;
  STATIC_REQUIRE(P64::size() == 64);
  STATIC_REQUIRE(P64::k(31) == 32);
  STATIC_REQUIRE(P64::k_max() == 64);

  using T = hsae::top_k<32>;
  STATIC_REQUIRE(std::is_same_v<T, hsae::k_schedule<32>>);
  STATIC_REQUIRE(T::size() == 1);
  STATIC_REQUIRE(T::k(0) == 32);
  STATIC_REQUIRE(T::k_max() == 32);
  STATIC_REQUIRE(T::weight(0) == 1.0);

  using M = hsae::multi_topk<8>;
  STATIC_REQUIRE(M::size() == 2);
  STATIC_REQUIRE(M::k(0) == 8);
  STATIC_REQUIRE(M::k(1) == 32);
  STATIC_REQUIRE(M::k_max() == 32);
  STATIC_REQUIRE(M::weight(0) == 1.0);
  STATIC_REQUIRE(M::weight(1) == 0.125);
  CHECK(weights_of(M{}) == std::vector<double>{1.0, 0.125});
}

TEST_CASE("weighted_k_schedule with a constexpr std::array", "[k_schedule]") {
  STATIC_REQUIRE(weighted3::size() == 3);
  STATIC_REQUIRE(weighted3::k(0) == 4);
  STATIC_REQUIRE(weighted3::k(1) == 16);
  STATIC_REQUIRE(weighted3::k(2) == 64);
  STATIC_REQUIRE(weighted3::k_max() == 64);
  STATIC_REQUIRE(weighted3::weight(0) == 2.0);
  STATIC_REQUIRE(weighted3::weight(1) == 0.5);
  STATIC_REQUIRE(weighted3::weight(2) == 0.25);
  STATIC_REQUIRE(total_weight(weighted3{}) == 2.75);

  STATIC_REQUIRE(weighted1::size() == 1);
  STATIC_REQUIRE(weighted1::k_max() == 7);
  STATIC_REQUIRE(weighted1::weight(0) == 3.0);
}

TEST_CASE("k_schedule_like is satisfied by every schedule type", "[k_schedule]") {
  STATIC_REQUIRE(hsae::k_schedule_like<hsae::k_schedule<8, 16, 32, 64>>);
  STATIC_REQUIRE(hsae::k_schedule_like<hsae::all_prefixes<5>>);
  STATIC_REQUIRE(hsae::k_schedule_like<hsae::top_k<32>>);
  STATIC_REQUIRE(hsae::k_schedule_like<hsae::multi_topk<8>>);
  STATIC_REQUIRE(hsae::k_schedule_like<weighted3>);
  STATIC_REQUIRE(hsae::k_schedule_like<hsae::dynamic_k_schedule>);
  STATIC_REQUIRE(hsae::k_schedule_like<user_schedule>);
  STATIC_REQUIRE_FALSE(hsae::k_schedule_like<not_a_schedule>);
  STATIC_REQUIRE_FALSE(hsae::k_schedule_like<int>);
  STATIC_REQUIRE_FALSE(hsae::k_schedule_like<std::vector<int>>);
}

TEST_CASE("dynamic_k_schedule: construction and accessors", "[k_schedule]") {
  const hsae::dynamic_k_schedule s{{2, 1.0}, {5, 0.5}, {11, 4.0}};
  REQUIRE(s.size() == 3);
  CHECK(s.k(0) == 2);
  CHECK(s.k(1) == 5);
  CHECK(s.k(2) == 11);
  CHECK(s.k_max() == 11);
  CHECK(s.weight(0) == 1.0);
  CHECK(s.weight(1) == 0.5);
  CHECK(s.weight(2) == 4.0);
  CHECK(s.levels() == std::vector<hsae::schedule_level>{{2, 1.0}, {5, 0.5}, {11, 4.0}});

  const hsae::dynamic_k_schedule from_vec(std::vector<hsae::schedule_level>{{2, 1.0}, {5, 0.5}, {11, 4.0}});
  CHECK(from_vec == s);
  const hsae::dynamic_k_schedule other{{2, 1.0}, {5, 0.5}, {11, 4.5}};
  CHECK_FALSE(other == s);

  const hsae::dynamic_k_schedule one{{1, 1e-6}};
  CHECK(one.size() == 1);
  CHECK(one.k_max() == 1);
}

TEST_CASE("dynamic_k_schedule factories", "[k_schedule]") {
  SECTION("all_prefixes") {
    const auto s = hsae::dynamic_k_schedule::all_prefixes(6);
    CHECK(ks_of(s) == std::vector<int>{1, 2, 3, 4, 5, 6});
    CHECK(weights_of(s) == std::vector<double>(6, 1.0));
    CHECK(s.k_max() == 6);
    CHECK(hsae::dynamic_k_schedule::all_prefixes(1).size() == 1);
    CHECK(hsae::dynamic_k_schedule::all_prefixes(256).size() == 256);
    CHECK(hsae::dynamic_k_schedule::all_prefixes(5) == hsae::dynamic_k_schedule::from(hsae::all_prefixes<5>{}));
  }
  SECTION("top_k") {
    const auto s = hsae::dynamic_k_schedule::top_k(32);
    CHECK(s.size() == 1);
    CHECK(s.k(0) == 32);
    CHECK(s.weight(0) == 1.0);
    CHECK(s.k_max() == 32);
    CHECK(s == hsae::dynamic_k_schedule::from(hsae::top_k<32>{}));
  }
  SECTION("subset") {
    const auto s = hsae::dynamic_k_schedule::subset({8, 16, 32, 64});
    CHECK(ks_of(s) == std::vector<int>{8, 16, 32, 64});
    CHECK(weights_of(s) == std::vector<double>(4, 1.0));
    CHECK(s == hsae::dynamic_k_schedule::from(hsae::k_schedule<8, 16, 32, 64>{}));
  }
  SECTION("geometric") {
    CHECK(ks_of(hsae::dynamic_k_schedule::geometric(8, 64)) == std::vector<int>{8, 16, 32, 64});
    CHECK(ks_of(hsae::dynamic_k_schedule::geometric(3, 20)) == std::vector<int>{3, 6, 12, 20});
    CHECK(ks_of(hsae::dynamic_k_schedule::geometric(1, 8)) == std::vector<int>{1, 2, 4, 8});
    CHECK(ks_of(hsae::dynamic_k_schedule::geometric(5, 5)) == std::vector<int>{5});
    CHECK(ks_of(hsae::dynamic_k_schedule::geometric(1, 1)) == std::vector<int>{1});
    CHECK(ks_of(hsae::dynamic_k_schedule::geometric(16, 17)) == std::vector<int>{16, 17});
    CHECK(weights_of(hsae::dynamic_k_schedule::geometric(3, 20)) == std::vector<double>(4, 1.0));
    // Large k_max near INT_MAX: the doubling must not overflow.
    const int big = std::numeric_limits<int>::max();
    const auto g = hsae::dynamic_k_schedule::geometric(1 << 29, big);
    CHECK(ks_of(g) == std::vector<int>{1 << 29, 1 << 30, big});
  }
  SECTION("multi_topk") {
    const auto s = hsae::dynamic_k_schedule::multi_topk(8);
    CHECK(ks_of(s) == std::vector<int>{8, 32});
    CHECK(weights_of(s) == std::vector<double>{1.0, 0.125});
    CHECK(s == hsae::dynamic_k_schedule::from(hsae::multi_topk<8>{}));
  }
  SECTION("from: compile-time and user schedules") {
    const auto w = hsae::dynamic_k_schedule::from(weighted3{});
    CHECK(w.levels() == std::vector<hsae::schedule_level>{{4, 2.0}, {16, 0.5}, {64, 0.25}});
    const auto u = hsae::dynamic_k_schedule::from(user_schedule{});
    CHECK(u.levels() == std::vector<hsae::schedule_level>{{3, 1.0}, {9, 3.0}});
    const auto m = hsae::dynamic_k_schedule::from(hsae::multi_topk<16>{});
    CHECK(m.k_max() == 64);
    CHECK(m.weight(1) == 0.125);
  }
}

TEST_CASE("normalized_rank_weights", "[k_schedule]") {
  SECTION("multi_topk<8>: 1/1.125 at rank 8, 0.125/1.125 at rank 32, zero elsewhere") {
    const auto w = hsae::normalized_rank_weights<double>(hsae::multi_topk<8>{});
    REQUIRE(w.size() == 32);
    for (std::size_t j = 0; j < w.size(); ++j) {
      INFO("rank " << j + 1);
      if (j == 7)
        CHECK(w[j] == Approx(1.0 / 1.125).epsilon(1e-15));
      else if (j == 31)
        CHECK(w[j] == Approx(0.125 / 1.125).epsilon(1e-15));
      else
        CHECK(w[j] == 0.0);
    }
    CHECK(std::accumulate(w.begin(), w.end(), 0.0) == Approx(1.0).epsilon(1e-15));
    // The dynamic twin gives the same weights bitwise; float accumulation too.
    CHECK(hsae::normalized_rank_weights<double>(hsae::dynamic_k_schedule::multi_topk(8)) == w);
    const auto wf = hsae::normalized_rank_weights<float>(hsae::multi_topk<8>{});
    REQUIRE(wf.size() == 32);
    CHECK(wf[7] == Approx(1.0f / 1.125f));
    CHECK(wf[31] == Approx(0.125f / 1.125f));
    CHECK(wf[0] == 0.0f);
  }
  SECTION("all_prefixes<5>: uniform 1/5") {
    const auto w = hsae::normalized_rank_weights<double>(hsae::all_prefixes<5>{});
    REQUIRE(w.size() == 5);
    for (double x : w) CHECK(x == Approx(0.2).epsilon(1e-15));
  }
  SECTION("top_k<32>: everything at rank 32") {
    const auto w = hsae::normalized_rank_weights<double>(hsae::top_k<32>{});
    REQUIRE(w.size() == 32);
    CHECK(w[31] == 1.0);
    CHECK(std::count(w.begin(), w.end(), 0.0) == 31);
  }
  SECTION("subset and weighted schedules: zero at unscheduled ranks, sums to 1") {
    const auto check = [](const auto& s) {
      const auto w = hsae::normalized_rank_weights<double>(s);
      REQUIRE(w.size() == std::size_t(s.k_max()));
      const double total = total_weight(s);
      std::vector<double> expect(w.size(), 0.0);
      for (std::size_t l = 0; l < s.size(); ++l) expect[std::size_t(s.k(l) - 1)] = s.weight(l) / total;
      for (std::size_t j = 0; j < w.size(); ++j) {
        INFO("rank " << j + 1);
        CHECK(w[j] == Approx(expect[j]).epsilon(1e-15).margin(0));
        if (expect[j] == 0.0) CHECK(w[j] == 0.0);
      }
      CHECK(std::accumulate(w.begin(), w.end(), 0.0) == Approx(1.0).epsilon(1e-14));
    };
    check(hsae::k_schedule<8, 16, 32, 64>{});
    check(weighted3{});
    check(user_schedule{});
    check(hsae::dynamic_k_schedule::geometric(3, 20));
    check(hsae::dynamic_k_schedule{{2, 1e-3}, {3, 7.0}, {40, 0.25}});
  }
}

TEST_CASE("dynamic_k_schedule validation names the problem", "[k_schedule][errors]") {
  using hsae::config_error;
  using hsae::dynamic_k_schedule;
  using L = std::vector<hsae::schedule_level>;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();

  SECTION("empty") {
    CHECK_THROWS_AS(dynamic_k_schedule(L{}), config_error);
    CHECK_THAT(message_of(L{}), Catch::Contains("empty"));
    CHECK_THROWS_WITH(dynamic_k_schedule::subset({}), Catch::Contains("empty"));
  }
  SECTION("non-increasing and duplicate k") {
    CHECK_THROWS_AS(dynamic_k_schedule(L{{8, 1}, {4, 1}}), config_error);
    CHECK_THAT(message_of(L{{8, 1}, {4, 1}}), Catch::Contains("strictly increasing") && Catch::Contains("k=4"));
    CHECK_THAT(message_of(L{{1, 1}, {2, 1}, {2, 1}}), Catch::Contains("strictly increasing") && Catch::Contains("k=2"));
    CHECK_THROWS_AS(dynamic_k_schedule::subset({8, 16, 16, 32}), config_error);
    CHECK_THROWS_WITH(dynamic_k_schedule::subset({32, 16}), Catch::Contains("strictly increasing"));
  }
  SECTION("k < 1") {
    CHECK_THROWS_AS(dynamic_k_schedule(L{{0, 1}}), config_error);
    CHECK_THAT(message_of(L{{0, 1}}), Catch::Contains("k=0") && Catch::Contains(">= 1"));
    CHECK_THAT(message_of(L{{-3, 1}, {4, 1}}), Catch::Contains("k=-3"));
    CHECK_THROWS_WITH(dynamic_k_schedule::top_k(0), Catch::Contains("k=0"));
    CHECK_THROWS_WITH(dynamic_k_schedule::all_prefixes(0), Catch::Contains("k_max") && Catch::Contains(">= 1"));
    CHECK_THROWS_AS(dynamic_k_schedule::all_prefixes(-2), config_error);
    CHECK_THROWS_AS(dynamic_k_schedule::multi_topk(0), config_error);
    CHECK_THROWS_WITH(dynamic_k_schedule::geometric(0, 8), Catch::Contains("k_min=0"));
    CHECK_THROWS_WITH(dynamic_k_schedule::geometric(16, 8), Catch::Contains("k_min=16") && Catch::Contains("k_max=8"));
  }
  SECTION("weights: zero, negative, NaN, Inf") {
    for (double w : {0.0, -0.0, -1.0, -1e-300, nan, inf, -inf}) {
      INFO("weight " << w);
      CHECK_THROWS_AS(dynamic_k_schedule(L{{4, 1.0}, {8, w}}), config_error);
      const std::string msg = message_of(L{{4, 1.0}, {8, w}});
      CHECK_THAT(msg, Catch::Contains("weight") && Catch::Contains("positive and finite") && Catch::Contains("k=8"));
    }
    CHECK_THAT(message_of(L{{4, 0.0}}), Catch::Contains("level 0"));
  }
  SECTION("every message starts with the library prefix") {
    CHECK_THAT(message_of(L{}), Catch::StartsWith("hsae: "));
    CHECK_THAT(message_of(L{{3, 1}, {3, 1}}), Catch::StartsWith("hsae: "));
  }
  SECTION("valid edge cases do not throw") {
    CHECK_NOTHROW(dynamic_k_schedule(L{{1, 1e-300}}));
    CHECK_NOTHROW(dynamic_k_schedule(L{{1, 1e300}, {2, 1e-10}}));
    CHECK_NOTHROW(dynamic_k_schedule::geometric(1, 1));
  }
}

TEST_CASE("multi_topk: a k whose second level 4k overflows an int is refused", "[k_schedule][errors]") {
  using hsae::config_error;
  using hsae::dynamic_k_schedule;
  const int big = std::numeric_limits<int>::max();
  STATIC_REQUIRE(hsae::multi_topk_max_k == big / 4);
  // The largest k still works, statically and at run time.
  STATIC_REQUIRE(hsae::multi_topk<hsae::multi_topk_max_k>::k_max() == 4 * hsae::multi_topk_max_k);
  const auto top = dynamic_k_schedule::multi_topk(hsae::multi_topk_max_k);
  CHECK(ks_of(top) == std::vector<int>{hsae::multi_topk_max_k, 4 * hsae::multi_topk_max_k});
  CHECK(top == dynamic_k_schedule::from(hsae::multi_topk<hsae::multi_topk_max_k>{}));
  // One more and 4k no longer fits: refused by name, before any multiplication.
  for (int k : {hsae::multi_topk_max_k + 1, big / 2, big, -(big / 4) - 2, std::numeric_limits<int>::min()}) {
    INFO("k = " << k);
    CHECK_THROWS_AS(dynamic_k_schedule::multi_topk(k), config_error);
    CHECK_THROWS_WITH(dynamic_k_schedule::multi_topk(k), Catch::Contains("multi_topk: k=" + std::to_string(k)) &&
                                                             Catch::Contains("must be in [1, 536870911]"));
  }
  CHECK_THROWS_WITH(dynamic_k_schedule::multi_topk(0), Catch::Contains("multi_topk: k=0"));
  // hsae::multi_topk<536870912> does not compile: a static_assert names the bound.
}

TEST_CASE("weights whose sum overflows normalise by the largest weight", "[k_schedule]") {
  using hsae::dynamic_k_schedule;
  using hsae::normalized_rank_weights;
  // 1e308 + 1e308 overflows: the plain w / W made every weight 0 (a loss identically 0).
  SECTION("{1e308, 1e308} gives {1/2, 1/2}, bitwise as {1, 1}") {
    const dynamic_k_schedule huge{{2, 1e308}, {5, 1e308}};
    const auto w = normalized_rank_weights<double>(huge);
    CHECK(w == std::vector<double>{0, 0.5, 0, 0, 0.5});
    CHECK(w == normalized_rank_weights<double>(dynamic_k_schedule{{2, 1.0}, {5, 1.0}}));
    CHECK(normalized_rank_weights<double>(huge2{}) == w);
    CHECK(normalized_rank_weights<float>(huge2{}) == std::vector<float>{0, 0.5f, 0, 0, 0.5f});
  }
  SECTION("three weights of DBL_MAX give 1/3 each") {
    const auto w = normalized_rank_weights<double>(maxes3{});
    REQUIRE(w.size() == 3);
    for (double x : w) CHECK(x == Approx(1.0 / 3.0).epsilon(1e-15));
    CHECK(normalized_rank_weights<double>(dynamic_k_schedule::from(maxes3{})) == w);
  }
  SECTION("mixed magnitudes: ratios kept, the sum is 1") {
    const dynamic_k_schedule s{{1, kMax}, {4, kMax / 2}, {9, kMax / 4}, {16, 1.0}};
    const auto w = normalized_rank_weights<double>(s);
    CHECK(w[0] == Approx(4.0 / 7.0).epsilon(1e-15));
    CHECK(w[3] == Approx(2.0 / 7.0).epsilon(1e-15));
    CHECK(w[8] == Approx(1.0 / 7.0).epsilon(1e-15));
    CHECK(w[15] > 0.0);  // 1 / (1.75 DBL_MAX): subnormal, not 0
    CHECK(std::accumulate(w.begin(), w.end(), 0.0) == Approx(1.0).epsilon(1e-15));
    for (double x : w) CHECK(std::isfinite(x));
  }
  SECTION("the predicates behind the static_asserts of weighted_k_schedule") {
    constexpr double inf = std::numeric_limits<double>::infinity();
    constexpr double nan = std::numeric_limits<double>::quiet_NaN();
    STATIC_REQUIRE(hsae::detail::normalizable(kHuge));
    STATIC_REQUIRE(hsae::detail::normalizable(kMaxes));
    STATIC_REQUIRE(hsae::detail::normalizable(std::array<double, 2>{1e300, 1e-10}));
    STATIC_REQUIRE_FALSE(hsae::detail::all_positive_finite(std::array<double, 2>{1.0, inf}));
    STATIC_REQUIRE_FALSE(hsae::detail::all_positive_finite(std::array<double, 2>{nan, 1.0}));
    STATIC_REQUIRE_FALSE(hsae::detail::all_positive_finite(std::array<double, 2>{1.0, 0.0}));
    STATIC_REQUIRE_FALSE(hsae::detail::normalizable(std::array<double, 2>{1.0, inf}));
    STATIC_REQUIRE_FALSE(hsae::detail::normalizable(std::array<double, 2>{1e308, 1e-20}));
  }
}

TEST_CASE("a weight whose normalised weight underflows to 0 is refused", "[k_schedule][errors]") {
  using L = std::vector<hsae::schedule_level>;
  // 1e-20 / 1e308 = 1e-328 is below the smallest subnormal: the level would count for nothing.
  for (const L& levels :
       {L{{4, 1e308}, {8, 1e-20}}, L{{4, 1e-20}, {8, 1e308}}, L{{4, kMax}, {8, kMax}, {9, 1e-300}}}) {
    CHECK_THROWS_AS(hsae::dynamic_k_schedule(levels), hsae::config_error);
    CHECK_THAT(message_of(levels), Catch::Contains("has weight 1e-") &&
                                       Catch::Contains("negligible next to the largest") &&
                                       Catch::Contains("underflows to 0"));
  }
  CHECK_THAT(message_of(L{{4, 1e308}, {8, 1e-20}}),
             Catch::Contains("level 1 (k=8) has weight 1e-20") && Catch::Contains("largest weight 1e+308"));
  // The same from a user schedule, a compile-time one converted, and the JSON-like path of from().
  raw_schedule r{{{4, 1e308}, {8, 1e-20}}, 8};
  CHECK_THROWS_AS(hsae::normalized_rank_weights<double>(r), hsae::config_error);
  CHECK_THROWS_AS(hsae::dynamic_k_schedule::from(r), hsae::config_error);
}

TEST_CASE("normalized_rank_weights checks a user schedule before indexing by its ks", "[k_schedule][errors]") {
  using hsae::config_error;
  using hsae::normalized_rank_weights;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const auto message = [](const raw_schedule& r) -> std::string {
    try {
      (void)normalized_rank_weights<double>(r);
    } catch (const config_error& e) {
      return e.what();
    }
    return "<no exception>";
  };
  CHECK(normalized_rank_weights<double>(raw_schedule{{{2, 1.0}, {4, 3.0}}, 4}) ==
        std::vector<double>{0, 0.25, 0, 0.75});
  CHECK_THAT(message(raw_schedule{{}, 0}), Catch::Contains("empty"));
  CHECK_THAT(message(raw_schedule{{{0, 1.0}, {4, 1.0}}, 4}), Catch::Contains("level 0 has k=0"));
  CHECK_THAT(message(raw_schedule{{{4, 1.0}, {2, 1.0}}, 4}), Catch::Contains("not strictly increasing"));
  CHECK_THAT(message(raw_schedule{{{2, 1.0}, {9, 1.0}}, 4}),
             Catch::Contains("k_max()=4 differs from its last level's k=9"));
  CHECK_THAT(message(raw_schedule{{{2, 1.0}, {4, nan}}, 4}), Catch::Contains("(k=4) has weight nan"));
  CHECK_THAT(message(raw_schedule{{{2, inf}, {4, 1.0}}, 4}), Catch::Contains("(k=2) has weight inf"));
  CHECK_THAT(message(raw_schedule{{{2, -1.0}, {4, 1.0}}, 4}), Catch::Contains("positive and finite"));
}
