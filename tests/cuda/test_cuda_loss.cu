// SPDX-License-Identifier: Apache-2.0
// The GPU schedule loss (forward, decoder-side backward, decoder gradient) against the CPU
// reference cpu/loss.hpp on the same data, the docs/OBJECTIVE.md hand-checked vector, and
// bitwise determinism of the deterministic mode (run to run and across staging chunk
// sizes).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <hsae/cpu/init.hpp>
#include <hsae/cpu/loss.hpp>
#include <hsae/cuda/loss.cuh>
#include <hsae/k_schedule.hpp>
#include <hsae/model.hpp>
#include <hsae/rng.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

/// A random model (unit decoder rows), batch, and a code with distinct latents per row,
/// values descending; `zero_tail` rows end with zeros (fewer than k positives).
struct problem {
  sae<float> m;
  row_matrix<float> x;
  sparse_code<float> code;
};

problem make_problem(int B, int D, int F, int kc, std::uint64_t seed) {
  problem p;
  p.m.resize(D, F);
  init(cpu_backend{}, p.m, row_matrix<float>(0, D), {.seed = seed, .b_dec = decoder_bias_init::zero});
  rng gen(seed * 31 + 7);
  for (int j = 0; j < D; ++j) p.m.b_dec[j] = float(0.3 * gen.normal());
  p.x.resize(B, D);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < D; ++j) p.x(b, j) = float(gen.normal());
  p.code.resize(B, kc);
  std::vector<int> perm(static_cast<std::size_t>(F));
  for (int b = 0; b < B; ++b) {
    for (int f = 0; f < F; ++f) perm[std::size_t(f)] = f;
    for (int t = 0; t < kc; ++t) {  // partial Fisher-Yates: kc distinct latents
      const int s = t + int(gen.below(std::uint64_t(F - t)));
      std::swap(perm[std::size_t(t)], perm[std::size_t(s)]);
    }
    std::vector<float> v(static_cast<std::size_t>(kc));
    for (auto& e : v) e = float(std::abs(gen.normal()) * 0.5);
    std::sort(v.begin(), v.end(), [](float a, float c) { return a > c; });
    // Every third row has fewer than kc positives: its last third is zero.
    if (b % 3 == 1)
      for (int t = kc - kc / 3; t < kc; ++t) v[std::size_t(t)] = 0.f;
    for (int t = 0; t < kc; ++t) {
      p.code.values(b, t) = v[std::size_t(t)];
      p.code.indices(b, t) = perm[std::size_t(t)];
    }
  }
  return p;
}

struct gpu_result {
  loss_stats st;
  row_matrix<float> grad_values, residual, gW_dec;
  vector<float> gb_dec;
};

template <class T, class S>
gpu_result run_gpu(const cuda_backend& be, const problem& p, const S& schedule, std::size_t staging_bytes,
                   bool backward = true) {
  device_inputs<T> d(be, p.m, p.x, p.code);
  device_loss_workspace ws;
  ws.staging_bytes = staging_bytes;
  if (backward)
    hierarchical_loss_backward(be, d.m, d.x_view(), d.code, schedule, d.g, ws);
  else
    hierarchical_loss(be, d.m, d.x_view(), d.code, schedule, ws);
  gpu_result r;
  r.st = read_loss_stats(be, ws);
  r.residual = download(be, ws.residual);
  if (backward) {
    r.grad_values = download(be, ws.grad_values);
    r.gW_dec = download(be, d.g.W_dec);
    r.gb_dec = download(be, d.g.b_dec);
  }
  return r;
}

