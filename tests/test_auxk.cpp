// SPDX-License-Identifier: Apache-2.0
// Dead-latent tracking and the AuxK loss (docs/OBJECTIVE.md, Gao et al. 2024) against
// hand-computed references: which latents are dead, which dead latents AuxK selects,
// its loss (decoded WITHOUT b_dec, normalised by the residual's variance, scaled by
// alpha * min(n_dead / k_aux, 1)), and where its gradient goes.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace {

using hsae_test::bitwise_equal;

using namespace hsae;

/// A code with the given (value, index) rows.
sparse_code<float> make_code(const std::vector<std::vector<std::pair<float, int>>>& rows) {
  sparse_code<float> c;
  c.resize(Eigen::Index(rows.size()), int(rows.at(0).size()));
  for (std::size_t b = 0; b < rows.size(); ++b)
    for (std::size_t t = 0; t < rows[b].size(); ++t) {
      c.values(Eigen::Index(b), Eigen::Index(t)) = rows[b][t].first;
      c.indices(Eigen::Index(b), Eigen::Index(t)) = rows[b][t].second;
    }
  return c;
}

// ---------------------------------------------------------------------------
// AuxK fixture: a double model with b_dec far from zero, a batch around b_dec, its
// pre-activations, main top-K code and residual, all computed by hand here.

struct fixture {
  int D = 10, F = 24, K = 3, B = 7;
  sae<double> m;
  row_matrix<double> x, pre, residual;

  explicit fixture(std::uint64_t seed = 1) : m(D, F) {
    const cpu_backend be;
    init(be, m, row_matrix<double>(0, D), {.seed = seed, .b_dec = decoder_bias_init::zero});
    rng gen(seed + 77);
    // An encoder that differs from the decoder, and b_enc mostly positive so that many
    // pre-activations (dead ones included) are positive.
    for (Eigen::Index i = 0; i < m.W_enc.size(); ++i) m.W_enc.data()[i] += 0.3 * gen.normal();
    for (int f = 0; f < F; ++f) m.b_enc[f] = 0.2 + 0.3 * gen.normal();
    for (int j = 0; j < D; ++j) m.b_dec[j] = 25.0 + 5.0 * gen.normal();  // far from zero
    x.resize(B, D);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < D; ++j) x(b, j) = m.b_dec[j] + gen.normal();
    // Hand-computed pre-activations, main top-K code and residual x - xhat_K.
    pre.resize(B, F);
    for (int b = 0; b < B; ++b)
      for (int f = 0; f < F; ++f) {
        double a = m.b_enc[f];
        for (int j = 0; j < D; ++j) a += (x(b, j) - m.b_dec[j]) * m.W_enc(f, j);
        pre(b, f) = std::max(a, 0.0);
      }
    residual.resize(B, D);
    for (int b = 0; b < B; ++b) {
      std::vector<int> order(static_cast<std::size_t>(F));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return pre(b, i) > pre(b, j); });
      residual.row(b) = x.row(b) - m.b_dec.transpose();
      for (int t = 0; t < K; ++t) residual.row(b) -= pre(b, order[std::size_t(t)]) * m.W_dec.row(order[std::size_t(t)]);
    }
  }
};

/// Hand reference of AuxK: per row the top-k pre-activations among `dead` (ties: lower
/// id first), e_hat decoded without b_dec, and the scaled normalised loss.
struct auxk_reference {
  std::vector<std::vector<std::pair<double, int>>> code;  // per row: (value, latent)
  double loss = 0;
  row_matrix<double> ehat;
};

auxk_reference reference_auxk(const sae<double>& m, const row_matrix<double>& pre, const row_matrix<double>& e,
                              const std::vector<index_t>& dead, int k_aux, double alpha) {
  auxk_reference r;
  const auto B = pre.rows();
  const int k = std::min<int>(k_aux, int(dead.size()));
  r.ehat = row_matrix<double>::Zero(B, m.d_model());
  double sse = 0;
  for (Eigen::Index b = 0; b < B; ++b) {
    std::vector<std::pair<double, int>> cand;
    for (index_t f : dead) cand.push_back({pre(b, f), f});
    std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& c) {
      return a.first > c.first || (a.first == c.first && a.second < c.second);
    });
    cand.resize(std::size_t(k));
    for (const auto& [v, f] : cand) r.ehat.row(b) += v * m.W_dec.row(f);
    sse += (r.ehat.row(b) - e.row(b)).squaredNorm();
    r.code.push_back(cand);
  }
  const Eigen::RowVectorXd mean = e.colwise().mean();
  double tv = 0;
  for (Eigen::Index b = 0; b < B; ++b) tv += (e.row(b) - mean).squaredNorm();
  r.loss = alpha * std::min(double(dead.size()) / double(k_aux), 1.0) * sse / tv;
  return r;
}

