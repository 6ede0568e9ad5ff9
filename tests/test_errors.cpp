// SPDX-License-Identifier: Apache-2.0
// Bad input raises an hsae:: exception whose message names the problem, through the
// public API; a rejected training step leaves the model untouched.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

/// Matches an exception whose what() contains every given substring.
class what_has : public Catch::MatcherBase<std::exception> {
 public:
  what_has(std::initializer_list<std::string> parts) : parts_(parts) {}
  bool match(const std::exception& e) const override {
    const std::string w = e.what();
    for (const auto& p : parts_)
      if (w.find(p) == std::string::npos) return false;
    return true;
  }
  std::string describe() const override {
    std::string d = "has a message containing";
    for (const auto& p : parts_) d += " \"" + p + "\"";
    return d;
  }

 private:
  std::vector<std::string> parts_;
};

constexpr int kD = 8;   // d_model
constexpr int kF = 32;  // d_sae

template <class T>
hsae::row_matrix<T> random_batch(int rows, int cols, std::uint64_t seed) {
  hsae::rng g(seed);
  hsae::row_matrix<T> x(rows, cols);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = T(g.normal());
  return x;
}

template <class T, int F = hsae::dynamic>
hsae::sae<T, F> make_model(std::uint64_t seed = 1) {
  hsae::sae<T, F> m(kD, kF);
  hsae::init<T>(hsae::cpu_backend{}, m, random_batch<T>(64, kD, seed + 100), {.seed = seed});
  return m;
}

template <class M>
bool same_bits(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(typename M::Scalar) * std::size_t(a.size())) == 0;
}

template <class T, int F>
bool same_model(const hsae::sae<T, F>& a, const hsae::sae<T, F>& b) {
  return same_bits(a.W_enc, b.W_enc) && same_bits(a.b_enc, b.b_enc) && same_bits(a.W_dec, b.W_dec) &&
         same_bits(a.b_dec, b.b_dec);
}

template <class T, int F>
bool same_moments(const hsae::sae_gradients<T, F>& a, const hsae::sae_gradients<T, F>& b) {
  return same_bits(a.W_enc, b.W_enc) && same_bits(a.b_enc, b.b_enc) && same_bits(a.W_dec, b.W_dec) &&
         same_bits(a.b_dec, b.b_dec);
}

hsae::adam_options quick_adam() {
  hsae::adam_options o;
  o.lr = 1e-2;
  o.warmup_steps = 0;
  return o;
}

}  // namespace

TEST_CASE("every exception type derives from hsae::error and std::exception", "[errors]") {
  STATIC_REQUIRE(std::is_base_of_v<std::exception, hsae::error>);
  STATIC_REQUIRE(std::is_base_of_v<std::runtime_error, hsae::error>);
  STATIC_REQUIRE(std::is_base_of_v<hsae::error, hsae::shape_error>);
  STATIC_REQUIRE(std::is_base_of_v<hsae::error, hsae::config_error>);
  STATIC_REQUIRE(std::is_base_of_v<hsae::error, hsae::numeric_error>);
  STATIC_REQUIRE(std::is_base_of_v<hsae::error, hsae::io_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::exception, hsae::shape_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::exception, hsae::config_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::exception, hsae::numeric_error>);
  STATIC_REQUIRE(std::is_base_of_v<std::exception, hsae::io_error>);
  // The four kinds are distinct: catching one does not catch another.
  STATIC_REQUIRE_FALSE(std::is_base_of_v<hsae::shape_error, hsae::config_error>);
  STATIC_REQUIRE_FALSE(std::is_base_of_v<hsae::config_error, hsae::shape_error>);
  STATIC_REQUIRE_FALSE(std::is_base_of_v<hsae::numeric_error, hsae::config_error>);

  // Thrown by the library, caught through each base.
  const hsae::sae<float> m = make_model<float>();
  const hsae::row_matrix<float> bad = random_batch<float>(3, kD + 1, 5);
  CHECK_THROWS_AS(hsae::encode<float>(hsae::cpu_backend{}, m, bad, 4), hsae::error);
  CHECK_THROWS_AS(hsae::encode<float>(hsae::cpu_backend{}, m, bad, 4), std::exception);
  try {
    (void)hsae::encode<float>(hsae::cpu_backend{}, m, bad, 4);
    FAIL("no exception");
  } catch (const std::exception& e) {
    CHECK(dynamic_cast<const hsae::shape_error*>(&e) != nullptr);
    CHECK_THAT(std::string(e.what()), Catch::StartsWith("hsae: "));
  }
  try {
    hsae::sae<float, 64> wrong(kD, 32);
    FAIL("no exception");
  } catch (const hsae::error& e) {
    CHECK(dynamic_cast<const hsae::config_error*>(&e) != nullptr);
  }
}

