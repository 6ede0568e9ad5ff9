// SPDX-License-Identifier: Apache-2.0
// The hand-checked test vector of docs/OBJECTIVE.md, exactly:
//   B=1, K=2, D=2, x=[1,0], b_dec=[0,0], e_0=[1,0], e_1=[0,1], indices [0,1],
//   values [0.8,0.3], schedule (1,1),(2,1):
//   L = (0.04 + 0.13) / 4 = 0.0425 (plain TopK: 0.065),
//   dL/dv = [-0.2, 0.15], dL/de_0 = [-0.16, 0.12], dL/de_1 = [-0.03, 0.045],
//   dL/db_dec (decoder side) = [-0.2, 0.15].
// Plain TopK (the single level (2,1)) on the same input, derived the same way:
//   c = 2/(B*D) = 1, S_1 = S_2 = r_2 = [-0.2, 0.3]; dL/dv = [-0.2, 0.3],
//   dL/de_0 = 0.8 S_1 = [-0.16, 0.24], dL/de_1 = 0.3 S_2 = [-0.06, 0.09],
//   dL/db_dec = S_1 = [-0.2, 0.3].
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <string>

namespace {

struct expected {
  double loss;
  std::array<double, 2> dv, de0, de1, db;
  // Per-level squared errors, in the schedule's level order.
  std::array<double, 2> level_sse;
  int levels;
};

// All prefixes (1,1),(2,1): the numbers of docs/OBJECTIVE.md.
constexpr expected all_prefix_expected{0.0425, {-0.2, 0.15}, {-0.16, 0.12}, {-0.03, 0.045}, {-0.2, 0.15}, {0.04, 0.13}, 2};
// Plain TopK, the single level (2,1).
constexpr expected plain_topk_expected{0.065, {-0.2, 0.3}, {-0.16, 0.24}, {-0.06, 0.09}, {-0.2, 0.3}, {0.13, 0.0}, 1};

template <class T>
struct vector_case {
  hsae::sae<T> m{2, 2};
  hsae::row_matrix<T> x{1, 2};
  hsae::sparse_code<T> code;
  vector_case() {
    m.W_dec << T(1), T(0), T(0), T(1);  // e_0 = [1,0], e_1 = [0,1]
    m.W_enc = m.W_dec;                  // unused by the decoder-side loss
    m.b_enc.setZero();
    m.b_dec.setZero();
    x << T(1), T(0);
    code.resize(1, 2);
    code.indices << 0, 1;
    code.values << T(0.8), T(0.3);
  }
};

// |got - want| <= abs_tol + rel_tol * |want|
template <class T>
void check_close(const char* what, T got, double want, double abs_tol, double rel_tol) {
  INFO(what << ": got " << double(got) << ", want " << want << " (diff " << std::abs(double(got) - want) << ")");
  CHECK(std::abs(double(got) - want) <= abs_tol + rel_tol * std::abs(want));
}

template <class T>
constexpr double abs_tol() {
  return std::is_same_v<T, double> ? 1e-15 : 0.0;
}
template <class T>
constexpr double rel_tol() {
  // float: the inputs 0.8 and 0.3 are themselves rounded (relative 1.5e-8 and 5e-9) and a
  // squared error takes a handful of float roundings, so allow about 2 ulp (2^-22 each).
  return std::is_same_v<T, double> ? 0.0 : 2.4e-7;
}

template <class T, class S>
void run_vector(const S& schedule, const expected& want, T grad_preload = T(0)) {
  using namespace hsae;
  vector_case<T> c;
  const cpu_backend be;
  loss_workspace<T> ws;

  // Forward only.
  const loss_stats fwd = hierarchical_loss(be, c.m, c.x, c.code, schedule, ws);
  check_close<T>("forward L", T(fwd.loss), want.loss, abs_tol<T>(), rel_tol<T>());
  REQUIRE(fwd.level_sse.size() == std::size_t(want.levels));
  REQUIRE(fwd.level_k.size() == std::size_t(want.levels));
  for (int l = 0; l < want.levels; ++l) {
    check_close<T>("level sse", T(fwd.level_sse[std::size_t(l)]), want.level_sse[std::size_t(l)], abs_tol<T>(),
                   rel_tol<T>());
    check_close<T>("level mse", T(fwd.mse(std::size_t(l))), want.level_sse[std::size_t(l)] / 2.0, abs_tol<T>(),
                   rel_tol<T>());
  }
  CHECK(fwd.level_k.back() == 2);
  CHECK(fwd.rows == 1);
  CHECK(fwd.d_model == 2);
  // Residual x - xhat_2 = [0.2, -0.3].
  check_close<T>("residual[0]", ws.residual(0, 0), 0.2, abs_tol<T>() * 100, rel_tol<T>() * 4);
  check_close<T>("residual[1]", ws.residual(0, 1), -0.3, abs_tol<T>() * 100, rel_tol<T>() * 4);

  // Backward: gradients are *added* to grads.
  sae_gradients<T> g;
  g.zeros_like(c.m);
  g.W_dec.array() += grad_preload;
  g.b_dec.array() += grad_preload;
  const loss_stats bwd = hierarchical_loss_backward(be, c.m, c.x, c.code, schedule, g, ws);
  check_close<T>("backward L", T(bwd.loss), want.loss, abs_tol<T>(), rel_tol<T>());
  CHECK(bwd.loss == fwd.loss);

  REQUIRE(ws.grad_values.rows() == 1);
  REQUIRE(ws.grad_values.cols() == 2);
  const double p = double(grad_preload);
  // The preload is exactly representable and the sums have a handful of bits: when it is
  // nonzero, compare after removing it (exact in both precisions for p = 1).
  const double tol_a = abs_tol<T>() * (p != 0 ? 4 : 1);
  for (int j = 0; j < 2; ++j) {
    check_close<T>("dL/dv", ws.grad_values(0, j), want.dv[std::size_t(j)], abs_tol<T>(), rel_tol<T>());
    check_close<T>("dL/de_0", T(double(g.W_dec(0, j)) - p), want.de0[std::size_t(j)], tol_a, rel_tol<T>() * (p != 0 ? 8 : 1));
    check_close<T>("dL/de_1", T(double(g.W_dec(1, j)) - p), want.de1[std::size_t(j)], tol_a, rel_tol<T>() * (p != 0 ? 8 : 1));
    check_close<T>("dL/db_dec", T(double(g.b_dec[j]) - p), want.db[std::size_t(j)], tol_a, rel_tol<T>() * (p != 0 ? 8 : 1));
    check_close<T>("bias_rows = S_1", ws.bias_rows(0, j), want.db[std::size_t(j)], abs_tol<T>(), rel_tol<T>());
  }
  // The decoder-side backward leaves the encoder gradients alone.
  CHECK(g.W_enc.isZero(0));
  CHECK(g.b_enc.isZero(0));
}

}  // namespace

