// SPDX-License-Identifier: Apache-2.0
// The model (shapes, fixed vs dynamic width), the init recipe, the geometric median,
// the random generator, and encode / decode / pre_activations against hand computations.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

using hsae_test::bitwise_equal;

using namespace hsae;

template <class T>
row_matrix<T> normal_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, double scale = 1.0,
                            double shift = 0.0) {
  rng gen(seed);
  row_matrix<T> x(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j) x(i, j) = T(shift + scale * gen.normal());
  return x;
}

/// sum_i ||x_i - y||
double sum_of_distances(const row_matrix<double>& p, const Eigen::VectorXd& y) {
  double s = 0;
  for (Eigen::Index i = 0; i < p.rows(); ++i) s += (p.row(i).transpose() - y).norm();
  return s;
}

/// The negative gradient of sum_i ||x_i - y||: sum_i (x_i - y) / ||x_i - y||.
Eigen::VectorXd sum_of_unit_vectors(const row_matrix<double>& p, const Eigen::VectorXd& y) {
  Eigen::VectorXd s = Eigen::VectorXd::Zero(p.cols());
  for (Eigen::Index i = 0; i < p.rows(); ++i) {
    const Eigen::VectorXd d = p.row(i).transpose() - y;
    s += d / d.norm();
  }
  return s;
}

/// Reference: hand loops for pre = ReLU((x - b_dec) W_enc^T + b_enc).
template <class T, int F>
row_matrix<double> hand_pre(const sae<T, F>& m, const row_matrix<T>& x) {
  row_matrix<double> pre(x.rows(), m.d_sae());
  for (Eigen::Index b = 0; b < x.rows(); ++b)
    for (int f = 0; f < m.d_sae(); ++f) {
      double a = double(m.b_enc[f]);
      for (int j = 0; j < m.d_model(); ++j) a += (double(x(b, j)) - double(m.b_dec[j])) * double(m.W_enc(f, j));
      pre(b, f) = std::max(a, 0.0);
    }
  return pre;
}

/// A model whose every parameter is random and distinct (W_enc != W_dec, b_enc mixed
/// sign, b_dec non-zero), so that a swapped or forgotten term shows.
template <class T, int F = dynamic>
sae<T, F> random_model(int d_model, int d_sae, std::uint64_t seed) {
  sae<T, F> m(d_model, d_sae);
  init(cpu_backend{}, m, row_matrix<T>(0, d_model), {.seed = seed, .b_dec = decoder_bias_init::zero});
  rng gen(seed + 1);
  for (Eigen::Index i = 0; i < m.W_enc.size(); ++i) m.W_enc.data()[i] = T(gen.normal());
  for (int f = 0; f < d_sae; ++f) m.b_enc[f] = T(0.5 * gen.normal());
  for (int j = 0; j < d_model; ++j) m.b_dec[j] = T(2.0 + gen.normal());
  return m;
}

}  // namespace

// ---------------------------------------------------------------------------
// Shapes