TEMPLATE_TEST_CASE("a batch whose width is not d_model is rejected", "[errors]", float, double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  hsae::sae<T> m = make_model<T>();
  const hsae::sae<T> before = m;
  const hsae::row_matrix<T> x = random_batch<T>(4, kD, 7);
  const hsae::row_matrix<T> narrow = random_batch<T>(4, kD - 1, 8);
  const hsae::row_matrix<T> wide = random_batch<T>(4, kD + 5, 9);
  const auto width_msg = what_has({"width " + std::to_string(kD - 1), "d_model=" + std::to_string(kD)});

  SECTION("encode / pre_activations") {
    hsae::sparse_code<T> code;
    hsae::row_matrix<T> pre;
    CHECK_THROWS_MATCHES(hsae::encode<T>(be, m, narrow, 4, code, pre), hsae::shape_error, width_msg);
    CHECK_THROWS_MATCHES(hsae::encode<T>(be, m, narrow, 4), hsae::shape_error, width_msg);
    CHECK_THROWS_MATCHES(hsae::encode<T>(be, m, wide, 4), hsae::shape_error,
                         what_has({"width " + std::to_string(kD + 5)}));
    CHECK_THROWS_MATCHES(hsae::pre_activations<T>(be, m, narrow, pre), hsae::shape_error, width_msg);
    // An empty batch is named as such.
    const hsae::row_matrix<T> empty(0, kD);
    CHECK_THROWS_MATCHES(hsae::encode<T>(be, m, empty, 4), hsae::shape_error, what_has({"empty"}));
  }
  SECTION("train_step") {
    hsae::adam<T> opt(m, quick_adam());
    hsae::dead_latent_tracker dead(kF);
    hsae::train_workspace<T> ws;
    CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, narrow, hsae::all_prefixes<4>{}, ws), hsae::shape_error,
                         width_msg);
    CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, wide, hsae::dynamic_k_schedule::top_k(4), ws),
                         hsae::shape_error, what_has({"d_model=" + std::to_string(kD)}));
    CHECK(same_model(m, before));
    CHECK(opt.steps() == 0);
  }
  SECTION("hierarchical_loss, its backward, and encoder_backward") {
    const auto code = hsae::encode<T>(be, m, x, 4);
    hsae::loss_workspace<T> lw;
    hsae::sae_gradients<T> g;
    g.zeros_like(m);
    CHECK_THROWS_MATCHES(hsae::hierarchical_loss(be, m, narrow, code, hsae::all_prefixes<4>{}, lw), hsae::shape_error,
                         width_msg);
    CHECK_THROWS_MATCHES(hsae::hierarchical_loss_backward(be, m, narrow, code, hsae::all_prefixes<4>{}, g, lw),
                         hsae::shape_error, width_msg);
    const hsae::row_matrix<T> gv = hsae::row_matrix<T>::Zero(4, 4);
    CHECK_THROWS_MATCHES(hsae::encoder_backward<T>(be, m, narrow, code, gv, g, lw.pairs), hsae::shape_error,
                         width_msg);
    // A correct batch still works (the checks are not over-eager).
    CHECK_NOTHROW(hsae::hierarchical_loss(be, m, x, code, hsae::all_prefixes<4>{}, lw));
  }
}

