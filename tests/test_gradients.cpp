// SPDX-License-Identifier: Apache-2.0
// Finite-difference checks (double, central differences) of every parameter's gradient
// through the full pipeline  L(params) = hierarchical_loss(encode(x; params)),  under
// several k-schedules, and of the AuxK loss with the residual held fixed (detached).
//
// Top-k and ReLU are piecewise: a difference quotient is only meaningful when the
// perturbation leaves the selection (indices, their order, and which values are
// positive) unchanged at both +h and -h. Each coordinate whose selection moves is
// skipped and counted, and every check REQUIREs that almost all coordinates were
// actually compared. With the selection fixed the loss is a quadratic in each single
// parameter, so central differences carry no truncation error, only rounding.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace {

using hsae::index_t;
using model = hsae::sae<double>;
using grads_t = hsae::sae_gradients<double>;
using mat = hsae::row_matrix<double>;

constexpr double fd_h = 1e-6;
constexpr double fd_rel = 1e-6;   // relative tolerance
constexpr double fd_abs = 2e-9;   // rounding floor: ~ulp(L) / h for L = O(1)

struct case_options {
  int B = 5, D = 7, F = 24;
  std::uint64_t seed = 1;
  // Latents with f % sparse_every != 0 get a strongly negative b_enc (rows then have
  // fewer than K positive pre-activations); 0 = off.
  int sparse_every = 0;
};

struct fd_case {
  model m;
  mat x;
};

fd_case make_case(const case_options& o) {
  hsae::rng g(o.seed);
  fd_case c{model(o.D, o.F), mat(o.B, o.D)};
  auto& m = c.m;
  for (int f = 0; f < o.F; ++f) {
    for (int j = 0; j < o.D; ++j) m.W_dec(f, j) = g.normal();
    // Rows deliberately not unit norm: the loss is a function of the raw W_dec.
    m.W_dec.row(f) *= (0.5 + g.uniform()) / m.W_dec.row(f).norm();
    for (int j = 0; j < o.D; ++j) m.W_enc(f, j) = g.normal() / std::sqrt(double(o.D));
    m.b_enc[f] = 0.2 * g.normal();
    if (o.sparse_every > 0 && f % o.sparse_every != 0) m.b_enc[f] = -0.5 - 2.0 * g.uniform();
  }
  for (int j = 0; j < o.D; ++j) m.b_dec[j] = 0.3 * g.normal();
  for (int b = 0; b < o.B; ++b)
    for (int j = 0; j < o.D; ++j) c.x(b, j) = g.normal();
  return c;
}

// What the difference quotient requires to be unchanged: the ordered selection and
// which selected values are positive.
struct selection {
  hsae::index_matrix indices;
  Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> positive;
  friend bool operator==(const selection& a, const selection& b) {
    return a.indices.rows() == b.indices.rows() && a.indices.cols() == b.indices.cols() &&
           a.indices == b.indices && a.positive == b.positive;
  }
};

template <class T>
selection selection_of(const hsae::sparse_code<T>& code) {
  return {code.indices, (code.values.array() > T(0)).matrix()};
}

// A loss as a function of the parameters; sets `sel` to what it selected.
using loss_fn = std::function<double(const model&, selection& sel)>;

struct fd_report {
  std::string name;
  long total = 0, checked = 0, skipped = 0, nonzero = 0, failures = 0;
  double worst_excess = 0;  // max over entries of |a - fd| / (abs + rel * max(|a|, |fd|))
  std::string worst;
};

