// SPDX-License-Identifier: Apache-2.0
// The streaming k-schedule loss (cpu/loss.hpp) against naive references that
// materialise every prefix reconstruction [B, K, D] explicitly, in double.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using hsae_test::bitwise_equal;

using hsae::index_t;
using dmat = Eigen::MatrixXd;
using dvec = Eigen::VectorXd;

// ---------------------------------------------------------------------------------
// Random inputs (seeded, platform independent through hsae::rng).

template <class T>
hsae::sae<T> random_model(std::uint64_t seed, int D, int F) {
  hsae::rng g(seed);
  hsae::sae<T> m(D, F);
  for (int f = 0; f < F; ++f) {
    for (int j = 0; j < D; ++j) m.W_dec(f, j) = T(g.normal());
    // Not unit norm on purpose: the loss is a function of the raw W_dec.
    m.W_dec.row(f) *= T((0.5 + g.uniform()) / double(m.W_dec.row(f).norm()));
    for (int j = 0; j < D; ++j) m.W_enc(f, j) = T(g.normal() / std::sqrt(double(D)));
    m.b_enc[f] = T(0.1 * g.normal());
  }
  for (int j = 0; j < D; ++j) m.b_dec[j] = T(0.3 * g.normal());
  return m;
}

template <class T>
hsae::row_matrix<T> random_batch(std::uint64_t seed, int B, int D) {
  hsae::rng g(seed);
  hsae::row_matrix<T> x(B, D);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < D; ++j) x(b, j) = T(g.normal());
  return x;
}

// A hand-built code: distinct random latents per row, values descending in (0.05, 2];
// row b keeps only positives[b] positive values (the rest are 0), -1 = all k positive.
template <class T>
hsae::sparse_code<T> random_code(std::uint64_t seed, int B, int F, int k, const std::vector<int>& positives = {}) {
  hsae::rng g(seed);
  hsae::sparse_code<T> code;
  code.resize(B, k);
  std::vector<index_t> perm(static_cast<std::size_t>(F));
  for (int b = 0; b < B; ++b) {
    std::iota(perm.begin(), perm.end(), index_t(0));
    for (int t = 0; t < k; ++t) {  // partial Fisher-Yates
      const auto j = std::size_t(t) + std::size_t(g.below(std::uint64_t(F - t)));
      std::swap(perm[std::size_t(t)], perm[j]);
      code.indices(b, t) = perm[std::size_t(t)];
    }
    std::vector<double> v(static_cast<std::size_t>(k));
    for (auto& e : v) e = 0.05 + 1.95 * g.uniform();
    std::sort(v.begin(), v.end(), std::greater<>());
    const int npos = (std::size_t(b) < positives.size() && positives[std::size_t(b)] >= 0) ? positives[std::size_t(b)] : k;
    for (int t = 0; t < k; ++t) code.values(b, t) = t < npos ? T(v[std::size_t(t)]) : T(0);
  }
  return code;
}

// ---------------------------------------------------------------------------------
// Naive reference: every prefix reconstruction materialised from scratch.

struct naive_result {
  double loss = 0;
  std::vector<double> level_sse;
  dmat grad_values;          // [B, code.k()], zero beyond k_max
  dmat dW_dec;               // [F, D]
  dvec db_dec;               // [D], decoder side
  dmat residual;             // x - xhat_{k_max}
  std::vector<dmat> prefix;  // prefix[j] = xhat_j [B, D], j = 0..K
};