TEMPLATE_TEST_CASE("a code whose rows do not match the batch is rejected", "[errors]", float, double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  const hsae::sae<T> m = make_model<T>();
  const hsae::row_matrix<T> x4 = random_batch<T>(4, kD, 11);
  const hsae::row_matrix<T> x3 = random_batch<T>(3, kD, 12);
  const auto code = hsae::encode<T>(be, m, x4, 4);
  hsae::loss_workspace<T> lw;
  hsae::sae_gradients<T> g;
  g.zeros_like(m);
  const auto msg = what_has({"the code has 4 rows", "batch has 3"});
  CHECK_THROWS_MATCHES(hsae::hierarchical_loss(be, m, x3, code, hsae::top_k<4>{}, lw), hsae::shape_error, msg);
  CHECK_THROWS_MATCHES(hsae::hierarchical_loss_backward(be, m, x3, code, hsae::top_k<4>{}, g, lw), hsae::shape_error,
                       msg);
  const hsae::row_matrix<T> gv = hsae::row_matrix<T>::Zero(4, 4);
  CHECK_THROWS_MATCHES(hsae::encoder_backward<T>(be, m, x3, code, gv, g, lw.pairs), hsae::shape_error, msg);
  // grad_values of the wrong shape.
  const hsae::row_matrix<T> gv_bad = hsae::row_matrix<T>::Zero(4, 3);
  CHECK_THROWS_MATCHES(hsae::encoder_backward<T>(be, m, x4, code, gv_bad, g, lw.pairs), hsae::shape_error,
                       what_has({"grad_values", "[4, 3]", "[4, 4]"}));
}

