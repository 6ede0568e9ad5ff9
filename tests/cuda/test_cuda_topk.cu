// SPDX-License-Identifier: Apache-2.0
// The GPU top-k (cuda/topk.cuh) against the CPU top-k (cpu/topk.hpp), bit for bit:
// indices equal, values equal (NaN: both NaN), for float, half and bfloat16 inputs (the
// CPU sees the same values converted to float), on N(0,1), ReLU'd (half zeros),
// all-equal, ascending, descending and special-value (+-0, +-inf, NaN) rows, over
// shapes with k not a power of two, rows not a multiple of the vector width (so rows
// start unaligned), B = 1, and one row of 2^20. The AuxK variant against a CPU top-k
// over each row's dead latents. Every case runs both kernels (cuda_topk_kernel).
#include "cuda_test_main.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <hsae/cpu/topk.hpp>
#include <hsae/cuda/topk.cuh>
#include <hsae/rng.hpp>

using namespace hsae;

namespace {

enum class pattern { normal, relu, equal, ascending, descending, special, ascending_nonpositive };
constexpr pattern all_patterns[] = {pattern::normal,     pattern::relu,    pattern::equal,
                                    pattern::ascending,  pattern::descending, pattern::special,
                                    pattern::ascending_nonpositive};

const char* name(pattern p) {
  switch (p) {
    case pattern::normal: return "normal";
    case pattern::relu: return "relu";
    case pattern::equal: return "equal";
    case pattern::ascending: return "ascending";
    case pattern::descending: return "descending";
    case pattern::special: return "special";
    case pattern::ascending_nonpositive: return "ascending_nonpositive";
  }
  return "?";
}

row_matrix<float> make_rows(pattern p, int rows, int n, std::uint64_t seed) {
  rng gen(seed);
  row_matrix<float> x(rows, n);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int r = 0; r < rows; ++r) {
    auto row = x.row(r);
    for (int i = 0; i < n; ++i) row(i) = float(gen.normal());
    switch (p) {
      case pattern::normal: break;
      case pattern::relu: row = row.cwiseMax(0.0f); break;
      case pattern::equal: row.setConstant(r % 2 == 0 ? 0.5f : 0.0f); break;
      case pattern::ascending: std::sort(row.begin(), row.end()); break;
      case pattern::descending: std::sort(row.begin(), row.end(), std::greater<float>()); break;
      case pattern::ascending_nonpositive:
        // Negatives ascending, then zeros: every key passes, the adversarial guard fires
        // on long rows, and the k-th key is 0, so the guard's threshold has the upper
        // half 0x7FFFFFFF, whose float form is -0.0 (the tiled kernel's edge case).
        row = row.cwiseMin(0.0f);
        std::sort(row.begin(), row.end());
        break;
      case pattern::special: {
        // Every row gets +-0, +-inf and NaN sprinkled in; every third row is mostly NaN
        // and -inf, so that it has fewer than k numbers above NaN for most k.
        const float tiny = std::numeric_limits<float>::denorm_min();
        const float specials[] = {0.0f, -0.0f, inf, -inf, nan, tiny, -tiny};
        const std::uint64_t every = r % 3 == 2 ? 1 : 8;
        for (int i = 0; i < n; ++i)
          if (gen.below(every) == 0) row(i) = specials[gen.below(7)];
        break;
      }
    }
  }
  return x;
}

bool same_value(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::memcmp(&a, &b, sizeof a) == 0;
}

/// Counts mismatches between the GPU and the reference; describes the first.
struct comparison {
  long mismatches = 0;
  std::string first;
  void compare(const row_matrix<float>& gv, const index_matrix& gi, const row_matrix<float>& cv,
               const index_matrix& ci) {
    for (Eigen::Index r = 0; r < ci.rows(); ++r)
      for (Eigen::Index t = 0; t < ci.cols(); ++t)
        if (gi(r, t) != ci(r, t) || !same_value(gv(r, t), cv(r, t))) {
          if (mismatches++ == 0) {
            std::ostringstream os;
            os << "row " << r << " rank " << t << ": gpu (" << gi(r, t) << ", " << gv(r, t) << ") cpu (" << ci(r, t)
               << ", " << cv(r, t) << ")";
            first = os.str();
          }
        }
  }
};