TEST_CASE("sae construction: shapes, dynamic and fixed width", "[model]") {
  SECTION("dynamic width") {
    sae<float> m(8, 32);
    CHECK(m.d_model() == 8);
    CHECK(m.d_sae() == 32);
    CHECK(m.W_enc.rows() == 32);
    CHECK(m.W_enc.cols() == 8);
    CHECK(m.W_dec.rows() == 32);
    CHECK(m.W_dec.cols() == 8);
    CHECK(m.b_enc.size() == 32);
    CHECK(m.b_dec.size() == 8);
    CHECK(m.W_enc.cwiseAbs().maxCoeff() == 0.0f);  // zero-initialised
    CHECK(m.W_dec.cwiseAbs().maxCoeff() == 0.0f);
    CHECK_NOTHROW(m.check_shapes());
    STATIC_REQUIRE(sae<float>::static_d_sae == dynamic);
    STATIC_REQUIRE(decltype(m.W_enc)::RowsAtCompileTime == Eigen::Dynamic);
    STATIC_REQUIRE(decltype(m.W_enc)::IsRowMajor);
    m.resize(5, 7);
    CHECK(m.d_model() == 5);
    CHECK(m.d_sae() == 7);
    CHECK(m.W_enc.rows() == 7);
    CHECK(m.b_dec.size() == 5);
  }
  SECTION("fixed width sae<float, 64>") {
    sae<float, 64> m(12);
    STATIC_REQUIRE(sae<float, 64>::static_d_sae == 64);
    STATIC_REQUIRE(decltype(m.W_enc)::RowsAtCompileTime == 64);
    STATIC_REQUIRE(decltype(m.W_dec)::RowsAtCompileTime == 64);
    CHECK(m.d_sae() == 64);
    CHECK(m.d_model() == 12);
    CHECK(m.W_enc.rows() == 64);
    CHECK(m.W_enc.cols() == 12);
    CHECK(m.b_enc.size() == 64);
    CHECK(m.b_dec.size() == 12);
    CHECK_NOTHROW(sae<float, 64>(12, 64));
    CHECK_THROWS_AS((sae<float, 64>(12, 32)), hsae::config_error);
  }
  SECTION("invalid sizes") {
    CHECK_THROWS_AS(sae<double>(0, 4), hsae::config_error);
    CHECK_THROWS_AS(sae<double>(4, 0), hsae::config_error);
    CHECK_THROWS_AS(sae<double>(-3, 4), hsae::config_error);
  }
  SECTION("check_shapes catches inconsistent tensors") {
    sae<double> m(6, 10);
    m.b_enc.resize(9);
    CHECK_THROWS_AS(m.check_shapes(), hsae::shape_error);
    sae<double> n(6, 10);
    n.b_dec.resize(7);
    CHECK_THROWS_AS(n.check_shapes(), hsae::shape_error);
    sae<double> o(6, 10);
    o.W_enc.resize(10, 5);
    CHECK_THROWS_AS(o.check_shapes(), hsae::shape_error);
  }
  SECTION("gradients shaped like the model, zero") {
    sae<float, 64> m(12);
    m.W_enc.setOnes();
    sae_gradients<float, 64> g;
    g.zeros_like(m);
    CHECK(g.W_enc.rows() == 64);
    CHECK(g.W_enc.cols() == 12);
    CHECK(g.W_dec.rows() == 64);
    CHECK(g.b_enc.size() == 64);
    CHECK(g.b_dec.size() == 12);
    CHECK(g.W_enc.cwiseAbs().maxCoeff() == 0.0f);
    CHECK(g.W_dec.cwiseAbs().maxCoeff() == 0.0f);
  }
}

// ---------------------------------------------------------------------------
// Init

TEMPLATE_TEST_CASE("init: unit decoder rows, W_enc == W_dec, b_enc == 0", "[model][init]", float, double) {
  const double tol = std::is_same_v<TestType, float> ? 1e-6 : 1e-12;
  const cpu_backend be;
  const auto sample = normal_matrix<TestType>(200, 16, 1, 1.0, 3.0);
  sae<TestType> m(16, 48);
  m.b_enc.setOnes();  // init must clear it
  init(be, m, sample, {.seed = 11});
  for (Eigen::Index f = 0; f < m.W_dec.rows(); ++f) {
    INFO("row " << f);
    REQUIRE(std::abs(double(m.W_dec.row(f).norm()) - 1.0) <= tol);
  }
  CHECK(bitwise_equal(m.W_enc, m.W_dec));
  CHECK(m.b_enc.cwiseAbs().maxCoeff() == TestType(0));
  // Random directions: entries are not all alike and roughly centred.
  CHECK(std::abs(double(m.W_dec.mean())) < 0.05);
  CHECK(m.W_dec.cwiseAbs().minCoeff() < 0.05);
  CHECK(m.W_dec.cwiseAbs().maxCoeff() > 0.4);
}