// Central differences on every entry of one parameter tensor (contiguous storage).
fd_report fd_check(const char* name, model& m, double* param, const double* grad, Eigen::Index n, const loss_fn& loss,
                   const selection& base) {
  fd_report r;
  r.name = name;
  for (Eigen::Index i = 0; i < n; ++i) {
    ++r.total;
    const double saved = param[i];
    selection sp, sm;
    param[i] = saved + fd_h;
    const double lp = loss(m, sp);
    param[i] = saved - fd_h;
    const double lm = loss(m, sm);
    param[i] = saved;
    if (!(sp == base) || !(sm == base)) {
      ++r.skipped;
      continue;
    }
    ++r.checked;
    const double fd = (lp - lm) / (2 * fd_h);
    const double a = grad[i];
    if (std::abs(a) > 1e-7) ++r.nonzero;
    const double allowed = fd_abs + fd_rel * std::max(std::abs(a), std::abs(fd));
    const double excess = std::abs(a - fd) / allowed;
    if (excess > r.worst_excess) {
      r.worst_excess = excess;
      r.worst = std::string(name) + "[" + std::to_string(i) + "]: analytic " + std::to_string(a) + ", fd " +
                std::to_string(fd) + ", diff " + std::to_string(std::abs(a - fd));
    }
    if (excess > 1) ++r.failures;
  }
  return r;
}

// Runs fd_check on all four tensors and asserts on the outcome. `min_nonzero[p]` is the
// least number of entries of tensor p whose analytic gradient must be nonzero (so the
// comparison is not against a vacuous all-zero gradient).
void check_all_params(model& m, const grads_t& g, const loss_fn& loss, std::array<long, 4> min_nonzero,
                      double min_checked_fraction = 0.95) {
  selection base;
  loss(m, base);
  const std::array<fd_report, 4> reports{
      fd_check("W_enc", m, m.W_enc.data(), g.W_enc.data(), m.W_enc.size(), loss, base),
      fd_check("b_enc", m, m.b_enc.data(), g.b_enc.data(), m.b_enc.size(), loss, base),
      fd_check("W_dec", m, m.W_dec.data(), g.W_dec.data(), m.W_dec.size(), loss, base),
      fd_check("b_dec", m, m.b_dec.data(), g.b_dec.data(), m.b_dec.size(), loss, base)};
  for (std::size_t p = 0; p < reports.size(); ++p) {
    const auto& r = reports[p];
    INFO(r.name << ": " << r.checked << "/" << r.total << " checked (" << r.skipped << " skipped: selection moved), "
                << r.nonzero << " nonzero, " << r.failures << " failures; worst (excess " << r.worst_excess
                << "): " << r.worst);
    CHECK(r.failures == 0);
    CHECK(double(r.checked) >= min_checked_fraction * double(r.total));
    CHECK(r.nonzero >= min_nonzero[p]);
  }
}

// ---------------------------------------------------------------------------------
// The main pipeline.

template <class S>
double pipeline_loss(const model& m, const mat& x, const S& schedule, int K, selection& sel) {
  const hsae::cpu_backend be;
  hsae::sparse_code<double> code;
  mat pre;
  hsae::encode(be, m, x, K, code, pre);
  sel = selection_of(code);
  hsae::loss_workspace<double> ws;
  return hsae::hierarchical_loss(be, m, x, code, schedule, ws).loss;
}

template <class S>
grads_t pipeline_grad(const model& m, const mat& x, const S& schedule, int K, int threads = 0) {
  hsae::cpu_backend be;
  be.num_threads = threads;
  grads_t g;
  g.zeros_like(m);
  hsae::sparse_code<double> code;
  mat pre;
  hsae::encode(be, m, x, K, code, pre);
  hsae::loss_workspace<double> ws;
  hsae::hierarchical_loss_backward(be, m, x, code, schedule, g, ws);
  hsae::encoder_backward(be, m, x, code, ws.grad_values, g, ws.pairs);
  return g;
}