/// Reference loss as a function of the parameters (selection recomputed), for finite
/// differences.
double reference_loss(const sae<double>& m, const row_matrix<double>& x, const row_matrix<double>& e,
                      const std::vector<index_t>& dead, int k_aux, double alpha) {
  row_matrix<double> pre(x.rows(), m.d_sae());
  for (Eigen::Index b = 0; b < x.rows(); ++b)
    for (int f = 0; f < m.d_sae(); ++f)
      pre(b, f) = std::max(0.0, m.b_enc[f] + (x.row(b) - m.b_dec.transpose()).dot(m.W_enc.row(f)));
  return reference_auxk(m, pre, e, dead, k_aux, alpha).loss;
}

template <class T, int F>
sae_gradients<T, F> zero_grads(const sae<T, F>& m) {
  sae_gradients<T, F> g;
  g.zeros_like(m);
  return g;
}

}  // namespace

// ---------------------------------------------------------------------------
// dead_latent_tracker

TEST_CASE("dead_latent_tracker: a latent dies after dead_after_tokens tokens without firing", "[auxk][dead]") {
  dead_latent_tracker tr(6, 10);
  CHECK(tr.dead_after_tokens() == 10);
  CHECK(tr.num_dead() == 0);
  CHECK(tr.dead_fraction() == 0.0);
  CHECK(tr.dead_latents().empty());

  // 5 rows, k = 2. Latents 0 and 1 fire; latent 2 appears only with value 0 (does not
  // count); 3, 4, 5 never appear.
  const auto c = make_code({{{1.0f, 0}, {0.0f, 2}},
                            {{2.0f, 1}, {0.0f, 2}},
                            {{0.3f, 0}, {0.0f, 2}},
                            {{0.7f, 1}, {0.1f, 0}},
                            {{0.2f, 0}, {0.0f, 3}}});
  tr.update(c);  // 5 tokens
  CHECK(tr.tokens_since_fired() == std::vector<std::int64_t>{0, 0, 5, 5, 5, 5});
  CHECK(tr.num_dead() == 0);
  tr.update(c);  // 10 tokens: 2..5 reach the threshold (dead at >= dead_after_tokens)
  CHECK(tr.dead_latents() == std::vector<index_t>{2, 3, 4, 5});
  CHECK(tr.num_dead() == 4);
  CHECK(tr.dead_fraction() == Approx(4.0 / 6.0));
  CHECK(tr.is_dead(2));
  CHECK_FALSE(tr.is_dead(0));
  CHECK_FALSE(tr.is_dead(1));

  // Latent 4 fires (in the last row): it is alive again and its count restarts.
  const auto c4 = make_code({{{1.0f, 0}, {0.0f, 1}}, {{3.0f, 4}, {0.0f, 5}}});
  tr.update(c4);  // 2 tokens
  CHECK(tr.dead_latents() == std::vector<index_t>{2, 3, 5});
  CHECK(tr.tokens_since_fired()[4] == 0);
  CHECK(tr.tokens_since_fired()[1] == 2);  // fired in the second batch (the 0 here does not count)
  CHECK(tr.tokens_since_fired()[2] == 12);
  // Latent 1 needs 8 more tokens without firing to die: 7 are not enough, 8 are.
  const auto c0 = make_code({{{1.0f, 0}}, {{1.0f, 0}}, {{1.0f, 0}}, {{1.0f, 0}}, {{1.0f, 0}}, {{1.0f, 0}}, {{1.0f, 0}}});
  tr.update(c0);
  CHECK(tr.tokens_since_fired()[1] == 9);
  CHECK_FALSE(tr.is_dead(1));
  CHECK_FALSE(tr.is_dead(4));
  tr.update(make_code({{{1.0f, 0}}}));
  CHECK(tr.is_dead(1));
  CHECK_FALSE(tr.is_dead(4));  // 8 tokens since it fired
  CHECK(tr.dead_latents() == std::vector<index_t>{1, 2, 3, 5});
  CHECK(tr.num_dead() == 4);
}