template <class S>
void compare_with_cpu(const cuda_backend& be, const problem& p, const S& schedule, double tol = 2e-5) {
  const cpu_backend cbe;
  sae_gradients<float> cg;
  cg.zeros_like(p.m);
  loss_workspace<float> cws;
  const loss_stats cst = hierarchical_loss_backward(cbe, p.m, p.x, p.code, schedule, cg, cws);

  const gpu_result r = run_gpu<float>(be, p, schedule, std::size_t(64) << 20);
  REQUIRE(r.st.level_sse.size() == cst.level_sse.size());
  for (std::size_t l = 0; l < cst.level_sse.size(); ++l) {
    INFO("level " << l << " (k=" << cst.level_k[l] << ")");
    CHECK(r.st.level_k[l] == cst.level_k[l]);
    CHECK(std::abs(r.st.level_sse[l] - cst.level_sse[l]) <= tol * cst.level_sse[l] + 1e-30);
  }
  CHECK(std::abs(r.st.loss - cst.loss) <= tol * cst.loss);
  check_near("residual", r.residual, cws.residual, tol);
  check_near("dL/dv", r.grad_values, cws.grad_values, 5 * tol);
  check_near("dL/dW_dec", r.gW_dec, cg.W_dec, 5 * tol);
  check_near("dL/db_dec", r.gb_dec, cg.b_dec, 5 * tol);

  // Forward only: the same level errors and residual.
  const gpu_result f = run_gpu<float>(be, p, schedule, std::size_t(64) << 20, false);
  for (std::size_t l = 0; l < cst.level_sse.size(); ++l) CHECK(f.st.level_sse[l] == r.st.level_sse[l]);
  CHECK(same_bits(f.residual, r.residual));

  // Fast mode (atomics): same values within the tolerance.
  cuda_backend fast(be.stream());
  fast.deterministic = false;
  const gpu_result a = run_gpu<float>(fast, p, schedule, std::size_t(64) << 20);
  check_near("dL/dv (fast)", a.grad_values, cws.grad_values, 5 * tol);
  check_near("dL/dW_dec (fast)", a.gW_dec, cg.W_dec, 5 * tol);
  check_near("dL/db_dec (fast)", a.gb_dec, cg.b_dec, 5 * tol);
  CHECK(std::abs(a.st.loss - cst.loss) <= tol * cst.loss);
}

}  // namespace

// ---------------------------------------------------------------------------------------

TEST_CASE("GPU loss: the docs/OBJECTIVE.md hand-checked vector", "[cuda][loss]") {
  hsae_test::test_stream stream;
  for (const bool det : {true, false}) {
    cuda_backend be(stream.s);
    be.deterministic = det;
    problem p;
    p.m.resize(2, 2);
    p.m.W_dec << 1.f, 0.f, 0.f, 1.f;
    p.m.W_enc = p.m.W_dec;
    p.x.resize(1, 2);
    p.x << 1.f, 0.f;
    p.code.resize(1, 2);
    p.code.indices << 0, 1;
    p.code.values << 0.8f, 0.3f;
    const double rel = 2.4e-7;
    auto close = [&](double got, double want) { return std::abs(got - want) <= rel * std::abs(want) + 1e-12; };

    INFO((det ? "deterministic" : "atomics"));
    {  // all prefixes (1,1),(2,1)
      const gpu_result r = run_gpu<float>(be, p, all_prefixes<2>{}, std::size_t(64) << 20);
      CHECK(close(r.st.loss, 0.0425));
      REQUIRE(r.st.level_sse.size() == 2);
      CHECK(close(r.st.level_sse[0], 0.04));
      CHECK(close(r.st.level_sse[1], 0.13));
      CHECK(close(r.grad_values(0, 0), -0.2));
      CHECK(close(r.grad_values(0, 1), 0.15));
      CHECK(close(r.gW_dec(0, 0), -0.16));
      CHECK(close(r.gW_dec(0, 1), 0.12));
      CHECK(close(r.gW_dec(1, 0), -0.03));
      CHECK(close(r.gW_dec(1, 1), 0.045));
      CHECK(close(r.gb_dec[0], -0.2));
      CHECK(close(r.gb_dec[1], 0.15));
      CHECK(close(r.residual(0, 0), 0.2));  // x - xhat_2 = [1,0] - [0.8,0.3]
      CHECK(close(r.residual(0, 1), -0.3));
    }
    {  // plain TopK: the single level (2,1)
      const gpu_result r = run_gpu<float>(be, p, top_k<2>{}, std::size_t(64) << 20);
      CHECK(close(r.st.loss, 0.065));
      REQUIRE(r.st.level_sse.size() == 1);
      CHECK(close(r.st.level_sse[0], 0.13));
      CHECK(close(r.grad_values(0, 0), -0.2));
      CHECK(close(r.grad_values(0, 1), 0.3));
      CHECK(close(r.gW_dec(0, 0), -0.16));
      CHECK(close(r.gW_dec(0, 1), 0.24));
      CHECK(close(r.gW_dec(1, 0), -0.06));
      CHECK(close(r.gW_dec(1, 1), 0.09));
      CHECK(close(r.gb_dec[0], -0.2));
      CHECK(close(r.gb_dec[1], 0.3));
    }
  }
}

