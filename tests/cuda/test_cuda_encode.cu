// SPDX-License-Identifier: Apache-2.0
// The GPU encoder (cuda/encode.cuh) against the CPU encoder (cpu/encode.hpp): the
// pre-activations within a rounding tolerance scaled by each row's magnitude, the code
// exactly the GPU top-k of the GPU pre-activations, and close to the CPU code (sorted
// values within tolerance; every chosen latent within tolerance of the CPU's k-th
// value). Both GEMM paths: cuBLASLt with the fused RELU_BIAS epilogue, and cublasGemmEx
// plus the bias/ReLU kernel.
#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <sstream>
#include <utility>
#include <vector>

#include <hsae/cpu/encode.hpp>
#include <hsae/cpu/init.hpp>
#include <hsae/cpu/topk.hpp>
#include <hsae/cuda/encode.cuh>
#include <hsae/rng.hpp>

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

template <class T>
float rounded(float v) {
  return storage_traits<T>::to_float(storage_traits<T>::from_float(v));
}

/// Relative tolerance of a pre-activation against the row's magnitude bound.
template <class T>
float relative_tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-4f;
  else if constexpr (std::is_same_v<T, __half>) return 3e-3f;
  else return 2e-2f;
}

struct shape {
  int rows, d_model, d_sae, k;
};

}  // namespace