// FD-checks the full pipeline for one schedule on `seeds` random cases.
template <class S>
void check_pipeline(const S& schedule, case_options o, int K = 0, int seeds = 3) {
  if (K == 0) K = schedule.k_max();
  for (int s = 0; s < seeds; ++s) {
    o.seed = 1000 + std::uint64_t(s) * 17 + std::uint64_t(o.sparse_every);
    INFO("seed " << o.seed << ", B " << o.B << ", D " << o.D << ", F " << o.F << ", K " << K);
    fd_case c = make_case(o);
    const grads_t g = pipeline_grad(c.m, c.x, schedule, K);
    // Two threads give the same gradient bit for bit.
    const grads_t g2 = pipeline_grad(c.m, c.x, schedule, K, 2);
    CHECK(g2.W_enc == g.W_enc);
    CHECK(g2.W_dec == g.W_dec);
    CHECK(g2.b_enc == g.b_enc);
    CHECK(g2.b_dec == g.b_dec);
    const loss_fn loss = [&](const model& m, selection& sel) { return pipeline_loss(m, c.x, schedule, K, sel); };
    // Nonzero at least: the W_enc / W_dec rows of a couple of selected latents, a few
    // b_enc entries, and b_dec (decoder side plus the pre-bias encoder side).
    check_all_params(c.m, g, loss, {2L * o.D, 2, 2L * o.D, o.D - 1});
  }
}

inline constexpr std::array<double, 3> subset_weights{1.0, 0.5, 2.0};

}  // namespace

TEST_CASE("finite differences: all prefixes (HierarchicalTopK)", "[gradients]") {
  SECTION("compile-time all_prefixes<6>") { check_pipeline(hsae::all_prefixes<6>{}, {}); }
  SECTION("dynamic all_prefixes(6)") { check_pipeline(hsae::dynamic_k_schedule::all_prefixes(6), {}); }
  SECTION("all_prefixes<3>, wider model") { check_pipeline(hsae::all_prefixes<3>{}, {.B = 4, .D = 9, .F = 40}); }
}

TEST_CASE("finite differences: weighted subset {(2,1),(4,0.5),(6,2)}", "[gradients]") {
  SECTION("dynamic") { check_pipeline(hsae::dynamic_k_schedule{{2, 1.0}, {4, 0.5}, {6, 2.0}}, {}); }
  SECTION("compile-time weighted_k_schedule") {
    check_pipeline(hsae::weighted_k_schedule<subset_weights, 2, 4, 6>{}, {});
  }
  SECTION("uniform subset k_schedule<1, 3, 6>") { check_pipeline(hsae::k_schedule<1, 3, 6>{}, {}); }
}

TEST_CASE("finite differences: a single k (plain TopK)", "[gradients]") {
  SECTION("top_k<6>") { check_pipeline(hsae::top_k<6>{}, {}); }
  SECTION("dynamic top_k(1)") { check_pipeline(hsae::dynamic_k_schedule::top_k(1), {}); }
  SECTION("top_k<4> on a code of k = 6 (ranks 5, 6 unused)") { check_pipeline(hsae::top_k<4>{}, {}, 6); }
}

TEST_CASE("finite differences: Multi-TopK", "[gradients]") {
  SECTION("multi_topk<2>: (2,1),(8,1/8)") { check_pipeline(hsae::multi_topk<2>{}, {}); }
  SECTION("dynamic multi_topk(2)") { check_pipeline(hsae::dynamic_k_schedule::multi_topk(2), {}); }
}

TEST_CASE("finite differences: rows with fewer positive pre-activations than K", "[gradients]") {
  // Only every 4th latent can fire (6 of 24): most rows have zeros among their top 6, the
  // selected zero slots must carry no encoder gradient (ReLU), and FD agrees.
  case_options o;
  o.sparse_every = 4;
  for (int s = 0; s < 3; ++s) {
    o.seed = 500 + std::uint64_t(s);
    fd_case c = make_case(o);
    const hsae::cpu_backend be;
    const auto code = hsae::encode(be, c.m, c.x, 6);
    int zeros = 0;
    for (int b = 0; b < o.B; ++b)
      for (int t = 0; t < 6; ++t) zeros += code.values(b, t) == 0.0;
    CHECK(zeros > 0);
  }
  check_pipeline(hsae::all_prefixes<6>{}, o);
  check_pipeline(hsae::dynamic_k_schedule{{2, 1.0}, {4, 0.5}, {6, 2.0}}, o);
}