template <class T, class S>
naive_result naive(const hsae::sae<T>& m, const hsae::row_matrix<T>& x, const hsae::sparse_code<T>& code,
                   const S& schedule) {
  const int B = int(x.rows()), D = m.d_model(), F = m.d_sae(), K = schedule.k_max(), kc = code.k();
  const dmat Wd = m.W_dec.template cast<double>();
  const dvec bd = m.b_dec.template cast<double>();
  const dmat X = x.template cast<double>();
  naive_result n;
  // [K+1, B, D]: prefix j reconstructed from scratch (no running sums shared across j).
  n.prefix.assign(std::size_t(K) + 1, dmat(B, D));
  for (int j = 0; j <= K; ++j)
    for (int b = 0; b < B; ++b) {
      dvec xh = bd;
      for (int t = 0; t < j; ++t) xh += double(code.values(b, t)) * Wd.row(code.indices(b, t)).transpose();
      n.prefix[std::size_t(j)].row(b) = xh.transpose();
    }
  double W = 0;
  for (std::size_t l = 0; l < schedule.size(); ++l) W += schedule.weight(l);
  std::vector<double> omega(std::size_t(K) + 1, 0.0);  // omega[j] = w_l / W at j = k_l
  n.level_sse.assign(schedule.size(), 0.0);
  for (std::size_t l = 0; l < schedule.size(); ++l) {
    const int kl = schedule.k(l);
    omega[std::size_t(kl)] = schedule.weight(l) / W;
    n.level_sse[l] = (X - n.prefix[std::size_t(kl)]).squaredNorm();
    n.loss += schedule.weight(l) / W * n.level_sse[l] / (double(B) * D);
  }
  n.residual = X - n.prefix[std::size_t(K)];
  const double c = 2.0 / (double(B) * D);
  n.grad_values = dmat::Zero(B, kc);
  n.dW_dec = dmat::Zero(F, D);
  n.db_dec = dvec::Zero(D);
  for (int b = 0; b < B; ++b) {
    for (int t = 1; t <= K; ++t) {  // S_t = sum_{j >= t} c omega_j r_j, r_j = xhat_j - x
      dvec St = dvec::Zero(D);
      for (int j = t; j <= K; ++j) St += c * omega[std::size_t(j)] * (n.prefix[std::size_t(j)].row(b) - X.row(b)).transpose();
      const int f = code.indices(b, t - 1);
      n.grad_values(b, t - 1) = Wd.row(f).dot(St);
      n.dW_dec.row(f) += double(code.values(b, t - 1)) * St.transpose();
      if (t == 1) n.db_dec += St;
    }
  }
  return n;
}

// ---------------------------------------------------------------------------------
// Comparisons.

template <class T>
constexpr double tol() {
  return std::is_same_v<T, double> ? 1e-12 : 2e-5;
}

// Entry-wise |a - b| <= rel * max|b| (+ a tiny floor), reported with the worst entry.
template <class A>
void check_matrix(const char* what, const A& got, const dmat& want, double rel) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const dmat g = got.template cast<double>();
  const double scale = std::max(want.cwiseAbs().maxCoeff(), 1e-300);
  const double err = (g - want).cwiseAbs().maxCoeff();
  INFO(what << ": max abs error " << err << " vs scale " << scale << " (rel " << err / scale << ", tol " << rel << ")");
  CHECK(err <= rel * scale);
  CHECK(g.allFinite());
}

void check_scalar(const char* what, double got, double want, double rel) {
  INFO(what << ": got " << got << ", want " << want << " (rel err " << std::abs(got - want) / std::abs(want) << ")");
  CHECK(std::abs(got - want) <= rel * std::abs(want));
}

// Forward, backward, and every output against the naive reference.
template <class T, class S>
void check_against_naive(const hsae::sae<T>& m, const hsae::row_matrix<T>& x, const hsae::sparse_code<T>& code,
                         const S& schedule, const hsae::cpu_backend& be = {}) {
  using namespace hsae;
  const naive_result n = naive(m, x, code, schedule);
  loss_workspace<T> ws;
  const loss_stats fwd = hierarchical_loss(be, m, x, code, schedule, ws);
  check_scalar("forward loss", fwd.loss, n.loss, tol<T>());
  REQUIRE(fwd.level_sse.size() == schedule.size());
  REQUIRE(fwd.level_k.size() == schedule.size());
  CHECK(fwd.rows == x.rows());
  CHECK(fwd.d_model == m.d_model());
  for (std::size_t l = 0; l < schedule.size(); ++l) {
    CHECK(fwd.level_k[l] == schedule.k(l));
    check_scalar("level_sse", fwd.level_sse[l], n.level_sse[l], tol<T>());
    check_scalar("mse(l)", fwd.mse(l), n.level_sse[l] / (double(x.rows()) * m.d_model()), tol<T>());
  }
  check_matrix("forward residual", ws.residual, n.residual, tol<T>());

  sae_gradients<T> g;
  g.zeros_like(m);
  const loss_stats bwd = hierarchical_loss_backward(be, m, x, code, schedule, g, ws);
  CHECK(bwd.loss == fwd.loss);
  CHECK(bwd.level_sse == fwd.level_sse);
  check_matrix("dL/dv (grad_values)", ws.grad_values, n.grad_values, tol<T>());
  check_matrix("dL/dW_dec", g.W_dec, n.dW_dec, tol<T>());
  check_matrix("dL/db_dec (decoder side)", g.b_dec, dmat(n.db_dec), tol<T>());
  check_matrix("backward residual", ws.residual, n.residual, tol<T>());
  CHECK(g.W_enc.isZero(0));
  CHECK(g.b_enc.isZero(0));
}

