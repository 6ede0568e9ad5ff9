// SPDX-License-Identifier: Apache-2.0
// The GPU constrained Adam against cpu/optimizer.hpp over several steps: weights, moments,
// the projected decoder gradient, the gradient norm, clipping, warm-up, the options that
// switch the constraint off, storage copies, and the non-finite-gradient guard.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <hsae/cpu/init.hpp>
#include <hsae/cpu/optimizer.hpp>
#include <hsae/cuda/optimizer.cuh>
#include <hsae/model.hpp>
#include <hsae/optimizer.hpp>
#include <hsae/rng.hpp>
#include <limits>
#include <type_traits>
#include <vector>

#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

sae<float> random_model(int D, int F, std::uint64_t seed) {
  sae<float> m(D, F);
  init(cpu_backend{}, m, row_matrix<float>(0, D), {.seed = seed, .b_dec = decoder_bias_init::zero});
  rng gen(seed + 1);
  for (Eigen::Index i = 0; i < m.W_enc.size(); ++i) m.W_enc.data()[i] += float(0.1 * gen.normal());
  for (int f = 0; f < F; ++f) m.b_enc[f] = float(0.1 * gen.normal());
  for (int j = 0; j < D; ++j) m.b_dec[j] = float(gen.normal());
  return m;
}

sae_gradients<float> random_grads(const sae<float>& m, rng& gen, double scale) {
  sae_gradients<float> g;
  g.zeros_like(m);
  for (Eigen::Index i = 0; i < g.W_enc.size(); ++i) g.W_enc.data()[i] = float(scale * gen.normal());
  for (Eigen::Index i = 0; i < g.W_dec.size(); ++i) g.W_dec.data()[i] = float(scale * gen.normal());
  for (Eigen::Index i = 0; i < g.b_enc.size(); ++i) g.b_enc[i] = float(scale * gen.normal());
  for (Eigen::Index i = 0; i < g.b_dec.size(); ++i) g.b_dec[i] = float(scale * gen.normal());
  // A large component along the atom, which the projection removes.
  g.W_dec.row(0) += float(50 * scale) * m.W_dec.row(0);
  return g;
}

void upload_grads(const cuda_backend& be, const sae_gradients<float>& h, device_gradients<>& d) {
  copy_to_device(be, cref<float>(h.W_enc), d.W_enc);
  copy_to_device(be, cref<float>(h.W_dec), d.W_dec);
  copy_to_device(be, cvref<float>(h.b_enc), d.b_enc);
  copy_to_device(be, cvref<float>(h.b_dec), d.b_dec);
}

template <class T>
void compare_steps(const adam_options& opt, int D, int F, double grad_scale, int steps) {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  sae<float> hm = random_model(D, F, 7);
  device_sae<T> dm;
  dm.upload(be, hm);
  adam<float> ha(hm, opt);
  device_adam<T> da(be, dm, opt);
  rng gen(11);
  for (int s = 0; s < steps; ++s) {
    INFO("step " << s);
    sae_gradients<float> hg = random_grads(hm, gen, grad_scale);
    device_gradients<> dg;
    dg.zeros_like(be, dm);
    upload_grads(be, hg, dg);
    const double hnorm = ha.step(cpu_backend{}, hm, hg);
    da.step(be, dm, dg);
    const double dnorm = da.check_last_step(be);
    CHECK(std::abs(dnorm - hnorm) <= 1e-6 * hnorm);
    CHECK(da.steps() == ha.steps());
    CHECK(da.last_lr() == ha.last_lr());
    check_near("projected W_dec gradient", download(be, dg.W_dec), hg.W_dec, 1e-5);
    sae<float> back;
    dm.download(be, back);
    check_near("W_enc", back.W_enc, hm.W_enc, 2e-6);
    check_near("W_dec", back.W_dec, hm.W_dec, 2e-6);
    check_near("b_enc", back.b_enc, hm.b_enc, 2e-6);
    check_near("b_dec", back.b_dec, hm.b_dec, 2e-6);
    sae_gradients<float> m1, m2;
    da.get_state(be, m1, m2);
    check_near("first moment W_dec", m1.W_dec, ha.first_moment().W_dec, 1e-5);
    check_near("second moment W_enc", m2.W_enc, ha.second_moment().W_enc, 1e-5);
    check_near("first moment b_dec", m1.b_dec, ha.first_moment().b_dec, 1e-5);
    if constexpr (!std::is_same_v<T, float>) {
      // The storage copies are the rounded masters.
      row_matrix<float> s1;
      copy_to_host(be, dm.W_dec_s, s1);
      for (Eigen::Index i = 0; i < s1.size(); ++i)
        REQUIRE(s1.data()[i] == storage_traits<T>::to_float(storage_traits<T>::from_float(back.W_dec.data()[i])));
      copy_to_host(be, dm.W_enc_s, s1);
      for (Eigen::Index i = 0; i < s1.size(); ++i)
        REQUIRE(s1.data()[i] == storage_traits<T>::to_float(storage_traits<T>::from_float(back.W_enc.data()[i])));
    }
  }
}

}  // namespace

