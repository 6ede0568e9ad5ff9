// SPDX-License-Identifier: Apache-2.0
// Device memory, conversions and the device model: round trips against the host.
#include "cuda_test_main.hpp"
#include "cuda_test_util.hpp"

#include <cmath>
#include <cstdint>
#include <utility>

#include <hsae/cpu/init.hpp>
#include <hsae/cuda/memory.cuh>
#include <hsae/cuda/model.cuh>
#include <hsae/rng.hpp>

using namespace hsae;
using namespace hsae_cuda_test;

namespace {

/// Relative rounding error bound of T (half an ulp): 2^-24, 2^-11, 2^-8.
template <class T>
float unit_roundoff() {
  if constexpr (std::is_same_v<T, float>) return 0.0f;
  else if constexpr (std::is_same_v<T, __half>) return 1.0f / 2048.0f;
  else return 1.0f / 256.0f;
}

__global__ void fill_iota(int* p, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    p[i] = int(i);
}

}  // namespace

TEMPLATE_TEST_CASE("copy_to_device / copy_to_host round trip with conversion", "[cuda][memory]", float, __half,
                   __nv_bfloat16) {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  for (auto [rows, cols] : {std::pair{1, 1}, std::pair{3, 33}, std::pair{17, 1000}}) {
    const row_matrix<float> h = normal_matrix(rows, cols, std::uint64_t(rows * 7919 + cols), 3.0f);
    device_matrix<TestType> d;
    copy_to_device(be, cref<float>(h), d);
    CHECK(d.rows() == rows);
    CHECK(d.cols() == cols);
    row_matrix<float> back;
    copy_to_host(be, d, back);
    REQUIRE(back.rows() == rows);
    REQUIRE(back.cols() == cols);
    const float u = unit_roundoff<TestType>();
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) {
        const float want = h(r, c), got = back(r, c);
        if constexpr (std::is_same_v<TestType, float>) REQUIRE(got == want);
        else REQUIRE(std::abs(got - want) <= u * std::abs(want) + 1e-7f);
        // The host conversion rounds like the device one: converting back is exact.
        REQUIRE(storage_traits<TestType>::to_float(storage_traits<TestType>::from_float(got)) == got);
      }
  }
}

TEST_CASE("copy_to_device honours the outer stride of a row block", "[cuda][memory]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  const row_matrix<float> h = normal_matrix(10, 24, 5, 3.0f);
  const cref<float> block = h.block(2, 3, 5, 7);  // outer stride 24, not 7
  device_matrix<float> d;
  copy_to_device(be, block, d);
  row_matrix<float> back;
  copy_to_host(be, d, back);
  REQUIRE(back.rows() == 5);
  REQUIRE(back.cols() == 7);
  CHECK(back == row_matrix<float>(h.block(2, 3, 5, 7)));
}

