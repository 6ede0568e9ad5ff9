// SPDX-License-Identifier: Apache-2.0
// The GPU sparse encoder backward against cpu/loss.hpp's encoder_backward (both modes),
// the latent grouping against cpu::latent_pairs, the deterministic reductions against
// plain host sums, and bitwise reproducibility of the deterministic mode.
#include <thrust/device_vector.h>
#include <thrust/host_vector.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <hsae/cpu/encode.hpp>
#include <hsae/cpu/init.hpp>
#include <hsae/cpu/latent_pairs.hpp>
#include <hsae/cpu/loss.hpp>
#include <hsae/cuda/detail/sparse_backward.cuh>
#include <hsae/cuda/loss.cuh>
#include <hsae/model.hpp>
#include <hsae/rng.hpp>
#include <vector>

#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

struct problem {
  sae<float> m;
  row_matrix<float> x, pre;
  sparse_code<float> code;
  row_matrix<float> grad_values;
};

/// A random model whose encoder differs from its decoder, b_enc so that some rows have
/// fewer than k positive pre-activations (zeros in the code), the CPU encoder's code, and
/// random dL/dv (zero in a few places).
problem make_problem(int B, int D, int F, int k, std::uint64_t seed) {
  problem p;
  p.m.resize(D, F);
  const cpu_backend be;
  init(be, p.m, row_matrix<float>(0, D), {.seed = seed, .b_dec = decoder_bias_init::zero});
  rng gen(seed * 17 + 3);
  for (Eigen::Index i = 0; i < p.m.W_enc.size(); ++i) p.m.W_enc.data()[i] += float(0.2 * gen.normal());
  for (int f = 0; f < F; ++f) p.m.b_enc[f] = float(-0.1 + 0.1 * gen.normal());
  for (int j = 0; j < D; ++j) p.m.b_dec[j] = float(0.5 * gen.normal());
  p.x.resize(B, D);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < D; ++j) p.x(b, j) = p.m.b_dec[j] + float(gen.normal()) * (b % 4 == 3 ? 0.01f : 1.f);
  encode(be, p.m, p.x, k, p.code, p.pre);
  p.grad_values.resize(B, k);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < k; ++t) p.grad_values(b, t) = (b + t) % 7 == 0 ? 0.f : float(gen.normal() * 1e-3);
  return p;
}

struct grads_host {
  row_matrix<float> W_enc;
  vector<float> b_enc, b_dec;
};

grads_host run_gpu(const cuda_backend& be, const problem& p, const sae_gradients<float>& start) {
  device_inputs<> d(be, p.m, p.x, p.code);
  device_matrix<float> dgv;
  copy_to_device(be, cref<float>(p.grad_values), dgv);
  copy_to_device(be, cref<float>(start.W_enc), d.g.W_enc);
  copy_to_device(be, cvref<float>(start.b_enc), d.g.b_enc);
  copy_to_device(be, cvref<float>(start.b_dec), d.g.b_dec);
  device_scratch scratch;
  const device_matrix<float>& cgv = dgv;
  encoder_backward(be, d.m, d.x_view(), d.code, cgv.view(), d.g, scratch);
  return {download(be, d.g.W_enc), download(be, d.g.b_enc), download(be, d.g.b_dec)};
}

