// SPDX-License-Identifier: Apache-2.0
// The constrained Adam of cpu/optimizer.hpp against a hand-written reference: decoder-gradient
// projection, bias-corrected Adam, row renormalisation, the learning-rate schedule,
// global-norm clipping, option validation and the NaN guard.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using hsae_test::bitwise_equal;

using namespace hsae;

/// A model with the init recipe (unit decoder rows) plus non-zero biases.
template <class T, int F = dynamic>
sae<T, F> make_model(int d_model, int d_sae, std::uint64_t seed) {
  sae<T, F> m(d_model, d_sae);
  const row_matrix<T> none(0, d_model);
  init(cpu_backend{}, m, none, {.seed = seed, .b_dec = decoder_bias_init::zero});
  rng gen(seed + 1000);
  for (Eigen::Index i = 0; i < m.b_enc.size(); ++i) m.b_enc[i] = T(0.1 * gen.normal());
  for (Eigen::Index i = 0; i < m.b_dec.size(); ++i) m.b_dec[i] = T(gen.normal());
  return m;
}

/// Gradients with entries N(0, scale^2), a different scale per tensor.
template <class T, int F>
sae_gradients<T, F> make_grads(const sae<T, F>& m, std::uint64_t seed, double scale = 1.0) {
  sae_gradients<T, F> g;
  g.zeros_like(m);
  rng gen(seed);
  for (Eigen::Index f = 0; f < g.W_enc.rows(); ++f)
    for (Eigen::Index j = 0; j < g.W_enc.cols(); ++j) {
      g.W_enc(f, j) = T(scale * gen.normal());
      g.W_dec(f, j) = T(0.5 * scale * gen.normal());
    }
  for (Eigen::Index i = 0; i < g.b_enc.size(); ++i) g.b_enc[i] = T(2.0 * scale * gen.normal());
  for (Eigen::Index i = 0; i < g.b_dec.size(); ++i) g.b_dec[i] = T(0.25 * scale * gen.normal());
  return g;
}

/// Plain dense reference of everything (double, separate storage).
struct ref_tensor {
  Eigen::MatrixXd w, m, v;
};

struct ref_adam {
  double lr, b1, b2, eps;
  int t = 0;
  ref_tensor W_enc, b_enc, W_dec, b_dec;
  bool project = true, normalize = true;

  template <class T, int F>
  ref_adam(const sae<T, F>& model, double lr_, double b1_, double b2_, double eps_)
      : lr(lr_), b1(b1_), b2(b2_), eps(eps_) {
    auto setup = [](ref_tensor& r, const Eigen::MatrixXd& w) {
      r.w = w;
      r.m = Eigen::MatrixXd::Zero(w.rows(), w.cols());
      r.v = Eigen::MatrixXd::Zero(w.rows(), w.cols());
    };
    setup(W_enc, model.W_enc.template cast<double>());
    setup(W_dec, model.W_dec.template cast<double>());
    setup(b_enc, Eigen::MatrixXd(model.b_enc.template cast<double>()));
    setup(b_dec, Eigen::MatrixXd(model.b_dec.template cast<double>()));
  }

  void adam_update(ref_tensor& r, const Eigen::MatrixXd& g, double lr_t) const {
    for (Eigen::Index i = 0; i < g.rows(); ++i)
      for (Eigen::Index j = 0; j < g.cols(); ++j) {
        r.m(i, j) = b1 * r.m(i, j) + (1 - b1) * g(i, j);
        r.v(i, j) = b2 * r.v(i, j) + (1 - b2) * g(i, j) * g(i, j);
        const double mhat = r.m(i, j) / (1 - std::pow(b1, t));
        const double vhat = r.v(i, j) / (1 - std::pow(b2, t));
        r.w(i, j) -= lr_t * mhat / (std::sqrt(vhat) + eps);
      }
  }

