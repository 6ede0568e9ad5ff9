// SPDX-License-Identifier: Apache-2.0
// The GPU AuxK loss and backward against cpu/auxk.hpp on the same data: the loss (decoded
// without b_dec, normalised by the residual's variance, alpha, min(n_dead / k_aux, 1)),
// dL/dv and every gradient; the top-k's padded code; the zero-variance and no-dead cases;
// bitwise reproducibility of the deterministic mode.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <hsae/cpu/auxk.hpp>
#include <hsae/cpu/encode.hpp>
#include <hsae/cpu/init.hpp>
#include <hsae/cpu/loss.hpp>
#include <hsae/cuda/auxk.cuh>
#include <hsae/model.hpp>
#include <hsae/rng.hpp>
#include <vector>

#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

/// Model, batch, pre-activations and the main loss's residual (all from the CPU).
struct fixture {
  sae<float> m;
  row_matrix<float> x, pre, residual;
  fixture(int B, int D, int F, int K, std::uint64_t seed) : m(D, F) {
    const cpu_backend be;
    init(be, m, row_matrix<float>(0, D), {.seed = seed, .b_dec = decoder_bias_init::zero});
    rng gen(seed + 5);
    for (Eigen::Index i = 0; i < m.W_enc.size(); ++i) m.W_enc.data()[i] += float(0.3 * gen.normal());
    for (int f = 0; f < F; ++f) m.b_enc[f] = float(0.1 + 0.2 * gen.normal());
    for (int j = 0; j < D; ++j) m.b_dec[j] = float(2 + gen.normal());
    x.resize(B, D);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < D; ++j) x(b, j) = m.b_dec[j] + float(gen.normal());
    sparse_code<float> code;
    encode(be, m, x, K, code, pre);
    residual = x - decode(be, m, code, K);  // x - xhat_K, as loss_workspace::residual
  }
};

struct result {
  double loss;
  row_matrix<float> grad_values, W_enc, W_dec;
  vector<float> b_enc, b_dec;
};

result run_gpu(const cuda_backend& be, const fixture& fx, const sparse_code<float>& aux, std::int64_t n_dead,
               const auxk_options& opt) {
  device_inputs<> d(be, fx.m, fx.x, aux);
  device_matrix<float> dres;
  copy_to_device(be, cref<float>(fx.residual), dres);
  device_auxk_workspace ws;
  const device_matrix<float>& cr = dres;
  auxk_backward(be, d.m, d.x_view(), d.code, cr.view(), n_dead, opt, d.g, ws);
  result r;
  r.loss = read_auxk_loss(be, ws);
  r.grad_values = download(be, ws.grad_values);
  r.W_enc = download(be, d.g.W_enc);
  r.W_dec = download(be, d.g.W_dec);
  r.b_enc = download(be, d.g.b_enc);
  r.b_dec = download(be, d.g.b_dec);
  return r;
}

/// CPU reference and GPU on the CPU's AuxK code; returns the GPU result.
result compare(const cuda_backend& be, const fixture& fx, const std::vector<index_t>& dead, const auxk_options& opt,
               int pad_to = 0) {
  sae_gradients<float> cg;
  cg.zeros_like(fx.m);
  auxk_workspace<float> aws;
  const double closs = auxk_backward(cpu_backend{}, fx.m, fx.x, fx.pre, fx.residual, dead, opt, cg, aws);
  REQUIRE(closs > 0);
  sparse_code<float> aux = aws.code;
  if (pad_to > aux.k()) {  // the GPU top-k's layout: slots beyond the dead latents hold -1 / 0
    sparse_code<float> p;
    p.resize(aux.rows(), pad_to);
    p.values.setZero();
    p.indices.setConstant(-1);
    p.values.leftCols(aux.k()) = aux.values;
    p.indices.leftCols(aux.k()) = aux.indices;
    aux = p;
  }
  const result r = run_gpu(be, fx, aux, std::int64_t(dead.size()), opt);
  CHECK(std::abs(r.loss - closs) <= 1e-5 * closs);
  check_near("dL/dv", r.grad_values.leftCols(aws.grad_values.cols()), aws.grad_values, 2e-5);
  if (pad_to > aws.grad_values.cols())
    CHECK(r.grad_values.rightCols(pad_to - aws.grad_values.cols()).cwiseAbs().maxCoeff() == 0.f);
  check_near("W_dec", r.W_dec, cg.W_dec, 2e-5);
  check_near("W_enc", r.W_enc, cg.W_enc, 2e-5);
  check_near("b_enc", r.b_enc, cg.b_enc, 2e-5);
  check_near("b_dec", r.b_dec, cg.b_dec, 2e-5);
  // Gradients reach dead latents only.
  for (int f = 0; f < fx.m.d_sae(); ++f)
    if (!std::binary_search(dead.begin(), dead.end(), f)) {
      INFO("live latent " << f);
      CHECK(r.W_dec.row(f).cwiseAbs().maxCoeff() == 0.f);
      CHECK(r.W_enc.row(f).cwiseAbs().maxCoeff() == 0.f);
    }
  return r;
}