void compare_with_cpu(const cuda_backend& be, const problem& p) {
  // Gradients start non-zero: the kernels add to them.
  sae_gradients<float> g0;
  g0.zeros_like(p.m);
  rng gen(99);
  for (Eigen::Index i = 0; i < g0.W_enc.size(); ++i) g0.W_enc.data()[i] = float(gen.normal() * 1e-3);
  for (Eigen::Index i = 0; i < g0.b_enc.size(); ++i) g0.b_enc[i] = float(gen.normal() * 1e-3);
  for (Eigen::Index i = 0; i < g0.b_dec.size(); ++i) g0.b_dec[i] = float(gen.normal() * 1e-3);
  sae_gradients<float> cg = g0;
  cpu::latent_pairs pairs;
  encoder_backward(cpu_backend{}, p.m, p.x, p.code, p.grad_values, cg, pairs);

  const grads_host d = run_gpu(be, p, g0);
  check_near("dL/dW_enc", d.W_enc, cg.W_enc, 1e-5);
  check_near("dL/db_enc", d.b_enc, cg.b_enc, 1e-5);
  check_near("dL/db_dec", d.b_dec, cg.b_dec, 1e-5);

  cuda_backend fast(be.stream());
  fast.deterministic = false;
  const grads_host a = run_gpu(fast, p, g0);
  check_near("dL/dW_enc (fast)", a.W_enc, cg.W_enc, 1e-5);
  check_near("dL/db_enc (fast)", a.b_enc, cg.b_enc, 1e-5);
  check_near("dL/db_dec (fast)", a.b_dec, cg.b_dec, 1e-5);

  const grads_host d2 = run_gpu(be, p, g0);
  CHECK(same_bits(d.W_enc, d2.W_enc));
  CHECK(same_bits(d.b_enc, d2.b_enc));
  CHECK(same_bits(d.b_dec, d2.b_dec));
}

}  // namespace

TEST_CASE("latent pairs: grouped by latent, pair order inside a group", "[cuda][backward]") {
  hsae_test::test_stream stream;
  rng gen(5);
  for (const auto [B, k, F] :
       {std::array{1, 1, 1}, std::array{7, 5, 13}, std::array{64, 33, 32}, std::array{256, 64, 1000}}) {
    INFO("B=" << B << " k=" << k << " F=" << F);
    index_matrix idx(B, k);
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < k; ++t) idx(b, t) = index_t(gen.below(std::uint64_t(F)));
    // A few AuxK-style padding slots (-1) belong to no latent.
    if (k > 2) idx(0, k - 1) = -1;
    cpu::latent_pairs ref;
    index_matrix clean = idx;
    for (int b = 0; b < B; ++b)
      for (int t = 0; t < k; ++t)
        if (clean(b, t) < 0) clean(b, t) = 0;  // the CPU grouping needs valid ids
    ref.build(clean, F);
    const int n = B * k;
    thrust::device_vector<index_t> d_idx(idx.data(), idx.data() + n);
    const std::size_t bytes = hsae::cuda::detail::latent_pairs_workspace_bytes(n, F);
    thrust::device_vector<unsigned char> ws(bytes);
    const auto lp = hsae::cuda::detail::build_latent_pairs(thrust::raw_pointer_cast(d_idx.data()), n, F,
                                                           thrust::raw_pointer_cast(ws.data()), bytes, stream.s);
    HSAE_CUDA_TRY(cudaStreamSynchronize(stream.s));
    std::vector<int> offsets(static_cast<std::size_t>(F) + 1), pairs(static_cast<std::size_t>(n));
    HSAE_CUDA_TRY(cudaMemcpy(offsets.data(), lp.offsets, offsets.size() * sizeof(int), cudaMemcpyDeviceToHost));
    HSAE_CUDA_TRY(cudaMemcpy(pairs.data(), lp.pairs, pairs.size() * sizeof(int), cudaMemcpyDeviceToHost));
    // Expected: the CPU grouping without the padding pairs (which sort last, past offsets[F]).
    const int pad = (k > 2) ? 1 : 0;
    CHECK(offsets[std::size_t(F)] == n - pad);
    for (int f = 0; f < F; ++f) {
      std::vector<int> want;
      for (std::int64_t q = ref.begin(f); q < ref.end(f); ++q) {
        const std::int64_t pid = ref.pairs[std::size_t(q)];
        if (idx.data()[pid] >= 0) want.push_back(int(pid));
      }
      const std::vector<int> got(pairs.begin() + offsets[std::size_t(f)], pairs.begin() + offsets[std::size_t(f) + 1]);
      INFO("latent " << f);
      CHECK(got == want);
    }
    if (pad) CHECK(pairs[std::size_t(n - 1)] == k - 1);
  }
}