  /// g - <g, e> e per row, with the current (unit) decoder rows.
  Eigen::MatrixXd projected(Eigen::MatrixXd g) const {
    if (!project) return g;
    for (Eigen::Index f = 0; f < g.rows(); ++f) {
      double dot = 0, n2 = 0;
      for (Eigen::Index j = 0; j < g.cols(); ++j) {
        dot += g(f, j) * W_dec.w(f, j);
        n2 += W_dec.w(f, j) * W_dec.w(f, j);
      }
      for (Eigen::Index j = 0; j < g.cols(); ++j) g(f, j) -= dot / n2 * W_dec.w(f, j);
    }
    return g;
  }

  /// One step; `max_norm` <= 0: no clipping. Returns the (projected, unclipped) norm.
  template <class T, int F>
  double step(const sae_gradients<T, F>& g, double lr_t, double max_norm = 0) {
    ++t;
    const Eigen::MatrixXd gWe = g.W_enc.template cast<double>();
    const Eigen::MatrixXd gWd = projected(g.W_dec.template cast<double>());
    const Eigen::MatrixXd gbe = g.b_enc.template cast<double>();
    const Eigen::MatrixXd gbd = g.b_dec.template cast<double>();
    double ss = 0;
    for (const Eigen::MatrixXd* p : {&gWe, &gWd, &gbe, &gbd})
      for (Eigen::Index i = 0; i < p->size(); ++i) ss += p->data()[i] * p->data()[i];
    const double norm = std::sqrt(ss);
    const double c = (max_norm > 0 && norm > max_norm) ? max_norm / norm : 1.0;
    adam_update(W_enc, c * gWe, lr_t);
    adam_update(W_dec, c * gWd, lr_t);
    adam_update(b_enc, c * gbe, lr_t);
    adam_update(b_dec, c * gbd, lr_t);
    if (normalize)
      for (Eigen::Index f = 0; f < W_dec.w.rows(); ++f) {
        double n2 = 0;
        for (Eigen::Index j = 0; j < W_dec.w.cols(); ++j) n2 += W_dec.w(f, j) * W_dec.w(f, j);
        W_dec.w.row(f) /= std::sqrt(n2);
      }
    return norm;
  }
};

template <class T, int F>
double max_diff(const sae<T, F>& m, const ref_adam& r) {
  double d = 0;
  d = std::max(d, (m.W_enc.template cast<double>() - r.W_enc.w).cwiseAbs().maxCoeff());
  d = std::max(d, (m.W_dec.template cast<double>() - r.W_dec.w).cwiseAbs().maxCoeff());
  d = std::max(d, (Eigen::MatrixXd(m.b_enc.template cast<double>()) - r.b_enc.w).cwiseAbs().maxCoeff());
  d = std::max(d, (Eigen::MatrixXd(m.b_dec.template cast<double>()) - r.b_dec.w).cwiseAbs().maxCoeff());
  return d;
}

template <class T, int F>
double max_row_norm_error(const sae<T, F>& m) {
  double e = 0;
  for (Eigen::Index f = 0; f < m.W_dec.rows(); ++f) e = std::max(e, std::abs(double(m.W_dec.row(f).norm()) - 1.0));
  return e;
}

}  // namespace

TEMPLATE_TEST_CASE("adam::step keeps every decoder row at unit norm", "[optimizer]", float, double) {
  const double tol = std::is_same_v<TestType, float> ? 1e-6 : 1e-12;
  const cpu_backend be;
  auto m = make_model<TestType>(16, 40, 1);
  REQUIRE(max_row_norm_error(m) <= tol);
  adam_options ao;
  ao.lr = 5e-2;  // large steps: without the renormalisation rows drift far from 1
  ao.warmup_steps = 0;
  SECTION("with projection") {}
  SECTION("without projection") { ao.project_decoder_gradient = false; }
  adam<TestType> opt(m, ao);
  for (int s = 0; s < 10; ++s) {
    auto g = make_grads(m, 100 + std::uint64_t(s), s % 2 ? 10.0 : 0.01);
    // One row whose gradient lies along the row, one with a zero gradient.
    g.W_dec.row(3) = TestType(-7) * m.W_dec.row(3);
    g.W_dec.row(5).setZero();
    opt.step(be, m, g);
    INFO("step " << s);
    REQUIRE(max_row_norm_error(m) <= tol);
  }
  CHECK(opt.steps() == 10);
}