TEMPLATE_TEST_CASE("hand-built gradients of the wrong shape are rejected by the loss, encoder and AuxK backward",
                   "[errors]", float, double) {
  // Only W_enc was checked by encoder_backward, none by auxk_backward (W_dec written
  // first): a short b_enc / b_dec was an Eigen assert, or a heap overflow with -DNDEBUG.
  using T = TestType;
  const hsae::cpu_backend be{};
  const hsae::sae<T> m = make_model<T>();
  const hsae::row_matrix<T> x = random_batch<T>(4, kD, 13);
  hsae::row_matrix<T> pre;
  hsae::sparse_code<T> code;
  hsae::encode<T>(be, m, x, 4, code, pre);
  hsae::loss_workspace<T> lw;
  hsae::sae_gradients<T> ok;
  ok.zeros_like(m);
  (void)hsae::hierarchical_loss_backward(be, m, x, code, hsae::top_k<4>{}, ok, lw);
  const hsae::row_matrix<T> gv = lw.grad_values, residual = lw.residual;
  std::vector<hsae::index_t> dead;
  for (hsae::index_t f = 0; f < kF; ++f) dead.push_back(f);
  hsae::auxk_workspace<T> aw;

  hsae::sae_gradients<T> g;
  g.zeros_like(m);
  const std::string F = std::to_string(kF), D = std::to_string(kD);
  auto loss_bw = [&] { (void)hsae::hierarchical_loss_backward(be, m, x, code, hsae::top_k<4>{}, g, lw); };
  auto enc_bw = [&] { hsae::encoder_backward<T>(be, m, x, code, gv, g, lw.pairs); };
  auto aux_bw = [&] { (void)hsae::auxk_backward<T>(be, m, x, pre, residual, dead, {}, g, aw); };
  SECTION("b_enc") {
    for (int n : {0, kF - 1, kF + 5}) {
      g.b_enc.setZero(n);
      const auto msg = what_has({"b_enc gradient has shape [" + std::to_string(n) + "], expected [" + F + "]"});
      CHECK_THROWS_MATCHES(enc_bw(), hsae::shape_error, msg);
      CHECK_THROWS_MATCHES(aux_bw(), hsae::shape_error, msg);
      CHECK_NOTHROW(loss_bw());  // the decoder-side backward does not touch b_enc
    }
  }
  SECTION("b_dec") {
    for (int n : {0, kD - 1, kD + 1}) {
      g.b_dec.setZero(n);
      const auto msg = what_has({"b_dec gradient has shape [" + std::to_string(n) + "], expected [" + D + "]"});
      CHECK_THROWS_MATCHES(enc_bw(), hsae::shape_error, msg);
      CHECK_THROWS_MATCHES(aux_bw(), hsae::shape_error, msg);
      CHECK_THROWS_MATCHES(loss_bw(), hsae::shape_error, msg);
    }
  }
  SECTION("W_enc") {
    g.W_enc.setZero(kF, kD - 1);
    const auto msg =
        what_has({"W_enc gradient", "[" + F + ", " + std::to_string(kD - 1) + "]", "[" + F + ", " + D + "]"});
    CHECK_THROWS_MATCHES(enc_bw(), hsae::shape_error, msg);
    CHECK_THROWS_MATCHES(aux_bw(), hsae::shape_error, msg);
  }
  SECTION("W_dec") {
    g.W_dec.setZero(kF - 3, kD);
    const auto msg =
        what_has({"W_dec gradient", "[" + std::to_string(kF - 3) + ", " + D + "]", "[" + F + ", " + D + "]"});
    CHECK_THROWS_MATCHES(aux_bw(), hsae::shape_error, msg);
    CHECK_THROWS_MATCHES(loss_bw(), hsae::shape_error, msg);
    CHECK_NOTHROW(enc_bw());  // the encoder backward does not touch W_dec
  }
  SECTION("never zeros_like'd") {
    g = hsae::sae_gradients<T>{};
    CHECK_THROWS_AS(enc_bw(), hsae::shape_error);
    CHECK_THROWS_AS(aux_bw(), hsae::shape_error);
    CHECK_THROWS_AS(loss_bw(), hsae::shape_error);
  }
  SECTION("AuxK checks the gradients even with nothing dead (before any early return)") {
    g.b_dec.setZero(1);
    dead.clear();
    CHECK_THROWS_MATCHES(aux_bw(), hsae::shape_error, what_has({"b_dec gradient"}));
  }
}

TEMPLATE_TEST_CASE("a code whose values and indices differ in shape is rejected", "[errors]", float, double) {
  // The loss and encoder backward read indices(b, t) for t < values.cols(): a narrower
  // or shorter index matrix was read out of bounds.
  using T = TestType;
  const hsae::cpu_backend be{};
  const hsae::sae<T> m = make_model<T>();
  const hsae::row_matrix<T> x = random_batch<T>(4, kD, 14);
  const auto good = hsae::encode<T>(be, m, x, 4);
  hsae::loss_workspace<T> lw;
  hsae::sae_gradients<T> g;
  g.zeros_like(m);
  const hsae::row_matrix<T> gv = hsae::row_matrix<T>::Zero(4, 4);
  for (auto [r, c] : {std::pair{4, 2}, std::pair{3, 4}, std::pair{4, 5}, std::pair{0, 0}}) {
    hsae::sparse_code<T> code = good;
    code.indices = good.indices.topLeftCorner(std::min(r, 4), std::min(c, 4));
    if (c > 4) {
      code.indices.conservativeResize(r, c);
      code.indices.col(4).setConstant(0);
    }
    INFO("indices [" << r << ", " << c << "]");
    const auto msg = what_has({"the code's values [4, 4] and indices [" + std::to_string(r) + ", " +
                               std::to_string(c) + "] differ in shape"});
    CHECK_THROWS_MATCHES(hsae::hierarchical_loss(be, m, x, code, hsae::top_k<4>{}, lw), hsae::shape_error, msg);
    CHECK_THROWS_MATCHES(hsae::hierarchical_loss_backward(be, m, x, code, hsae::top_k<4>{}, g, lw),
                         hsae::shape_error, msg);
    CHECK_THROWS_MATCHES(hsae::encoder_backward<T>(be, m, x, code, gv, g, lw.pairs), hsae::shape_error, msg);
  }
}

