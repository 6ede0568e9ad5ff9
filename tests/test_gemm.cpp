// SPDX-License-Identifier: Apache-2.0
// The CPU encoder GEMM (cpu/gemm.hpp), `pre = (x - b_dec) W^T`, against a plain double
// reference: Eigen's and oneDNN's (where built) in fp32, and bf16 operands (oneDNN's bf16
// matmul where the CPU has one, else the emulation) against the reference of the rounded
// operands. Plus the choices' errors, plan reuse across shapes and thread counts.
#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#include <cmath>
#include <vector>

namespace {

using hsae::row_matrix;

row_matrix<float> random_matrix(Eigen::Index r, Eigen::Index c, std::uint64_t seed, double mean = 0) {
  hsae::rng g(seed);
  row_matrix<float> a(r, c);
  for (Eigen::Index i = 0; i < a.size(); ++i) a.data()[i] = float(mean + g.normal());
  return a;
}

/// `(x - b) W^T` in double, with the operands optionally rounded to bf16 first (the
/// centred x is rounded, as the GEMM does), and the bound |x - b| |W^T| of each entry's
/// rounding error scale.
struct reference {
  Eigen::MatrixXd value, scale;
};
reference product(const row_matrix<float>& x, const hsae::vector<float>& b, const row_matrix<float>& w, bool bf16) {
  const auto round = [&](float v) { return bf16 ? hsae::cpu::detail::round_to_bfloat16(v) : v; };
  Eigen::MatrixXd xc(x.rows(), x.cols()), wd(w.rows(), w.cols());
  for (Eigen::Index i = 0; i < x.rows(); ++i)
    for (Eigen::Index d = 0; d < x.cols(); ++d) xc(i, d) = round(x(i, d) - b(d));
  for (Eigen::Index f = 0; f < w.rows(); ++f)
    for (Eigen::Index d = 0; d < w.cols(); ++d) wd(f, d) = round(w(f, d));
  return {xc * wd.transpose(), xc.cwiseAbs() * wd.cwiseAbs().transpose()};
}

/// max over entries of |pre - ref| / scale.
double worst(const row_matrix<float>& pre, const reference& r) {
  REQUIRE(pre.rows() == r.value.rows());
  REQUIRE(pre.cols() == r.value.cols());
  return ((pre.cast<double>() - r.value).cwiseAbs().array() / r.scale.array().max(1e-30)).maxCoeff();
}

std::vector<hsae::cpu_gemm> libraries() {
  std::vector<hsae::cpu_gemm> v{hsae::cpu_gemm::eigen};
  if (hsae::onednn_built()) v.push_back(hsae::cpu_gemm::onednn);
  return v;
}

}  // namespace

TEST_CASE("the fp32 encoder GEMM equals the double product to fp32 rounding", "[gemm]") {
  using namespace hsae;
  const cpu_gemm lib = GENERATE(from_range(libraries()));
  const cpu_backend be{.gemm = lib};
  INFO(encoder_gemm_info<float>(be));
  struct shape {
    Eigen::Index B, D, F;
    double mean;
  };
  // Odd sizes (no multiple of a vector or a block), one row, and activations with a large
  // mean (centring before the product keeps the error at fp32 rounding of the centred x).
  for (const shape s : {shape{64, 32, 128, 0}, shape{37, 29, 131, 0}, shape{1, 7, 3, 0}, shape{200, 96, 300, 50}}) {
    const row_matrix<float> x = random_matrix(s.B, s.D, 1, s.mean), w = random_matrix(s.F, s.D, 2);
    const vector<float> b = random_matrix(s.D, 1, 3, s.mean);
    row_matrix<float> pre;
    cpu::detail::encoder_gemm(be, x, b, w, pre);
    const double e = worst(pre, product(x, b, w, false));
    INFO("B=" << s.B << " D=" << s.D << " F=" << s.F << " mean " << s.mean << ": worst error " << e << " of |x||W|");
    CHECK(e < 4 * double(s.D) * 6e-8);  // D fp32 additions, |error| <= D u sum|terms| (u = 2^-24)
  }
}