TEMPLATE_TEST_CASE("docs/OBJECTIVE.md vector: HierarchicalTopK over all prefixes", "[objective][vector]", float, double) {
  using T = TestType;
  SECTION("compile-time all_prefixes<2>") { run_vector<T>(hsae::all_prefixes<2>{}, all_prefix_expected); }
  SECTION("compile-time k_schedule<1, 2>") { run_vector<T>(hsae::k_schedule<1, 2>{}, all_prefix_expected); }
  SECTION("dynamic all_prefixes(2)") {
    run_vector<T>(hsae::dynamic_k_schedule::all_prefixes(2), all_prefix_expected);
  }
  SECTION("dynamic {(1,1),(2,1)}") { run_vector<T>(hsae::dynamic_k_schedule{{1, 1.0}, {2, 1.0}}, all_prefix_expected); }
  SECTION("uniform weights other than 1 give the same loss ({(1,4),(2,4)})") {
    run_vector<T>(hsae::dynamic_k_schedule{{1, 4.0}, {2, 4.0}}, all_prefix_expected);
  }
}

TEMPLATE_TEST_CASE("docs/OBJECTIVE.md vector: plain TopK", "[objective][vector]", float, double) {
  using T = TestType;
  SECTION("compile-time top_k<2>") { run_vector<T>(hsae::top_k<2>{}, plain_topk_expected); }
  SECTION("dynamic top_k(2)") { run_vector<T>(hsae::dynamic_k_schedule::top_k(2), plain_topk_expected); }
  SECTION("dynamic {(2, 0.25)}") { run_vector<T>(hsae::dynamic_k_schedule{{2, 0.25}}, plain_topk_expected); }
}