inline constexpr std::array<double, 3> subset_weights{1.0, 0.5, 2.0};

}  // namespace

// (a) -------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("a single level (K, 1) is plain TopK MSE", "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int B = 11, D = 13, F = 40, K = 6;
  const auto m = random_model<T>(1, D, F);
  const auto x = random_batch<T>(2, B, D);
  const cpu_backend be;
  const auto code = encode(be, m, x, K);

  // Independent MSE: mean over B*D of (x - (b_dec + sum_{t<K} v_t W_dec[i_t]))^2, in double.
  double sse = 0;
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < D; ++j) {
      double xh = double(m.b_dec[j]);
      for (int t = 0; t < K; ++t) xh += double(code.values(b, t)) * double(m.W_dec(code.indices(b, t), j));
      sse += (double(x(b, j)) - xh) * (double(x(b, j)) - xh);
    }
  const double mse = sse / (double(B) * D);
  // ... and through hsae::decode.
  const row_matrix<T> xh = decode(be, m, code, K);
  const double mse_decode = (x - xh).template cast<double>().squaredNorm() / (double(B) * D);
  check_scalar("decode vs independent MSE", mse_decode, mse, tol<T>());

  loss_workspace<T> ws;
  check_scalar("top_k<K>", hierarchical_loss(be, m, x, code, top_k<K>{}, ws).loss, mse, tol<T>());
  check_scalar("k_schedule<K>", hierarchical_loss(be, m, x, code, k_schedule<K>{}, ws).loss, mse, tol<T>());
  check_scalar("dynamic top_k(K)", hierarchical_loss(be, m, x, code, dynamic_k_schedule::top_k(K), ws).loss, mse,
               tol<T>());
  const auto st = hierarchical_loss(be, m, x, code, dynamic_k_schedule{{K, 3.5}}, ws);
  check_scalar("dynamic {(K, 3.5)}: the weight normalises away", st.loss, mse, tol<T>());
  REQUIRE(st.level_sse.size() == 1);
  check_scalar("level_sse", st.level_sse[0], sse, tol<T>());
  check_scalar("mse(0)", st.mse(0), mse, tol<T>());
  CHECK(st.level_k[0] == K);

  // A single level below the code's k is the MSE of that prefix.
  const row_matrix<T> xh3 = decode(be, m, code, 3);
  const double mse3 = (x - xh3).template cast<double>().squaredNorm() / (double(B) * D);
  check_scalar("single level k=3 of a k=6 code", hierarchical_loss(be, m, x, code, top_k<3>{}, ws).loss, mse3,
               tol<T>());
  CHECK(std::abs(mse3 - mse) > 1e-3 * mse);  // the two prefixes genuinely differ
}

// (b), (c), (h) ----------------------------------------------------------------------
TEMPLATE_TEST_CASE("all-prefix, weighted-subset and Multi-TopK losses match the materialised [B,K,D] reference",
                   "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int B = 9, D = 16, F = 64;
  const auto m = random_model<T>(10, D, F);
  const auto x = random_batch<T>(11, B, D);
  const cpu_backend be;

  SECTION("all prefixes, K=8, encoded code") {
    const auto code = encode(be, m, x, 8);
    check_against_naive(m, x, code, all_prefixes<8>{});
    check_against_naive(m, x, code, dynamic_k_schedule::all_prefixes(8));
  }
  SECTION("all prefixes, K=8, hand-built code") {
    const auto code = random_code<T>(12, B, F, 8);
    check_against_naive(m, x, code, all_prefixes<8>{});
  }
  SECTION("all prefixes, K=1") {
    const auto code = random_code<T>(13, B, F, 1);
    check_against_naive(m, x, code, all_prefixes<1>{});
  }
  SECTION("weighted subset {(2,1),(4,0.5),(6,2)}") {
    const auto code = random_code<T>(14, B, F, 6);
    check_against_naive(m, x, code, dynamic_k_schedule{{2, 1.0}, {4, 0.5}, {6, 2.0}});
    check_against_naive(m, x, code, weighted_k_schedule<subset_weights, 2, 4, 6>{});
  }
  SECTION("uniform subset 1, 3, 7, 8 and geometric(1, 8)") {
    const auto code = random_code<T>(15, B, F, 8);
    check_against_naive(m, x, code, k_schedule<1, 3, 7, 8>{});
    check_against_naive(m, x, code, dynamic_k_schedule::geometric(1, 8));
  }
  SECTION("Multi-TopK (k=2: (2,1),(8,1/8))") {
    const auto code = encode(be, m, x, 8);
    check_against_naive(m, x, code, multi_topk<2>{});
    check_against_naive(m, x, code, dynamic_k_schedule::multi_topk(2));
  }
  SECTION("two threads") {
    cpu_backend be2;
    be2.num_threads = 2;
    const auto code = random_code<T>(16, B, F, 8);
    check_against_naive(m, x, code, all_prefixes<8>{}, be2);
  }
}