TEST_CASE("dead_latent_tracker: zero values never count as firing; k limits the ranks", "[auxk][dead]") {
  dead_latent_tracker tr(4, 3);
  // Every row holds all four latents, all with value 0 (a row with no positive
  // pre-activation): nothing fires.
  const auto zeros = make_code({{{0.0f, 0}, {0.0f, 1}, {0.0f, 2}, {0.0f, 3}},
                                {{0.0f, 3}, {0.0f, 2}, {0.0f, 1}, {0.0f, 0}},
                                {{0.0f, 1}, {0.0f, 0}, {0.0f, 3}, {0.0f, 2}}});
  tr.update(zeros);
  CHECK(tr.num_dead() == 4);
  CHECK(tr.dead_fraction() == 1.0);
  CHECK(tr.dead_latents() == std::vector<index_t>{0, 1, 2, 3});

  dead_latent_tracker tk(4, 3);
  const auto c = make_code({{{2.0f, 3}, {1.0f, 1}, {0.5f, 2}}, {{2.0f, 3}, {1.0f, 1}, {0.5f, 2}},
                            {{2.0f, 3}, {1.0f, 1}, {0.5f, 2}}});
  tk.update(c, 1);  // only rank 1 counts: latent 3 fires
  CHECK(tk.dead_latents() == std::vector<index_t>{0, 1, 2});
  tk.update(c, 2);
  CHECK(tk.dead_latents() == std::vector<index_t>{0, 2});
  tk.update(c, 99);  // clamped to the code's k
  CHECK(tk.dead_latents() == std::vector<index_t>{0});
  tk.update(c);  // all ranks
  CHECK(tk.dead_latents() == std::vector<index_t>{0});
  CHECK(tk.tokens_since_fired() == std::vector<std::int64_t>{12, 0, 0, 0});
}

TEST_CASE("dead_latent_tracker: validation and state round trip", "[auxk][dead]") {
  CHECK_THROWS_AS(dead_latent_tracker(0, 10), hsae::config_error);
  CHECK_THROWS_AS(dead_latent_tracker(4, 0), hsae::config_error);
  CHECK(dead_latent_tracker(4).dead_after_tokens() == 10'000'000);
  dead_latent_tracker tr(4, 5);
  CHECK_THROWS_AS(tr.update(make_code({{{1.0f, 4}}})), hsae::shape_error);
  CHECK_THROWS_AS(tr.set_tokens_since_fired({1, 2, 3}), hsae::shape_error);
  tr.set_tokens_since_fired({5, 4, 100, 0});
  CHECK(tr.dead_latents() == std::vector<index_t>{0, 2});
  CHECK(tr.num_dead() == 2);
  CHECK(tr.dead_fraction() == 0.5);
}

// ---------------------------------------------------------------------------
// auxk_options

TEST_CASE("auxk_options: k_aux defaults to min(512, d_model / 2)", "[auxk]") {
  const auxk_options o;
  CHECK(o.alpha == 1.0 / 32.0);
  CHECK(o.k_aux <= 0);
  CHECK(o.resolved_k_aux(10) == 5);
  CHECK(o.resolved_k_aux(768) == 384);
  CHECK(o.resolved_k_aux(1024) == 512);
  CHECK(o.resolved_k_aux(2304) == 512);
  CHECK(o.resolved_k_aux(4096) == 512);
  CHECK(o.resolved_k_aux(2) == 1);
  CHECK(o.resolved_k_aux(1) >= 1);  // never zero
  auxk_options e;
  e.k_aux = 7;
  CHECK(e.resolved_k_aux(2304) == 7);
}