TEST_CASE("adam::step keeps unit rows for a fixed-width model", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<float, 64>(12, 64, 2);
  adam_options ao;
  ao.lr = 1e-1;
  ao.warmup_steps = 0;
  adam<float, 64> opt(m, ao);
  for (int s = 0; s < 5; ++s) {
    auto g = make_grads(m, 200 + std::uint64_t(s));
    opt.step(be, m, g);
  }
  CHECK(max_row_norm_error(m) <= 1e-6);
}

TEST_CASE("without normalize_decoder the rows leave the unit sphere", "[optimizer]") {
  // Guards the previous test: the renormalisation is what keeps the rows at norm 1.
  const cpu_backend be;
  auto m = make_model<double>(8, 16, 3);
  adam_options ao;
  ao.lr = 5e-2;
  ao.warmup_steps = 0;
  ao.normalize_decoder = false;
  ao.project_decoder_gradient = false;
  adam<double> opt(m, ao);
  auto g = make_grads(m, 300);
  opt.step(be, m, g);
  CHECK(max_row_norm_error(m) > 1e-3);
}

TEMPLATE_TEST_CASE("project_decoder_gradient removes each row's component along the row", "[optimizer]", float,
                   double) {
  const double tol = std::is_same_v<TestType, float> ? 1e-5 : 1e-13;
  const cpu_backend be;
  auto m = make_model<TestType>(10, 24, 4);
  auto g = make_grads(m, 400, 3.0);
  g.W_dec.row(7) = TestType(2.5) * m.W_dec.row(7);  // fully parallel: projects to ~0
  const auto before = g;
  project_decoder_gradient(be, m, g);
  for (Eigen::Index f = 0; f < m.W_dec.rows(); ++f) {
    INFO("row " << f);
    const Eigen::VectorXd e = m.W_dec.row(f).template cast<double>().transpose();
    const Eigen::VectorXd g0 = before.W_dec.row(f).template cast<double>().transpose();
    const Eigen::VectorXd want = g0 - g0.dot(e) * e;
    const Eigen::VectorXd got = g.W_dec.row(f).template cast<double>().transpose();
    CHECK(std::abs(got.dot(e)) <= tol * (1 + g0.norm()));
    CHECK((got - want).cwiseAbs().maxCoeff() <= tol * (1 + g0.norm()));
  }
  CHECK(g.W_dec.row(7).template cast<double>().norm() <= 10 * tol);
  // Only W_dec's gradient is touched.
  CHECK(bitwise_equal(g.W_enc, before.W_enc));
  CHECK(bitwise_equal(g.b_enc, before.b_enc));
  CHECK(bitwise_equal(g.b_dec, before.b_dec));
}

TEST_CASE("project_decoder_gradient on non-unit and zero rows", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<double>(6, 5, 5);
  m.W_dec.row(1) *= 3.0;   // documented: the row's norm is used
  m.W_dec.row(2).setZero();  // left as is
  auto g = make_grads(m, 500);
  const auto before = g;
  project_decoder_gradient(be, m, g);
  const Eigen::VectorXd e = m.W_dec.row(1).transpose();
  const Eigen::VectorXd g0 = before.W_dec.row(1).transpose();
  const Eigen::VectorXd want = g0 - g0.dot(e) / e.squaredNorm() * e;
  CHECK((g.W_dec.row(1).transpose() - want).cwiseAbs().maxCoeff() <= 1e-13);
  CHECK(std::abs(g.W_dec.row(1).dot(m.W_dec.row(1))) <= 1e-12);
  CHECK(bitwise_equal(g.W_dec.row(2), before.W_dec.row(2)));
}

