// SPDX-License-Identifier: Apache-2.0
// One CUDA train_step (cuda/train_step.cuh) against the CPU train_step (cpu/train_step.hpp) on
// the same model, batch, schedule, optimizer state and dead-latent counters: the loss and
// every level's squared error, the AuxK loss, the gradient norm, the dead counts, every
// gradient, the parameter update, the Adam moments and the counters after the step.
// Schedules: all prefixes, a single K and a weighted subset (K not a power of two), D not
// a multiple of 32, B = 1; dead latents absent, present (AuxK runs, with the dead count
// read on the device), or possible by the tracker's host bound but absent at run time.
// Storage fp32 and bf16 (see below). Also: a batch holding NaN/Inf changes nothing and is
// reported by read_step_stats, and the argument checks.
//
// Tolerances. fp32: the GPU and the CPU compute the same sums in different orders
// (cuBLAS GEMM blocking, per-row CTA reductions, deterministic per-latent sums against
// Eigen's kernels), so every quantity carries a relative rounding difference of a few
// ulp times the number of summed terms: <= ~1e-6 here (<= 13 ranks, <= 256 rows, <= 130
// columns of O(1) terms). The tests allow 2e-5 on scalars (loss, per-level errors, norm)
// and 1e-4 of each tensor's largest entry on gradients, moments and parameter updates.
// The batches are drawn so that no two of a row's top K+1 pre-activations (nor of the top
// k_aux+1 among dead latents) lie within 1e-4 of the row's scale: with a near-tie the two
// backends may legitimately rank two latents differently, which changes that row's code
// rather than rounding it; the test is about the composition, not about tie luck.
// Adam starts from a warm state (first moment 0, second moment c^2 per tensor, step 10):
// Adam's very first step is lr * sign(g), which would turn a rounding-level difference
// in a near-zero gradient entry into a 2 lr difference; from this state the update is
// smooth in g and proportional to it, so it checks the gradients through the optimizer.
// An update w_after - w_before is also allowed a floor of 4 ulp of the tensor's largest
// parameter: both sides round w + update (and the decoder row norms) to float.
// bf16 storage: the batch and the weights are bf16 values (so the GPU's storage copies
// equal its fp32 masters), and the GPU stores the pre-activations in bf16 (relative 2^-9,
// with exact ties). The CPU train_step cannot round them so, so the reference is its
// composition (cpu/train_step.hpp, piece by piece) applied to the GPU's own code and
// pre-activations: everything after the encoder is then the same arithmetic, and the
// tolerances are fp32's. The full CPU train_step's loss (unrounded pre-activations, ties
// broken otherwise) is checked end to end within 5e-2 (B >= 16; one row of a tiny batch
// can swap its k-th latent).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <hsae/cpu/init.hpp>
#include <hsae/cpu/train_step.hpp>
#include <hsae/cuda/train_step.cuh>
#include <hsae/k_schedule.hpp>
#include <hsae/model.hpp>
#include <hsae/optimizer.hpp>
#include <hsae/rng.hpp>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

template <class T>
float round_to(float v) {
  return storage_traits<T>::to_float(storage_traits<T>::from_float(v));
}

constexpr double scalar_tol = 2e-5;  // loss, per-level errors, gradient norm
constexpr double tensor_tol = 1e-4;  // of each tensor's largest entry: gradients, moments, updates

/// HSAE_TEST_REPORT=1 prints every measured difference (to choose tolerances on a GPU).
bool report_enabled() {
  const char* v = std::getenv("HSAE_TEST_REPORT");
  return v != nullptr && *v != '\0' && *v != '0';
}
void report(const std::string& what, double value) {
  if (report_enabled()) std::printf("  %-60s %.3e\n", what.c_str(), value);
}

enum class dead_case { none, some, bound_only };

struct scenario {
  int B, D, F;
  dead_case dead;
  bool use_auxk = true;
  int k_aux = 0;  // 0: default min(512, D / 2)
};