/// Uploads `host` as T; returns the values the device holds, as float.
template <class T>
row_matrix<float> upload(const cuda_backend& be, const row_matrix<float>& host, device_matrix<T>& dev) {
  copy_to_device(be, cref<float>(host), dev);
  row_matrix<float> seen;
  copy_to_host(be, dev, seen);
  return seen;
}

constexpr cuda_topk_kernel all_kernels[] = {cuda_topk_kernel::streaming, cuda_topk_kernel::tiled};

const char* name(cuda_topk_kernel k) {
  return k == cuda_topk_kernel::tiled ? "tiled" : k == cuda_topk_kernel::streaming ? "streaming" : "automatic";
}

/// Sizes `code` to [rows, k] and fills it with 0xFF bytes (values NaN, indices -1), so
/// that a kernel leaving a slot unwritten cannot pass on an earlier run's output.
void poison(const cuda_backend& be, device_code& code, index_t rows, int k) {
  code.resize(be, rows, k);
  HSAE_CUDA_TRY(cudaMemsetAsync(code.values.data(), 0xFF, code.values.size() * sizeof(float), be.stream()));
  HSAE_CUDA_TRY(cudaMemsetAsync(code.indices.data(), 0xFF, code.indices.size() * sizeof(index_t), be.stream()));
}

template <class T>
void run_topk(cuda_topk_kernel kernel, const cuda_backend& be, const device_matrix<T>& pre, int k, device_code& out) {
  if (kernel == cuda_topk_kernel::tiled) topk<cuda_topk_kernel::tiled>(be, pre, k, out);
  else topk<cuda_topk_kernel::streaming>(be, pre, k, out);
}

template <class T>
void run_topk_with_auxk(cuda_topk_kernel kernel, const cuda_backend& be, const device_matrix<T>& pre, int k,
                        const device_buffer<std::uint32_t>& mask, int k_aux, device_code& out, device_code& aux) {
  if (kernel == cuda_topk_kernel::tiled) topk_with_auxk<cuda_topk_kernel::tiled>(be, pre, k, mask, k_aux, out, aux);
  else topk_with_auxk<cuda_topk_kernel::streaming>(be, pre, k, mask, k_aux, out, aux);
}

struct shape {
  int rows, n, k;
};

std::vector<shape> topk_shapes() {
  std::vector<shape> s;
  if (hsae_test::sanitizer_mode()) {
    for (int k : {1, 8, 257}) s.push_back({1, k, k});
    s.push_back({2, 65, 64});
    s.push_back({3, 1000, 63});
    s.push_back({2, 5000, 512});
    s.push_back({1, 9000, 4096});
    s.push_back({1, 12000, 8});  // ascending rows overflow the 4096-key buffer: the tiled retry path
    return s;
  }
  s.push_back({4, 2, 1});  // rows narrower than a vector, starting unaligned: all head
  s.push_back({4, 3, 2});
  for (int k : {1, 8, 257, 4096}) s.push_back({1, k, k});
  for (int k : {63, 256, 4096}) s.push_back({3, k + 1, k});
  for (int k : {1, 8, 63, 64, 255, 256, 257, 512}) s.push_back({300, 1000, k});
  for (int k : {8, 64, 256, 257, 512, 4096}) s.push_back({3, 16384, k});
  s.push_back({300, 16384, 64});
  for (int k : {1, 64, 255, 1024, 4096}) s.push_back({3, 65536 + 7, k});
  for (int k : {64, 4096}) s.push_back({1, 1 << 20, k});
  return s;
}

}  // namespace