TEST_CASE("auxk_options::validate and step_options::validate name a non-finite or negative alpha", "[auxk]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (const auto& [alpha, shown] : std::vector<std::pair<double, std::string>>{
           {nan, "nan"}, {inf, "inf"}, {-inf, "-inf"}, {-1.0, "-1"}, {-1e-300, "-1e-300"}}) {
    INFO("alpha = " << shown);
    auxk_options o;
    o.alpha = alpha;
    const auto msg = Catch::Contains("auxk_options.alpha must be finite and >= 0, got " + shown);
    CHECK_THROWS_AS(o.validate(), config_error);
    CHECK_THROWS_WITH(o.validate(), msg);
    step_options so;
    so.auxk = o;
    CHECK_THROWS_AS(so.validate(), config_error);
    CHECK_THROWS_WITH(so.validate(), msg);
    so.use_auxk = false;  // a NaN in the settings is an error whether AuxK runs or not
    CHECK_THROWS_WITH(so.validate(), msg);
  }
  for (double alpha : {0.0, -0.0, 1.0 / 32.0, 1.0, 1e300, std::numeric_limits<double>::denorm_min()}) {
    INFO("alpha = " << alpha);
    auxk_options o;
    o.alpha = alpha;
    CHECK_NOTHROW(o.validate());
    CHECK_NOTHROW(step_options{.auxk = o}.validate());
  }
  // Every k_aux is valid: <= 0 means the default.
  for (int k_aux : {std::numeric_limits<int>::min(), -1, 0, 1, 512, std::numeric_limits<int>::max()}) {
    auxk_options o;
    o.k_aux = k_aux;
    CHECK_NOTHROW(o.validate());
  }
  CHECK_NOTHROW(auxk_options{}.validate());
  CHECK_NOTHROW(step_options{}.validate());
}

// ---------------------------------------------------------------------------
// auxk_backward

TEST_CASE("auxk_backward checks alpha on every call, with latents dead or not", "[auxk]") {
  // alpha = NaN was caught only once a latent had died; alpha = Inf never (an infinite
  // gradient reached Adam).
  const cpu_backend be;
  fixture fx(5);
  auxk_workspace<double> ws;
  for (double alpha : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), -0.5}) {
    INFO("alpha = " << alpha);
    const auxk_options opt{.k_aux = 4, .alpha = alpha};
    for (const std::vector<index_t>& dead : {std::vector<index_t>{}, std::vector<index_t>{0, 3, 5, 9, 11}}) {
      auto g = zero_grads(fx.m);
      CHECK_THROWS_AS(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws), config_error);
      CHECK_THROWS_WITH(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws),
                        Catch::Contains("auxk_options.alpha"));
      CHECK(bitwise_equal(g.W_dec, zero_grads(fx.m).W_dec));  // nothing was added
    }
  }
}

TEST_CASE("auxk_backward with no dead latents returns 0 and leaves the gradients alone", "[auxk]") {
  const cpu_backend be;
  fixture fx;
  sae_gradients<double> g;
  g.zeros_like(fx.m);
  rng gen(5);
  for (Eigen::Index i = 0; i < g.W_enc.size(); ++i) {
    g.W_enc.data()[i] = gen.normal();
    g.W_dec.data()[i] = gen.normal();
  }
  g.b_enc.setConstant(0.25);
  g.b_dec.setConstant(-3.0);
  const auto before = g;
  auxk_workspace<double> ws;
  auxk_options opt;
  SECTION("empty dead list") {
    CHECK(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, {}, opt, g, ws) == 0.0);
  }
  SECTION("alpha = 0") {
    opt.alpha = 0;
    CHECK(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, {1, 2, 3}, opt, g, ws) == 0.0);
  }
  CHECK(bitwise_equal(g.W_enc, before.W_enc));
  CHECK(bitwise_equal(g.W_dec, before.W_dec));
  CHECK(bitwise_equal(g.b_enc, before.b_enc));
  CHECK(bitwise_equal(g.b_dec, before.b_dec));
}