TEST_CASE("the FD harness detects a wrong gradient", "[gradients]") {
  // Guard against a vacuous harness: a gradient with one entry off by 1% must fail.
  fd_case c = make_case({});
  const auto s = hsae::all_prefixes<6>{};
  grads_t g = pipeline_grad(c.m, c.x, s, 6);
  Eigen::Index f = 0;
  g.b_enc.cwiseAbs().maxCoeff(&f);
  g.b_enc[f] *= 1.01;
  const loss_fn loss = [&](const model& m, selection& sel) { return pipeline_loss(m, c.x, s, 6, sel); };
  selection base;
  loss(c.m, base);
  const fd_report r = fd_check("b_enc", c.m, c.m.b_enc.data(), g.b_enc.data(), c.m.b_enc.size(), loss, base);
  CHECK(r.failures == 1);
  CHECK(r.checked >= r.total - 1);
}

TEST_CASE("the FD harness skips coordinates whose perturbation moves the selection", "[gradients]") {
  // Make row 0's ranks 1 and 2 nearly tie (gap 1e-7 < h): perturbing either latent's
  // b_enc by +-h swaps them, which must be skipped rather than differenced.
  fd_case c = make_case({});
  const auto s = hsae::all_prefixes<6>{};
  const hsae::cpu_backend be;
  const auto code = hsae::encode(be, c.m, c.x, 6);
  const index_t f1 = code.indices(0, 0), f2 = code.indices(0, 1);
  c.m.b_enc[f2] += code.values(0, 0) - code.values(0, 1) - 1e-7;
  const auto code2 = hsae::encode(be, c.m, c.x, 6);
  REQUIRE(code2.indices(0, 0) == f1);
  REQUIRE(code2.indices(0, 1) == f2);
  const grads_t g = pipeline_grad(c.m, c.x, s, 6);
  const loss_fn loss = [&](const model& m, selection& sel) { return pipeline_loss(m, c.x, s, 6, sel); };
  selection base;
  loss(c.m, base);
  const fd_report r = fd_check("b_enc", c.m, c.m.b_enc.data(), g.b_enc.data(), c.m.b_enc.size(), loss, base);
  CHECK(r.skipped >= 2);
  CHECK(r.failures == 0);
  CHECK(r.checked + r.skipped == r.total);
}

// ---------------------------------------------------------------------------------
// AuxK with a detached residual.