TEMPLATE_TEST_CASE("adam::step rejects gradients of the wrong shape", "[errors]", float, double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  hsae::sae<T> m = make_model<T>();
  const hsae::sae<T> before = m;
  hsae::adam<T> opt(m, quick_adam());

  hsae::sae_gradients<T> g;
  g.zeros_like(m);
  SECTION("W_enc rows") {
    g.W_enc.setZero(kF - 1, kD);
    CHECK_THROWS_MATCHES(opt.step(be, m, g), hsae::shape_error,
                         what_has({"W_enc gradient", "[31, 8]", "[32, 8]"}));
  }
  SECTION("W_dec columns") {
    g.W_dec.setZero(kF, kD + 2);
    CHECK_THROWS_MATCHES(opt.step(be, m, g), hsae::shape_error,
                         what_has({"W_dec gradient", "[32, 10]", "[32, 8]"}));
  }
  SECTION("b_enc size") {
    g.b_enc.setZero(kF + 1);
    CHECK_THROWS_MATCHES(opt.step(be, m, g), hsae::shape_error, what_has({"bias gradient"}));
  }
  SECTION("b_dec size") {
    g.b_dec.setZero(kD - 1);
    CHECK_THROWS_MATCHES(opt.step(be, m, g), hsae::shape_error, what_has({"bias gradient"}));
  }
  SECTION("empty gradients (never zeros_like'd)") {
    hsae::sae_gradients<T> empty;
    CHECK_THROWS_AS(opt.step(be, m, empty), hsae::shape_error);
  }
  CHECK(same_model(m, before));
  CHECK(opt.steps() == 0);
}

TEMPLATE_TEST_CASE("non-finite gradients are rejected by adam::step without applying it", "[errors]", float,
                   double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  hsae::sae<T> m = make_model<T>();
  const hsae::sae<T> before = m;
  hsae::adam<T> opt(m, quick_adam());
  const auto m1 = opt.first_moment();
  const auto m2 = opt.second_moment();
  hsae::sae_gradients<T> g;
  g.zeros_like(m);
  g.W_enc.setConstant(T(0.5));
  SECTION("NaN") { g.W_enc(3, 2) = std::numeric_limits<T>::quiet_NaN(); }
  SECTION("Inf") { g.b_dec(1) = std::numeric_limits<T>::infinity(); }
  CHECK_THROWS_MATCHES(opt.step(be, m, g), hsae::numeric_error, what_has({"not finite"}));
  CHECK(same_model(m, before));
  CHECK(opt.steps() == 0);
  CHECK(same_moments(opt.first_moment(), m1));
  CHECK(same_moments(opt.second_moment(), m2));
}