TEST_CASE("Adam steps match a hand-written bias-corrected reference (double)", "[optimizer]") {
  const cpu_backend be;
  const int D = 9, F = 20;
  auto m = make_model<double>(D, F, 6);
  adam_options ao;
  ao.lr = 1e-2;
  ao.beta1 = 0.8;
  ao.beta2 = 0.95;
  ao.eps = 1e-3;  // large enough that a misplaced eps would show
  ao.warmup_steps = 0;
  SECTION("default constraint") {}
  SECTION("no projection, no renormalisation") {
    ao.project_decoder_gradient = false;
    ao.normalize_decoder = false;
  }
  const auto m0 = m;
  adam<double> opt(m, ao);
  ref_adam ref(m, ao.lr, ao.beta1, ao.beta2, ao.eps);
  ref.project = ao.project_decoder_gradient;
  ref.normalize = ao.normalize_decoder;
  for (int s = 0; s < 4; ++s) {
    auto g = make_grads(m, 600 + std::uint64_t(s), s == 2 ? 5.0 : 0.3);
    const double want_norm = ref.step(g, ao.lr);
    const double norm = opt.step(be, m, g);
    INFO("step " << s);
    CHECK(norm == Approx(want_norm).epsilon(1e-13));
    CHECK(max_diff(m, ref) <= 1e-12);
    CHECK(opt.steps() == s + 1);
    CHECK(opt.last_lr() == ao.lr);
    // The step really moved the parameters (Adam's first step is ~lr per coordinate).
    if (s == 0) CHECK((m.W_enc - m0.W_enc).cwiseAbs().maxCoeff() > 0.5 * ao.lr);
  }
}

TEST_CASE("step leaves the projected gradient in g; the first step moves each coordinate by ~lr", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<double>(7, 11, 7);
  const auto m0 = m;
  adam_options ao;
  ao.lr = 1e-3;
  ao.warmup_steps = 0;
  ao.normalize_decoder = false;
  adam<double> opt(m, ao);
  auto g = make_grads(m, 700);
  auto want = g;
  project_decoder_gradient(be, m0, want);
  opt.step(be, m, g);
  CHECK((g.W_dec - want.W_dec).cwiseAbs().maxCoeff() <= 1e-15);
  // Step 1 of bias-corrected Adam: delta = -lr * g / (|g| + eps), i.e. -lr * sign(g).
  const row_matrix<double> dW = m.W_enc - m0.W_enc;
  for (Eigen::Index i = 0; i < dW.size(); ++i) {
    const double gi = g.W_enc.data()[i];
    REQUIRE(dW.data()[i] == Approx(-ao.lr * gi / (std::abs(gi) + ao.eps)).epsilon(1e-9));
  }
}