TEST_CASE("AuxK selects per row the top-k_aux pre-activations among dead latents only", "[auxk]") {
  const cpu_backend be;
  fixture fx;
  // Dead latents: every other one plus a few; live latents include each row's largest.
  const std::vector<index_t> dead = {1, 3, 4, 7, 9, 11, 12, 15, 18, 20, 23};
  auxk_options opt;
  opt.k_aux = 4;
  auto g = zero_grads(fx.m);
  auxk_workspace<double> ws;
  auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws);
  const auto ref = reference_auxk(fx.m, fx.pre, fx.residual, dead, opt.k_aux, opt.alpha);
  REQUIRE(ws.code.rows() == fx.B);
  REQUIRE(ws.code.k() == 4);
  int positive = 0;
  for (int b = 0; b < fx.B; ++b)
    for (int t = 0; t < 4; ++t) {
      INFO("row " << b << " rank " << t);
      const index_t i = ws.code.indices(b, t);
      CHECK(std::binary_search(dead.begin(), dead.end(), i));
      CHECK(ws.code.values(b, t) == ref.code[std::size_t(b)][std::size_t(t)].first);
      CHECK(i == ref.code[std::size_t(b)][std::size_t(t)].second);
      CHECK(ws.code.values(b, t) == fx.pre(b, i));
      if (t > 0) CHECK(ws.code.values(b, t) <= ws.code.values(b, t - 1));
      positive += ws.code.values(b, t) > 0;
    }
  CHECK(positive > fx.B);  // the fixture really exercises the selection
  // Some row's overall top pre-activation is a live latent that AuxK must skip.
  bool skipped_live = false;
  for (int b = 0; b < fx.B; ++b) {
    Eigen::Index top;
    fx.pre.row(b).maxCoeff(&top);
    skipped_live |= !std::binary_search(dead.begin(), dead.end(), index_t(top));
  }
  CHECK(skipped_live);
}

TEST_CASE("AuxK loss: alpha * min(n_dead/k_aux, 1) * sum||ehat - e||^2 / sum||e - mean e||^2, no b_dec", "[auxk]") {
  const cpu_backend be;
  fixture fx;
  REQUIRE(fx.m.b_dec.cwiseAbs().minCoeff() > 5.0);
  const std::vector<index_t> dead = {0, 2, 5, 6, 8, 13, 14, 17, 19, 21};
  auxk_options opt;
  opt.alpha = 0.25;
  SECTION("n_dead >= k_aux: scale 1") {
    opt.k_aux = 3;
    auto g = zero_grads(fx.m);
    auxk_workspace<double> ws;
    const double loss = auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws);
    const auto ref = reference_auxk(fx.m, fx.pre, fx.residual, dead, 3, 0.25);
    CHECK(loss == Approx(ref.loss).epsilon(1e-12));
    // The same sum decoded WITH b_dec would be enormous: the test can tell them apart.
    double sse_with_bias = 0, tv = 0;
    const Eigen::RowVectorXd mean = fx.residual.colwise().mean();
    for (int b = 0; b < fx.B; ++b) {
      sse_with_bias += (ref.ehat.row(b) + fx.m.b_dec.transpose() - fx.residual.row(b)).squaredNorm();
      tv += (fx.residual.row(b) - mean).squaredNorm();
    }
    CHECK(0.25 * sse_with_bias / tv > 100 * loss);
    // Not normalised by the uncentred energy either.
    CHECK(loss > 0);
  }
  SECTION("n_dead < k_aux: every dead latent is used, scaled by n_dead / k_aux") {
    opt.k_aux = 25;  // > n_dead = 10 (and > d_sae)
    auto g = zero_grads(fx.m);
    auxk_workspace<double> ws;
    const double loss = auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws);
    CHECK(ws.code.k() == int(dead.size()));
    for (int b = 0; b < fx.B; ++b) {
      std::vector<index_t> used(ws.code.indices.row(b).data(), ws.code.indices.row(b).data() + ws.code.k());
      std::sort(used.begin(), used.end());
      CHECK(used == dead);
    }
    const auto ref = reference_auxk(fx.m, fx.pre, fx.residual, dead, 25, 0.25);
    CHECK(loss == Approx(ref.loss).epsilon(1e-12));
    // The scale is 10/25 of the unscaled loss.
    const auto ref_unscaled = reference_auxk(fx.m, fx.pre, fx.residual, dead, 10, 0.25);
    CHECK(loss == Approx(0.4 * ref_unscaled.loss).epsilon(1e-12));
  }
  SECTION("default k_aux = d_model / 2 = 5") {
    auto g = zero_grads(fx.m);
    auxk_workspace<double> ws;
    const double loss = auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws);
    CHECK(ws.code.k() == 5);
    CHECK(loss == Approx(reference_auxk(fx.m, fx.pre, fx.residual, dead, 5, 0.25).loss).epsilon(1e-12));
  }
  SECTION("a zero-variance residual gives 0 and no gradient") {
    // Exactly zero variance: the residual is 0 (e.g. a perfect reconstruction).
    const row_matrix<double> zero = row_matrix<double>::Zero(fx.B, fx.D);
    auto g = zero_grads(fx.m);
    auxk_workspace<double> ws;
    CHECK(auxk_backward(be, fx.m, fx.x, fx.pre, zero, dead, opt, g, ws) == 0.0);
    CHECK(g.W_dec.cwiseAbs().maxCoeff() == 0.0);
    CHECK(g.W_enc.cwiseAbs().maxCoeff() == 0.0);
    CHECK(g.b_dec.cwiseAbs().maxCoeff() == 0.0);
    // A single row has zero variance about its own mean.
    CHECK(auxk_backward(be, fx.m, fx.x.topRows(1), fx.pre.topRows(1), fx.residual.topRows(1), dead, opt, g, ws) ==
          0.0);
    CHECK(g.W_dec.cwiseAbs().maxCoeff() == 0.0);
  }
}

