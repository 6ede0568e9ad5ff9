// SPDX-License-Identifier: Apache-2.0
// The CPU step is bitwise reproducible: the same seed gives the same weights, and the
// thread count does not change a single bit (every reduction runs in index order).
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cstring>
#include <limits>

namespace {

using hsae_test::bitwise_equal;

template <class T>
hsae::sae<T> run(int threads, int steps, std::size_t scratch_bytes = std::size_t(64) << 20) {
  using namespace hsae;
  cpu_backend be;
  be.num_threads = threads;
  be.scratch_bytes = scratch_bytes;
  synthetic_options so;
  so.d_model = 24;
  so.n_atoms = 48;
  so.seed = 11;
  synthetic_source<T> src(so);
  sae<T> m(so.d_model, 96);
  init(be, m, src.next(512), {.seed = 5});
  adam_options ao;
  ao.warmup_steps = 5;
  ao.lr = 3e-3;
  ao.max_grad_norm = 1.0;
  adam<T> opt(m, ao);
  dead_latent_tracker dead(m.d_sae(), 64 * 4);  // small window: AuxK runs too
  train_workspace<T> ws;
  row_matrix<T> x;
  for (int i = 0; i < steps; ++i) {
    src.next(64, x);
    train_step(be, m, opt, dead, x, dynamic_k_schedule::subset({2, 5, 8}), ws);
  }
  return m;
}

template <class T>
void require_same(const hsae::sae<T>& a, const hsae::sae<T>& b) {
  REQUIRE(bitwise_equal(a.W_enc, b.W_enc));
  REQUIRE(bitwise_equal(a.W_dec, b.W_dec));
  REQUIRE(bitwise_equal(a.b_enc, b.b_enc));
  REQUIRE(bitwise_equal(a.b_dec, b.b_dec));
}

}  // namespace

TEMPLATE_TEST_CASE("same seed, same bits; thread count and chunking change nothing", "[determinism]", float, double) {
  const auto a = run<TestType>(1, 40);
  const auto b = run<TestType>(1, 40);
  require_same(a, b);
  const auto c = run<TestType>(2, 40);
  require_same(a, c);
  const auto d = run<TestType>(2, 40, 1);  // one row per decoder-gradient chunk
  require_same(a, d);
  // ...and the run actually moved the weights (the comparison is not vacuous).
  const auto e = run<TestType>(1, 41);
  CHECK_FALSE(bitwise_equal(a.W_dec, e.W_dec));
}

TEMPLATE_TEST_CASE("loss_and_gradients then the optimizer is train_step without AuxK, bit for bit", "[determinism]",
                   float, double) {
  using namespace hsae;
  using T = TestType;
  cpu_backend be;
  synthetic_options so;
  so.d_model = 24;
  so.n_atoms = 48;
  so.seed = 13;
  synthetic_source<T> src(so);
  sae<T> a(so.d_model, 96);
  init(be, a, src.next(512), {.seed = 7});
  sae<T> b = a;
  adam_options ao;
  ao.warmup_steps = 3;
  ao.lr = 3e-3;
  ao.max_grad_norm = 1.0;
  adam<T> opt_a(a, ao), opt_b(b, ao);
  dead_latent_tracker dead(a.d_sae(), 64);
  train_workspace<T> ws_a, ws_b;
  const auto schedule = dynamic_k_schedule::subset({2, 5, 8});
  step_options step_opt;
  step_opt.use_auxk = false;
  row_matrix<T> x;
  loss_stats ls;
  for (int i = 0; i < 12; ++i) {
    src.next(64, x);
    const step_stats st = train_step(be, a, opt_a, dead, x, schedule, ws_a, step_opt);
    loss_and_gradients(be, b, x, schedule, ws_b, ls);
    const double norm = opt_b.step(be, b, ws_b.grads);
    REQUIRE(ls.loss == st.loss);
    REQUIRE(norm == st.grad_norm);
    REQUIRE(bitwise_equal(ws_a.code.indices, ws_b.code.indices));
  }
  require_same(a, b);

  // The gradients are those of the loss: one SGD-sized nudge along -grad lowers it.
  src.next(64, x);
  const double before = loss_and_gradients(be, b, x, schedule, ws_b).loss;
  sae<T> c = b;
  const T eps = T(1e-3) / T(std::max<double>(1e-12, ws_b.grads.W_dec.norm()));
  c.W_dec -= eps * ws_b.grads.W_dec;
  c.W_enc -= eps * ws_b.grads.W_enc;
  c.b_enc -= eps * ws_b.grads.b_enc;
  c.b_dec -= eps * ws_b.grads.b_dec;
  train_workspace<T> ws_c;
  CHECK(loss_and_gradients(be, c, x, schedule, ws_c).loss < before);

  // Checked once, as train_step.
  row_matrix<T> wrong(4, so.d_model + 1);
  wrong.setZero();
  CHECK_THAT(hsae_test::message_of<shape_error>([&] { loss_and_gradients(be, b, wrong, schedule, ws_b); }),
             Catch::Contains("width"));
  row_matrix<T> bad = x;
  bad(3, 2) = std::numeric_limits<T>::quiet_NaN();
  CHECK_THROWS_AS(loss_and_gradients(be, b, bad, schedule, ws_b), numeric_error);
}