TEST_CASE("init of a fixed-width model", "[model][init]") {
  const cpu_backend be;
  sae<float, 64> m(10);
  init(be, m, normal_matrix<float>(50, 10, 2), {.seed = 3, .b_dec = decoder_bias_init::mean});
  for (Eigen::Index f = 0; f < 64; ++f) REQUIRE(std::abs(m.W_dec.row(f).norm() - 1.0f) <= 1e-6f);
  CHECK(bitwise_equal(m.W_enc, m.W_dec));
  // Same recipe and seed as a dynamic model of the same width.
  sae<float> d(10, 64);
  init(be, d, normal_matrix<float>(50, 10, 2), {.seed = 3, .b_dec = decoder_bias_init::mean});
  CHECK(bitwise_equal(m.W_dec, d.W_dec));
  CHECK(bitwise_equal(m.b_dec, d.b_dec));
}

TEST_CASE("init draws N(0,1) rows in row-major order from hsae::rng, then normalises", "[model][init]") {
  sae<double> m(4, 3);
  init(cpu_backend{}, m, row_matrix<double>(0, 4), {.seed = 7, .b_dec = decoder_bias_init::zero});
  rng gen(7);
  for (int f = 0; f < 3; ++f) {
    Eigen::RowVectorXd r(4);
    for (int j = 0; j < 4; ++j) r[j] = gen.normal();
    r /= r.norm();
    CHECK((m.W_dec.row(f) - r).cwiseAbs().maxCoeff() <= 1e-15);
  }
  // Recorded once: guards the cross-platform reproducibility of seeded init.
  const double first_row[] = {-0.14713044847760773, 0.80557444782587373, 0.56989285467749362,
                              -0.068004222871477824};
  for (int j = 0; j < 4; ++j) CHECK(m.W_dec(0, j) == Approx(first_row[j]).epsilon(1e-13));
  CHECK(m.W_dec(2, 3) == Approx(-0.63111715684612002).epsilon(1e-13));
}

TEMPLATE_TEST_CASE("init: b_dec is the geometric median, the mean or zero", "[model][init]", float, double) {
  const cpu_backend be;
  // Skewed data: median and mean differ clearly.
  row_matrix<TestType> sample = normal_matrix<TestType>(300, 6, 4, 1.0, -1.0);
  for (Eigen::Index i = 0; i < 30; ++i) sample.row(i).array() += TestType(40);
  sae<TestType> m(6, 12);
  SECTION("geometric median (default)") {
    init(be, m, sample, {.seed = 1});
    const vector<TestType> gm = geometric_median<TestType>(be, sample);
    CHECK(bitwise_equal(m.b_dec, gm));
    const Eigen::VectorXd mean = sample.template cast<double>().colwise().mean().transpose();
    CHECK((m.b_dec.template cast<double>() - mean).norm() > 5.0);
  }
  SECTION("mean") {
    init(be, m, sample, {.seed = 1, .b_dec = decoder_bias_init::mean});
    Eigen::VectorXd mean = Eigen::VectorXd::Zero(6);
    for (Eigen::Index i = 0; i < sample.rows(); ++i) mean += sample.row(i).template cast<double>().transpose();
    mean /= double(sample.rows());
    CHECK((m.b_dec.template cast<double>() - mean).cwiseAbs().maxCoeff() <= 1e-5);
  }
  SECTION("zero") {
    m.b_dec.setOnes();
    init(be, m, sample, {.seed = 1, .b_dec = decoder_bias_init::zero});
    CHECK(m.b_dec.cwiseAbs().maxCoeff() == TestType(0));
    // Zero needs no sample.
    CHECK_NOTHROW(init(be, m, row_matrix<TestType>(0, 6), {.seed = 1, .b_dec = decoder_bias_init::zero}));
  }
}