TEST_CASE("the AuxK gradient reaches dead latents only and matches the hand gradient", "[auxk]") {
  const cpu_backend be;
  fixture fx(3);
  const std::vector<index_t> dead = {2, 3, 5, 10, 11, 16, 17, 22};
  auxk_options opt;
  opt.k_aux = 3;
  opt.alpha = 0.5;
  auto g = zero_grads(fx.m);
  auxk_workspace<double> ws;
  const double loss = auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g, ws);
  REQUIRE(loss > 0);

  // Live latents: exactly zero.
  int dead_nonzero = 0;
  for (int f = 0; f < fx.F; ++f) {
    INFO("latent " << f);
    const bool is_dead = std::binary_search(dead.begin(), dead.end(), index_t(f));
    const double mx = std::max({g.W_dec.row(f).cwiseAbs().maxCoeff(), g.W_enc.row(f).cwiseAbs().maxCoeff(),
                                std::abs(g.b_enc[f])});
    if (!is_dead) CHECK(mx == 0.0);
    else dead_nonzero += mx > 0;
  }
  CHECK(dead_nonzero >= 1);

  // The analytic gradient by hand: q_b = 2 alpha s / tv (ehat_b - e_b).
  const auto ref = reference_auxk(fx.m, fx.pre, fx.residual, dead, 3, 0.5);
  const Eigen::RowVectorXd mean = fx.residual.colwise().mean();
  double tv = 0;
  for (int b = 0; b < fx.B; ++b) tv += (fx.residual.row(b) - mean).squaredNorm();
  const double coef = 2 * 0.5 * 1.0 / tv;
  row_matrix<double> gWd = row_matrix<double>::Zero(fx.F, fx.D), gWe = gWd;
  Eigen::VectorXd gbe = Eigen::VectorXd::Zero(fx.F), gbd = Eigen::VectorXd::Zero(fx.D);
  for (int b = 0; b < fx.B; ++b) {
    const Eigen::RowVectorXd q = coef * (ref.ehat.row(b) - fx.residual.row(b));
    for (const auto& [v, f] : ref.code[std::size_t(b)]) {
      if (v <= 0) continue;
      gWd.row(f) += v * q;
      const double dv = fx.m.W_dec.row(f).dot(q);
      gWe.row(f) += dv * (fx.x.row(b) - fx.m.b_dec.transpose());
      gbe[f] += dv;
      gbd -= dv * fx.m.W_enc.row(f).transpose();
    }
  }
  CHECK((g.W_dec - gWd).cwiseAbs().maxCoeff() <= 1e-12 * (1 + gWd.cwiseAbs().maxCoeff()));
  CHECK((g.W_enc - gWe).cwiseAbs().maxCoeff() <= 1e-12 * (1 + gWe.cwiseAbs().maxCoeff()));
  CHECK((g.b_enc - gbe).cwiseAbs().maxCoeff() <= 1e-12 * (1 + gbe.cwiseAbs().maxCoeff()));
  CHECK((g.b_dec - gbd).cwiseAbs().maxCoeff() <= 1e-12 * (1 + gbd.cwiseAbs().maxCoeff()));

  // And by central finite differences of the reference loss (selection recomputed).
  const double h = 1e-6;
  auto fd = [&](auto&& entry) {
    sae<double> mp = fx.m, mm = fx.m;
    entry(mp) += h;
    entry(mm) -= h;
    return (reference_loss(mp, fx.x, fx.residual, dead, 3, 0.5) - reference_loss(mm, fx.x, fx.residual, dead, 3, 0.5)) /
           (2 * h);
  };
  int checked = 0;
  for (int b = 0; b < 2; ++b)
    for (const auto& [v, f] : ref.code[std::size_t(b)]) {
      if (v <= 0) continue;
      const int j = (f + b) % fx.D;
      INFO("latent " << f << " coord " << j);
      CHECK(fd([&](sae<double>& mm) -> double& { return mm.W_dec(f, j); }) ==
            Approx(g.W_dec(f, j)).margin(1e-7).epsilon(1e-5));
      CHECK(fd([&](sae<double>& mm) -> double& { return mm.W_enc(f, j); }) ==
            Approx(g.W_enc(f, j)).margin(1e-7).epsilon(1e-5));
      CHECK(fd([&](sae<double>& mm) -> double& { return mm.b_enc[f]; }) ==
            Approx(g.b_enc[f]).margin(1e-7).epsilon(1e-5));
      ++checked;
    }
  CHECK(fd([&](sae<double>& mm) -> double& { return mm.b_dec[1]; }) == Approx(g.b_dec[1]).margin(1e-7).epsilon(1e-5));
  CHECK(checked >= 2);
}