TEMPLATE_TEST_CASE("the weighted schedule loss is the weighted mean of its levels' MSEs", "[loss]", float, double) {
  // (c) restated: L = sum_l w_l mse(l) / sum_l w_l, and mse(l) equals the MSE of decode(code, k_l).
  using T = TestType;
  using namespace hsae;
  const int B = 7, D = 10, F = 30;
  const auto m = random_model<T>(20, D, F);
  const auto x = random_batch<T>(21, B, D);
  const cpu_backend be;
  const auto code = random_code<T>(22, B, F, 6);
  const dynamic_k_schedule s{{2, 1.0}, {4, 0.5}, {6, 2.0}};
  loss_workspace<T> ws;
  const loss_stats st = hierarchical_loss(be, m, x, code, s, ws);
  double combo = 0;
  for (std::size_t l = 0; l < s.size(); ++l) {
    const row_matrix<T> xh = decode(be, m, code, s.k(l));
    const double mse = (x - xh).template cast<double>().squaredNorm() / (double(B) * D);
    check_scalar("mse(l) vs decode", st.mse(l), mse, tol<T>());
    combo += s.weight(l) * st.mse(l);
  }
  check_scalar("L = weighted mean of mse(l)", st.loss, combo / 3.5, 1e-14);
  // The levels genuinely differ (a wrong level index would be caught).
  CHECK(st.level_sse[0] != st.level_sse[1]);
  CHECK(st.level_sse[1] != st.level_sse[2]);
}

TEMPLATE_TEST_CASE("weights whose sum overflows a double give the loss of their ratios, not 0", "[loss]", float,
                   double) {
  // 1e308 + 1e308 overflowed to inf and every normalised weight was 0: loss and gradients 0.
  using T = TestType;
  using namespace hsae;
  const int B = 5, D = 8, F = 24;
  const auto m = random_model<T>(30, D, F);
  const auto x = random_batch<T>(31, B, D);
  const cpu_backend be;
  const auto code = random_code<T>(32, B, F, 6);
  const dynamic_k_schedule unit{{2, 1.0}, {6, 1.0}};
  const dynamic_k_schedule huge{{2, 1e308}, {6, 1e308}};
  loss_workspace<T> wu, wh;
  sae_gradients<T> gu, gh;
  gu.zeros_like(m);
  gh.zeros_like(m);
  const loss_stats su = hierarchical_loss_backward(be, m, x, code, unit, gu, wu);
  const loss_stats sh = hierarchical_loss_backward(be, m, x, code, huge, gh, wh);
  CHECK(su.loss > 0);
  CHECK(sh.loss == su.loss);  // the same normalised weights {1/2, 1/2}, bitwise
  CHECK(hierarchical_loss(be, m, x, code, huge, wh).loss == su.loss);
  CHECK(bitwise_equal(wh.grad_values, wu.grad_values));
  CHECK(bitwise_equal(gh.W_dec, gu.W_dec));
  CHECK(bitwise_equal(gh.b_dec, gu.b_dec));
  CHECK(gh.W_dec.cwiseAbs().maxCoeff() > 0);
}