TEST_CASE("deterministic column and vector sums", "[cuda][backward]") {
  hsae_test::test_stream stream;
  rng gen(8);
  for (const auto [n, D] : {std::array{1, 1}, std::array{17, 33}, std::array{1000, 70}}) {
    std::vector<float> h(std::size_t(n) * std::size_t(D));
    for (auto& v : h) v = float(gen.normal());
    thrust::device_vector<float> d(h.begin(), h.end());
    std::vector<double> start(static_cast<std::size_t>(D));
    for (auto& v : start) v = gen.normal();
    thrust::device_vector<double> out(start.begin(), start.end());
    hsae::cuda::detail::column_sum<float, double, double>(thrust::raw_pointer_cast(d.data()), n, D,
                                                          thrust::raw_pointer_cast(out.data()), -2.0, true, stream.s);
    thrust::device_vector<double> total(1);
    hsae::cuda::detail::vector_sum<float, double>(thrust::raw_pointer_cast(d.data()), std::int64_t(n) * D,
                                                  thrust::raw_pointer_cast(total.data()), stream.s);
    HSAE_CUDA_TRY(cudaStreamSynchronize(stream.s));
    const thrust::host_vector<double> got = out;
    double all = 0;
    for (int j = 0; j < D; ++j) {
      double s = 0;
      for (int r = 0; r < n; ++r) s += double(h[std::size_t(r) * std::size_t(D) + std::size_t(j)]);
      all += s;
      CHECK(std::abs(got[std::size_t(j)] - (start[std::size_t(j)] - 2.0 * s)) <= 1e-9 * (1 + std::abs(s)));
    }
    const double t = total[0];
    CHECK(std::abs(t - all) <= 1e-9 * (1 + std::abs(all)));
  }
}

TEST_CASE("GPU encoder backward matches the CPU", "[cuda][backward]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const bool small = hsae_test::sanitizer_mode();
  struct shape {
    int B, D, F, k;
  };
  const std::vector<shape> shapes =
      small ? std::vector<shape>{{1, 1, 4, 1}, {7, 33, 40, 5}}
            : std::vector<shape>{{1, 1, 4, 1},        {7, 33, 40, 5},      {256, 768, 600, 64},
                                 {7, 2304, 300, 100}, {256, 33, 128, 100}, {1, 2304, 70, 64}};
  std::uint64_t seed = 1;
  for (const shape s : shapes) {
    INFO("B=" << s.B << " D=" << s.D << " F=" << s.F << " k=" << s.k);
    const problem p = make_problem(s.B, s.D, s.F, s.k, seed++);
    // The fixture really has zeros in the code (fewer than k positives in some rows) when
    // k is a sizeable part of F.
    if (s.k * 2 > s.F) CHECK((p.code.values.array() == 0.f).any());
    compare_with_cpu(be, p);
  }
}

TEST_CASE("GPU loss + encoder backward: the full sparse backward against the CPU", "[cuda][backward]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const problem p = make_problem(33, 200, 150, 20, 77);
  const auto sched = dynamic_k_schedule::geometric(2, 20);
  sae_gradients<float> cg;
  cg.zeros_like(p.m);
  loss_workspace<float> cws;
  hierarchical_loss_backward(cpu_backend{}, p.m, p.x, p.code, sched, cg, cws);
  encoder_backward(cpu_backend{}, p.m, p.x, p.code, cws.grad_values, cg, cws.pairs);

  device_inputs<> d(be, p.m, p.x, p.code);
  device_loss_workspace ws;
  hierarchical_loss_backward(be, d.m, d.x_view(), d.code, sched, d.g, ws);
  const device_matrix<float>& cgv = ws.grad_values;
  encoder_backward(be, d.m, d.x_view(), d.code, cgv.view(), d.g, ws.scratch);
  check_near("W_enc", download(be, d.g.W_enc), cg.W_enc, 5e-5);
  check_near("W_dec", download(be, d.g.W_dec), cg.W_dec, 5e-5);
  check_near("b_enc", download(be, d.g.b_enc), cg.b_enc, 5e-5);
  check_near("b_dec", download(be, d.g.b_dec), cg.b_dec, 5e-5);
}