TEST_CASE("init: same seed gives the same bits, another seed other weights", "[model][init]") {
  const auto sample = normal_matrix<float>(100, 12, 5);
  cpu_backend one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  sae<float> a(12, 40), b(12, 40), c(12, 40);
  init(one, a, sample, {.seed = 123});
  init(two, b, sample, {.seed = 123});  // thread count does not matter either
  init(one, c, sample, {.seed = 124});
  CHECK(bitwise_equal(a.W_dec, b.W_dec));
  CHECK(bitwise_equal(a.W_enc, b.W_enc));
  CHECK(bitwise_equal(a.b_enc, b.b_enc));
  CHECK(bitwise_equal(a.b_dec, b.b_dec));
  CHECK_FALSE(bitwise_equal(a.W_dec, c.W_dec));
  CHECK((a.W_dec - c.W_dec).cwiseAbs().maxCoeff() > 0.1f);
  // b_dec depends on the sample, not the seed.
  CHECK(bitwise_equal(a.b_dec, c.b_dec));
  // float and double draw the same directions.
  sae<double> d(12, 40);
  init(one, d, sample.cast<double>(), {.seed = 123});
  CHECK((a.W_dec.cast<double>() - d.W_dec).cwiseAbs().maxCoeff() <= 1e-6);
}