std::string describe(const scenario& sc, int K) {
  const char* d = sc.dead == dead_case::none ? "none dead" : sc.dead == dead_case::some ? "some dead" : "bound only";
  return "B=" + std::to_string(sc.B) + " D=" + std::to_string(sc.D) + " F=" + std::to_string(sc.F) +
         " K=" + std::to_string(K) + " " + d + (sc.use_auxk ? "" : " (AuxK off)") +
         " k_aux=" + std::to_string(sc.k_aux);
}

constexpr std::int64_t dead_after = 1000;

struct problem {
  sae<float> m;
  row_matrix<float> x;
  std::vector<std::int64_t> since;
};

/// Scale of row b's pre-activations (as test_cuda_encode's tolerance scale).
float row_scale(const problem& p, int b) {
  return p.x.row(b).norm() + p.m.b_dec.norm() + p.m.b_enc.cwiseAbs().maxCoeff() + 1.0f;
}

/// True when row b's top K+1 pre-activations (and the top k_aux+1 among dead latents, all
/// dead ones away from the ReLU kink) are pairwise more than `thr` apart.
bool well_separated(const problem& p, int b, int K, int ka, float thr) {
  const int F = p.m.d_sae();
  std::vector<double> pos, dead_pos;
  for (int f = 0; f < F; ++f) {
    double v = double(p.m.b_enc[f]);
    for (int j = 0; j < p.m.d_model(); ++j) v += (double(p.x(b, j)) - double(p.m.b_dec[j])) * double(p.m.W_enc(f, j));
    if (v > 0) pos.push_back(v);
    if (p.since[std::size_t(f)] >= dead_after) {
      if (std::abs(v) <= thr) return false;
      if (v > 0) dead_pos.push_back(v);
    }
  }
  if (int(pos.size()) < K + 1) return false;
  auto separated = [thr](std::vector<double>& v, int n) {
    std::sort(v.begin(), v.end(), std::greater<>());
    for (int t = 0; t + 1 < std::min(n, int(v.size())); ++t)
      if (v[std::size_t(t)] - v[std::size_t(t) + 1] <= thr) return false;
    return true;
  };
  return separated(pos, K + 1) && separated(dead_pos, ka + 1);
}

template <class T>
problem make_problem(const scenario& sc, int K, std::uint64_t seed) {
  problem p;
  p.m = sae<float>(sc.D, sc.F);
  init(cpu_backend{}, p.m, row_matrix<float>(0, sc.D), {.seed = seed, .b_dec = decoder_bias_init::zero});
  rng gen(seed + 5);
  for (Eigen::Index i = 0; i < p.m.W_enc.size(); ++i) p.m.W_enc.data()[i] += float(0.3 * gen.normal());
  for (int f = 0; f < sc.F; ++f) p.m.b_enc[f] = float(0.1 + 0.2 * gen.normal());
  for (int j = 0; j < sc.D; ++j) p.m.b_dec[j] = float(2 + gen.normal());
  if constexpr (!std::is_same_v<T, float>) {  // masters = their storage copies
    p.m.W_enc = p.m.W_enc.unaryExpr([](float v) { return round_to<T>(v); });
    p.m.W_dec = p.m.W_dec.unaryExpr([](float v) { return round_to<T>(v); });
  }
  p.since.assign(std::size_t(sc.F), 0);
  if (sc.dead == dead_case::some)
    for (int f = 0; f < sc.F; f += 3) p.since[std::size_t(f)] = dead_after + f;
  const int ka = std::min(auxk_options{.k_aux = sc.k_aux}.resolved_k_aux(sc.D), sc.F);
  p.x.resize(sc.B, sc.D);
  for (int b = 0; b < sc.B; ++b) {
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 500);
      for (int j = 0; j < sc.D; ++j) p.x(b, j) = p.m.b_dec[j] + float(gen.normal());
      if constexpr (!std::is_same_v<T, float>) {
        for (int j = 0; j < sc.D; ++j) p.x(b, j) = round_to<T>(p.x(b, j));
        break;
      } else {
        if (well_separated(p, b, K, ka, 1e-4f * row_scale(p, b))) break;
      }
    }
  }
  return p;
}

double max_abs(const row_matrix<float>& a) { return a.size() ? double(a.cwiseAbs().maxCoeff()) : 0.0; }

