// SPDX-License-Identifier: Apache-2.0
// The NCCL communicator (comm/nccl.cuh) on one GPU: one NCCL rank per device, so the group
// is of size 1, bootstrapped through single_process_communicator; every collective and
// element type, n = 0, split and barrier. The ordered reduction's device fold is checked
// against the host's rank-order fold on gathered data of 3 "ranks", bit for bit. The
// multi-rank logic is the MPI communicator's (tests/mpi).
#include "cuda_test_main.hpp"

#include <hsae/comm/nccl.cuh>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace hsae;

namespace {

/// A device buffer holding `host`, read back with `get`.
template <class T>
struct dev_vec {
  T* p = nullptr;
  std::size_t n = 0;
  explicit dev_vec(const std::vector<T>& host) : n(host.size()) {
    HSAE_CUDA_TRY(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
    if (n) HSAE_CUDA_TRY(cudaMemcpy(p, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~dev_vec() { (void)cudaFree(p); }
  dev_vec(const dev_vec&) = delete;
  dev_vec& operator=(const dev_vec&) = delete;
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) HSAE_CUDA_TRY(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

/// The message of the hsae::config_error `fn` throws ("<none>" when it returns).
template <class Fn>
std::string config_error_of(Fn&& fn) {
  try {
    fn();
  } catch (const config_error& e) {
    return e.what();
  }
  return "<none>";
}

}  // namespace

TEMPLATE_TEST_CASE("fold_ranks adds in rank order, bitwise as the host", "[nccl]", float, double, std::int64_t,
                   std::uint8_t) {
  using T = TestType;
  const int R = 3;
  const std::size_t n = 5000;
  std::mt19937_64 g(11);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> all(n * R);
  for (std::size_t j = 0; j < all.size(); ++j) {
    if constexpr (std::is_floating_point_v<T>) all[j] = T(u(g) * std::pow(10.0, double(j % 9)));
    else all[j] = T(j % 50);
  }
  std::vector<T> expect(n);
  for (std::size_t i = 0; i < n; ++i) {
    T acc = all[i];
    for (int r = 1; r < R; ++r) acc = static_cast<T>(acc + all[std::size_t(r) * n + i]);
    expect[i] = acc;
  }
  hsae_test::test_stream s;
  dev_vec<T> d_all(all), d_out(std::vector<T>(n, T(0)));
  cuda::detail::fold_ranks(d_all.p, n, R, d_out.p, s.s);
  HSAE_CUDA_TRY(cudaStreamSynchronize(s.s));
  const std::vector<T> got = d_out.get();
  CHECK(std::memcmp(got.data(), expect.data(), n * sizeof(T)) == 0);
}

TEMPLATE_TEST_CASE("nccl_communicator on one GPU: every collective is the identity", "[nccl]", float, double,
                   std::int32_t, std::int64_t, std::uint8_t) {
  using T = TestType;
  single_process_communicator boot;
  hsae_test::test_stream s;
  nccl_communicator c = nccl_communicator::create(boot, s.s, nccl_options{std::chrono::seconds(60)});
  CHECK(c.rank() == 0);
  CHECK(c.size() == 1);
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(777)}) {
    std::vector<T> h(n);
    for (std::size_t i = 0; i < n; ++i) h[i] = T(i % 100);
    dev_vec<T> a(h), b(std::vector<T>(n, T(0)));
    c.all_gather(a.p, n, b.p);
    c.synchronize();
    CHECK(b.get() == h);
    for (reduction red : {reduction::native, reduction::ordered}) {
      c.all_reduce_sum(a.p, n, red);
      c.reduce_scatter_sum(a.p, n, b.p, red);
      c.synchronize();
      CHECK(a.get() == h);
      CHECK(b.get() == h);
    }
    c.broadcast(a.p, n, 0);
    c.synchronize();
    CHECK(a.get() == h);
  }
  nccl_communicator sub = c.split(0, 0);
  CHECK(sub.size() == 1);
  sub.barrier();
  c.barrier();
  std::int32_t dummy = 0;
  CHECK_THAT(config_error_of([&] { c.broadcast(&dummy, 1, 1); }), Catch::Contains("root 1 is not a rank"));
}