TEMPLATE_TEST_CASE("GPU top-k equals the CPU top-k bit for bit", "[cuda][topk]", float, __half, __nv_bfloat16) {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  device_matrix<TestType> dev;
  device_code code;
  row_matrix<float> gv, cv;
  index_matrix gi, ci;
  std::uint64_t seed = 1;
  for (const shape& sh : topk_shapes()) {
    for (pattern p : all_patterns) {
      // The 2^20 row is costly on the CPU side; two patterns suffice there.
      if (sh.n == (1 << 20) && p != pattern::normal && p != pattern::ascending) continue;
      const row_matrix<float> x = upload(be, make_rows(p, sh.rows, sh.n, ++seed), dev);
      cpu::topk_rows(cpu_backend{}, cref<float>(x), sh.k, cv, ci);
      for (cuda_topk_kernel kernel : all_kernels) {
        poison(be, code, sh.rows, sh.k);
        run_topk(kernel, be, dev, sh.k, code);
        REQUIRE(code.rows() == sh.rows);
        REQUIRE(code.k() == sh.k);
        copy_to_host(be, code.values, gv);
        copy_to_host(be, code.indices, gi);
        comparison cmp;
        cmp.compare(gv, gi, cv, ci);
        INFO(name(kernel) << " " << storage_traits<TestType>::name << " " << name(p) << " B=" << sh.rows
                          << " n=" << sh.n << " k=" << sh.k << ": " << cmp.mismatches
                          << " mismatches; first: " << cmp.first);
        REQUIRE(cmp.mismatches == 0);
      }
    }
  }
}

TEST_CASE("GPU top-k: the result does not depend on the run", "[cuda][topk]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  device_matrix<float> dev;
  upload(be, make_rows(pattern::relu, 64, 20000, 99), dev);
  for (cuda_topk_kernel kernel : all_kernels) {
    INFO(name(kernel));
    device_code a, b;
    run_topk(kernel, be, dev, 300, a);
    run_topk(kernel, be, dev, 300, b);
    row_matrix<float> va, vb;
    index_matrix ia, ib;
    copy_to_host(be, a.values, va);
    copy_to_host(be, b.values, vb);
    copy_to_host(be, a.indices, ia);
    copy_to_host(be, b.indices, ib);
    CHECK(ia == ib);
    CHECK(std::memcmp(va.data(), vb.data(), std::size_t(va.size()) * sizeof(float)) == 0);
  }
}

// The automatic choice is the faster kernel of each shape measured on the H200
// (bench/RESULTS.md): tiled for fp32 everywhere, streaming for bf16 from n k = 2^24.
static_assert(hsae::cuda::detail::automatic_topk_kernel<float>(131072, 256) == cuda_topk_kernel::tiled);
static_assert(hsae::cuda::detail::automatic_topk_kernel<float>(16384, 32) == cuda_topk_kernel::tiled);
static_assert(hsae::cuda::detail::automatic_topk_kernel<__nv_bfloat16>(16384, 256) == cuda_topk_kernel::tiled);
static_assert(hsae::cuda::detail::automatic_topk_kernel<__nv_bfloat16>(65536, 128) == cuda_topk_kernel::tiled);
static_assert(hsae::cuda::detail::automatic_topk_kernel<__nv_bfloat16>(65536, 256) == cuda_topk_kernel::streaming);
static_assert(hsae::cuda::detail::automatic_topk_kernel<__nv_bfloat16>(131072, 128) == cuda_topk_kernel::streaming);
static_assert(hsae::cuda::detail::automatic_topk_kernel<__half>(131072, 64) == cuda_topk_kernel::tiled);