/// got vs want elementwise: max error <= tol * max |want| + floor. `param_scale`: for
/// updates, the largest parameter, whose float rounding (4 ulp) is the floor.
template <class A, class B>
void check_tensor(const std::string& what, const A& got, const B& want, double param_scale = 0) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  const double tol = tensor_tol, floor = 4 * 0x1p-23 * param_scale;
  const double err = (got.template cast<double>() - want.template cast<double>()).cwiseAbs().maxCoeff();
  const double scale = want.template cast<double>().cwiseAbs().maxCoeff();
  report(what + " (relative)", err / std::max(scale, 1e-300));
  INFO(what << ": error " << err << " at scale " << scale << " (tol " << tol << ", floor " << floor << ")");
  CHECK(err <= tol * scale + floor);
}

void check_scalar(const std::string& what, double got, double want, double tol) {
  const double rel = std::abs(got - want) / std::max(std::abs(want), 1e-300);
  report(what + " (relative)", want == 0 ? std::abs(got) : rel);
  INFO(what << ": gpu " << got << " cpu " << want << " (tol " << tol << ")");
  if (want == 0) CHECK(got == 0);
  else CHECK(rel <= tol);
}

template <class T, class S>
void compare_step(const cuda_backend& be, const scenario& sc, const S& sched, std::uint64_t seed) {
  const int K = sched.k_max();
  const std::string label = std::string(storage_traits<T>::name) + " " + describe(sc, K);
  INFO(label);
  if (report_enabled()) std::printf("%s\n", label.c_str());
  const problem p = make_problem<T>(sc, K, seed);
  step_options so;
  so.use_auxk = sc.use_auxk;
  so.auxk.k_aux = sc.k_aux;
  so.auxk.alpha = 0.25;  // larger than the default 1/32, so that AuxK's share is visible
  adam_options ao;
  ao.lr = 1e-2;
  ao.warmup_steps = 0;

  // Warm Adam state from the scale of the CPU's gradients (see the file comment); the
  // full CPU step's loss for the end-to-end check.
  sae_gradients<float> m1, m2;
  double full_cpu_loss = 0;
  {
    sae<float> probe = p.m;
    adam<float> pa(probe, ao);
    dead_latent_tracker pt(sc.F, dead_after);
    pt.set_tokens_since_fired(p.since);
    train_workspace<float> pws;
    full_cpu_loss = train_step(cpu_backend{}, probe, pa, pt, p.x, sched, pws, so).loss;
    m1.zeros_like(p.m);
    m2.zeros_like(p.m);
    auto c2 = [](double c) { return float(std::max(c * c, 1e-20)); };
    m2.W_enc.setConstant(c2(max_abs(pws.grads.W_enc)));
    m2.W_dec.setConstant(c2(max_abs(pws.grads.W_dec)));
    m2.b_enc.setConstant(c2(double(pws.grads.b_enc.cwiseAbs().maxCoeff())));
    m2.b_dec.setConstant(c2(double(pws.grads.b_dec.cwiseAbs().maxCoeff())));
  }
  const std::int64_t warm_steps = 10;

  // GPU.
  device_sae<T> dm;
  dm.upload(be, p.m);
  device_adam<T> da(be, dm, ao);
  da.set_state(be, warm_steps, m1, m2, ao.lr);
  device_dead_latent_tracker dt(be, sc.F, dead_after);
  if (sc.dead == dead_case::bound_only) {
    // Counters at dead_after - 1, then a code in which every latent fires: all counters 0,
    // but the host bound (dead_after - 1 + 1 row) says latents may be dead.
    dt.set_tokens_since_fired(be, std::vector<std::int64_t>(std::size_t(sc.F), dead_after - 1));
    sparse_code<float> all;
    all.resize(1, sc.F);
    all.values.setOnes();
    for (int f = 0; f < sc.F; ++f) all.indices(0, f) = f;
    device_code dall;
    upload_code(be, all, dall);
    dt.update(be, dall);
    REQUIRE(dt.may_have_dead());
    REQUIRE(dt.num_dead(be) == 0);
    REQUIRE(dt.tokens_since_fired(be) == p.since);
  } else {
    dt.set_tokens_since_fired(be, p.since);
  }
  device_matrix<T> dx;
  copy_to_device(be, cref<float>(p.x), dx);
  device_train_workspace<T> dws;
  train_step(be, dm, da, dt, std::as_const(dx).view(), sched, dws, so);
  const device_step_stats gst = read_step_stats(be, da, dws);

  // CPU reference: the CPU train_step (fp32), or its composition on the GPU's code (bf16).
  sae<float> cm = p.m;
  adam<float> ca(cm, ao);
  ca.set_state(warm_steps, m1, m2, ao.lr);
  dead_latent_tracker ct(sc.F, dead_after);
  ct.set_tokens_since_fired(p.since);
  train_workspace<float> cws;
  step_stats cst;
  if constexpr (std::is_same_v<T, float>) {
    cst = train_step(cpu_backend{}, cm, ca, ct, p.x, sched, cws, so);
  } else {
    const cpu_backend cb;
    copy_to_host(be, dws.code.values, cws.code.values);
    copy_to_host(be, dws.code.indices, cws.code.indices);
    copy_to_host(be, dws.pre, cws.pre);
    zero_gradients(cb, cws.grads, cm);
    cst.levels = hierarchical_loss_backward(cb, cm, p.x, cws.code, sched, cws.grads, cws.loss);
    cst.loss = cst.levels.loss;
    cst.dead = ct.num_dead();
    if (so.use_auxk && cst.dead > 0)
      cst.aux_loss = auxk_backward(cb, cm, p.x, cws.pre, cws.loss.residual, ct.dead_latents(), so.auxk, cws.grads,
                                   cws.aux);
    encoder_backward(cb, cm, p.x, cws.code, cws.loss.grad_values, cws.grads, cws.loss.pairs);
    ct.update(cws.code);
    cst.grad_norm = ca.step(cb, cm, cws.grads);
    cst.lr = ca.last_lr();
    // End to end: the full CPU step on unrounded pre-activations.
    report("bf16 loss against the full CPU train_step (relative)",
           std::abs(gst.loss - full_cpu_loss) / full_cpu_loss);
    if (sc.B >= 16) CHECK(std::abs(gst.loss - full_cpu_loss) <= 5e-2 * full_cpu_loss);
  }

  // Which path ran.
  CHECK(dws.pending.aux_ran == (sc.use_auxk && sc.dead != dead_case::none));
  if (sc.dead == dead_case::some && sc.use_auxk && sc.B > 1) CHECK(cst.aux_loss > 0);

  // Statistics.
  const double ts = scalar_tol;
  check_scalar("loss", gst.loss, cst.loss, ts);
  REQUIRE(gst.levels.level_k == cst.levels.level_k);
  for (std::size_t l = 0; l < cst.levels.level_sse.size(); ++l)
    check_scalar("level " + std::to_string(cst.levels.level_k[l]) + " squared error", gst.levels.level_sse[l],
                 cst.levels.level_sse[l], ts);
  CHECK(gst.levels.rows == cst.levels.rows);
  CHECK(gst.levels.d_model == cst.levels.d_model);
  check_scalar("AuxK loss", gst.aux_loss, cst.aux_loss, 2 * ts);
  check_scalar("gradient norm", gst.grad_norm, cst.grad_norm, ts);
  CHECK(gst.lr == cst.lr);
  CHECK(gst.dead == cst.dead);
  CHECK(da.steps() == ca.steps());

  // Gradients (W_dec's projected in place by both optimizers).
  check_tensor("gradient W_enc", download(be, dws.grads.W_enc), cws.grads.W_enc);
  check_tensor("gradient W_dec", download(be, dws.grads.W_dec), cws.grads.W_dec);
  check_tensor("gradient b_enc", download(be, dws.grads.b_enc), cws.grads.b_enc);
  check_tensor("gradient b_dec", download(be, dws.grads.b_dec), cws.grads.b_dec);

  // Parameters: the update w_after - w_before of each tensor, and the moments.
  sae<float> gm;
  dm.download(be, gm);
  auto largest = [](const auto& w) { return double(w.cwiseAbs().maxCoeff()); };
  check_tensor("update W_enc", (gm.W_enc - p.m.W_enc).eval(), (cm.W_enc - p.m.W_enc).eval(), largest(p.m.W_enc));
  check_tensor("update W_dec", (gm.W_dec - p.m.W_dec).eval(), (cm.W_dec - p.m.W_dec).eval(), largest(p.m.W_dec));
  check_tensor("update b_enc", (gm.b_enc - p.m.b_enc).eval(), (cm.b_enc - p.m.b_enc).eval(), largest(p.m.b_enc));
  check_tensor("update b_dec", (gm.b_dec - p.m.b_dec).eval(), (cm.b_dec - p.m.b_dec).eval(), largest(p.m.b_dec));
  sae_gradients<float> g1, g2;
  da.get_state(be, g1, g2);
  check_tensor("first moment W_enc", g1.W_enc, ca.first_moment().W_enc);
  check_tensor("first moment W_dec", g1.W_dec, ca.first_moment().W_dec);
  check_tensor("second moment b_dec", g2.b_dec, ca.second_moment().b_dec);

  // Dead latents after the update.
  CHECK(gst.dead_after_update == ct.num_dead());
  CHECK(dt.tokens_since_fired(be) == ct.tokens_since_fired());
  const std::vector<std::int64_t>& since = ct.tokens_since_fired();
  CHECK(gst.max_tokens_since_fired == *std::max_element(since.begin(), since.end()));
}