namespace {

struct auxk_naive {
  double loss = 0;
  selection sel;
};

// L_aux(params) with e (the residual) and the dead list fixed: the top-k pre-activations
// among dead latents (ties: lower latent first) decode *without* b_dec;
// L = alpha * min(n_dead / k_aux, 1) * sum ||ehat - e||^2 / sum ||e - mean(e)||^2.
auxk_naive auxk_reference(const model& m, const mat& x, const mat& e, const std::vector<index_t>& dead,
                          const hsae::auxk_options& opt) {
  const int B = int(x.rows()), D = m.d_model();
  const int k_aux = opt.resolved_k_aux(D);
  const int n_dead = int(dead.size());
  const int k = std::min(k_aux, n_dead);
  const double scale = std::min(double(n_dead) / k_aux, 1.0);
  double tv = 0;
  const Eigen::RowVectorXd mean = e.colwise().mean();
  for (int b = 0; b < B; ++b) tv += (e.row(b) - mean).squaredNorm();
  auxk_naive r;
  r.sel.indices.resize(B, k);
  r.sel.positive.resize(B, k);
  double sse = 0;
  for (int b = 0; b < B; ++b) {
    std::vector<std::pair<double, index_t>> cand;
    for (index_t f : dead) {
      double p = m.b_enc[f];
      for (int j = 0; j < D; ++j) p += m.W_enc(f, j) * (x(b, j) - m.b_dec[j]);
      cand.emplace_back(std::max(p, 0.0), f);
    }
    std::stable_sort(cand.begin(), cand.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
    Eigen::RowVectorXd eh = Eigen::RowVectorXd::Zero(D);
    for (int t = 0; t < k; ++t) {
      r.sel.indices(b, t) = cand[std::size_t(t)].second;
      r.sel.positive(b, t) = cand[std::size_t(t)].first > 0;
      eh += cand[std::size_t(t)].first * m.W_dec.row(cand[std::size_t(t)].second);
    }
    sse += (eh - e.row(b)).squaredNorm();
  }
  r.loss = opt.alpha * scale * sse / tv;
  return r;
}

struct auxk_setup {
  fd_case c;
  mat residual;  // x - xhat_K at the base parameters, then held fixed
  mat pre;
  hsae::sparse_code<double> code;
};

auxk_setup make_auxk_setup(const case_options& o, int K) {
  auxk_setup s{make_case(o), {}, {}, {}};
  const hsae::cpu_backend be;
  hsae::encode(be, s.c.m, s.c.x, K, s.code, s.pre);
  hsae::loss_workspace<double> ws;
  hsae::hierarchical_loss(be, s.c.m, s.c.x, s.code, hsae::dynamic_k_schedule::all_prefixes(K), ws);
  s.residual = ws.residual;
  return s;
}

// Latents in no row's top-K (the realistic dead set).
std::vector<index_t> unselected(const hsae::sparse_code<double>& code, int F) {
  std::vector<index_t> dead;
  for (index_t f = 0; f < F; ++f)
    if (!(code.indices.array() == f).any()) dead.push_back(f);
  return dead;
}

void check_auxk(auxk_setup& s, const std::vector<index_t>& dead, const hsae::auxk_options& opt) {
  auto& m = s.c.m;
  const auto& x = s.c.x;
  const int F = m.d_sae(), D = m.d_model();
  INFO(dead.size() << " dead latents, k_aux " << opt.resolved_k_aux(D) << ", alpha " << opt.alpha);
  REQUIRE(!dead.empty());
  const hsae::cpu_backend be;
  grads_t g;
  g.zeros_like(m);
  hsae::auxk_workspace<double> ws;
  const double l = hsae::auxk_backward(be, m, x, s.pre, s.residual, dead, opt, g, ws);
  const auxk_naive ref = auxk_reference(m, x, s.residual, dead, opt);
  CHECK(std::abs(l - ref.loss) <= 1e-12 * ref.loss);
  CHECK(l > 0);
  CHECK(ws.code.indices == ref.sel.indices);

  // Exactly zero on every latent that is not dead.
  int live = 0;
  for (index_t f = 0; f < F; ++f) {
    if (std::binary_search(dead.begin(), dead.end(), f)) continue;
    ++live;
    CHECK(g.W_dec.row(f).isZero(0));
    CHECK(g.W_enc.row(f).isZero(0));
    CHECK(g.b_enc[f] == 0.0);
  }
  CHECK(live > 0);
  // ... and nonzero on the dead latents AuxK used with a positive value.
  int used = 0;
  for (index_t f : dead)
    if (((ref.sel.indices.array() == f) && ref.sel.positive.array()).any()) {
      ++used;
      CHECK_FALSE(g.W_dec.row(f).isZero(0));
      CHECK_FALSE(g.W_enc.row(f).isZero(0));
    }
  CHECK(used > 0);

  // Two threads: same bits.
  {
    hsae::cpu_backend be2;
    be2.num_threads = 2;
    grads_t g2;
    g2.zeros_like(m);
    hsae::auxk_workspace<double> ws2;
    CHECK(hsae::auxk_backward(be2, m, x, s.pre, s.residual, dead, opt, g2, ws2) == l);
    CHECK(g2.W_enc == g.W_enc);
    CHECK(g2.W_dec == g.W_dec);
    CHECK(g2.b_enc == g.b_enc);
    CHECK(g2.b_dec == g.b_dec);
  }

  // FD with the residual and the dead list fixed; pre-activations recomputed from the
  // perturbed parameters.
  const loss_fn loss = [&](const model& mm, selection& sel) {
    auxk_naive r = auxk_reference(mm, x, s.residual, dead, opt);
    sel = std::move(r.sel);
    return r.loss;
  };
  check_all_params(m, g, loss, {D, 1, D, D - 1});
}

}  // namespace

TEST_CASE("finite differences: AuxK with a detached residual", "[gradients][auxk]") {
  case_options o;
  for (int s = 0; s < 3; ++s) {
    o.seed = 700 + std::uint64_t(s);
    auxk_setup st = make_auxk_setup(o, 4);
    const auto dead = unselected(st.code, o.F);
    SECTION("unselected latents dead, default options, seed " + std::to_string(s)) {
      check_auxk(st, dead, {});
    }
    SECTION("unselected latents dead, k_aux 4, alpha 1, seed " + std::to_string(s)) {
      check_auxk(st, dead, {.k_aux = 4, .alpha = 1.0});
    }
    SECTION("k_aux > number of dead (scale < 1), seed " + std::to_string(s)) {
      check_auxk(st, dead, {.k_aux = 64, .alpha = 0.5});
    }
    SECTION("every third latent dead, including selected ones, seed " + std::to_string(s)) {
      std::vector<index_t> d;
      for (index_t f = 1; f < o.F; f += 3) d.push_back(f);
      check_auxk(st, d, {.k_aux = 3, .alpha = 1.0});
    }
  }
}

TEST_CASE("AuxK: nothing dead or alpha 0 means no loss and no gradient", "[gradients][auxk]") {
  auxk_setup st = make_auxk_setup({}, 4);
  const hsae::cpu_backend be;
  grads_t g;
  g.zeros_like(st.c.m);
  hsae::auxk_workspace<double> ws;
  CHECK(hsae::auxk_backward(be, st.c.m, st.c.x, st.pre, st.residual, {}, {}, g, ws) == 0.0);
  const auto dead = unselected(st.code, st.c.m.d_sae());
  REQUIRE(!dead.empty());
  CHECK(hsae::auxk_backward(be, st.c.m, st.c.x, st.pre, st.residual, dead, {.alpha = 0.0}, g, ws) == 0.0);
  CHECK(g.W_enc.isZero(0));
  CHECK(g.W_dec.isZero(0));
  CHECK(g.b_enc.isZero(0));
  CHECK(g.b_dec.isZero(0));
}

TEST_CASE("finite differences: main loss plus AuxK composed as train_step does", "[gradients][auxk]") {
  // grads = hierarchical_loss_backward + auxk_backward + encoder_backward (the order of
  // train_step), against FD of L_main(params) + L_aux(params; residual fixed).
  case_options o;
  o.seed = 900;
  fd_case c = make_case(o);
  const int K = 5;
  const auto schedule = hsae::dynamic_k_schedule{{1, 1.0}, {3, 0.5}, {5, 1.0}};
  const hsae::cpu_backend be;
  hsae::sparse_code<double> code;
  mat pre;
  hsae::encode(be, c.m, c.x, K, code, pre);
  grads_t g;
  g.zeros_like(c.m);
  hsae::loss_workspace<double> lws;
  hsae::hierarchical_loss_backward(be, c.m, c.x, code, schedule, g, lws);
  const mat residual = lws.residual;
  const auto dead = unselected(code, o.F);
  REQUIRE(dead.size() >= 2);
  const hsae::auxk_options opt{.k_aux = 3, .alpha = 0.25};
  hsae::auxk_workspace<double> aws;
  CHECK(hsae::auxk_backward(be, c.m, c.x, pre, residual, dead, opt, g, aws) > 0);
  hsae::encoder_backward(be, c.m, c.x, code, lws.grad_values, g, lws.pairs);

  const loss_fn loss = [&](const model& m, selection& sel) {
    selection main_sel;
    const double lm = pipeline_loss(m, c.x, schedule, K, main_sel);
    auxk_naive a = auxk_reference(m, c.x, residual, dead, opt);
    // Both selections must hold: concatenate them.
    sel.indices.resize(main_sel.indices.rows(), main_sel.indices.cols() + a.sel.indices.cols());
    sel.indices << main_sel.indices, a.sel.indices;
    sel.positive.resize(sel.indices.rows(), sel.indices.cols());
    sel.positive << main_sel.positive, a.sel.positive;
    return lm + a.loss;
  };
  check_all_params(c.m, g, loss, {2L * o.D, 2, 2L * o.D, o.D - 1});
}