TEST_CASE("init validates its sample", "[model][init]") {
  const cpu_backend be;
  sae<double> m(6, 8);
  CHECK_THROWS_AS(init(be, m, normal_matrix<double>(10, 5, 1)), hsae::shape_error);
  CHECK_THROWS_AS(init(be, m, row_matrix<double>(0, 6)), hsae::shape_error);
  CHECK_THROWS_AS(init(be, m, row_matrix<double>(0, 6), {.b_dec = decoder_bias_init::mean}), hsae::shape_error);
  auto bad = normal_matrix<double>(10, 6, 1);
  bad(3, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(init(be, m, bad), hsae::numeric_error);
  bad(3, 2) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(init(be, m, bad, {.b_dec = decoder_bias_init::mean}), hsae::numeric_error);
}

// ---------------------------------------------------------------------------
// Geometric median

TEST_CASE("geometric_median satisfies the optimality condition and beats the mean", "[model][median]") {
  const cpu_backend be;
  const auto p = normal_matrix<double>(400, 7, 8, 2.0, 1.0);
  // Make it skewed so that mean != median.
  row_matrix<double> q = p;
  for (Eigen::Index i = 0; i < 60; ++i) q.row(i).array() += 10.0;
  SECTION("tight tolerance") {
    const Eigen::VectorXd y = geometric_median<double>(be, q, 5000, 1e-14);
    // sum of unit vectors (x_i - y)/||x_i - y|| ~ 0, relative to its scale N.
    CHECK(sum_of_unit_vectors(q, y).norm() <= 1e-6 * double(q.rows()));
    const Eigen::VectorXd mean = q.colwise().mean().transpose();
    CHECK(sum_of_distances(q, y) < sum_of_distances(q, mean));
    // Local optimality in random directions.
    rng gen(1);
    for (int r = 0; r < 20; ++r) {
      Eigen::VectorXd d(7);
      for (int j = 0; j < 7; ++j) d[j] = gen.normal();
      d *= 1e-3 / d.norm();
      CHECK(sum_of_distances(q, y) <= sum_of_distances(q, y + d));
      CHECK(sum_of_distances(q, y) <= sum_of_distances(q, y - d));
    }
  }
  SECTION("default settings are close to optimal") {
    const Eigen::VectorXd y = geometric_median<double>(be, q);
    const Eigen::VectorXd yt = geometric_median<double>(be, q, 5000, 1e-14);
    CHECK((y - yt).norm() <= 1e-4);
    CHECK(sum_of_unit_vectors(q, y).norm() <= 1e-3 * double(q.rows()));
    CHECK(sum_of_distances(q, y) <= sum_of_distances(q, yt) * (1 + 1e-9));
  }
  SECTION("float input, result computed in double") {
    const row_matrix<float> qf = q.cast<float>();
    const vector<float> yf = geometric_median<float>(be, qf, 5000, 1e-14);
    const Eigen::VectorXd yd = geometric_median<double>(be, qf.cast<double>(), 5000, 1e-14);
    CHECK((yf.cast<double>() - yd).cwiseAbs().maxCoeff() <= 1e-6);
  }
}

TEST_CASE("geometric_median is robust to outliers, the mean is not", "[model][median]") {
  const cpu_backend be;
  const int D = 5;
  row_matrix<double> p = normal_matrix<double>(110, D, 9, 0.1, 1.0);  // bulk around (1, ..., 1)
  for (Eigen::Index i = 100; i < 110; ++i) p.row(i).setConstant(1000.0);
  const Eigen::VectorXd y = geometric_median<double>(be, p);
  const Eigen::VectorXd mean = p.colwise().mean().transpose();
  const Eigen::VectorXd ones = Eigen::VectorXd::Ones(D);
  INFO("median distance " << (y - ones).norm() << " mean distance " << (mean - ones).norm());
  CHECK((y - ones).norm() < 0.2);
  CHECK((mean - ones).norm() > 100.0);
}

TEST_CASE("geometric_median special cases", "[model][median]") {
  const cpu_backend be;
  SECTION("one dimension: the ordinary median") {
    row_matrix<double> p(5, 1);
    p << 0, 1, 2, 10, 100;
    CHECK(geometric_median<double>(be, p, 1000, 1e-12)[0] == Approx(2.0).margin(1e-4));
  }
  SECTION("a single point") {
    row_matrix<double> p(1, 3);
    p << 1.5, -2, 7;
    const auto y = geometric_median<double>(be, p);
    CHECK((y - p.row(0).transpose()).norm() <= 1e-12);
  }
  SECTION("identical points (zero spread)") {
    row_matrix<double> p(4, 2);
    p.rowwise() = Eigen::RowVector2d(3, -4);
    const auto y = geometric_median<double>(be, p);
    CHECK(y.allFinite());
    CHECK((y - Eigen::Vector2d(3, -4)).norm() <= 1e-12);
  }
  SECTION("symmetric configuration: the centre") {
    row_matrix<double> p(4, 2);
    p << 1, 0, -1, 0, 0, 1, 0, -1;
    p.rowwise() += Eigen::RowVector2d(5, 5);
    const auto y = geometric_median<double>(be, p);
    CHECK((y - Eigen::Vector2d(5, 5)).norm() <= 1e-9);
  }
  SECTION("errors") {
    CHECK_THROWS_AS(geometric_median<double>(be, row_matrix<double>(0, 3)), hsae::shape_error);
    row_matrix<double> p = normal_matrix<double>(4, 3, 1);
    p(1, 1) = std::numeric_limits<double>::quiet_NaN();
    CHECK_THROWS_AS(geometric_median<double>(be, p), hsae::numeric_error);
  }
}

// ---------------------------------------------------------------------------
// rng

TEST_CASE("hsae::rng: splitmix64 seeding and xoshiro256** outputs are stable", "[rng]") {
  SECTION("seed 0: the well-known splitmix64(0) state") {
    rng g(0);
    const auto st = g.state();
    CHECK(st.s[0] == 0xe220a8397b1dcdafull);
    CHECK(st.s[1] == 0x6e789e6aa1b965f4ull);
    CHECK(st.s[2] == 0x06c45d188009454full);
    CHECK(st.s[3] == 0xf88bb8a8724c81ecull);
    const std::uint64_t want[] = {0x99ec5f36cb75f2b4ull, 0xbf6e1f784956452aull, 0x1a5f849d4933e6e0ull,
                                  0x6aa594f1262d2d2cull};
    for (auto w : want) CHECK(g() == w);
  }
  SECTION("seed 42 (recorded once)") {
    rng g(42);
    const std::uint64_t want[] = {0x15780b2e0c2ec716ull, 0x6104d9866d113a7eull, 0xae17533239e499a1ull,
                                  0xecb8ad4703b360a1ull};
    for (auto w : want) CHECK(g() == w);
  }
  SECTION("default seed 0x5eed (recorded once)") {
    rng g;
    const std::uint64_t want[] = {0xef33f17055244b74ull, 0xe1f591112fb5051bull, 0xd8ab05640214863aull,
                                  0xf985e1f2fb897b03ull};
    for (auto w : want) CHECK(g() == w);
  }
  SECTION("matches an independent xoshiro256** for 10000 outputs") {
    auto rotl = [](std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); };
    rng g(987654321);
    std::uint64_t s[4];
    std::uint64_t z = 987654321;
    for (auto& w : s) {
      z += 0x9e3779b97f4a7c15ull;
      std::uint64_t r = z;
      r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ull;
      r = (r ^ (r >> 27)) * 0x94d049bb133111ebull;
      w = r ^ (r >> 31);
    }
    bool same = true;
    for (int i = 0; i < 10000; ++i) {
      const std::uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
      s[2] ^= s[0];
      s[3] ^= s[1];
      s[1] ^= s[2];
      s[0] ^= s[3];
      s[2] ^= t;
      s[3] = rotl(s[3], 45);
      same = same && g() == result;
    }
    CHECK(same);
  }
  SECTION("uniform: exact 53-bit values, recorded once") {
    rng g(0);
    CHECK(g.uniform() == 0x1.33d8be6d96ebep-1);
    CHECK(g.uniform() == 0x1.7edc3ef092ac8p-1);
    CHECK(g.uniform() == 0x1.a5f849d4933ep-4);
  }
  SECTION("normal: first draws recorded once (libm-dependent in the last bits)") {
    rng g(0);
    const double want[] = {-0x1.ce4064b3ae873p-7, -0x1.0232b91aaa7a5p+0, -0x1.d88c949980295p+0,
                           0x1.1122350011511p+0};
    for (double w : want) CHECK(g.normal() == Approx(w).epsilon(1e-14));
    rng h(42);
    CHECK(h.normal() == Approx(-0x1.9cfc3b5554226p+0).epsilon(1e-14));
    CHECK(h.normal() == Approx(0x1.88d42946b3de2p+0).epsilon(1e-14));
  }
}