TEMPLATE_TEST_CASE("GPU top-k: the automatic choice runs a kernel and equals both, bit for bit", "[cuda][topk]",
                   float, __half, __nv_bfloat16) {
  using T = TestType;
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  // (n, k): one shape on each side of the 2-byte crossing (n k = 2^24).
  for (const auto& [n, k] : {std::pair{20000, 300}, std::pair{65536, 256}}) {
    INFO("n " << n << ", k " << k << ", automatic runs "
              << name(hsae::cuda::detail::automatic_topk_kernel<T>(n, k)));
    device_matrix<T> dev;
    upload(be, make_rows(pattern::relu, 16, n, 7), dev);
    device_code a, st, ti;
    poison(be, a, 16, k);
    topk(be, dev, k, a);  // the default: automatic
    run_topk(cuda_topk_kernel::streaming, be, dev, k, st);
    run_topk(cuda_topk_kernel::tiled, be, dev, k, ti);
    row_matrix<float> va, vs, vt;
    index_matrix ia, is, it;
    copy_to_host(be, a.values, va);
    copy_to_host(be, st.values, vs);
    copy_to_host(be, ti.values, vt);
    copy_to_host(be, a.indices, ia);
    copy_to_host(be, st.indices, is);
    copy_to_host(be, ti.indices, it);
    CHECK(ia == is);
    CHECK(ia == it);
    CHECK(std::memcmp(va.data(), vs.data(), std::size_t(va.size()) * sizeof(float)) == 0);
    CHECK(std::memcmp(va.data(), vt.data(), std::size_t(va.size()) * sizeof(float)) == 0);
  }
}

namespace {

/// CPU AuxK reference: per row, the sorted top-min(k_aux, n_dead) among dead latents
/// (ids ascending), slots beyond n_dead -> (-1, 0).
void reference_auxk(const row_matrix<float>& x, const std::vector<std::uint32_t>& mask, int k_aux,
                    row_matrix<float>& values, index_matrix& indices) {
  std::vector<index_t> dead;
  for (index_t i = 0; i < index_t(x.cols()); ++i)
    if ((mask[std::size_t(i) / 32] >> (i % 32)) & 1u) dead.push_back(i);
  values.setZero(x.rows(), k_aux);
  indices.setConstant(x.rows(), k_aux, -1);
  const int kk = int(std::min<std::size_t>(std::size_t(k_aux), dead.size()));
  if (kk == 0) return;
  cpu::row_selector<float> sel;
  std::vector<float> gathered(dead.size()), v(std::size_t(kk), 0.0f);
  std::vector<index_t> id(std::size_t(kk), 0);
  for (Eigen::Index r = 0; r < x.rows(); ++r) {
    for (std::size_t j = 0; j < dead.size(); ++j) gathered[j] = x(r, dead[j]);
    sel.select(gathered.data(), index_t(dead.size()), index_t(kk), v.data(), id.data());
    for (int t = 0; t < kk; ++t) {
      values(r, t) = v[std::size_t(t)];
      indices(r, t) = dead[std::size_t(id[std::size_t(t)])];
    }
  }
}

enum class mask_kind { random30, few, all, none };

std::vector<std::uint32_t> make_mask(mask_kind kind, int n, std::uint64_t seed) {
  std::vector<std::uint32_t> m((std::size_t(n) + 31) / 32, 0u);
  rng gen(seed);
  for (int i = 0; i < n; ++i) {
    bool dead = false;
    switch (kind) {
      case mask_kind::random30: dead = gen.below(10) < 3; break;
      case mask_kind::few: dead = i % (n / 5 + 1) == 3; break;  // about five dead latents
      case mask_kind::all: dead = true; break;
      case mask_kind::none: dead = false; break;
    }
    if (dead) m[std::size_t(i) / 32] |= 1u << (i % 32);
  }
  return m;
}

}  // namespace