// (d) -------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("a code wider than k_max uses only its first k_max ranks", "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int B = 9, D = 16, F = 64;
  const auto m = random_model<T>(30, D, F);
  const auto x = random_batch<T>(31, B, D);
  cpu_backend be;
  const auto wide = encode(be, m, x, 12);  // code k = 12
  sparse_code<T> narrow;                   // its first 8 columns
  narrow.values = wide.values.leftCols(8);
  narrow.indices = wide.indices.leftCols(8);
  sparse_code<T> scrambled = wide;  // columns 8..11 replaced by other latents and values
  const auto junk = random_code<T>(32, B, F, 12);
  for (int b = 0; b < B; ++b)
    for (int t = 8; t < 12; ++t) {
      index_t f = junk.indices(b, t);
      // Keep each row's latents distinct.
      while ((scrambled.indices.row(b).leftCols(t).array() == f).any()) f = (f + 1) % F;
      scrambled.indices(b, t) = f;
      scrambled.values(b, t) = T(5) * junk.values(b, t);
    }

  auto run = [&](const sparse_code<T>& code, const auto& schedule, loss_workspace<T>& ws, sae_gradients<T>& g) {
    g.zeros_like(m);
    const loss_stats st = hierarchical_loss_backward(be, m, x, code, schedule, g, ws);
    encoder_backward(be, m, x, code, ws.grad_values, g, ws.pairs);
    return st;
  };
  auto check_same = [&](const auto& schedule) {
    check_against_naive(m, x, wide, schedule);
    loss_workspace<T> w1, w2, w3;
    sae_gradients<T> g1, g2, g3;
    const loss_stats s1 = run(narrow, schedule, w1, g1);
    const loss_stats s2 = run(wide, schedule, w2, g2);
    const loss_stats s3 = run(scrambled, schedule, w3, g3);
    CHECK(s1.loss == s2.loss);
    CHECK(s1.loss == s3.loss);
    CHECK(s1.level_sse == s2.level_sse);
    CHECK(s1.level_sse == s3.level_sse);
    CHECK(bitwise_equal(w1.residual, w2.residual));
    CHECK(bitwise_equal(w1.residual, w3.residual));
    REQUIRE(w2.grad_values.cols() == 12);
    const row_matrix<T> gv_head = w2.grad_values.leftCols(8);
    CHECK(bitwise_equal(w1.grad_values, gv_head));
    CHECK(w2.grad_values.rightCols(4).isZero(0));
    CHECK(w3.grad_values.rightCols(4).isZero(0));
    for (const auto* g : {&g2, &g3}) {
      CHECK(bitwise_equal(g1.W_dec, g->W_dec));
      CHECK(bitwise_equal(g1.b_dec, g->b_dec));
      CHECK(bitwise_equal(g1.W_enc, g->W_enc));
      CHECK(bitwise_equal(g1.b_enc, g->b_enc));
    }
    // Latents that appear only beyond rank 8 get no gradient at all.
    int only_late = 0;
    for (index_t f = 0; f < F; ++f) {
      if ((narrow.indices.array() == f).any() || !(scrambled.indices.array() == f).any()) continue;
      ++only_late;
      CHECK(g3.W_dec.row(f).isZero(0));
      CHECK(g3.W_enc.row(f).isZero(0));
      CHECK(g3.b_enc[f] == T(0));
    }
    CHECK(only_late > 0);
  };
  SECTION("all_prefixes<8>") { check_same(all_prefixes<8>{}); }
  SECTION("weighted {(3,1),(8,0.25)}") { check_same(dynamic_k_schedule{{3, 1.0}, {8, 0.25}}); }
  SECTION("chunked, one row at a time") {
    be.scratch_bytes = 1;
    check_same(all_prefixes<8>{});
  }
}

// (e) -------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("loss_workspace::residual is x - xhat_K", "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int B = 8, D = 12, F = 36;
  const auto m = random_model<T>(40, D, F);
  const auto x = random_batch<T>(41, B, D);
  const cpu_backend be;
  const auto code = encode(be, m, x, 7);
  for (int K : {7, 4}) {
    const row_matrix<T> xh = decode(be, m, code, K);
    const row_matrix<T> want = x - xh;
    const dmat want_d = want.template cast<double>();
    const auto schedule = dynamic_k_schedule::all_prefixes(K);
    loss_workspace<T> ws;
    hierarchical_loss(be, m, x, code, schedule, ws);
    check_matrix("forward residual vs x - decode(code, K)", ws.residual, want_d, std::is_same_v<T, double> ? 1e-14 : 1e-6);
    check_matrix("forward residual vs naive", ws.residual, naive(m, x, code, schedule).residual, tol<T>());
    sae_gradients<T> g;
    g.zeros_like(m);
    hierarchical_loss_backward(be, m, x, code, schedule, g, ws);
    check_matrix("backward residual vs x - decode(code, K)", ws.residual, want_d,
                 std::is_same_v<T, double> ? 1e-14 : 1e-6);
    // Not vacuous: x - xhat_K is far from -(x - xhat_K) and, for K < code.k(), from x - xhat_{code.k()}.
    CHECK((ws.residual.template cast<double>() + want_d).norm() > 0.5 * want_d.norm());
    if (K < code.k()) {
      const row_matrix<T> full = x - decode(be, m, code, code.k());
      CHECK((ws.residual - full).template cast<double>().norm() > 1e-2 * want_d.norm());
    }
  }
}