TEST_CASE("hsae::rng: reseed, state round trip, ranges", "[rng]") {
  rng a(5), b(5), c(6);
  CHECK(a() == b());
  CHECK(a() != c());
  a.normal();  // leaves a spare
  const auto st = a.state();
  CHECK(st.has_spare);
  const double n1 = a.normal(), n2 = a.normal();
  const std::uint64_t u1 = a();
  a.set_state(st);
  CHECK(a.normal() == n1);
  CHECK(a.normal() == n2);
  CHECK(a() == u1);
  a.reseed(5);
  rng fresh(5);
  CHECK_FALSE(a.state().has_spare);
  CHECK(a() == fresh());
  for (int i = 0; i < 1000; ++i) {
    const double u = a.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    REQUIRE(a.below(7) < 7u);
  }
  CHECK(a.below(1) == 0u);
  STATIC_REQUIRE(rng::min() == 0);
  STATIC_REQUIRE(rng::max() == std::numeric_limits<std::uint64_t>::max());
}

TEST_CASE("hsae::rng: normal() has mean ~0 and variance ~1 on 1e5 draws", "[rng]") {
  rng g(2024);
  const int n = 100000;
  double s = 0, s2 = 0, s4 = 0;
  int above_2 = 0;
  bool finite = true;
  for (int i = 0; i < n; ++i) {
    const double v = g.normal();
    finite = finite && std::isfinite(v);
    s += v;
    s2 += v * v;
    s4 += v * v * v * v;
    above_2 += std::abs(v) > 2.0;
  }
  CHECK(finite);
  const double mean = s / n, var = s2 / n - mean * mean;
  // Standard errors: mean 0.0032, variance 0.0045, fourth moment ~0.03.
  CHECK(std::abs(mean) < 0.02);
  CHECK(std::abs(var - 1.0) < 0.03);
  CHECK(std::abs(s4 / n - 3.0) < 0.2);
  CHECK(std::abs(double(above_2) / n - 0.0455) < 0.005);
  // uniform(): mean 1/2, variance 1/12.
  double us = 0, us2 = 0;
  for (int i = 0; i < n; ++i) {
    const double u = g.uniform();
    us += u;
    us2 += u * u;
  }
  CHECK(std::abs(us / n - 0.5) < 0.005);
  CHECK(std::abs(us2 / n - (us / n) * (us / n) - 1.0 / 12.0) < 0.003);
}

// ---------------------------------------------------------------------------
// pre_activations, encode, decode

