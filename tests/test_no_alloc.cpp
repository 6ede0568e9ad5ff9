// SPDX-License-Identifier: Apache-2.0
// train_step, hierarchical_loss_backward and auxk_backward allocate nothing once their
// workspaces have seen the shapes. Every global operator new / new[] (plain, aligned,
// nothrow) is replaced by a counting one; on glibc without sanitizers malloc, calloc,
// realloc, posix_memalign, aligned_alloc and memalign are counted as well (they forward
// to glibc's __libc_* entry points), which catches Eigen's heap temporaries and
// OpenMP's. Independently, EIGEN_RUNTIME_NO_MALLOC makes every Eigen heap allocation
// report through eigen_assert, which this file routes to a counter.
// Replacing operator new/delete by malloc/free is what this file means to do.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <algorithm>
#include <new>

namespace no_alloc_test {
inline std::atomic<bool> counting{false};
inline std::atomic<long> news{0}, mallocs{0}, eigen_mallocs{0};
/// A failed eigen_assert; while counting, the one that fires is "heap allocation is
/// forbidden" (correct code trips no other), so it is counted as an Eigen allocation.
inline void eigen_failed() {
  if (counting.load()) ++eigen_mallocs;
}
}  // namespace no_alloc_test

#define EIGEN_RUNTIME_NO_MALLOC
// eigen_assert is otherwise compiled out under NDEBUG: route it to the counter.
#define eigen_assert(x) ((x) ? (void)0 : no_alloc_test::eigen_failed())

#include <catch2/catch.hpp>
#include <hsae/hsae.hpp>

#include "test_util.hpp"

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define HSAE_TEST_COUNT_MALLOC 1
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* malloc(std::size_t n) {
  if (no_alloc_test::counting.load(std::memory_order_relaxed)) ++no_alloc_test::mallocs;
  return __libc_malloc(n);
}
void* calloc(std::size_t c, std::size_t n) {
  if (no_alloc_test::counting.load(std::memory_order_relaxed)) ++no_alloc_test::mallocs;
  return __libc_calloc(c, n);
}
void* realloc(void* p, std::size_t n) {
  if (no_alloc_test::counting.load(std::memory_order_relaxed)) ++no_alloc_test::mallocs;
  return __libc_realloc(p, n);
}
void* memalign(std::size_t a, std::size_t n) {
  if (no_alloc_test::counting.load(std::memory_order_relaxed)) ++no_alloc_test::mallocs;
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) { return memalign(a, n); }
int posix_memalign(void** p, std::size_t a, std::size_t n) {
  *p = memalign(a, n);
  return *p ? 0 : 12;  // ENOMEM
}
}
#else
#define HSAE_TEST_COUNT_MALLOC 0
#endif

namespace {
void* counted_new(std::size_t n, std::size_t align = 0) {
  if (no_alloc_test::counting.load(std::memory_order_relaxed)) ++no_alloc_test::news;
  if (n == 0) n = 1;
  void* p = nullptr;
  if (align > alignof(std::max_align_t)) {
    if (posix_memalign(&p, align, n) != 0) p = nullptr;
  } else {
    p = std::malloc(n);
  }
  return p;
}
}  // namespace