TEST_CASE("bf16 encoder operands: the product of the rounded operands, in fp32 accumulation", "[gemm]") {
  using namespace hsae;
  const cpu_gemm lib = GENERATE(from_range(libraries()));
  const cpu_backend be{.gemm = lib, .encoder_precision = gemm_precision::bf16};
  const encoder_gemm_choice c = resolve_encoder_gemm<float>(be);
  INFO(encoder_gemm_info<float>(be));
  CHECK(c.precision == gemm_precision::bf16);
#if defined(HSAE_WITH_ONEDNN)
  CHECK(c.emulated_bf16 == !(lib == cpu_gemm::onednn && cpu::detail::onednn_bf16_available()));
  if (lib == cpu_gemm::onednn && c.emulated_bf16)
    WARN("no bf16 matmul on this CPU: oneDNN's bf16 kernel is not exercised, the emulation is");
#else
  CHECK(c.emulated_bf16);
#endif
  for (const Eigen::Index D : {32, 29, 768 / 4}) {
    const row_matrix<float> x = random_matrix(48, D, 4, 2.0), w = random_matrix(96, D, 5);
    const vector<float> b = random_matrix(D, 1, 6, 2.0);
    row_matrix<float> pre;
    cpu::detail::encoder_gemm(be, x, b, w, pre);
    const double e_rounded = worst(pre, product(x, b, w, true));
    const double e_exact = worst(pre, product(x, b, w, false));
    INFO("D=" << D << ": error against the rounded operands' product " << e_rounded << ", against fp32's "
              << e_exact);
    CHECK(e_rounded < 4 * double(D) * 6e-8);
    // bf16 rounding (relative 2^-9 per operand) is far above fp32 accumulation: the
    // operands really were rounded.
    CHECK(e_exact > 10 * e_rounded);
  }
  // The weights stay the fp32 masters: nothing was written to them.
  const row_matrix<float> w = random_matrix(16, 8, 7), w0 = w;
  row_matrix<float> pre;
  cpu::detail::encoder_gemm(be, random_matrix(4, 8, 8), vector<float>::Zero(8), w, pre);
  CHECK(hsae_test::bitwise_equal(w, w0));
}

TEST_CASE("a plan follows the shape and the thread count: the same bits on every return to a shape", "[gemm]") {
  using namespace hsae;
  const cpu_gemm lib = GENERATE(from_range(libraries()));
  const gemm_precision prec = GENERATE(gemm_precision::fp32, gemm_precision::bf16);
  const row_matrix<float> x1 = random_matrix(64, 32, 11), w1 = random_matrix(128, 32, 12);
  const row_matrix<float> x2 = random_matrix(33, 40, 13), w2 = random_matrix(70, 40, 14);
  const vector<float> b1 = random_matrix(32, 1, 15), b2 = random_matrix(40, 1, 16);
  row_matrix<float> p1, p2, q1, q2, t1;
  const cpu_backend be{.gemm = lib, .encoder_precision = prec};
  INFO(encoder_gemm_info<float>(be));
  cpu::detail::encoder_gemm(be, x1, b1, w1, p1);
  cpu::detail::encoder_gemm(be, x2, b2, w2, p2);
  cpu::detail::encoder_gemm(be, x1, b1, w1, q1);
  cpu::detail::encoder_gemm(be, x2, b2, w2, q2);
  CHECK(hsae_test::bitwise_equal(p1, q1));
  CHECK(hsae_test::bitwise_equal(p2, q2));
  CHECK(worst(p2, product(x2, b2, w2, prec == gemm_precision::bf16)) < 4 * 40 * 6e-8);
  // One and two threads: the same bits (the product is split over its outputs).
  for (const int t : {1, 2}) {
    cpu_backend bt = be;
    bt.num_threads = t;
    cpu::detail::encoder_gemm(bt, x1, b1, w1, t1);
    INFO("threads " << t);
    CHECK(hsae_test::bitwise_equal(p1, t1));
  }
}

TEST_CASE("encoder GEMM choices a model or a build cannot take are refused by name", "[gemm][errors]") {
  using namespace hsae;
  const cpu_backend bf{.encoder_precision = gemm_precision::bf16};
  CHECK(hsae_test::message_of<config_error>([&] { (void)resolve_encoder_gemm<double>(bf); })
            .find("bf16") != std::string::npos);
  // A double model's step refuses it too, before any work.
  sae<double> m = hsae_test::random_sae<double>(8, 16, 1);
  CHECK(hsae_test::message_of<config_error>([&] { (void)encode(bf, m, row_matrix<double>::Ones(4, 8), 2); })
            .find("bf16") != std::string::npos);
  const cpu_backend one{.gemm = cpu_gemm::onednn};
  if (onednn_built()) {
    CHECK(resolve_encoder_gemm<float>(one).library == cpu_gemm::onednn);
    CHECK(resolve_encoder_gemm<double>(one).library == cpu_gemm::eigen);  // oneDNN has no fp64 matmul
    CHECK(resolve_encoder_gemm<float>(cpu_backend{}).library == cpu_gemm::onednn);  // the default where built
  } else {
    CHECK(hsae_test::message_of<config_error>([&] { (void)resolve_encoder_gemm<float>(one); })
              .find("without oneDNN") != std::string::npos);
    CHECK(resolve_encoder_gemm<float>(cpu_backend{}).library == cpu_gemm::eigen);
  }
}