template <class T>
void run_scenarios(const cuda_backend& be) {
  const bool small = hsae_test::sanitizer_mode();
  std::uint64_t seed = 100;
  for (const dead_case d : {dead_case::none, dead_case::some, dead_case::bound_only})
    compare_step<T>(be, scenario{64, 33, 96, d, true, 5}, all_prefixes<6>{}, ++seed);
  compare_step<T>(be, scenario{64, 33, 96, dead_case::some, false, 5}, all_prefixes<6>{}, ++seed);
  for (const dead_case d : {dead_case::none, dead_case::some})
    compare_step<T>(be, scenario{1, 70, 50, d}, top_k<7>{}, ++seed);  // B = 1, default k_aux = 35
  if (small) return;
  compare_step<T>(be, scenario{37, 100, 200, dead_case::some}, dynamic_k_schedule{{2, 1.0}, {5, 0.5}, {13, 2.0}},
                  ++seed);
  compare_step<T>(be, scenario{256, 130, 1000, dead_case::some, true, 20}, all_prefixes<13>{}, ++seed);
  compare_step<T>(be, scenario{256, 130, 1000, dead_case::none}, top_k<11>{}, ++seed);
}

}  // namespace

TEMPLATE_TEST_CASE("GPU train_step matches the CPU train_step", "[cuda][train_step]", float, __nv_bfloat16) {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  run_scenarios<TestType>(be);
}