TEST_CASE("device_buffer: resize keeps memory unless growing, zero, move", "[cuda][memory]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  device_buffer<int> a(be, 1000);
  CHECK(a.size() == 1000);
  CHECK(a.capacity() == 1000);
  fill_iota<<<4, 128, 0, be.stream()>>>(a.data(), a.size());
  HSAE_CUDA_CHECK_LAUNCH();
  int* const p = a.data();
  a.resize(be, 10);  // shrink: same memory, contents kept
  CHECK(a.data() == p);
  CHECK(a.size() == 10);
  std::vector<int> h(10);
  HSAE_CUDA_TRY(cudaMemcpyAsync(h.data(), a.data(), 10 * sizeof(int), cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
  for (int i = 0; i < 10; ++i) CHECK(h[std::size_t(i)] == i);
  a.resize(be, 2000);  // grow: reallocates
  CHECK(a.size() == 2000);
  CHECK(a.capacity() == 2000);
  a.zero(be);
  std::vector<int> z(2000, -1);
  HSAE_CUDA_TRY(cudaMemcpyAsync(z.data(), a.data(), 2000 * sizeof(int), cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
  for (int v : z) REQUIRE(v == 0);

  device_buffer<int> b = std::move(a);
  CHECK(a.data() == nullptr);
  CHECK(a.size() == 0);
  CHECK(b.size() == 2000);
  device_buffer<int> c;
  c = std::move(b);
  CHECK(b.data() == nullptr);
  CHECK(c.size() == 2000);
  CHECK(c.data() != nullptr);
}

TEST_CASE("device_matrix: shape, views, move", "[cuda][memory]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  device_matrix<float> m(be, 4, 6);
  CHECK(m.rows() == 4);
  CHECK(m.cols() == 6);
  const device_matrix_view<float> v = m.view();
  CHECK(v.data == m.data());
  CHECK(v.rows == 4);
  CHECK(v.cols == 6);
  const device_matrix_view<const float> cv = v;
  CHECK(cv.data == m.data());
  const auto mid = v.middle_rows(1, 2);
  CHECK(mid.data == m.data() + 6);
  CHECK(mid.rows == 2);
  float* const p = m.data();
  m.resize(be, 2, 12);  // same size: no reallocation
  CHECK(m.data() == p);
  CHECK(m.rows() == 2);
  CHECK(m.cols() == 12);
  device_matrix<float> n = std::move(m);
  CHECK(n.data() == p);
  CHECK(m.data() == nullptr);
  CHECK_THROWS_AS(n.resize(be, -1, 3), shape_error);
}

TEST_CASE("cuda_backend: handles, allocator, move", "[cuda][backend]") {
  hsae_test::test_stream stream;
  cuda_backend be(stream.s);
  CHECK(be.stream() == stream.s);
  CHECK(be.cublas() != nullptr);
  CHECK(be.deterministic);
  int dev = -1;
  HSAE_CUDA_TRY(cudaGetDevice(&dev));
  CHECK(be.device() == dev);
  void* p = be.allocate(1 << 20);
  CHECK(p != nullptr);
  be.deallocate(p, 1 << 20);
  CHECK(be.allocate(0) == nullptr);
  cudaStream_t bound = nullptr;
  HSAE_CUBLAS_TRY(cublasGetStream(be.cublas(), &bound));
  CHECK(bound == stream.s);
  cuda_backend moved = std::move(be);
  CHECK(moved.cublas() != nullptr);
  CHECK(be.cublas() == nullptr);
  moved.synchronize();
  CHECK_THROWS_AS(cuda_backend(stream.s, 1 << 20), config_error);
}

TEST_CASE("HSAE_CUDA_TRY throws cuda_error naming the call", "[cuda][error]") {
  try {
    HSAE_CUDA_TRY(cudaSetDevice(1 << 20));
    FAIL("no exception");
  } catch (const cuda_error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("cudaSetDevice") != std::string::npos);
    CHECK(msg.find("test_cuda_memory.cu") != std::string::npos);
  }
  (void)cudaGetLastError();
  try {
    HSAE_CUBLAS_TRY(cublasSetStream(nullptr, nullptr));
    FAIL("no exception");
  } catch (const cuda_error& e) {
    CHECK(std::string(e.what()).find("cublasSetStream") != std::string::npos);
  }
}

TEMPLATE_TEST_CASE("device_sae upload / download and storage copies", "[cuda][model]", float, __half,
                   __nv_bfloat16) {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  sae<float> m(13, 70);
  const row_matrix<float> sample = normal_matrix(32, 13, 11, 3.0f);
  init(cpu_backend{}, m, sample, init_options{.seed = 4, .b_dec = decoder_bias_init::mean});
  m.b_enc.setLinSpaced(-1.0f, 1.0f);
  device_sae<TestType> d;
  d.upload(be, m);
  CHECK(d.d_model() == 13);
  CHECK(d.d_sae() == 70);
  d.check_shapes();
  sae<float> back;
  d.download(be, back);
  CHECK(back.W_enc == m.W_enc);
  CHECK(back.W_dec == m.W_dec);
  CHECK(back.b_enc == m.b_enc);
  CHECK(back.b_dec == m.b_dec);
  // The storage copies are the rounded masters.
  std::vector<TestType> s(std::size_t(70 * 13));
  HSAE_CUDA_TRY(cudaMemcpyAsync(s.data(), d.dec_storage(), s.size() * sizeof(TestType), cudaMemcpyDeviceToHost,
                                be.stream()));
  be.synchronize();
  for (int f = 0; f < 70; ++f)
    for (int j = 0; j < 13; ++j) {
      const float want = storage_traits<TestType>::to_float(storage_traits<TestType>::from_float(m.W_dec(f, j)));
      REQUIRE(storage_traits<TestType>::to_float(s[std::size_t(f * 13 + j)]) == want);
    }
  if constexpr (std::is_same_v<TestType, float>) CHECK(d.enc_storage() == d.W_enc.data());
  else CHECK(d.enc_storage() == d.W_enc_s.data());

  device_gradients<> g;
  g.zeros_like(be, d);
  row_matrix<float> gw;
  copy_to_host(be, g.W_dec, gw);
  CHECK(gw.rows() == 70);
  CHECK(gw.cols() == 13);
  CHECK((gw.array() == 0.0f).all());
  CHECK(g.b_enc.size() == 70);
  CHECK(g.b_dec.size() == 13);

  device_sae<TestType, 71> fixed;
  CHECK_THROWS_AS(fixed.upload(be, m), config_error);
}