TEMPLATE_TEST_CASE("k_max > d_sae is rejected", "[errors]", float, double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  hsae::sae<T> m = make_model<T>();
  const hsae::sae<T> before = m;
  const hsae::row_matrix<T> x = random_batch<T>(4, kD, 21);

  SECTION("encode with k > d_sae or k < 1") {
    CHECK_THROWS_MATCHES(hsae::encode<T>(be, m, x, kF + 1), hsae::config_error,
                         what_has({"k=33", "d_sae=32"}));
    CHECK_THROWS_MATCHES(hsae::encode<T>(be, m, x, 0), hsae::config_error, what_has({"k=0"}));
    CHECK_NOTHROW(hsae::encode<T>(be, m, x, kF));  // k == d_sae is fine
  }
  SECTION("train_step with a schedule whose k_max > d_sae") {
    hsae::adam<T> opt(m, quick_adam());
    hsae::dead_latent_tracker dead(kF);
    const auto since = dead.tokens_since_fired();
    hsae::train_workspace<T> ws;
    const auto msg = what_has({"k_max=64", "d_sae=32"});
    CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, x, hsae::top_k<64>{}, ws), hsae::config_error, msg);
    CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, x, hsae::k_schedule<8, 16, 32, 64>{}, ws),
                         hsae::config_error, msg);
    CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, x, hsae::multi_topk<16>{}, ws), hsae::config_error,
                         msg);
    CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, x, hsae::dynamic_k_schedule::all_prefixes(33), ws),
                         hsae::config_error, what_has({"k_max=33", "d_sae=32"}));
    CHECK(same_model(m, before));
    CHECK(opt.steps() == 0);
    CHECK(dead.tokens_since_fired() == since);
  }
  SECTION("hierarchical_loss with a schedule beyond the code's k") {
    const auto code = hsae::encode<T>(be, m, x, 8);
    hsae::loss_workspace<T> lw;
    CHECK_THROWS_MATCHES(hsae::hierarchical_loss(be, m, x, code, hsae::top_k<16>{}, lw), hsae::config_error,
                         what_has({"k_max=16", "code's k=8"}));
  }
}

TEST_CASE("invalid k-schedules are rejected before training", "[errors]") {
  const hsae::cpu_backend be{};
  hsae::sae<float> m = make_model<float>();
  const hsae::sae<float> before = m;
  hsae::adam<float> opt(m, quick_adam());
  hsae::dead_latent_tracker dead(kF);
  hsae::train_workspace<float> ws;
  const hsae::row_matrix<float> x = random_batch<float>(4, kD, 31);
  using L = std::vector<hsae::schedule_level>;
  // As a schedule read from a config file would be built: the constructor validates.
  auto step_with = [&](const L& levels) {
    return hsae::train_step(be, m, opt, dead, x, hsae::dynamic_k_schedule(levels), ws);
  };
  CHECK_THROWS_MATCHES(step_with(L{}), hsae::config_error, what_has({"empty"}));
  CHECK_THROWS_MATCHES(step_with(L{{8, 1}, {4, 1}}), hsae::config_error, what_has({"strictly increasing"}));
  CHECK_THROWS_MATCHES(step_with(L{{4, 1}, {4, 1}}), hsae::config_error, what_has({"strictly increasing"}));
  CHECK_THROWS_MATCHES(step_with(L{{0, 1}, {4, 1}}), hsae::config_error, what_has({"k=0"}));
  CHECK_THROWS_MATCHES(step_with(L{{2, 1}, {4, 0}}), hsae::config_error,
                       what_has({"weight", "positive"}));
  CHECK_THROWS_MATCHES(step_with(L{{2, -0.5}, {4, 1}}), hsae::config_error,
                       what_has({"weight -0.5", "positive"}));
  CHECK_THROWS_MATCHES(step_with(L{{2, 1}, {4, std::numeric_limits<double>::quiet_NaN()}}), hsae::config_error,
                       what_has({"finite"}));
  CHECK(same_model(m, before));
  CHECK(opt.steps() == 0);
  // A valid one trains.
  CHECK_NOTHROW(step_with(L{{2, 1}, {4, 0.5}}));
  CHECK(opt.steps() == 1);
  CHECK_FALSE(same_model(m, before));
}