TEST_CASE("auxk_backward adds to existing gradients and validates its inputs", "[auxk]") {
  const cpu_backend be;
  fixture fx(4);
  const std::vector<index_t> dead = {0, 1, 2, 3, 4, 5, 6, 7};
  auxk_options opt;
  opt.k_aux = 4;
  auto g0 = zero_grads(fx.m);
  auxk_workspace<double> ws;
  const double l0 = auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g0, ws);
  auto g1 = zero_grads(fx.m);
  g1.W_dec.setConstant(1.0);
  g1.b_enc.setConstant(2.0);
  const double l1 = auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, opt, g1, ws);
  CHECK(l1 == l0);
  CHECK((g1.W_dec.array() - 1.0 - g0.W_dec.array()).abs().maxCoeff() <= 1e-14);
  CHECK((g1.b_enc.array() - 2.0 - g0.b_enc.array()).abs().maxCoeff() <= 1e-14);

  CHECK_THROWS_AS(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, {3, 1}, opt, g0, ws), hsae::config_error);
  CHECK_THROWS_AS(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, {1, 1}, opt, g0, ws), hsae::config_error);
  CHECK_THROWS_AS(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, {24}, opt, g0, ws), hsae::config_error);
  auxk_options neg;
  neg.alpha = -1;
  CHECK_THROWS_AS(auxk_backward(be, fx.m, fx.x, fx.pre, fx.residual, dead, neg, g0, ws), hsae::config_error);
  const row_matrix<double> bad_pre = fx.pre.leftCols(fx.F - 1);
  CHECK_THROWS_AS(auxk_backward(be, fx.m, fx.x, bad_pre, fx.residual, dead, opt, g0, ws), hsae::shape_error);
}

TEST_CASE("auxk_backward agrees with the library's own encode and residual (float)", "[auxk]") {
  // The documented pipeline: pre from encode, residual from the loss workspace.
  const cpu_backend be;
  const int D = 16, F = 64, K = 4, B = 12;
  sae<float> m(D, F);
  synthetic_options so;
  so.d_model = D;
  so.n_atoms = 32;
  so.seed = 9;
  synthetic_source<float> src(so);
  init(be, m, src.next(256), {.seed = 2});
  const row_matrix<float> x = src.next(B);
  sparse_code<float> code;
  row_matrix<float> pre;
  encode(be, m, x, K, code, pre);
  sae_gradients<float> g;
  g.zeros_like(m);
  loss_workspace<float> lw;
  hierarchical_loss_backward(be, m, x, code, top_k<K>{}, g, lw);
  const row_matrix<float> xhat = decode(be, m, code, K);
  CHECK((lw.residual - (x - xhat)).cwiseAbs().maxCoeff() <= 1e-5f);

  std::vector<index_t> dead;
  for (int f = 0; f < F; f += 3) dead.push_back(f);
  auto ga = zero_grads(m);
  auxk_workspace<float> ws;
  auxk_options opt;  // defaults: k_aux = 8, alpha = 1/32
  const double loss = auxk_backward(be, m, x, pre, lw.residual, dead, opt, ga, ws);

  sae<double> md(D, F);
  md.W_enc = m.W_enc.cast<double>();
  md.W_dec = m.W_dec.cast<double>();
  md.b_enc = m.b_enc.cast<double>();
  md.b_dec = m.b_dec.cast<double>();
  const auto ref = reference_auxk(md, pre.cast<double>(), lw.residual.cast<double>(), dead, 8, 1.0 / 32.0);
  CHECK(loss == Approx(ref.loss).epsilon(1e-4));
  CHECK(loss > 0);
  for (int f = 0; f < F; ++f)
    if (f % 3 != 0) REQUIRE(ga.W_enc.row(f).cwiseAbs().maxCoeff() == 0.0f);
}

