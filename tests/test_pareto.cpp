// SPDX-License-Identifier: Apache-2.0
// The paper's claim in miniature (pareto.hpp): one HierarchicalTopK SAE trained at K is
// close to a TopK SAE trained for each k <= K, and clearly better than the TopK SAE
// trained at K read at a smaller k. Plus the study's mechanics: outputs and errors.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.hpp"

using namespace hsae;

namespace {

synthetic_options claim_data(std::uint64_t seed) {
  synthetic_options d;  // the demo's hierarchical data, scaled down
  d.d_model = 32;
  d.n_atoms = 64;
  d.children_per_atom = 2;
  d.child_prob = 0.3;
  d.child_magnitude = 0.6;
  d.mean_active = 4;
  d.zipf_exponent = 0.7;
  d.noise_std = 0.01;
  d.seed = seed;
  return d;
}

pareto_options claim_options(std::uint64_t seed, std::int64_t tokens) {
  pareto_options o;
  o.d_sae = 256;
  o.k_max = 16;
  o.ks = {2, 4, 8};
  o.train.batch_size = 512;
  o.train.total_tokens = tokens;
  o.train.eval_rows = 8192;
  o.train.init_rows = 4096;
  o.train.init.seed = seed;
  o.train.adam.lr = 2e-3;
  o.train.adam.warmup_steps = 50;
  o.train.adam.decay_steps = o.train.steps() / 5;
  o.train.dead_after_tokens = 200'000;
  o.train.progress = progress_mode::never;
  return o;
}

}  // namespace