TEST_CASE("GPU loss matches the CPU on random shapes", "[cuda][loss]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const bool small = hsae_test::sanitizer_mode();
  struct shape {
    int B, D, F, K, kc;
  };
  // Awkward shapes: B = 1, K not a power of two, D not a multiple of 32, D wider than one
  // 4096-column tile, code wider than k_max.
  const std::vector<shape> shapes =
      small ? std::vector<shape>{{1, 1, 8, 1, 1}, {7, 33, 50, 5, 7}}
            : std::vector<shape>{{1, 1, 8, 1, 1},          {7, 33, 50, 5, 7},      {256, 768, 512, 64, 64},
                                 {7, 2304, 300, 100, 100}, {1, 2304, 128, 64, 70}, {7, 5000, 64, 5, 5},
                                 {256, 33, 200, 100, 100}};
  std::uint64_t seed = 1;
  for (const shape s : shapes) {
    const problem p = make_problem(s.B, s.D, s.F, s.kc, seed++);
    INFO("B=" << s.B << " D=" << s.D << " F=" << s.F << " K=" << s.K << " kc=" << s.kc);
    compare_with_cpu(be, p, dynamic_k_schedule::all_prefixes(s.K));
    compare_with_cpu(be, p, dynamic_k_schedule::top_k(s.K));
    std::vector<schedule_level> lv;  // weighted subset
    if (s.K >= 4) lv.push_back({s.K / 4, 2.0});
    if (s.K >= 2 && s.K / 2 != s.K / 4) lv.push_back({s.K / 2, 0.5});
    lv.push_back({s.K, 1.25});
    compare_with_cpu(be, p, dynamic_k_schedule(lv));
  }
}

TEST_CASE("GPU loss with compile-time schedules", "[cuda][loss]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const problem p = make_problem(7, 100, 90, 16, 42);
  compare_with_cpu(be, p, all_prefixes<5>{});
  compare_with_cpu(be, p, dynamic_k_schedule::multi_topk(4));
  compare_with_cpu(be, p, k_schedule<1, 3, 8, 16>{});
}

TEST_CASE("GPU loss: deterministic mode is bitwise reproducible, for any staging size", "[cuda][loss]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const bool small = hsae_test::sanitizer_mode();
  const problem p = small ? make_problem(9, 70, 40, 6, 5) : make_problem(64, 1000, 96, 37, 5);
  const auto s = dynamic_k_schedule::all_prefixes(p.code.k());
  const gpu_result a = run_gpu<float>(be, p, s, std::size_t(64) << 20);
  const gpu_result b = run_gpu<float>(be, p, s, std::size_t(64) << 20);
  // 1 byte: one row per chunk. The per-latent sums run in pair order either way.
  const gpu_result c = run_gpu<float>(be, p, s, 1);
  for (const gpu_result* o : {&b, &c}) {
    CHECK(same_bits(a.gW_dec, o->gW_dec));
    CHECK(same_bits(a.gb_dec, o->gb_dec));
    CHECK(same_bits(a.grad_values, o->grad_values));
    CHECK(same_bits(a.residual, o->residual));
    CHECK(std::memcmp(&a.st.loss, &o->st.loss, sizeof(double)) == 0);
  }
  // Latents are shared between rows here (F small), so the sums really are reduced.
  CHECK(a.gW_dec.norm() > 0);
}