std::vector<index_t> every(int F, int step, int offset = 0) {
  std::vector<index_t> d;
  for (int f = offset; f < F; f += step) d.push_back(f);
  return d;
}

}  // namespace

TEST_CASE("GPU AuxK matches the CPU", "[cuda][auxk]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const bool small = hsae_test::sanitizer_mode();
  {
    INFO("B=7 D=33 F=60 K=5: k_aux 4 of 20 dead");
    const fixture fx(7, 33, 60, 5, 1);
    compare(be, fx, every(60, 3), auxk_options{.k_aux = 4, .alpha = 0.5});
  }
  {
    INFO("default k_aux = min(512, D/2) = 16, 5 dead: scale 5/16; padded code");
    const fixture fx(7, 33, 40, 3, 2);
    const auto dead = every(40, 8, 1);
    REQUIRE(dead.size() == 5);
    compare(be, fx, dead, auxk_options{});
    compare(be, fx, dead, auxk_options{}, 16);
  }
  if (!small) {
    INFO("B=256 D=768 F=512 K=32, k_aux 100 of 171 dead");
    const fixture fx(256, 768, 512, 32, 3);
    compare(be, fx, every(512, 3, 2), auxk_options{.k_aux = 100});
  }
  if (!small) {
    INFO("B=7 D=2304 F=200 K=64, default k_aux: 50 dead");
    const fixture fx(7, 2304, 200, 64, 4);
    compare(be, fx, every(200, 4), auxk_options{});
  }
}

TEST_CASE("GPU AuxK: deterministic mode is bitwise reproducible; atomics agree", "[cuda][auxk]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const fixture fx(64, 100, 80, 6, 9);
  const auto dead = every(80, 2);
  const auxk_options opt{.k_aux = 12};
  const result a = compare(be, fx, dead, opt);
  const result b = compare(be, fx, dead, opt);
  CHECK(same_bits(a.W_dec, b.W_dec));
  CHECK(same_bits(a.W_enc, b.W_enc));
  CHECK(same_bits(a.b_enc, b.b_enc));
  CHECK(same_bits(a.b_dec, b.b_dec));
  CHECK(same_bits(a.grad_values, b.grad_values));
  CHECK(std::memcmp(&a.loss, &b.loss, sizeof(double)) == 0);
  cuda_backend fast(stream.s);
  fast.deterministic = false;
  compare(fast, fx, dead, opt);
}

TEST_CASE("GPU AuxK: nothing dead, alpha 0, or a zero-variance residual give 0 and no gradient", "[cuda][auxk]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const fixture fx(5, 20, 30, 3, 6);
  sparse_code<float> aux;
  aux.resize(5, 4);
  aux.values.setConstant(1.f);
  for (int b = 0; b < 5; ++b)
    for (int t = 0; t < 4; ++t) aux.indices(b, t) = 2 * t;
  auto zero_grads = [](const result& r) {
    return r.W_dec.cwiseAbs().maxCoeff() == 0.f && r.W_enc.cwiseAbs().maxCoeff() == 0.f &&
           r.b_enc.cwiseAbs().maxCoeff() == 0.f && r.b_dec.cwiseAbs().maxCoeff() == 0.f;
  };
  {
    const result r = run_gpu(be, fx, aux, 0, auxk_options{.k_aux = 4});
    CHECK(r.loss == 0.0);
    CHECK(zero_grads(r));
  }
  {
    const result r = run_gpu(be, fx, aux, 10, auxk_options{.k_aux = 4, .alpha = 0.0});
    CHECK(r.loss == 0.0);
    CHECK(zero_grads(r));
  }
  {
    fixture flat = fx;  // every row's residual equal: zero variance
    for (int b = 1; b < 5; ++b) flat.residual.row(b) = flat.residual.row(0);
    const result r = run_gpu(be, flat, aux, 10, auxk_options{.k_aux = 4});
    CHECK(r.loss == 0.0);
    CHECK(zero_grads(r));
    sae_gradients<float> cg;
    cg.zeros_like(flat.m);
    auxk_workspace<float> aws;
    CHECK(auxk_backward(cpu_backend{}, flat.m, flat.x, flat.pre, flat.residual, every(30, 3), auxk_options{.k_aux = 4},
                        cg, aws) == 0.0);
  }
  CHECK_THROWS_AS(run_gpu(be, fx, aux, 10, auxk_options{.k_aux = 3}), shape_error);  // k=4 > k_aux
  CHECK_THROWS_AS(run_gpu(be, fx, aux, 10, auxk_options{.k_aux = 4, .alpha = -1}), config_error);
}