TEST_CASE("train_step rejects a bad AuxK alpha on the first step, before any latent is dead", "[auxk][train_step]") {
  const cpu_backend be;
  const int D = 8, F = 32, B = 4;
  synthetic_options so;
  so.d_model = D;
  so.n_atoms = 16;
  so.seed = 23;
  synthetic_source<double> src(so);
  sae<double> m(D, F);
  init(be, m, src.next(128), {.seed = 5});
  const sae<double> before = m;
  adam<double> opt(m, {});
  dead_latent_tracker dead(F);  // nothing is dead for millions of tokens
  train_workspace<double> ws;
  const row_matrix<double> x = src.next(B);
  for (double alpha : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(), -1.0}) {
    INFO("alpha = " << alpha);
    step_options sopt;
    sopt.auxk.alpha = alpha;
    CHECK_THROWS_AS(train_step(be, m, opt, dead, x, top_k<2>{}, ws, sopt), config_error);
    CHECK_THROWS_WITH(train_step(be, m, opt, dead, x, top_k<2>{}, ws, sopt),
                      Catch::Contains("auxk_options.alpha must be finite and >= 0"));
  }
  CHECK(opt.steps() == 0);
  CHECK(bitwise_equal(m.W_enc, before.W_enc));
  CHECK(bitwise_equal(m.W_dec, before.W_dec));
  CHECK(dead.num_dead() == 0);
  CHECK_NOTHROW(train_step(be, m, opt, dead, x, top_k<2>{}, ws));
  CHECK(opt.steps() == 1);
}

TEST_CASE("train_step: aux_loss is 0 until latents die, then > 0", "[auxk][train_step]") {
  const cpu_backend be;
  const int D = 8, F = 32, B = 4;
  synthetic_options so;
  so.d_model = D;
  so.n_atoms = 16;
  so.seed = 21;
  synthetic_source<double> src(so);
  const row_matrix<double> sample = src.next(128);
  const row_matrix<double> x1 = src.next(B), x2 = src.next(B), x3 = src.next(B);

  auto run = [&](bool use_auxk, std::vector<step_stats>& stats) {
    sae<double> m(D, F);
    init(be, m, sample, {.seed = 4});
    adam_options ao;
    ao.lr = 1e-2;
    ao.warmup_steps = 0;
    adam<double> opt(m, ao);
    dead_latent_tracker dead(F, B);  // dead after one batch without firing
    train_workspace<double> ws;
    step_options sopt;
    sopt.use_auxk = use_auxk;
    for (const auto* x : {&x1, &x2, &x3}) stats.push_back(train_step(be, m, opt, dead, *x, top_k<2>{}, ws, sopt));
    return m;
  };
  std::vector<step_stats> with, without;
  const auto m_with = run(true, with);
  const auto m_without = run(false, without);

  CHECK(with[0].dead == 0);
  CHECK(with[0].aux_loss == 0.0);
  // After one batch of 4 rows with k = 2, at most 8 of 32 latents fired.
  CHECK(with[1].dead >= F - B * 2);
  CHECK(with[1].aux_loss > 0.0);
  CHECK(with[2].aux_loss > 0.0);
  for (const auto& s : without) CHECK(s.aux_loss == 0.0);
  // The main loss of the first two steps does not depend on AuxK (same model then).
  CHECK(with[0].loss == without[0].loss);
  CHECK(with[1].loss == without[1].loss);
  // AuxK changed the training: the models differ after the runs.
  CHECK((m_with.W_enc - m_without.W_enc).cwiseAbs().maxCoeff() > 0);
}