TEST_CASE("the learning-rate schedule", "[optimizer]") {
  adam_options ao;
  SECTION("default peak lr is 2e-4 / sqrt(F / 2^14)") {
    ao.warmup_steps = 0;
    CHECK(ao.lr_at(0, 16384) == Approx(2e-4).epsilon(1e-15));
    CHECK(ao.lr_at(0, 65536) == Approx(1e-4).epsilon(1e-15));
    CHECK(ao.lr_at(0, 4096) == Approx(4e-4).epsilon(1e-15));
    CHECK(ao.lr_at(123, 1000) == Approx(2e-4 / std::sqrt(1000.0 / 16384.0)).epsilon(1e-15));
    CHECK(ao.peak_lr(32768) == Approx(2e-4 / std::sqrt(2.0)).epsilon(1e-15));
    ao.lr = 3e-3;
    CHECK(ao.lr_at(0, 4096) == 3e-3);
    CHECK(ao.peak_lr(4096) == 3e-3);
  }
  SECTION("linear warm-up from lr/W to lr, then flat without decay") {
    ao.lr = 1e-3;
    ao.warmup_steps = 10;
    for (int s = 0; s < 10; ++s) CHECK(ao.lr_at(s, 64) == Approx(1e-3 * (s + 1) / 10.0).epsilon(1e-14));
    CHECK(ao.lr_at(9, 64) == Approx(1e-3).epsilon(1e-14));
    // decay_steps = 0: no decay, ever.
    for (std::int64_t s : {10LL, 11LL, 1000LL, 1000000000LL}) CHECK(ao.lr_at(s, 64) == 1e-3);
    ao.total_steps = 100;  // total alone changes nothing
    CHECK(ao.lr_at(99, 64) == 1e-3);
    CHECK(ao.lr_at(500, 64) == 1e-3);
  }
  SECTION("no warm-up when warmup_steps = 0") {
    ao.lr = 1e-3;
    ao.warmup_steps = 0;
    CHECK(ao.lr_at(0, 64) == 1e-3);
  }
  SECTION("linear decay over the last decay_steps to final_lr_fraction") {
    ao.lr = 1e-3;
    ao.warmup_steps = 5;
    ao.total_steps = 100;
    ao.decay_steps = 20;
    ao.final_lr_fraction = 0.1;
    REQUIRE_NOTHROW(ao.validate());
    CHECK(ao.lr_at(0, 64) == Approx(2e-4).epsilon(1e-14));
    CHECK(ao.lr_at(50, 64) == 1e-3);
    CHECK(ao.lr_at(79, 64) == 1e-3);  // the last step before the decay window
    double prev = ao.lr_at(79, 64);
    for (int s = 80; s < 100; ++s) {
      const double lr = ao.lr_at(s, 64);
      INFO("step " << s);
      CHECK(lr < prev);
      // Linear: equal decrements of 0.9 * lr / 20.
      CHECK(prev - lr == Approx(0.9e-3 / 20).epsilon(1e-9));
      prev = lr;
    }
    CHECK(ao.lr_at(99, 64) == Approx(1e-4).epsilon(1e-12));   // the last step reaches the final fraction
    CHECK(ao.lr_at(1000, 64) == Approx(1e-4).epsilon(1e-12));  // and stays there
    ao.final_lr_fraction = 0.0;
    CHECK(ao.lr_at(99, 64) == 0.0);
  }
  SECTION("adam::step uses lr_at of its 0-based step count") {
    const cpu_backend be;
    auto m = make_model<double>(4, 8, 8);
    ao.lr = 1e-2;
    ao.warmup_steps = 3;
    ao.total_steps = 6;
    ao.decay_steps = 2;
    ao.final_lr_fraction = 0.5;
    adam<double> opt(m, ao);
    for (int s = 0; s < 8; ++s) {
      auto g = make_grads(m, 800 + std::uint64_t(s));
      opt.step(be, m, g);
      CHECK(opt.last_lr() == ao.lr_at(s, 8));
    }
  }
}

TEST_CASE("Adam with warm-up matches the reference with the scheduled lr", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<double>(5, 12, 9);
  adam_options ao;
  ao.lr = 2e-2;
  ao.warmup_steps = 4;
  adam<double> opt(m, ao);
  ref_adam ref(m, ao.lr, ao.beta1, ao.beta2, ao.eps);
  for (int s = 0; s < 6; ++s) {
    auto g = make_grads(m, 900 + std::uint64_t(s));
    ref.step(g, ao.lr * std::min(1.0, (s + 1) / 4.0));
    opt.step(be, m, g);
    INFO("step " << s);
    CHECK(max_diff(m, ref) <= 1e-12);
  }
}