void* operator new(std::size_t n) {
  if (void* p = counted_new(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = counted_new(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = counted_new(n, std::size_t(a))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  if (void* p = counted_new(n, std::size_t(a))) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return counted_new(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return counted_new(n); }
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_new(n, std::size_t(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_new(n, std::size_t(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }

namespace {

struct allocations {
  long news = 0, mallocs = 0, eigen = 0;
  /// operator new calls malloc, and so does Eigen: each allocation counts once here.
  long total() const { return std::max(news, mallocs) + (HSAE_TEST_COUNT_MALLOC ? 0 : eigen); }
};

/// The allocations `fn` makes on any thread (operator new, malloc where counted, and
/// Eigen's own heap allocations).
template <class Fn>
allocations count_allocations(Fn&& fn) {
  no_alloc_test::news = 0;
  no_alloc_test::mallocs = 0;
  no_alloc_test::eigen_mallocs = 0;
  Eigen::internal::set_is_malloc_allowed(false);
  no_alloc_test::counting = true;
  fn();
  no_alloc_test::counting = false;
  Eigen::internal::set_is_malloc_allowed(true);
  return {no_alloc_test::news.load(), no_alloc_test::mallocs.load(), no_alloc_test::eigen_mallocs.load()};
}

#define REPORT_ALLOCATIONS(a) \
  INFO("operator new: " << (a).news << ", malloc: " << (a).mallocs << " (counted: " << HSAE_TEST_COUNT_MALLOC << ")" \
                        << ", Eigen: " << (a).eigen)

// Small enough that Eigen's GEMM keeps its packing blocks on the stack
// (EIGEN_STACK_ALLOCATION_LIMIT); larger products allocate them inside Eigen.
constexpr int D = 32, F = 128, B = 64;

hsae::row_matrix<float> batch(std::uint64_t seed) {
  hsae::rng g(seed);
  hsae::row_matrix<float> x(B, D);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = float(g.normal());
  return x;
}

/// The libraries whose encoder GEMM the step cases run with: Eigen, and oneDNN where built.
std::vector<hsae::cpu_gemm> gemm_libraries() {
  std::vector<hsae::cpu_gemm> v{hsae::cpu_gemm::eigen};
  if (hsae::onednn_built()) v.push_back(hsae::cpu_gemm::onednn);
  return v;
}

/// The allocations of the encoder GEMM alone at the step's shape, once its plan exists:
/// zero for Eigen on one thread; oneDNN's `execute` allocates a few small blocks of its own
/// each call (7 with oneDNN 2.6.3's fp32 matmul), which hsae cannot avoid. A step may
/// allocate exactly this and nothing more.
allocations gemm_allocations(const hsae::cpu_backend& be, const hsae::sae<float>& m, const hsae::row_matrix<float>& x) {
  hsae::row_matrix<float> pre;
  hsae::cpu::detail::encoder_gemm(be, m, x, pre);
  const auto g = count_allocations([&] { hsae::cpu::detail::encoder_gemm(be, m, x, pre); });
  if (be.gemm == hsae::cpu_gemm::eigen) CHECK(g.total() == 0);
  // Small fixed bookkeeping per executed primitive (the matmul, and for oneDNN's bf16 matmul
  // the reorder of W_enc), not buffers.
  CHECK(g.total() <= 32);
  CHECK(g.eigen == 0);
  return g;
}

}  // namespace

TEST_CASE("the counters see allocations (the test can fail)", "[no_alloc]") {
  const auto a = count_allocations([] {
    auto* v = new std::vector<int>(100);
    delete v;
  });
  CHECK(a.news >= 1);
  const auto e = count_allocations([] {
    Eigen::MatrixXf m(50, 50);
    m.setZero();
  });
  CHECK(e.eigen + e.mallocs >= 1);
}

TEST_CASE("train_step with AuxK allocates nothing once the shapes settle", "[no_alloc]") {
  using namespace hsae;
  // Eigen's own multi-threaded GEMM (the encoder product) allocates its per-thread
  // bookkeeping on every call (Eigen::internal::parallelize_gemm); hsae's loops run on
  // be's threads either way. Count hsae's allocations: the GEMM on one thread.
  const int eigen_threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  const cpu_gemm lib = GENERATE(from_range(gemm_libraries()));
  const gemm_precision prec = GENERATE(gemm_precision::fp32, gemm_precision::bf16);
  const cpu_backend be{.num_threads = 2, .gemm = lib, .encoder_precision = prec};
  INFO("encoder GEMM: " << encoder_gemm_info<float>(be));
  sae<float> m = hsae_test::random_sae<float>(D, F, 3);
  adam<float> opt(m, adam_options{});
  // Dead after one batch without firing: with F = 128 and 64 rows of k = 8 some
  // latents stay dead every step, and their number changes from step to step.
  dead_latent_tracker dead(F, B);
  const dynamic_k_schedule schedule = dynamic_k_schedule::geometric(2, 8);
  train_workspace<float> ws;
  step_stats st;
  step_options so;
  so.auxk.k_aux = 16;
  for (int step = 0; step < 2; ++step) train_step(be, m, opt, dead, batch(10 + step), schedule, ws, st, so);
  REQUIRE(dead.num_dead() > 0);
  const allocations g = gemm_allocations(be, m, batch(9));
  for (int step = 2; step < 5; ++step) {
    const row_matrix<float> x = batch(10 + step);
    const auto a = count_allocations([&] { train_step(be, m, opt, dead, x, schedule, ws, st, so); });
    REPORT_ALLOCATIONS(a);
    INFO("step " << step << " dead " << st.dead << " aux loss " << st.aux_loss << "; the GEMM's own: " << g.total());
    CHECK(st.dead > 0);
    CHECK(st.aux_loss > 0);
    CHECK(a.total() == g.total());
    CHECK(a.eigen == 0);
  }
  // The returning form allocates the returned statistics' two level vectors only.
  const row_matrix<float> x = batch(99);
  step_stats r;
  const auto a = count_allocations([&] { r = train_step(be, m, opt, dead, x, schedule, ws, so); });
  REPORT_ALLOCATIONS(a);
  CHECK(a.news == 2 + g.news);
  CHECK(a.eigen == 0);
  CHECK(r.levels.level_k.size() == schedule.size());
  Eigen::setNbThreads(eigen_threads);
}

TEST_CASE("loss_and_gradients allocates nothing once the shapes settle", "[no_alloc]") {
  using namespace hsae;
  const int eigen_threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);  // as above: Eigen's threaded GEMM allocates its bookkeeping
  const cpu_gemm lib = GENERATE(from_range(gemm_libraries()));
  const cpu_backend be{.num_threads = 2, .gemm = lib};
  INFO("encoder GEMM: " << encoder_gemm_info<float>(be));
  const sae<float> m = hsae_test::random_sae<float>(D, F, 5);
  const dynamic_k_schedule schedule = dynamic_k_schedule::geometric(2, 8);
  train_workspace<float> ws;
  loss_stats st;
  for (int step = 0; step < 2; ++step) loss_and_gradients(be, m, batch(20 + step), schedule, ws, st);
  const row_matrix<float> x = batch(30);
  const allocations g = gemm_allocations(be, m, x);
  const auto a = count_allocations([&] { loss_and_gradients(be, m, x, schedule, ws, st); });
  REPORT_ALLOCATIONS(a);
  CHECK(a.total() == g.total());
  CHECK(a.eigen == 0);
  CHECK(st.loss > 0);
  Eigen::setNbThreads(eigen_threads);
}

TEST_CASE("hierarchical_loss_backward and auxk_backward allocate nothing once the shapes settle", "[no_alloc]") {
  using namespace hsae;
  const cpu_backend be{.num_threads = 2};
  const sae<float> m = hsae_test::random_sae<float>(D, F, 5);
  const dynamic_k_schedule schedule = dynamic_k_schedule::all_prefixes(8);
  const row_matrix<float> x = batch(7);
  sparse_code<float> code;
  row_matrix<float> pre;
  encode(be, m, x, 8, code, pre);
  sae_gradients<float> g;
  g.zeros_like(m);
  loss_workspace<float> lw;
  auxk_workspace<float> aw;
  std::vector<index_t> dead_a, dead_b;
  for (index_t f = 0; f < F; f += 3) dead_a.push_back(f);
  for (index_t f = 1; f < F; f += 5) dead_b.push_back(f);
  const auxk_options ao{.k_aux = 16};
  loss_stats st;
  for (int i = 0; i < 2; ++i) {
    st = hierarchical_loss_backward(be, m, x, code, schedule, g, lw);
    (void)auxk_backward(be, m, x, pre, lw.residual, dead_a, ao, g, aw);
  }
  // The returned loss_stats is new: its two level vectors, nothing else.
  const auto l = count_allocations([&] { st = hierarchical_loss_backward(be, m, x, code, schedule, g, lw); });
  {
    REPORT_ALLOCATIONS(l);
    CHECK(l.news == 2);
    CHECK(l.eigen == 0);
  }
  // The unchecked body into a reused loss_stats allocates nothing.
  const auto u = count_allocations([&] {
    cpu::detail::schedule_loss_unchecked<true>(be, m, x, code, schedule, &g, lw, st);
  });
  {
    REPORT_ALLOCATIONS(u);
    CHECK(u.total() == 0);
    CHECK(u.eigen == 0);
  }
  double aux = 0;
  const auto k = count_allocations([&] {
    aux = auxk_backward(be, m, x, pre, lw.residual, dead_a, ao, g, aw);
    aux += auxk_backward(be, m, x, pre, lw.residual, dead_b, ao, g, aw);  // another dead count
  });
  REPORT_ALLOCATIONS(k);
  CHECK(aux > 0);
  CHECK(k.total() == 0);
  CHECK(k.eigen == 0);
}