TEMPLATE_TEST_CASE("NaN or Inf in a training batch: numeric_error, model unchanged", "[errors]", float, double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  hsae::sae<T> m = make_model<T>();
  hsae::adam<T> opt(m, quick_adam());
  hsae::dead_latent_tracker dead(kF, 1000);
  hsae::train_workspace<T> ws;
  // One good step first, so the optimizer moments and the workspace are non-trivial.
  const hsae::row_matrix<T> good = random_batch<T>(16, kD, 41);
  hsae::train_step(be, m, opt, dead, good, hsae::all_prefixes<4>{}, ws);
  REQUIRE(opt.steps() == 1);

  const hsae::sae<T> before = m;
  const auto m1 = opt.first_moment();
  const auto m2 = opt.second_moment();
  const auto since = dead.tokens_since_fired();

  const T bad_values[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                          -std::numeric_limits<T>::infinity()};
  for (const T bad : bad_values) {
    for (const auto& [r, c] : {std::pair{0, 0}, std::pair{9, 5}, std::pair{15, kD - 1}}) {
      hsae::row_matrix<T> x = good;
      x(r, c) = bad;
      INFO("value " << bad << " at [" << r << ", " << c << "]");
      CHECK_THROWS_MATCHES(hsae::train_step(be, m, opt, dead, x, hsae::all_prefixes<4>{}, ws), hsae::numeric_error,
                           what_has({"training batch", "non-finite", "[" + std::to_string(r) + ", " + std::to_string(c) + "]"}));
      CHECK_THROWS_AS(hsae::train_step(be, m, opt, dead, x, hsae::dynamic_k_schedule::multi_topk(2), ws),
                      hsae::numeric_error);
      CHECK(same_model(m, before));
      CHECK(opt.steps() == 1);
      CHECK(same_moments(opt.first_moment(), m1));
      CHECK(same_moments(opt.second_moment(), m2));
      CHECK(dead.tokens_since_fired() == since);
    }
  }
  // The comparison has teeth: a good step afterwards does change the model.
  hsae::train_step(be, m, opt, dead, good, hsae::all_prefixes<4>{}, ws);
  CHECK(opt.steps() == 2);
  CHECK_FALSE(same_model(m, before));
}

TEST_CASE("a fixed-width sae rejects a different d_sae", "[errors]") {
  CHECK_THROWS_MATCHES((hsae::sae<float, 64>(kD, 32)), hsae::config_error,
                       what_has({"d_sae=32", "F=64"}));
  CHECK_THROWS_MATCHES((hsae::sae<double, 64>(kD, 65)), hsae::config_error,
                       what_has({"d_sae=65", "F=64"}));
  hsae::sae<float, 64> ok(kD);
  CHECK(ok.d_sae() == 64);
  CHECK(ok.W_dec.rows() == 64);
  CHECK_THROWS_MATCHES(ok.resize(kD, 16), hsae::config_error, what_has({"d_sae=16", "F=64"}));
  CHECK_NOTHROW(hsae::sae<float, 64>(kD, 64));
  // Non-positive widths.
  CHECK_THROWS_MATCHES((hsae::sae<float>(0, 32)), hsae::config_error, what_has({"d_model must be >= 1, got 0"}));
  CHECK_THROWS_MATCHES((hsae::sae<float>(kD, 0)), hsae::config_error, what_has({"d_sae must be >= 1"}));
  CHECK_THROWS_MATCHES((hsae::sae<float>(kD, -4)), hsae::config_error, what_has({"d_sae must be >= 1, got -4"}));
}

TEMPLATE_TEST_CASE("decode rejects a latent index out of range and a bad k", "[errors]", float, double) {
  using T = TestType;
  const hsae::cpu_backend be{};
  const hsae::sae<T> m = make_model<T>();
  const hsae::row_matrix<T> x = random_batch<T>(4, kD, 51);
  const auto good = hsae::encode<T>(be, m, x, 6);
  CHECK_NOTHROW(hsae::decode<T>(be, m, good, 6));

  for (const hsae::index_t bad : {hsae::index_t(kF), hsae::index_t(kF + 100), hsae::index_t(-1)}) {
    auto code = good;
    code.indices(2, 3) = bad;
    INFO("index " << bad);
    CHECK_THROWS_MATCHES(hsae::decode<T>(be, m, code, 6), hsae::shape_error,
                         what_has({"latent index", "d_sae=32"}));
    // Even when k would not reach the bad rank, the code as a whole is checked.
    CHECK_THROWS_AS(hsae::decode<T>(be, m, code, 1), hsae::shape_error);
    hsae::loss_workspace<T> lw;
    CHECK_THROWS_MATCHES(hsae::hierarchical_loss(be, m, x, code, hsae::top_k<6>{}, lw), hsae::shape_error,
                         what_has({"latent index"}));
  }
  CHECK_THROWS_MATCHES(hsae::decode<T>(be, m, good, 7), hsae::config_error, what_has({"k=7"}));
  CHECK_THROWS_MATCHES(hsae::decode<T>(be, m, good, 0), hsae::config_error, what_has({"k=0"}));
}

