// SPDX-License-Identifier: Apache-2.0
// A short training run on data drawn from a known dictionary: the loss falls and the
// learned decoder recovers the true atoms.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <numeric>
#include <vector>

namespace {

struct run_result {
  double first_loss = 0;  // mean of the first 20 steps
  double last_loss = 0;   // mean of the last 50 steps
  double recovery = 0;    // mean max cosine similarity to the true atoms
};

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
  sae<float> m(so.d_model, 128);
  init(be, m, src.next(1024), {.seed = 3});
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