TEST_CASE("pareto: HierarchicalTopK at K is close to TopK trained at each k and beats TopK@K truncated",
          "[pareto][claim]") {
  // d_model 32, 64 parents with 2 children each, d_sae 256, K = 16, k in {2, 4, 8},
  // 400k tokens per model, one thread (the shapes are too small to split).
  // Tolerances, from measurement: seeds 1-4 of exactly this setup gave the FVU ratios
  // hierarchical / other (min-max over the seeds):
  //   / TopK trained at k:     k=2: 1.19-1.21   k=4: 1.12-1.13   k=8: 1.04-1.05   k=16: 1.06-1.07
  //   / TopK@16 truncated:     k=2: 0.81-0.84   k=4: 0.73-0.74   k=8: 0.75-0.76
  // So at this size and budget one hierarchical model pays ~20 % FVU at K/8 and ~5 % at
  // K/2..K against a model trained for exactly that k (the paper's runs are far longer
  // and report near parity; see README), and is 16-27 % better than truncating TopK@K.
  // The bounds sit ~0.07 above the worst measured ratio: loose enough for other
  // compilers' float rounding, tight enough that a broken schedule (e.g. training only
  // the last prefix, which gives the truncated curve) fails both checks.
  const std::vector<std::pair<int, double>> close_to_topk{{2, 1.28}, {4, 1.20}, {8, 1.12}, {16, 1.14}};
  constexpr double better_than_truncated = 0.91;
  cpu_backend be;
  be.num_threads = 1;
  const std::uint64_t seed = 1;
  const synthetic_options data = claim_data(seed);
  const pareto_result r =
      pareto_study<float>(be, [&] { return synthetic_source<float>(data, be); }, claim_options(seed, 400'000));
  INFO(pareto_markdown(r));
  REQUIRE(r.ks == std::vector<int>{2, 4, 8, 16});
  for (const auto& [k, bound] : close_to_topk) {
    const double hier = r.hierarchical().at(k).fvu;
    INFO("k=" << k);
    CHECK(hier < bound * r.topk(k).at(k).fvu);
    if (k < r.k_max) CHECK(hier < better_than_truncated * r.topk(r.k_max).at(k).fvu);
  }
  // And it is a usable model at every k: FVU falls with k.
  const auto& levels = r.hierarchical().eval.levels;
  for (std::size_t l = 1; l < levels.size(); ++l) CHECK(levels[l].fvu < levels[l - 1].fvu);
}

TEST_CASE("pareto: every model is evaluated on the same rows at every k; CSV and markdown", "[pareto]") {
  cpu_backend be;
  be.num_threads = 1;
  const synthetic_options data = claim_data(3);
  pareto_options o = claim_options(3, 4096);
  o.d_sae = 64;
  o.k_max = 8;
  o.ks = {4, 2, 4};  // unsorted, duplicated: normalised to {2, 4, 8}
  o.train.eval_rows = 1000;
  const pareto_result r = pareto_study<float>(be, [&] { return synthetic_source<float>(data, be); }, o);
  REQUIRE(r.ks == std::vector<int>{2, 4, 8});
  REQUIRE(r.models.size() == 4);
  CHECK(r.hierarchical().hierarchical);
  CHECK(r.hierarchical().trained_k == 8);
  for (const auto& m : r.models) {
    REQUIRE(m.eval.levels.size() == 8);
    CHECK(m.eval.rows == 1000);
    // Same held-out rows for every model: the same total variance.
    CHECK(m.eval.total_variance == r.hierarchical().eval.total_variance);
    for (int k = 1; k <= 8; ++k) CHECK(m.at(k).k == k);
  }
  CHECK(r.topk(2).trained_k == 2);
  CHECK_THROWS_AS(r.topk(3), config_error);

  hsae_test::temp_dir tmp;
  write_pareto_csv(tmp / "p.csv", r);
  std::ifstream f(tmp / "p.csv");
  std::string line;
  std::getline(f, line);
  CHECK(line == "model,hierarchical,trained_k,k,l0,fvu,mse");
  int rows = 0;
  while (std::getline(f, line)) ++rows;
  CHECK(rows == 4 * 8);
  const std::string md = pareto_markdown(r);
  CHECK(md.find("| 2 |") != std::string::npos);
  CHECK(md.find("| 8 |") != std::string::npos);
  CHECK(md.find("1000 held-out rows") != std::string::npos);
}

TEST_CASE("pareto: with make_held_out every model is evaluated on a fresh held-out source", "[pareto]") {
  cpu_backend be;
  be.num_threads = 1;
  const synthetic_options data = claim_data(5);
  pareto_options o = claim_options(5, 4096);
  o.d_sae = 64;
  o.k_max = 8;
  o.ks = {4};
  o.train.eval_rows = 500;
  o.held_out_note = "rows of another stream";
  synthetic_options other = data;
  other.seed = 77;  // rows no training stream of the study serves
  const row_matrix<float> held = synthetic_source<float>(other, be).next(500);

  int made = 0;
  const pareto_result r = pareto_study<float>(
      be, [&] { return synthetic_source<float>(data, be); },
      [&] {
        ++made;
        return matrix_source<float>(held, 1, /*shuffle=*/false);
      },
      o);
  REQUIRE(r.models.size() == 3);  // hierarchical, TopK 4, TopK 8
  CHECK(made == 3);
  // The same rows as a study whose source starts with them: the same total variance.
  pareto_options o2 = o;
  o2.train.total_tokens = 500;  // only the held-out rows matter; one short step
  o2.ks = {8};
  const pareto_result first_rows =
      pareto_study<float>(be, [&] { return matrix_source<float>(held, 1, /*shuffle=*/false); }, o2);
  for (const auto& m : r.models) {
    CHECK(m.eval.rows == 500);
    CHECK(m.eval.total_variance == first_rows.hierarchical().eval.total_variance);
  }
  CHECK_THAT(pareto_markdown(r), Catch::Contains("FVU on 500 held-out rows (rows of another stream)"));
}

TEST_CASE("pareto: bad settings raise hsae errors", "[pareto][errors]") {
  cpu_backend be;
  const synthetic_options data = claim_data(1);
  auto make = [&] { return synthetic_source<float>(data, be); };
  pareto_options o = claim_options(1, 1024);
  o.ks = {0, 4};
  CHECK_THROWS_AS(pareto_study<float>(be, make, o), config_error);
  o.ks = {4, 32};
  CHECK_THROWS_AS(pareto_study<float>(be, make, o), config_error);
  o.ks = {4};
  o.train.eval_rows = 0;
  CHECK_THROWS_AS(pareto_study<float>(be, make, o), config_error);
  o.train.eval_rows = 100;
  o.k_max = 512;  // > d_sae
  CHECK_THROWS_AS(pareto_study<float>(be, make, o), config_error);
}