TEST_CASE("GPU train_step: a non-finite batch changes nothing and is reported", "[cuda][train_step]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const scenario sc{16, 20, 40, dead_case::some};
  const problem p = make_problem<float>(sc, 4, 7);
  const top_k<4> sched;
  adam_options ao;
  ao.lr = 1e-3;
  device_sae<float> dm;
  dm.upload(be, p.m);
  device_adam<float> da(be, dm, ao);
  device_dead_latent_tracker dt(be, sc.F, dead_after);
  dt.set_tokens_since_fired(be, p.since);
  device_train_workspace<float> ws;
  CHECK_THROWS_AS(read_step_stats(be, da, ws), config_error);  // nothing has run

  row_matrix<float> bad = p.x;
  bad(3, 5) = std::numeric_limits<float>::quiet_NaN();
  bad(7, 0) = std::numeric_limits<float>::infinity();
  bad(2, 19) = -std::numeric_limits<float>::infinity();
  device_matrix<float> dx;
  copy_to_device(be, cref<float>(bad), dx);

  auto unchanged = [&] {
    sae<float> back;
    dm.download(be, back);
    CHECK(hsae_test::bitwise_equal(back.W_enc, p.m.W_enc));
    CHECK(hsae_test::bitwise_equal(back.W_dec, p.m.W_dec));
    CHECK(hsae_test::bitwise_equal(back.b_enc, p.m.b_enc));
    CHECK(hsae_test::bitwise_equal(back.b_dec, p.m.b_dec));
    sae_gradients<float> m1, m2;
    da.get_state(be, m1, m2);
    CHECK(m1.W_enc.cwiseAbs().maxCoeff() == 0.f);
    CHECK(m2.W_dec.cwiseAbs().maxCoeff() == 0.f);
    CHECK(m2.b_dec.cwiseAbs().maxCoeff() == 0.f);
    CHECK(da.steps() == 0);
    CHECK(da.last_lr() == 0);
  };

  SECTION("check_finite: rejected on the device, reported with the first entry") {
    train_step(be, dm, da, dt, std::as_const(dx).view(), sched, ws);
    CHECK(da.steps() == 1);  // not known on the host until read_step_stats
    CHECK_THROWS_WITH(read_step_stats(be, da, ws),
                      Catch::Contains("training batch contains a non-finite value (-inf) at [2, 19]"));
    CHECK_THROWS_AS(read_step_stats(be, da, ws), numeric_error);  // again: taken back once only
    unchanged();
    CHECK(dt.tokens_since_fired(be) == p.since);

    // A clean batch afterwards steps normally.
    device_matrix<float> good;
    copy_to_device(be, cref<float>(p.x), good);
    train_step(be, dm, da, dt, std::as_const(good).view(), sched, ws);
    const device_step_stats st = read_step_stats(be, da, ws);
    CHECK(std::isfinite(st.loss));
    CHECK(st.loss > 0);
    CHECK(da.steps() == 1);
    CHECK(dt.tokens_since_fired(be) != p.since);
  }
  SECTION("without the check the non-finite gradient norm rejects the step") {
    step_options so;
    so.check_finite = false;
    train_step(be, dm, da, dt, std::as_const(dx).view(), sched, ws, so);
    CHECK_THROWS_WITH(read_step_stats(be, da, ws), Catch::Contains("gradient norm is not finite"));
    unchanged();
  }
}