// (f) -------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("rows with fewer positive values than K", "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int B = 6, D = 10, F = 30, K = 6;
  const auto m = random_model<T>(50, D, F);
  const auto x = random_batch<T>(51, B, D);
  const cpu_backend be;

  SECTION("hand-built: 6, 2, 0, 5, 1 and 3 positives") {
    const auto code = random_code<T>(52, B, F, K, {6, 2, 0, 5, 1, 3});
    REQUIRE(code.values(2, 0) == T(0));
    check_against_naive(m, x, code, all_prefixes<K>{});
    check_against_naive(m, x, code, dynamic_k_schedule{{2, 1.0}, {4, 0.5}, {6, 2.0}});

    loss_workspace<T> ws;
    sae_gradients<T> g;
    g.zeros_like(m);
    hierarchical_loss_backward(be, m, x, code, all_prefixes<K>{}, g, ws);
    // The all-zero row reconstructs to b_dec at every prefix.
    const row_matrix<T> r2 = x.row(2) - m.b_dec.transpose();
    CHECK(bitwise_equal(row_matrix<T>(ws.residual.row(2)), r2));
    // dL/dv is defined at zero values too (the ReLU mask is the encoder's business).
    CHECK(ws.grad_values.row(2).cwiseAbs().maxCoeff() > T(0));
    encoder_backward(be, m, x, code, ws.grad_values, g, ws.pairs);
    CHECK(g.W_enc.allFinite());
    CHECK(g.W_dec.allFinite());
    CHECK(g.b_dec.allFinite());
    // Latents selected only with value 0 receive no gradient on any of their rows.
    int zero_only = 0;
    for (index_t f = 0; f < F; ++f) {
      bool positive = false, zero = false;
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < K; ++t)
          if (code.indices(b, t) == f) (code.values(b, t) > T(0) ? positive : zero) = true;
      if (!zero || positive) continue;
      ++zero_only;
      CHECK(g.W_dec.row(f).isZero(0));
      CHECK(g.W_enc.row(f).isZero(0));
      CHECK(g.b_enc[f] == T(0));
    }
    CHECK(zero_only > 0);
  }
  SECTION("from encode with mostly negative pre-activations") {
    auto m2 = m;
    for (int f = 0; f < F; ++f)
      if (f % 5 != 0) m2.b_enc[f] = T(-50);  // only latents 0, 5, ..., 25 can fire
    const auto code = encode(be, m2, x, K);
    int zeros = 0;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < K; ++t) zeros += code.values(b, t) == T(0);
    CHECK(zeros > 0);
    // Indices are still distinct per row.
    for (int b = 0; b < B; ++b) {
      std::vector<index_t> r(code.indices.row(b).data(), code.indices.row(b).data() + K);
      std::sort(r.begin(), r.end());
      CHECK(std::adjacent_find(r.begin(), r.end()) == r.end());
    }
    check_against_naive(m2, x, code, all_prefixes<K>{});
    check_against_naive(m2, x, code, top_k<K>{});
  }
}

