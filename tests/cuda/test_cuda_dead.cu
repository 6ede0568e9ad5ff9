// SPDX-License-Identifier: Apache-2.0
// GPU dead-latent tracking against dead_latents.hpp: counters, the dead bitmask, the
// ascending dead list and its count, over several updates with zeros in the codes and a
// rank limit k; checkpoint round trips.
#include <algorithm>
#include <cstdint>
#include <hsae/cuda/dead_latents.cuh>
#include <hsae/dead_latents.hpp>
#include <hsae/rng.hpp>
#include <vector>

#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

/// Rows of k distinct latents drawn from [0, active) (so latents >= active never fire),
/// values descending with zeros in some slots.
sparse_code<float> random_code(int B, int k, int active, rng& gen) {
  sparse_code<float> c;
  c.resize(B, k);
  std::vector<int> perm(static_cast<std::size_t>(active));
  for (int b = 0; b < B; ++b) {
    for (int f = 0; f < active; ++f) perm[std::size_t(f)] = f;
    for (int t = 0; t < k; ++t)
      std::swap(perm[std::size_t(t)], perm[std::size_t(t) + gen.below(std::uint64_t(active - t))]);
    for (int t = 0; t < k; ++t) {
      c.indices(b, t) = perm[std::size_t(t)];
      c.values(b, t) = (t >= k / 2 && b % 2 == 1) ? 0.f : float(k - t);
    }
  }
  return c;
}

void check_same(const cuda_backend& be, const device_dead_latent_tracker& d, const dead_latent_tracker& h) {
  CHECK(d.tokens_since_fired(be) == h.tokens_since_fired());
  const std::vector<index_t> dead = h.dead_latents();
  CHECK(d.dead_latents(be) == dead);
  CHECK(d.num_dead(be) == h.num_dead());
  const int F = d.d_sae();
  std::vector<std::uint32_t> mask(static_cast<std::size_t>((F + 31) / 32));
  HSAE_CUDA_TRY(
      cudaMemcpy(mask.data(), d.dead_mask().data(), mask.size() * sizeof(std::uint32_t), cudaMemcpyDeviceToHost));
  for (int f = 0; f < F; ++f) {
    INFO("latent " << f);
    CHECK(bool((mask[std::size_t(f / 32)] >> (f % 32)) & 1u) == h.is_dead(f));
  }
}

std::uint64_t read_max_since(const cuda_backend& be, const device_dead_latent_tracker& d) {
  unsigned long long v = 0;
  HSAE_CUDA_TRY(cudaMemcpyAsync(&v, d.max_since_device(), sizeof v, cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
  return v;
}

}  // namespace

TEST_CASE("GPU dead-latent tracker matches the CPU tracker", "[cuda][dead]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  rng gen(3);
  for (const int F : {1, 33, 64, 1000}) {
    INFO("F=" << F);
    const std::int64_t after = 20;
    dead_latent_tracker h(F, after);
    device_dead_latent_tracker d(be, F, after);
    check_same(be, d, h);  // nothing dead at the start
    const int k = std::min(F, 5);
    const int active = std::max(k, F / 2);
    for (int step = 0; step < 6; ++step) {
      const int B = 4 + int(gen.below(6));  // >= 24 tokens over 6 steps: beyond dead_after
      const sparse_code<float> code = random_code(B, k, active, gen);
      device_code dc;
      upload_code(be, code, dc);
      const int limit = step % 3 == 2 ? k / 2 : -1;  // sometimes only the first k/2 ranks count
      h.update(code, limit);
      d.update(be, dc, limit);
      check_same(be, d, h);
      const std::vector<std::int64_t>& since = h.tokens_since_fired();
      CHECK(read_max_since(be, d) == std::uint64_t(*std::max_element(since.begin(), since.end())));
    }
    if (F > 10) CHECK(h.num_dead() > 0);  // latents >= active never fire
  }
}

TEST_CASE("GPU dead-latent tracker: checkpoint round trip", "[cuda][dead]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const int F = 77;
  dead_latent_tracker h(F, 100);
  std::vector<std::int64_t> s(F);
  for (int f = 0; f < F; ++f) s[std::size_t(f)] = std::int64_t(f) * 3;
  h.set_tokens_since_fired(s);
  device_dead_latent_tracker d(be, F, 100);
  d.upload(be, h);
  check_same(be, d, h);
  CHECK(d.num_dead(be) == 77 - 34);  // 3f >= 100 for f >= 34
  dead_latent_tracker back(F, 100);
  d.download(be, back);
  CHECK(back.tokens_since_fired() == s);
  dead_latent_tracker other(F, 5);
  CHECK_THROWS_AS(d.upload(be, other), config_error);
  CHECK_THROWS_AS(d.set_tokens_since_fired(be, std::vector<std::int64_t>(3)), shape_error);
  CHECK_THROWS_AS(device_dead_latent_tracker(be, 0), config_error);
}

TEST_CASE("GPU dead-latent tracker: an observed maximum tightens the host bound", "[cuda][dead]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const int F = 40;
  device_dead_latent_tracker d(be, F, 100);
  // Every latent fires in every batch of 30 rows: counters stay 0, but the host bound
  // (rows counted since the start) passes dead_after after 4 batches.
  sparse_code<float> code;
  code.resize(30, 4);
  for (int b = 0; b < 30; ++b)
    for (int t = 0; t < 4; ++t) {
      code.indices(b, t) = (b * 4 + t) % F;
      code.values(b, t) = float(4 - t);
    }
  device_code dc;
  upload_code(be, code, dc);
  for (int i = 0; i < 4; ++i) d.update(be, dc);
  CHECK(d.may_have_dead());  // 120 rows >= 100: the bound alone cannot exclude it
  const auto at = d.where();
  const std::uint64_t largest = read_max_since(be, d);
  CHECK(largest == 0);
  d.observe(largest, at);
  CHECK_FALSE(d.may_have_dead());
  // Rows counted after the observed update are added back: 0 + 3 * 30 < 100, then 120.
  for (int i = 0; i < 3; ++i) d.update(be, dc);
  d.observe(largest, at);
  CHECK_FALSE(d.may_have_dead());
  device_code none;  // a batch where nothing fires: counters 30 after it
  upload_code(be, sparse_code<float>{row_matrix<float>::Zero(30, 4), index_matrix::Zero(30, 4)}, none);
  d.update(be, none);
  CHECK(d.may_have_dead());  // bound 90 + 30 = 120 (the device maximum is 30)
  const auto at2 = d.where();
  const std::uint64_t largest2 = read_max_since(be, d);
  CHECK(largest2 == 30);
  d.observe(largest2, at2);
  CHECK_FALSE(d.may_have_dead());
  // A value observed on other counters (before an upload) is ignored.
  d.set_tokens_since_fired(be, std::vector<std::int64_t>(F, 150));
  CHECK(d.may_have_dead());
  d.observe(0, at2);
  CHECK(d.may_have_dead());
  CHECK(d.num_dead(be) == F);
}