TEST_CASE("other invalid settings name the field", "[errors]") {
  const hsae::cpu_backend be{};
  const hsae::sae<float> m = make_model<float>();
  SECTION("adam_options") {
    auto with = [](auto edit) {
      hsae::adam_options o;
      edit(o);
      return o;
    };
    const hsae::sae<float>& mm = m;
    CHECK_THROWS_MATCHES((hsae::adam<float>(mm, with([](auto& o) { o.eps = 0; }))), hsae::config_error,
                         what_has({"eps"}));
    CHECK_THROWS_MATCHES((hsae::adam<float>(mm, with([](auto& o) { o.beta1 = 1.0; }))), hsae::config_error,
                         what_has({"beta1"}));
    CHECK_THROWS_MATCHES((hsae::adam<float>(mm, with([](auto& o) { o.beta2 = -0.1; }))), hsae::config_error,
                         what_has({"beta2"}));
    CHECK_THROWS_MATCHES(
        (hsae::adam<float>(mm, with([](auto& o) { o.lr = std::numeric_limits<double>::quiet_NaN(); }))),
        hsae::config_error, what_has({"lr"}));
    CHECK_THROWS_MATCHES((hsae::adam<float>(mm, with([](auto& o) { o.warmup_steps = -1; }))), hsae::config_error,
                         what_has({"warmup_steps"}));
    CHECK_THROWS_MATCHES((hsae::adam<float>(mm, with([](auto& o) {
                           o.total_steps = 10;
                           o.decay_steps = 11;
                         }))),
                         hsae::config_error, what_has({"decay_steps"}));
  }
  SECTION("init sample") {
    hsae::sae<float> m2(kD, kF);
    CHECK_THROWS_MATCHES(hsae::init<float>(be, m2, random_batch<float>(10, kD + 1, 61)), hsae::shape_error,
                         what_has({"width " + std::to_string(kD + 1), "d_model=" + std::to_string(kD)}));
    auto sample = random_batch<float>(10, kD, 62);
    sample(4, 2) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_MATCHES(hsae::init<float>(be, m2, sample), hsae::numeric_error,
                         what_has({"non-finite", "[4, 2]"}));
    CHECK_THROWS_MATCHES(hsae::geometric_median<float>(be, hsae::row_matrix<float>(0, kD)), hsae::shape_error,
                         what_has({"empty"}));
  }
  SECTION("model tensors that disagree") {
    hsae::sae<float> bad = m;
    bad.b_enc.resize(kF - 1);
    CHECK_THROWS_MATCHES(bad.check_shapes(), hsae::shape_error, what_has({"b_enc", "d_sae=32"}));
    CHECK_THROWS_AS(hsae::encode<float>(be, bad, random_batch<float>(2, kD, 63), 4), hsae::shape_error);
  }
  SECTION("dead_latent_tracker") {
    CHECK_THROWS_MATCHES(hsae::dead_latent_tracker(0), hsae::config_error, what_has({"d_sae"}));
    CHECK_THROWS_MATCHES(hsae::dead_latent_tracker(kF, 0), hsae::config_error, what_has({"dead_after_tokens"}));
  }
}