// (g) -------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("the chunked decoder backward is bitwise independent of scratch size and threads", "[loss]", float,
                   double) {
  using T = TestType;
  using namespace hsae;
  const int B = 23, D = 24, F = 96;
  const auto m = random_model<T>(60, D, F);
  const auto x = random_batch<T>(61, B, D);

  struct result {
    loss_stats st;
    loss_workspace<T> ws;
    sae_gradients<T> g;
  };
  auto run = [&](const sparse_code<T>& code, const dynamic_k_schedule& s, std::size_t scratch, int threads) {
    cpu_backend be;
    be.scratch_bytes = scratch;
    be.num_threads = threads;
    result r;
    r.g.zeros_like(m);
    r.st = hierarchical_loss_backward(be, m, x, code, s, r.g, r.ws);
    encoder_backward(be, m, x, code, r.ws.grad_values, r.g, r.ws.pairs);
    return r;
  };
  auto same = [](const result& a, const result& b) {
    CHECK(a.st.loss == b.st.loss);
    CHECK(a.st.level_sse == b.st.level_sse);
    CHECK(bitwise_equal(a.ws.grad_values, b.ws.grad_values));
    CHECK(bitwise_equal(a.ws.residual, b.ws.residual));
    CHECK(bitwise_equal(a.g.W_dec, b.g.W_dec));
    CHECK(bitwise_equal(a.g.b_dec, b.g.b_dec));
    CHECK(bitwise_equal(a.g.W_enc, b.g.W_enc));
    CHECK(bitwise_equal(a.g.b_enc, b.g.b_enc));
  };
  const cpu_backend be;
  for (const auto& [kc, s] : {std::pair{8, dynamic_k_schedule::all_prefixes(8)},
                              std::pair{8, dynamic_k_schedule{{2, 1.0}, {5, 0.5}, {8, 2.0}}},
                              std::pair{12, dynamic_k_schedule::all_prefixes(8)}}) {
    const auto code = encode(be, m, x, kc);
    const result ref = run(code, s, cpu_backend{}.scratch_bytes, 1);
    REQUIRE_FALSE(ref.g.W_dec.isZero(0));
    // The reference itself is right.
    const naive_result n = naive(m, x, code, s);
    check_matrix("dL/dW_dec", ref.g.W_dec, n.dW_dec, tol<T>());
    const std::size_t row_bytes = std::size_t(s.k_max()) * D * sizeof(T);
    for (std::size_t scratch : {std::size_t(1), row_bytes, 2 * row_bytes, 3 * row_bytes + 1, 7 * row_bytes,
                                std::size_t(B) * row_bytes, cpu_backend{}.scratch_bytes})
      for (int threads : {1, 2}) {
        INFO("code k " << kc << ", scratch " << scratch << " bytes, " << threads << " threads");
        same(ref, run(code, s, scratch, threads));
      }
  }
}

// (h) -------------------------------------------------------------------------------
TEMPLATE_TEST_CASE("dL/dv = <e_{i_t}, S_t> from materialised residuals", "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int B = 10, D = 14, F = 50, K = 7;
  const auto m = random_model<T>(70, D, F);
  const auto x = random_batch<T>(71, B, D);
  const cpu_backend be;
  const auto code = random_code<T>(72, B, F, K, {7, 7, 3, 7, 0, 7, 7, 5, 7, 7});
  for (const auto& s : {dynamic_k_schedule::all_prefixes(K), dynamic_k_schedule{{1, 2.0}, {4, 1.0}, {7, 0.25}},
                        dynamic_k_schedule::top_k(K), dynamic_k_schedule{{3, 1.0}, {7, 1.0}}}) {
    // Materialise r_{b,j} = xhat_{b,j} - x_b for j = 1..K, then S_{b,t} = sum_{j >= t} c omega_j r_{b,j}.
    double W = 0;
    for (std::size_t l = 0; l < s.size(); ++l) W += s.weight(l);
    std::vector<double> omega(std::size_t(K) + 1, 0.0);
    for (std::size_t l = 0; l < s.size(); ++l) omega[std::size_t(s.k(l))] = s.weight(l);
    const double c = 2.0 / (double(B) * D * W);
    dmat want(B, K);
    for (int b = 0; b < B; ++b) {
      std::vector<dvec> r(std::size_t(K) + 1);
      for (int j = 1; j <= K; ++j) {
        r[std::size_t(j)] = m.b_dec.template cast<double>() - x.row(b).transpose().template cast<double>();
        for (int t = 0; t < j; ++t)
          r[std::size_t(j)] += double(code.values(b, t)) * m.W_dec.row(code.indices(b, t)).transpose().template cast<double>();
      }
      for (int t = 1; t <= K; ++t) {
        dvec S = dvec::Zero(D);
        for (int j = t; j <= K; ++j) S += c * omega[std::size_t(j)] * r[std::size_t(j)];
        want(b, t - 1) = m.W_dec.row(code.indices(b, t - 1)).template cast<double>().dot(S);
      }
    }
    loss_workspace<T> ws;
    sae_gradients<T> g;
    g.zeros_like(m);
    hierarchical_loss_backward(be, m, x, code, s, g, ws);
    check_matrix("grad_values", ws.grad_values, want, tol<T>());
    // The rank-1 value is pulled by every level: its gradient is not the last level's alone.
    CHECK(want.cwiseAbs().maxCoeff() > 1e-3);
  }
}