TEMPLATE_TEST_CASE("pre_activations equals ReLU((x - b_dec) W_enc^T + b_enc) by hand", "[model][encode]", float,
                   double) {
  const double tol = std::is_same_v<TestType, float> ? 1e-4 : 1e-12;
  const cpu_backend be;
  const auto m = random_model<TestType>(9, 30, 1);
  const auto x = normal_matrix<TestType>(11, 9, 2, 1.0, 2.0);
  row_matrix<TestType> pre;
  pre_activations(be, m, x, pre);
  const auto want = hand_pre(m, x);
  REQUIRE(pre.rows() == 11);
  REQUIRE(pre.cols() == 30);
  CHECK((pre.template cast<double>() - want).cwiseAbs().maxCoeff() <= tol);
  CHECK(pre.minCoeff() == TestType(0));  // the ReLU clipped some
  CHECK(pre.maxCoeff() > TestType(0));
  CHECK_THROWS_AS(pre_activations(be, m, normal_matrix<TestType>(3, 8, 1), pre), hsae::shape_error);
}

TEMPLATE_TEST_CASE("encode is the sorted top-k of the hand pre-activations; decode sums the prefix",
                   "[model][encode]", float, double) {
  const bool is_float = std::is_same_v<TestType, float>;
  const double tol = is_float ? 1e-4 : 1e-12;
  const cpu_backend be;
  const int D = 9, F = 30, K = 6, B = 11;
  const auto m = random_model<TestType>(D, F, 3);
  const auto x = normal_matrix<TestType>(B, D, 4, 1.0, 2.0);
  sparse_code<TestType> code;
  row_matrix<TestType> pre;
  encode(be, m, x, K, code, pre);
  REQUIRE(code.rows() == B);
  REQUIRE(code.k() == K);
  // The kept pre-activations are pre_activations()'s, bit for bit.
  row_matrix<TestType> pre2;
  pre_activations(be, m, x, pre2);
  CHECK(bitwise_equal(pre, pre2));
  const auto want = hand_pre(m, x);
  for (int b = 0; b < B; ++b) {
    // Reference: sort the (library's) row by value descending, ties by lower index.
    std::vector<int> order(F);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return pre(b, i) > pre(b, j); });
    for (int t = 0; t < K; ++t) {
      INFO("row " << b << " rank " << t);
      CHECK(code.indices(b, t) == order[std::size_t(t)]);
      CHECK(code.values(b, t) == pre(b, order[std::size_t(t)]));
      CHECK(double(code.values(b, t)) == Approx(want(b, code.indices(b, t))).margin(tol));
      if (t > 0) CHECK(code.values(b, t) <= code.values(b, t - 1));
    }
    // The k-th value is >= every value left out (against the hand computation).
    std::vector<double> hand(want.row(b).data(), want.row(b).data() + F);
    std::sort(hand.begin(), hand.end(), std::greater<>());
    for (int t = 0; t < K; ++t) CHECK(double(code.values(b, t)) == Approx(hand[std::size_t(t)]).margin(tol));
  }
  // decode(code, k) = b_dec + sum_{t<k} v_t W_dec[i_t] for several k.
  for (int k : {1, 2, 4, K}) {
    const row_matrix<TestType> out = decode(be, m, code, k);
    REQUIRE(out.rows() == B);
    REQUIRE(out.cols() == D);
    for (int b = 0; b < B; ++b) {
      Eigen::RowVectorXd r = m.b_dec.template cast<double>().transpose();
      for (int t = 0; t < k; ++t)
        r += double(code.values(b, t)) * m.W_dec.row(code.indices(b, t)).template cast<double>();
      INFO("k " << k << " row " << b);
      CHECK((out.row(b).template cast<double>() - r).cwiseAbs().maxCoeff() <= tol);
    }
  }
  CHECK_THROWS_AS(decode(be, m, code, 0), hsae::config_error);
  CHECK_THROWS_AS(decode(be, m, code, K + 1), hsae::config_error);
  auto broken = code;
  broken.indices(0, 0) = F;
  CHECK_THROWS_AS(decode(be, m, broken, 1), hsae::shape_error);
}