TEST_CASE("gradient_norm is the L2 norm over all four gradients", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<double>(6, 10, 10);
  auto g = make_grads(m, 1000);
  double ss = 0;
  for (Eigen::Index i = 0; i < g.W_enc.size(); ++i) ss += g.W_enc.data()[i] * g.W_enc.data()[i];
  for (Eigen::Index i = 0; i < g.W_dec.size(); ++i) ss += g.W_dec.data()[i] * g.W_dec.data()[i];
  for (Eigen::Index i = 0; i < g.b_enc.size(); ++i) ss += g.b_enc[i] * g.b_enc[i];
  for (Eigen::Index i = 0; i < g.b_dec.size(); ++i) ss += g.b_dec[i] * g.b_dec[i];
  CHECK(gradient_norm(be, g) == Approx(std::sqrt(ss)).epsilon(1e-14));
  // Each tensor contributes.
  auto h = g;
  h.b_dec[0] += 1.0;
  CHECK(gradient_norm(be, h) != gradient_norm(be, g));
  h = g;
  h.b_enc.setZero();
  CHECK(gradient_norm(be, h) < gradient_norm(be, g));
  // float gradients accumulate in double.
  sae<float> mf(6, 10);
  sae_gradients<float> gf;
  gf.zeros_like(mf);
  gf.W_enc.setConstant(1.0f);
  gf.b_dec.setConstant(2.0f);
  CHECK(gradient_norm(be, gf) == Approx(std::sqrt(60.0 + 24.0)).epsilon(1e-12));
}

TEST_CASE("global-norm clipping scales the gradients before the Adam update", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<double>(8, 14, 11);
  const auto m0 = m;
  adam_options ao;
  ao.lr = 1e-2;
  ao.warmup_steps = 0;
  ao.eps = 1e-2;
  ao.max_grad_norm = 1.0;
  adam<double> opt(m, ao);
  ref_adam ref(m0, ao.lr, ao.beta1, ao.beta2, ao.eps);
  ref_adam unclipped(m0, ao.lr, ao.beta1, ao.beta2, ao.eps);
  // Norms below and above the threshold: Adam is scale-invariant per step only if every
  // step is scaled alike, so the mix makes clipping visible in the result.
  const double scales[] = {0.01, 5.0, 0.02, 3.0};
  for (int s = 0; s < 4; ++s) {
    auto g = make_grads(m, 1100 + std::uint64_t(s), scales[s]);
    auto gp = g;
    project_decoder_gradient(be, m, gp);
    const double want_norm = gradient_norm(be, gp);
    CHECK(ref.step(g, ao.lr, ao.max_grad_norm) == Approx(want_norm).epsilon(1e-12));
    unclipped.step(g, ao.lr);
    const double norm = opt.step(be, m, g);
    INFO("step " << s << " norm " << norm);
    CHECK(norm == Approx(want_norm).epsilon(1e-12));  // reported before clipping
    if (scales[s] > 1) CHECK(norm > ao.max_grad_norm);
    if (scales[s] < 1) CHECK(norm < ao.max_grad_norm);
    CHECK(max_diff(m, ref) <= 1e-12);
  }
  CHECK(max_diff(m, unclipped) > 1e-4);
}