TEMPLATE_TEST_CASE("GPU encode matches the CPU encode", "[cuda][encode]", float, __half, __nv_bfloat16) {
  using T = TestType;
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  std::vector<shape> shapes = {{1, 33, 1000, 8}, {37, 64, 4096, 64}};
  if (!hsae_test::sanitizer_mode()) {
    shapes.push_back({300, 100, 16384, 257});
    shapes.push_back({5, 512, 2000, 2000});
    shapes.push_back({64, 48, 8192, 4096});
  }
  std::uint64_t seed = 7;
  for (const shape& sh : shapes) {
    for (bool use_lt : {true, false}) {
      // Model: unit-norm rows (init), a non-trivial b_enc and b_dec so the folding shows.
      sae<float> m(sh.d_model, sh.d_sae);
      init(cpu_backend{}, m, normal_matrix(8, sh.d_model, ++seed), init_options{.seed = seed, .b_dec = decoder_bias_init::zero});
      m.b_enc = normal_matrix(sh.d_sae, 1, ++seed, 0.3f).col(0);
      m.b_dec = normal_matrix(sh.d_model, 1, ++seed, 0.2f).col(0);
      device_sae<T> dm;
      dm.upload(be, m);
      device_matrix<T> dx;
      copy_to_device(be, cref<float>(normal_matrix(sh.rows, sh.d_model, ++seed)), dx);
      row_matrix<float> xs;
      copy_to_host(be, dx, xs);  // the batch as the GPU sees it

      encode_workspace<T> ws;
      ws.use_cublaslt = use_lt;
      device_code code;
      device_matrix<T> pre;
      encode(be, dm, std::as_const(dx).view(), sh.k, code, pre, ws);
      row_matrix<float> gpre, gv;
      index_matrix gi;
      copy_to_host(be, pre, gpre);
      copy_to_host(be, code.values, gv);
      copy_to_host(be, code.indices, gi);
      std::ostringstream label;
      label << storage_traits<T>::name << " B=" << sh.rows << " D=" << sh.d_model << " F=" << sh.d_sae
            << " k=" << sh.k << (use_lt ? " cuBLASLt requested" : " GemmEx path")
            << (ws.used_cublaslt ? " (cuBLASLt epilogue used)" : " (GemmEx + bias/ReLU kernel used)");
      INFO(label.str());
      if (!use_lt) CHECK_FALSE(ws.used_cublaslt);
      if (use_lt && !ws.used_cublaslt) WARN("cuBLASLt offered no algorithm: " << label.str());
      REQUIRE(gpre.rows() == sh.rows);
      REQUIRE(gpre.cols() == sh.d_sae);

      // CPU reference with the encoder weights rounded to T as the GPU's storage copy.
      sae<float> mt = m;
      mt.W_enc = m.W_enc.unaryExpr([](float v) { return rounded<T>(v); });
      sparse_code<float> ccode;
      row_matrix<float> cpre;
      encode(cpu_backend{}, mt, cref<float>(xs), sh.k, ccode, cpre);

      const float rel = relative_tolerance<T>();
      long bad_pre = 0, bad_code = 0;
      std::string first;
      for (int b = 0; b < sh.rows; ++b) {
        const float scale = xs.row(b).norm() + m.b_dec.norm() + m.b_enc.cwiseAbs().maxCoeff() + 1.0f;
        const float tol = rel * scale;
        for (int f = 0; f < sh.d_sae; ++f)
          if (!(std::abs(gpre(b, f) - cpre(b, f)) <= tol)) {
            if (bad_pre++ == 0) {
              std::ostringstream os;
              os << "pre[" << b << ", " << f << "] gpu " << gpre(b, f) << " cpu " << cpre(b, f) << " tol " << tol;
              first = os.str();
            }
          }
        // Code vs CPU code: sorted values close, members within tolerance of the k-th.
        std::set<index_t> seen;
        const float kth = ccode.values(b, sh.k - 1);
        for (int t = 0; t < sh.k; ++t) {
          const index_t i = gi(b, t);
          const bool ok = i >= 0 && i < sh.d_sae && seen.insert(i).second &&
                          std::abs(gv(b, t) - ccode.values(b, t)) <= tol && cpre(b, i) >= kth - 2.0f * tol;
          if (!ok && bad_code++ == 0) {
            std::ostringstream os;
            os << "code[" << b << ", " << t << "] gpu (" << i << ", " << gv(b, t) << ") cpu (" << ccode.indices(b, t)
               << ", " << ccode.values(b, t) << ") tol " << tol;
            first += " | " + os.str();
          }
        }
      }
      INFO("first mismatch: " << first);
      CHECK(bad_pre == 0);
      CHECK(bad_code == 0);

      // The code is exactly the top-k of the GPU's own pre-activations.
      row_matrix<float> tv;
      index_matrix ti;
      cpu::topk_rows(cpu_backend{}, cref<float>(gpre), sh.k, tv, ti);
      CHECK(ti == gi);
      CHECK(std::memcmp(tv.data(), gv.data(), std::size_t(tv.size()) * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("GPU encode: pool-workspace overload, pre_activations, argument checks", "[cuda][encode]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  sae<float> m(40, 300);
  init(cpu_backend{}, m, normal_matrix(16, 40, 3), init_options{.seed = 3});
  device_sae<float> dm;
  dm.upload(be, m);
  device_matrix<float> dx;
  const row_matrix<float> x = normal_matrix(9, 40, 4);
  copy_to_device(be, cref<float>(x), dx);
  device_code code;
  device_matrix<float> pre;
  encode(be, dm, std::as_const(dx).view(), 16, code, pre);
  CHECK(code.rows() == 9);
  CHECK(code.k() == 16);
  encode_workspace<float> ws;
  device_matrix<float> pre2;
  pre_activations(be, dm, std::as_const(dx).view(), pre2, ws);
  row_matrix<float> a, b;
  copy_to_host(be, pre, a);
  copy_to_host(be, pre2, b);
  CHECK(a == b);
  CHECK((a.array() >= 0.0f).all());

  CHECK_THROWS_AS(encode(be, dm, std::as_const(dx).view(), 0, code, pre), config_error);
  CHECK_THROWS_AS(encode(be, dm, std::as_const(dx).view(), 301, code, pre), config_error);
  device_matrix<float> wrong;
  copy_to_device(be, cref<float>(normal_matrix(9, 41, 5)), wrong);
  CHECK_THROWS_AS(encode(be, dm, std::as_const(wrong).view(), 8, code, pre), shape_error);
}