TEST_CASE("encode with k = 1 and k = d_sae", "[model][encode]") {
  const cpu_backend be;
  const int D = 7, F = 20, B = 9;
  const auto m = random_model<double>(D, F, 5);
  const auto x = normal_matrix<double>(B, D, 6, 1.0, 2.0);
  const auto want = hand_pre(m, x);
  SECTION("k = 1: the argmax") {
    const auto code = encode(be, m, x, 1);
    REQUIRE(code.k() == 1);
    for (int b = 0; b < B; ++b) {
      Eigen::Index arg;
      const double mx = want.row(b).maxCoeff(&arg);
      CHECK(code.values(b, 0) == Approx(mx).epsilon(1e-12));
      if (mx > 0) CHECK(code.indices(b, 0) == arg);
    }
  }
  SECTION("k = d_sae: every latent once, and decode(d_sae) is the dense decoder") {
    const auto code = encode(be, m, x, F);
    REQUIRE(code.k() == F);
    int zeros = 0;
    for (int b = 0; b < B; ++b) {
      std::vector<index_t> ids(code.indices.row(b).data(), code.indices.row(b).data() + F);
      std::sort(ids.begin(), ids.end());
      std::vector<index_t> all(F);
      std::iota(all.begin(), all.end(), 0);
      CHECK(ids == all);
      for (int t = 1; t < F; ++t) CHECK(code.values(b, t) <= code.values(b, t - 1));
      // The zero slots list the remaining latents in ascending order (tie rule).
      for (int t = 1; t < F; ++t)
        if (code.values(b, t) == 0 && code.values(b, t - 1) == 0) CHECK(code.indices(b, t) > code.indices(b, t - 1));
      for (int t = 0; t < F; ++t) zeros += code.values(b, t) == 0;
    }
    CHECK(zeros > 0);
    const row_matrix<double> dense = (want * m.W_dec).rowwise() + m.b_dec.transpose();
    CHECK((decode(be, m, code, F) - dense).cwiseAbs().maxCoeff() <= 1e-12);
  }
  SECTION("invalid k and batch width") {
    sparse_code<double> code;
    row_matrix<double> pre;
    CHECK_THROWS_AS(encode(be, m, x, 0, code, pre), hsae::config_error);
    CHECK_THROWS_AS(encode(be, m, x, F + 1, code, pre), hsae::config_error);
    CHECK_THROWS_AS(encode(be, m, normal_matrix<double>(3, D + 1, 1), 2, code, pre), hsae::shape_error);
    CHECK_THROWS_AS(encode(be, m, row_matrix<double>(0, D), 2, code, pre), hsae::shape_error);
  }
}

TEST_CASE("encode on a wide fixed-width float model (threshold-filter top-k path)", "[model][encode]") {
  // d_sae = 1024 >= 32 k: the top-k takes its filtered path; it must agree with a full sort.
  const cpu_backend be;
  const int D = 16, B = 24, K = 8;
  const auto m = random_model<float, 1024>(D, 1024, 7);
  const auto x = normal_matrix<float>(B, D, 8, 1.0, 2.0);
  sparse_code<float> code;
  row_matrix<float> pre;
  encode(be, m, x, K, code, pre);
  const auto want = hand_pre(m, x);
  for (int b = 0; b < B; ++b) {
    std::vector<int> order(1024);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return pre(b, i) > pre(b, j); });
    for (int t = 0; t < K; ++t) {
      INFO("row " << b << " rank " << t);
      REQUIRE(code.indices(b, t) == order[std::size_t(t)]);
      REQUIRE(code.values(b, t) == pre(b, order[std::size_t(t)]));
    }
  }
  CHECK((pre.cast<double>() - want).cwiseAbs().maxCoeff() <= 1e-4);
  // Thread count changes nothing.
  cpu_backend one;
  one.num_threads = 1;
  sparse_code<float> c1;
  row_matrix<float> p1;
  encode(one, m, x, K, c1, p1);
  CHECK(bitwise_equal(c1.values, code.values));
  CHECK(bitwise_equal(c1.indices, code.indices));
}