TEMPLATE_TEST_CASE("a workspace is reused across batch sizes, code widths and schedules", "[loss]", float, double) {
  using T = TestType;
  using namespace hsae;
  const int D = 12, F = 40;
  const auto m = random_model<T>(80, D, F);
  const cpu_backend be;
  loss_workspace<T> ws;  // shared by every call below
  for (const auto& [B, kc, s] :
       {std::tuple{9, 8, dynamic_k_schedule::all_prefixes(8)}, std::tuple{3, 5, dynamic_k_schedule::all_prefixes(5)},
        std::tuple{14, 10, dynamic_k_schedule{{2, 1.0}, {6, 1.0}}}, std::tuple{9, 8, dynamic_k_schedule::all_prefixes(8)}}) {
    INFO("B " << B << ", code k " << kc);
    const auto x = random_batch<T>(81 + std::uint64_t(B), B, D);
    const auto code = encode(be, m, x, kc);
    const naive_result n = naive(m, x, code, s);
    sae_gradients<T> g;
    g.zeros_like(m);
    const loss_stats st = hierarchical_loss_backward(be, m, x, code, s, g, ws);
    check_scalar("loss", st.loss, n.loss, tol<T>());
    check_matrix("grad_values", ws.grad_values, n.grad_values, tol<T>());
    check_matrix("dL/dW_dec", g.W_dec, n.dW_dec, tol<T>());
    check_matrix("dL/db_dec", g.b_dec, dmat(n.db_dec), tol<T>());
    check_matrix("residual", ws.residual, n.residual, tol<T>());
  }
}

TEST_CASE("inconsistent loss inputs are rejected", "[loss]") {
  using namespace hsae;
  const auto m = random_model<double>(90, 6, 20);
  const auto x = random_batch<double>(91, 4, 6);
  const cpu_backend be;
  loss_workspace<double> ws;
  const auto code = random_code<double>(92, 4, 20, 5);
  CHECK_THROWS_AS(hierarchical_loss(be, m, x, code, all_prefixes<6>{}, ws), config_error);  // k_max > code.k
  const auto x3 = random_batch<double>(93, 3, 6);
  CHECK_THROWS_AS(hierarchical_loss(be, m, x3, code, all_prefixes<5>{}, ws), shape_error);  // rows differ
  const auto xw = random_batch<double>(94, 4, 7);
  CHECK_THROWS_AS(hierarchical_loss(be, m, xw, code, all_prefixes<5>{}, ws), shape_error);  // width
  auto bad = code;
  bad.indices(1, 2) = 20;
  CHECK_THROWS_AS(hierarchical_loss(be, m, x, bad, all_prefixes<5>{}, ws), shape_error);  // index out of range
  bad.indices(1, 2) = -1;
  sae_gradients<double> g;
  g.zeros_like(m);
  CHECK_THROWS_AS(hierarchical_loss_backward(be, m, x, bad, all_prefixes<5>{}, g, ws), shape_error);
  CHECK_NOTHROW(hierarchical_loss(be, m, x, code, all_prefixes<5>{}, ws));
}

TEMPLATE_TEST_CASE("stream_scaled writes a * src at every alignment and length", "[loss][streaming]", float, double) {
  using T = TestType;
  hsae::cpu::detail::staging_buffer<T> buf;
  buf.reserve(300);
  REQUIRE(buf.capacity() >= 300);
  CHECK(reinterpret_cast<std::uintptr_t>(buf.data()) % (std::uintptr_t(2) << 20) == 0);
  std::vector<T> src(300);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = T(0.37) * T(i) - T(41.5);
  const T a = T(-1.7);
  for (int offset : {0, 1, 3, 5, 8}) {
    for (int n : {0, 1, 7, 8, 9, 33, 255}) {
      const T sentinel = T(1234.5);
      std::fill(buf.data(), buf.data() + 300, sentinel);
      hsae::cpu::detail::stream_scaled(buf.data() + offset, a, src.data() + 2, n);
      hsae::cpu::detail::stream_fence();
      bool same = true;
      for (int i = 0; i < 300; ++i) {
        const T want = i >= offset && i < offset + n ? a * src[std::size_t(i - offset + 2)] : sentinel;
        same = same && buf.data()[i] == want;
      }
      INFO("offset " << offset << ", n " << n);
      CHECK(same);
    }
  }
  // Growing keeps the alignment; a smaller request keeps the buffer.
  const T* before = buf.data();
  buf.reserve(10);
  CHECK(buf.data() == before);
  buf.reserve(std::size_t(3) << 20);
  CHECK(buf.capacity() >= (std::size_t(3) << 20));
  CHECK(reinterpret_cast<std::uintptr_t>(buf.data()) % (std::uintptr_t(2) << 20) == 0);
  hsae::cpu::detail::staging_buffer<T> moved(std::move(buf));
  CHECK(buf.data() == nullptr);
  CHECK(moved.capacity() >= (std::size_t(3) << 20));
}