TEMPLATE_TEST_CASE("GPU top-k with AuxK: both selections equal the CPU's", "[cuda][topk][auxk]", float, __half,
                   __nv_bfloat16) {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  struct auxk_shape {
    int rows, n, k, k_aux;
  };
  // Under compute-sanitizer (racecheck is ~100x slower) the large configurations get one
  // short row each: ascending rows at k=4096 compact once per buffer, minutes there.
  std::vector<auxk_shape> shapes = {{3, 1000, 8, 37}, {1, 257, 1, 257}};
  if (hsae_test::sanitizer_mode()) {
    shapes.push_back({1, 3000, 256, 1024});
    shapes.push_back({1, 6000, 4096, 1024});
    shapes.push_back({1, 9000, 8, 256});  // the AuxK buffer overflows (mask "all"), alone or with the main one
  } else {
    shapes.push_back({3, 16384, 256, 2048});
    shapes.push_back({2, 20000, 4096, 2048});
    shapes.push_back({300, 1000, 64, 256});
    shapes.push_back({1, 65536 + 7, 1024, 512});
    shapes.push_back({2, 100000, 257, 1000});
  }
  device_matrix<TestType> dev;
  device_buffer<std::uint32_t> mask_dev;
  device_code code, aux;
  row_matrix<float> gv;
  index_matrix gi;
  std::uint64_t seed = 1000;
  for (const auxk_shape& sh : shapes) {
    for (mask_kind mk : {mask_kind::random30, mask_kind::few, mask_kind::all, mask_kind::none}) {
      for (pattern p : {pattern::normal, pattern::relu, pattern::ascending, pattern::special}) {
        const row_matrix<float> x = upload(be, make_rows(p, sh.rows, sh.n, ++seed), dev);
        const std::vector<std::uint32_t> mask = make_mask(mk, sh.n, seed);
        mask_dev.resize(be, mask.size());
        HSAE_CUDA_TRY(cudaMemcpyAsync(mask_dev.data(), mask.data(), mask.size() * sizeof(std::uint32_t),
                                      cudaMemcpyHostToDevice, be.stream()));
        row_matrix<float> rv, ra;  // the CPU's main and AuxK selections
        index_matrix ri, rai;
        cpu::topk_rows(cpu_backend{}, cref<float>(x), sh.k, rv, ri);
        reference_auxk(x, mask, sh.k_aux, ra, rai);
        for (cuda_topk_kernel kernel : all_kernels) {
          poison(be, code, sh.rows, sh.k);
          poison(be, aux, sh.rows, sh.k_aux);
          run_topk_with_auxk(kernel, be, dev, sh.k, mask_dev, sh.k_aux, code, aux);
          INFO(name(kernel));
          INFO(storage_traits<TestType>::name << " " << name(p) << " mask " << int(mk) << " B=" << sh.rows
                                              << " n=" << sh.n << " k=" << sh.k << " k_aux=" << sh.k_aux);
          REQUIRE(aux.k() == sh.k_aux);
          for (const auto& [what, got, ref_v, ref_i] :
               {std::tie("main", code, rv, ri), std::tie("auxk", aux, ra, rai)}) {
            copy_to_host(be, got.values, gv);
            copy_to_host(be, got.indices, gi);
            comparison cmp;
            cmp.compare(gv, gi, ref_v, ref_i);
            INFO(what << ": " << cmp.mismatches << " mismatches; first: " << cmp.first);
            REQUIRE(cmp.mismatches == 0);
          }
        }
      }
    }
  }
}

TEST_CASE("GPU top-k validates its arguments", "[cuda][topk]") {
  hsae_test::test_stream stream;
  const cuda_backend be(stream.s);
  device_matrix<float> dev(be, 2, 5000);
  device_code code, aux;
  CHECK_THROWS_AS(topk(be, dev, 0, code), config_error);
  CHECK_THROWS_AS(topk(be, dev, 5001, code), config_error);
  CHECK_THROWS_AS(topk(be, dev, cuda_topk_max_k + 1, code), config_error);
  CHECK_THROWS_AS(topk<cuda_topk_kernel::tiled>(be, dev, 5001, code), config_error);
  device_matrix<float> empty(be, 2, 0);
  CHECK_THROWS_AS(topk(be, empty, 1, code), shape_error);
  device_buffer<std::uint32_t> mask(be, (5000 + 31) / 32);
  mask.zero(be);
  CHECK_THROWS_AS(topk_with_auxk(be, dev, 8, mask, 0, code, aux), config_error);
  CHECK_THROWS_AS(topk_with_auxk(be, dev, 8, mask, cuda_topk_max_k_aux + 1, code, aux), config_error);
  device_buffer<std::uint32_t> short_mask(be, 10);
  CHECK_THROWS_AS(topk_with_auxk(be, dev, 8, short_mask, 16, code, aux), shape_error);
  // A batch of zero rows is valid and launches nothing.
  device_matrix<float> no_rows(be, 0, 100);
  topk(be, no_rows, 10, code);
  CHECK(code.rows() == 0);
  CHECK(code.k() == 10);
}