TEST_CASE("GPU loss with bf16 and fp16 storage computes in fp32 on the rounded inputs", "[cuda][loss]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  problem p = make_problem(7, 300, 64, 9, 11);
  // The reference sees exactly what the device reads: W_dec and x rounded to bf16.
  problem q = p;
  for (Eigen::Index i = 0; i < q.m.W_dec.size(); ++i)
    q.m.W_dec.data()[i] = __bfloat162float(__float2bfloat16_rn(q.m.W_dec.data()[i]));
  for (Eigen::Index i = 0; i < q.x.size(); ++i) q.x.data()[i] = __bfloat162float(__float2bfloat16_rn(q.x.data()[i]));
  const auto s = dynamic_k_schedule::all_prefixes(9);
  sae_gradients<float> cg;
  cg.zeros_like(q.m);
  loss_workspace<float> cws;
  const loss_stats cst = hierarchical_loss_backward(cpu_backend{}, q.m, q.x, q.code, s, cg, cws);
  const gpu_result r = run_gpu<__nv_bfloat16>(be, p, s, std::size_t(64) << 20);
  CHECK(std::abs(r.st.loss - cst.loss) <= 2e-5 * cst.loss);
  check_near("dL/dv (bf16)", r.grad_values, cws.grad_values, 1e-4);
  check_near("dL/dW_dec (bf16)", r.gW_dec, cg.W_dec, 1e-4);
  check_near("dL/db_dec (bf16)", r.gb_dec, cg.b_dec, 1e-4);

  problem h = p;
  for (Eigen::Index i = 0; i < h.m.W_dec.size(); ++i)
    h.m.W_dec.data()[i] = __half2float(__float2half_rn(h.m.W_dec.data()[i]));
  for (Eigen::Index i = 0; i < h.x.size(); ++i) h.x.data()[i] = __half2float(__float2half_rn(h.x.data()[i]));
  const loss_stats hst = hierarchical_loss(cpu_backend{}, h.m, h.x, h.code, s, cws);
  const gpu_result rh = run_gpu<__half>(be, p, s, std::size_t(64) << 20, false);
  CHECK(std::abs(rh.st.loss - hst.loss) <= 2e-5 * hst.loss);
}

TEST_CASE("GPU loss rejects inconsistent shapes", "[cuda][loss]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const problem p = make_problem(3, 10, 12, 4, 3);
  device_sae<float> dm;
  dm.upload(be, p.m);
  device_code dc;
  upload_code(be, p.code, dc);
  device_loss_workspace ws;
  device_gradients<> g;
  g.zeros_like(be, dm);
  device_matrix<float> wrong_width;
  copy_to_device(be, cref<float>(row_matrix<float>::Zero(3, 11)), wrong_width);
  const device_matrix<float>& cw = wrong_width;
  CHECK_THROWS_AS(hierarchical_loss(be, dm, cw.view(), dc, top_k<4>{}, ws), shape_error);
  device_matrix<float> dx;
  copy_to_device(be, cref<float>(p.x), dx);
  const device_matrix<float>& cx = dx;
  CHECK_THROWS_AS(hierarchical_loss(be, dm, cx.view(), dc, top_k<5>{}, ws), config_error);  // k_max > code k
  device_gradients<> small_g;
  small_g.W_dec.resize(be, 5, 10);
  small_g.b_dec.resize(be, 10);
  CHECK_THROWS_AS(hierarchical_loss_backward(be, dm, cx.view(), dc, top_k<4>{}, small_g, ws), shape_error);
  device_matrix<float> gv(be, 3, 3);
  const device_matrix<float>& cgv = gv;
  CHECK_THROWS_AS(encoder_backward(be, dm, cx.view(), dc, cgv.view(), g, ws.scratch), shape_error);
  be.synchronize();
}