TEMPLATE_TEST_CASE("docs/OBJECTIVE.md vector: the backward adds to existing gradients", "[objective][vector]", float,
                   double) {
  using T = TestType;
  SECTION("all prefixes") { run_vector<T>(hsae::all_prefixes<2>{}, all_prefix_expected, T(1)); }
  SECTION("plain TopK") { run_vector<T>(hsae::dynamic_k_schedule::top_k(2), plain_topk_expected, T(1)); }
}

TEST_CASE("docs/OBJECTIVE.md vector: two backward calls accumulate exactly twice", "[objective][vector]") {
  using namespace hsae;
  vector_case<double> c;
  const cpu_backend be;
  loss_workspace<double> ws;
  sae_gradients<double> once, twice;
  once.zeros_like(c.m);
  twice.zeros_like(c.m);
  hierarchical_loss_backward(be, c.m, c.x, c.code, all_prefixes<2>{}, once, ws);
  hierarchical_loss_backward(be, c.m, c.x, c.code, all_prefixes<2>{}, twice, ws);
  hierarchical_loss_backward(be, c.m, c.x, c.code, all_prefixes<2>{}, twice, ws);
  CHECK(twice.W_dec == (2.0 * once.W_dec).eval());
  CHECK(twice.b_dec == (2.0 * once.b_dec).eval());
  CHECK_FALSE(once.W_dec.isZero(0));
}

TEST_CASE("docs/OBJECTIVE.md vector: the full encoder path on the same numbers", "[objective][vector]") {
  // Choose W_enc, b_enc so that encode() itself produces the code of the vector:
  // pre = ReLU(W_enc x + b_enc) = [0.8, 0.3] with x = [1, 0] and b_dec = 0.
  using namespace hsae;
  vector_case<double> c;
  c.m.W_enc << 0.5, 0.25, 0.125, -0.5;
  c.m.b_enc << 0.3, 0.175;
  const cpu_backend be;
  sparse_code<double> code;
  row_matrix<double> pre;
  encode(be, c.m, c.x, 2, code, pre);
  REQUIRE(code.indices(0, 0) == 0);
  REQUIRE(code.indices(0, 1) == 1);
  CHECK(std::abs(code.values(0, 0) - 0.8) <= 1e-15);
  CHECK(std::abs(code.values(0, 1) - 0.3) <= 1e-15);

  loss_workspace<double> ws;
  sae_gradients<double> g;
  g.zeros_like(c.m);
  const loss_stats st = hierarchical_loss_backward(be, c.m, c.x, code, all_prefixes<2>{}, g, ws);
  CHECK(std::abs(st.loss - 0.0425) <= 1e-15);
  encoder_backward(be, c.m, c.x, code, ws.grad_values, g, ws.pairs);
  // dL/dpre = dL/dv = [-0.2, 0.15] (both values positive).
  // dL/dW_enc[f] = dpre_f * (x - b_dec) = dpre_f * [1, 0]; dL/db_enc = dpre.
  CHECK(std::abs(g.W_enc(0, 0) - -0.2) <= 1e-15);
  CHECK(g.W_enc(0, 1) == 0.0);
  CHECK(std::abs(g.W_enc(1, 0) - 0.15) <= 1e-15);
  CHECK(g.W_enc(1, 1) == 0.0);
  CHECK(std::abs(g.b_enc[0] - -0.2) <= 1e-15);
  CHECK(std::abs(g.b_enc[1] - 0.15) <= 1e-15);
  // b_dec: decoder side S_1 = [-0.2, 0.15] minus sum_f dpre_f W_enc[f]
  //      = [-0.2, 0.15] - (-0.2 [0.5, 0.25] + 0.15 [0.125, -0.5])
  //      = [-0.2 + 0.1 - 0.01875, 0.15 + 0.05 + 0.075] = [-0.11875, 0.275].
  CHECK(std::abs(g.b_dec[0] - -0.11875) <= 1e-15);
  CHECK(std::abs(g.b_dec[1] - 0.275) <= 1e-15);
  // Decoder gradients unchanged by the encoder backward.
  CHECK(std::abs(g.W_dec(0, 0) - -0.16) <= 1e-15);
  CHECK(std::abs(g.W_dec(0, 1) - 0.12) <= 1e-15);
  CHECK(std::abs(g.W_dec(1, 0) - -0.03) <= 1e-15);
  CHECK(std::abs(g.W_dec(1, 1) - 0.045) <= 1e-15);
}