TEST_CASE("GPU Adam matches the CPU optimizer", "[cuda][adam]") {
  adam_options opt;
  opt.lr = 1e-2;
  opt.warmup_steps = 2;
  SECTION("defaults: projection and renormalisation, D = 1") { compare_steps<float>(opt, 1, 5, 1e-2, 3); }
  SECTION("awkward widths") { compare_steps<float>(opt, 33, 70, 1e-2, 3); }
  SECTION("wide rows, beyond the register cache") { compare_steps<float>(opt, 9000, 3, 1e-2, 2); }
  SECTION("d_model = 768, with decay") {
    opt.total_steps = 4;
    opt.decay_steps = 3;
    opt.final_lr_fraction = 0.1;
    compare_steps<float>(opt, 768, 64, 1e-3, 4);
  }
  SECTION("clipping") {
    opt.max_grad_norm = 0.05;
    compare_steps<float>(opt, 100, 40, 1e-2, 3);
  }
  SECTION("constraint off") {
    opt.project_decoder_gradient = false;
    opt.normalize_decoder = false;
    compare_steps<float>(opt, 50, 20, 1e-2, 2);
  }
  SECTION("bf16 storage copies") { compare_steps<__nv_bfloat16>(opt, 65, 30, 1e-2, 2); }
}

TEST_CASE("GPU Adam: a non-finite gradient changes nothing and is reported", "[cuda][adam]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const sae<float> hm = random_model(20, 10, 3);
  device_sae<float> dm;
  dm.upload(be, hm);
  device_adam<float> da(be, dm, adam_options{});
  rng gen(4);
  sae_gradients<float> hg = random_grads(hm, gen, 1e-2);
  hg.W_enc(3, 4) = std::numeric_limits<float>::quiet_NaN();
  device_gradients<> dg;
  dg.zeros_like(be, dm);
  upload_grads(be, hg, dg);
  da.step(be, dm, dg);
  CHECK(da.steps() == 1);
  CHECK_THROWS_AS(da.check_last_step(be), numeric_error);
  CHECK(da.steps() == 0);
  sae<float> back;
  dm.download(be, back);
  CHECK(back.W_enc == hm.W_enc);
  CHECK(back.W_dec == hm.W_dec);
  CHECK(back.b_enc == hm.b_enc);
  CHECK(back.b_dec == hm.b_dec);
  sae_gradients<float> m1, m2;
  da.get_state(be, m1, m2);
  CHECK(m1.W_enc.cwiseAbs().maxCoeff() == 0.f);
  CHECK(m2.W_dec.cwiseAbs().maxCoeff() == 0.f);
}

TEST_CASE("GPU Adam: checkpointed state continues like the CPU", "[cuda][adam]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  adam_options opt;
  opt.lr = 5e-3;
  opt.warmup_steps = 0;
  sae<float> hm = random_model(40, 12, 9);
  adam<float> ha(hm, opt);
  rng gen(21);
  sae_gradients<float> g1 = random_grads(hm, gen, 1e-2);
  ha.step(cpu_backend{}, hm, g1);
  // Resume on the GPU from the CPU state.
  device_sae<float> dm;
  dm.upload(be, hm);
  device_adam<float> da(be, dm, opt);
  da.set_state(be, ha.steps(), ha.first_moment(), ha.second_moment());
  sae_gradients<float> g2 = random_grads(hm, gen, 1e-2);
  device_gradients<> dg;
  dg.zeros_like(be, dm);
  upload_grads(be, g2, dg);
  ha.step(cpu_backend{}, hm, g2);
  da.step(be, dm, dg);
  sae<float> back;
  dm.download(be, back);
  check_near("W_dec after resume", back.W_dec, hm.W_dec, 2e-6);
  check_near("W_enc after resume", back.W_enc, hm.W_enc, 2e-6);
  CHECK(da.steps() == 2);
}