TEST_CASE("adam_options::validate rejects bad settings", "[optimizer]") {
  const adam_options good;
  REQUIRE_NOTHROW(good.validate());
  auto bad = [&](auto&& edit) {
    adam_options o = good;
    edit(o);
    return o;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<adam_options> rejected = {
      bad([](adam_options& o) { o.beta1 = 1.0; }),
      bad([](adam_options& o) { o.beta1 = -0.1; }),
      bad([&](adam_options& o) { o.beta1 = nan; }),
      bad([](adam_options& o) { o.beta2 = 1.0; }),
      bad([](adam_options& o) { o.beta2 = 1.5; }),
      bad([](adam_options& o) { o.beta2 = -1e-9; }),
      bad([](adam_options& o) { o.eps = 0.0; }),
      bad([](adam_options& o) { o.eps = -1e-8; }),
      bad([&](adam_options& o) { o.eps = nan; }),
      bad([&](adam_options& o) { o.lr = nan; }),
      bad([&](adam_options& o) { o.lr = inf; }),
      bad([](adam_options& o) { o.warmup_steps = -1; }),
      bad([](adam_options& o) { o.decay_steps = -1; }),
      bad([](adam_options& o) {
        o.total_steps = 10;
        o.decay_steps = 11;
      }),
      bad([](adam_options& o) { o.decay_steps = 5; }),  // total_steps = 0
      bad([](adam_options& o) { o.final_lr_fraction = -0.1; }),
      bad([](adam_options& o) { o.final_lr_fraction = 1.5; }),
  };
  for (std::size_t i = 0; i < rejected.size(); ++i) {
    INFO("case " << i);
    CHECK_THROWS_AS(rejected[i].validate(), hsae::config_error);
    sae<float> m(4, 8);
    CHECK_THROWS_AS((adam<float>(m, rejected[i])), hsae::config_error);
  }
  // Boundary values that are allowed.
  const std::vector<adam_options> accepted = {
      bad([](adam_options& o) { o.beta1 = 0.0; }),
      bad([](adam_options& o) { o.beta2 = 0.0; }),
      bad([](adam_options& o) { o.eps = 6.25e-10; }),
      bad([](adam_options& o) {
        o.total_steps = 10;
        o.decay_steps = 10;
        o.final_lr_fraction = 1.0;
      }),
      bad([](adam_options& o) { o.lr = -1.0; }),  // <= 0 selects the default
  };
  for (std::size_t i = 0; i < accepted.size(); ++i) {
    INFO("accepted case " << i);
    CHECK_NOTHROW(accepted[i].validate());
  }
}

TEMPLATE_TEST_CASE("a non-finite gradient throws numeric_error and changes nothing", "[optimizer]", float, double) {
  const cpu_backend be;
  auto m = make_model<TestType>(6, 12, 12);
  const auto m0 = m;
  adam_options ao;
  ao.lr = 1e-2;
  ao.warmup_steps = 0;
  adam<TestType> opt(m, ao);
  auto g = make_grads(m, 1200);
  const TestType nan = std::numeric_limits<TestType>::quiet_NaN();
  SECTION("NaN in W_enc") { g.W_enc(3, 2) = nan; }
  SECTION("NaN in W_dec") { g.W_dec(0, 0) = nan; }
  SECTION("NaN in b_enc") { g.b_enc[11] = nan; }
  SECTION("NaN in b_dec") { g.b_dec[5] = nan; }
  SECTION("Inf in W_enc") { g.W_enc(11, 5) = std::numeric_limits<TestType>::infinity(); }
  CHECK_THROWS_AS(opt.step(be, m, g), hsae::numeric_error);
  CHECK(bitwise_equal(m.W_enc, m0.W_enc));
  CHECK(bitwise_equal(m.W_dec, m0.W_dec));
  CHECK(bitwise_equal(m.b_enc, m0.b_enc));
  CHECK(bitwise_equal(m.b_dec, m0.b_dec));
  CHECK(opt.steps() == 0);
  CHECK(opt.first_moment().W_enc.cwiseAbs().maxCoeff() == 0);
  CHECK(opt.second_moment().W_dec.cwiseAbs().maxCoeff() == 0);
  // A good step afterwards is an ordinary first step.
  auto good = make_grads(m, 1201);
  auto good2 = good;
  auto fresh = m0;
  adam<TestType> opt2(fresh, ao);
  opt.step(be, m, good);
  opt2.step(be, fresh, good2);
  CHECK(bitwise_equal(m.W_enc, fresh.W_enc));
  CHECK(bitwise_equal(m.W_dec, fresh.W_dec));
  CHECK(bitwise_equal(m.b_dec, fresh.b_dec));
}

TEST_CASE("adam::step rejects mismatched gradient shapes", "[optimizer]") {
  const cpu_backend be;
  auto m = make_model<double>(6, 12, 13);
  adam<double> opt(m, adam_options{});
  auto g = make_grads(m, 1300);
  g.b_dec.resize(5);
  CHECK_THROWS_AS(opt.step(be, m, g), hsae::shape_error);
  auto h = make_grads(m, 1301);
  h.W_enc.resize(11, 6);
  CHECK_THROWS_AS(opt.step(be, m, h), hsae::shape_error);
  CHECK(opt.steps() == 0);
}