TEST_CASE("GPU train_step: argument checks", "[cuda][train_step]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  sae<float> m(24, 30);
  init(cpu_backend{}, m, normal_matrix(8, 24, 1), init_options{.seed = 1});
  device_sae<float> dm;
  dm.upload(be, m);
  device_adam<float> da(be, dm, adam_options{});
  device_dead_latent_tracker dt(be, 30);
  device_train_workspace<float> ws;
  device_matrix<float> x, wide, empty;
  copy_to_device(be, cref<float>(normal_matrix(5, 24, 2)), x);
  copy_to_device(be, cref<float>(normal_matrix(5, 25, 3)), wide);
  empty.resize(be, 0, 24);
  CHECK_THROWS_WITH(train_step(be, dm, da, dt, std::as_const(wide).view(), top_k<4>{}, ws),
                    Catch::Contains("batch has width 25, expected d_model=24"));
  CHECK_THROWS_AS(train_step(be, dm, da, dt, std::as_const(empty).view(), top_k<4>{}, ws), shape_error);
  CHECK_THROWS_WITH(train_step(be, dm, da, dt, std::as_const(x).view(), top_k<31>{}, ws),
                    Catch::Contains("k_max=31 exceeds d_sae=30"));
  device_dead_latent_tracker other(be, 31);
  CHECK_THROWS_AS(train_step(be, dm, da, other, std::as_const(x).view(), top_k<4>{}, ws), shape_error);
  step_options so;
  so.auxk.alpha = -1;
  CHECK_THROWS_AS(train_step(be, dm, da, dt, std::as_const(x).view(), top_k<4>{}, ws, so), config_error);
  CHECK(da.steps() == 0);  // nothing was enqueued
  CHECK_THROWS_AS(read_step_stats(be, da, ws), config_error);
  train_step(be, dm, da, dt, std::as_const(x).view(), top_k<4>{}, ws);
  CHECK(read_step_stats(be, da, ws).levels.level_k == std::vector<int>{4});
}
