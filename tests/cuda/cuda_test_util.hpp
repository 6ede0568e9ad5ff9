// SPDX-License-Identifier: Apache-2.0
// Host-side helpers shared by the GPU tests: host <-> device copies of codes, matrices and
// vectors, a relative-error check against a reference, bitwise comparison, and random
// matrices. Include after cuda_test_main.hpp (Catch2's macros).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <hsae/cuda/model.cuh>
#include <hsae/matrix.hpp>
#include <hsae/rng.hpp>
#include <hsae/sparse_code.hpp>

#include "../test_util.hpp"
#include "cuda_test_main.hpp"

namespace hsae_cuda_test {

/// Copies a host code (values and indices) into `d`, resizing it; synchronises the stream.
inline void upload_code(const hsae::cuda_backend& be, const hsae::sparse_code<float>& h, hsae::device_code& d) {
  hsae::copy_to_device(be, hsae::cref<float>(h.values), d.values);
  d.indices.resize(be, hsae::index_t(h.indices.rows()), hsae::index_t(h.indices.cols()));
  HSAE_CUDA_TRY(cudaMemcpyAsync(d.indices.data(), h.indices.data(),
                                std::size_t(h.indices.size()) * sizeof(hsae::index_t), cudaMemcpyHostToDevice,
                                be.stream()));
  be.synchronize();
}

/// A device matrix, copied to the host.
inline hsae::row_matrix<float> download(const hsae::cuda_backend& be, const hsae::device_matrix<float>& d) {
  hsae::row_matrix<float> h;
  hsae::copy_to_host(be, d, h);
  return h;
}

/// A device vector, copied to the host.
inline hsae::vector<float> download(const hsae::cuda_backend& be, const hsae::device_buffer<float>& d) {
  hsae::vector<float> h;
  hsae::copy_to_host(be, d, h);
  return h;
}

/// max |a - b| <= tol * max(max |b|, floor): errors relative to the reference's scale.
template <class A, class B>
void check_near(const char* what, const A& got, const B& want, double tol, double floor = 1e-30) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  double scale = floor, err = 0;
  for (Eigen::Index i = 0; i < want.rows(); ++i)
    for (Eigen::Index j = 0; j < want.cols(); ++j) {
      scale = std::max(scale, std::abs(double(want(i, j))));
      err = std::max(err, std::abs(double(got(i, j)) - double(want(i, j))));
    }
  INFO(what << ": max error " << err << " at scale " << scale << " (tol " << tol << ")");
  CHECK(err <= tol * scale);
}

/// Same shape and the same bits (NaN payloads and signed zeros included).
template <class A>
bool same_bits(const A& a, const A& b) {
  return hsae_test::bitwise_equal(a, b);
}

/// A host model, batch and code uploaded to the device, with zeroed gradients.
template <class T = float>
struct device_inputs {
  hsae::device_sae<T> m;
  hsae::device_matrix<T> x;
  hsae::device_code code;
  hsae::device_gradients<> g;

  device_inputs(const hsae::cuda_backend& be, const hsae::sae<float>& host_m, const hsae::row_matrix<float>& host_x,
                const hsae::sparse_code<float>& host_code) {
    m.upload(be, host_m);
    hsae::copy_to_device(be, hsae::cref<float>(host_x), x);
    upload_code(be, host_code, code);
    g.zeros_like(be, m);
  }
  /// The batch as a read-only view.
  auto x_view() const { return x.view(); }
};

/// rows x cols of N(0, 1) * scale from rng(seed).
inline hsae::row_matrix<float> normal_matrix(int rows, int cols, std::uint64_t seed, float scale = 1.0f) {
  hsae::rng gen(seed);
  hsae::row_matrix<float> m(rows, cols);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m(r, c) = float(gen.normal()) * scale;
  return m;
}

}  // namespace hsae_cuda_test
