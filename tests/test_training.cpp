// SPDX-License-Identifier: Apache-2.0
// A short training run on data drawn from a known dictionary: the loss falls and the
// learned decoder recovers the true atoms.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

struct run_result {
  double first_loss = 0;  // mean of the first 20 steps
  double last_loss = 0;   // mean of the last 50 steps
  double recovery = 0;    // mean max cosine similarity to the true atoms
};

/// Trains the SAE `m` (width F, initialised with `init_seed`) on the synthetic data `so` in
/// 256-row batches, Adam at lr 4e-3 after 50 warm-up steps; returns the loss of every step.
template <class Schedule>
std::vector<double> train_losses(const hsae::cpu_backend& be, const hsae::synthetic_options& so, int F,
                                 std::uint64_t init_seed, const Schedule& schedule, int steps, hsae::sae<float>& m,
                                 hsae::synthetic_source<float>& src) {
  using namespace hsae;
  m = sae<float>(so.d_model, F);
  init(be, m, src.next(1024), {.seed = init_seed});
  adam_options ao;
  ao.warmup_steps = 50;
  ao.lr = 4e-3;
  adam<float> opt(m, ao);
  dead_latent_tracker dead(m.d_sae(), 256 * 50);
  train_workspace<float> ws;
  row_matrix<float> x;
  std::vector<double> losses;
  for (int i = 0; i < steps; ++i) {
    src.next(256, x);
    losses.push_back(train_step(be, m, opt, dead, x, schedule, ws).loss);
  }
  return losses;
}

template <class Schedule>
run_result train_on_synthetic(const Schedule& schedule, int steps) {
  using namespace hsae;
  const cpu_backend be;
  synthetic_options so;
  so.d_model = 32;
  so.n_atoms = 64;
  so.mean_active = 3;
  so.zipf_exponent = 0.3;
  so.seed = 7;
  synthetic_source<float> src(so);
  sae<float> m;
  const std::vector<double> losses = train_losses(be, so, 128, 3, schedule, steps, m, src);
  run_result r;
  r.first_loss = std::accumulate(losses.begin(), losses.begin() + 20, 0.0) / 20;
  r.last_loss = std::accumulate(losses.end() - 50, losses.end(), 0.0) / 50;
  r.recovery = mean_max_cosine<float>(be, m.W_dec, src.atoms());
  return r;
}

}  // namespace

TEST_CASE("HierarchicalTopK training lowers the loss and recovers the dictionary", "[training]") {
  const auto r = train_on_synthetic(hsae::all_prefixes<8>{}, 800);
  INFO("first " << r.first_loss << " last " << r.last_loss << " recovery " << r.recovery);
  CHECK(r.last_loss < 0.5 * r.first_loss);
  CHECK(r.recovery > 0.9);
}

TEST_CASE("plain TopK and a subset schedule train too", "[training]") {
  SECTION("top_k<8>") {
    const auto r = train_on_synthetic(hsae::top_k<8>{}, 800);
    INFO("first " << r.first_loss << " last " << r.last_loss << " recovery " << r.recovery);
    CHECK(r.last_loss < 0.5 * r.first_loss);
    CHECK(r.recovery > 0.9);
  }
  SECTION("dynamic subset {2, 4, 8}") {
    const auto r = train_on_synthetic(hsae::dynamic_k_schedule::subset({2, 4, 8}), 800);
    INFO("first " << r.first_loss << " last " << r.last_loss << " recovery " << r.recovery);
    CHECK(r.last_loss < 0.5 * r.first_loss);
    CHECK(r.recovery > 0.9);
  }
}

TEST_CASE("an untrained SAE does not recover the dictionary (the metric can fail)", "[training]") {
  using namespace hsae;
  synthetic_options so;
  so.d_model = 32;
  so.n_atoms = 64;
  synthetic_source<float> src(so);
  sae<float> m(so.d_model, 128);
  init(cpu_backend{}, m, src.next(256), {.seed = 3});
  CHECK(mean_max_cosine<float>(cpu_backend{}, m.W_dec, src.atoms()) < 0.7);
}

namespace {

/// The training curve of one seed: the mean training loss over each of `windows` equal
/// windows of the run, and the final weights.
struct curve {
  std::vector<double> loss;
  hsae::sae<float> model;
};

curve train_curve(hsae::gemm_precision precision, std::uint64_t seed, int steps, int windows) {
  using namespace hsae;
  cpu_backend be;
  be.encoder_precision = precision;
  synthetic_options so;
  so.d_model = 64;
  so.n_atoms = 128;
  so.mean_active = 4;
  so.zipf_exponent = 0.3;
  so.seed = seed;
  synthetic_source<float> src(so);
  curve c;
  const std::vector<double> losses = train_losses(be, so, 256, seed + 100, all_prefixes<16>{}, steps, c.model, src);
  const int per = steps / windows;
  for (int w = 0; w < windows; ++w)
    c.loss.push_back(std::accumulate(losses.begin() + w * per, losses.begin() + (w + 1) * per, 0.0) / per);
  return c;
}

}  // namespace

TEST_CASE("bf16 encoder operands train within the seed spread of fp32", "[training][bf16]") {
  // The same runs (seeds 1-4: data, dictionary and initialisation) with fp32 and with bf16
  // encoder operands (fp32 masters). At every window of the curve the bf16 seeds' mean
  // loss must lie within fp32's spread (max - min over the seeds) of fp32's mean.
  using namespace hsae;
  constexpr int seeds = 4, steps = 600, windows = 6;
  std::vector<curve> f32, b16;
  for (int s = 1; s <= seeds; ++s) {
    f32.push_back(train_curve(gemm_precision::fp32, std::uint64_t(s), steps, windows));
    b16.push_back(train_curve(gemm_precision::bf16, std::uint64_t(s), steps, windows));
    // The bf16 runs took another path (the comparison is not of a run with itself).
    CHECK_FALSE(hsae_test::bitwise_equal(f32.back().model.W_enc, b16.back().model.W_enc));
  }
  INFO(encoder_gemm_info<float>(cpu_backend{.encoder_precision = gemm_precision::bf16}));
  for (int w = 0; w < windows; ++w) {
    double lo = 1e300, hi = -1e300, mean32 = 0, mean16 = 0;
    for (int s = 0; s < seeds; ++s) {
      lo = std::min(lo, f32[std::size_t(s)].loss[std::size_t(w)]);
      hi = std::max(hi, f32[std::size_t(s)].loss[std::size_t(w)]);
      mean32 += f32[std::size_t(s)].loss[std::size_t(w)] / seeds;
      mean16 += b16[std::size_t(s)].loss[std::size_t(w)] / seeds;
    }
    INFO("window " << w << ": fp32 mean " << mean32 << " spread [" << lo << ", " << hi << "], bf16 mean " << mean16);
    CHECK(hi > lo);
    CHECK(std::abs(mean16 - mean32) <= hi - lo);
  }
  // ...and the runs trained: the last window is well below the first.
  CHECK(b16[0].loss.back() < 0.5 * b16[0].loss.front());
}
