// SPDX-License-Identifier: Apache-2.0
// GPU benchmarks (CUDA-event timing, Google Benchmark manual time):
//  - BM_topk<T>: sorted top-k of B = 4096 rows, F in {16384, 65536, 131072}, K in {32, 64,
//    128, 256}, T = float and bfloat16, N(0,1) inputs. Counters: bytes read (B*F*sizeof T),
//    GB/s, frac_peak = time of the HBM read floor at the nominal peak (memory clock x bus
//    width x 2 from the device attributes) / measured time, frac_reduce = time of a
//    read-only reduction over the same buffer in this binary (the achievable floor) /
//    measured time. The streaming kernel.
//  - BM_topk_tiled<T>: the same with cuda_topk_kernel::tiled, and BM_topk_auto<T> with
//    the default (cuda_topk_kernel::automatic, whose label names the kernel it runs),
//    registered right after, so the kernels are timed side by side on the same inputs.
//  - BM_read_reduce<T>: that reduction alone (GB/s).
//  - BM_encoder_gemm<T>: the encoder's pre-activations (cuBLASLt GEMM with the fused
//    bias+ReLU epilogue) at B = 4096, D = 1024, F in {16384, 65536}; TFLOP/s.
// Without a device the binary prints "no CUDA device" and exits 0.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <tuple>
#include <utility>

#include <hsae/cuda/encode.cuh>
#include <hsae/cuda/topk.cuh>

#include "cuda_bench_common.cuh"

using namespace hsae;

namespace {

constexpr int batch = 4096;

struct context {
  hsae_bench::stream_guard guard;
  cudaStream_t stream = guard.s;
  std::unique_ptr<cuda_backend> be;
  hsae_bench::event_timer timer;
  double peak_bytes_per_s = 0;
  context() {
    be = std::make_unique<cuda_backend>(stream);
    int clock_khz = 0, bus_bits = 0;
    HSAE_CUDA_TRY(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, be->device()));
    HSAE_CUDA_TRY(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, be->device()));
    peak_bytes_per_s = 2.0 * double(clock_khz) * 1e3 * double(bus_bits) / 8.0;
  }
  static context& get() {
    static context c;
    return c;
  }
  /// Runs `fn` (enqueueing work on the stream) between two events; seconds.
  template <class Fn>
  double time(Fn&& fn) {
    return timer.time(stream, fn);
  }
};

__device__ __forceinline__ std::uint32_t hash32(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return std::uint32_t(x);
}

/// Approximately N(0,1) (Box-Muller on hashed bits), deterministic in (seed, i).
template <class T>
__global__ void fill_normal(T* out, std::size_t n, std::uint64_t seed) {
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float u1 = (float(hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i)) + 1.0f) * 0x1.0p-32f;
    const float u2 = float(hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i + 1)) * 0x1.0p-32f;
    out[i] = storage_traits<T>::from_float(sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

/// Read-only reduction: every element read once with 16-byte loads; one partial per
/// block written so that nothing is optimised away.
template <class T>
__global__ void read_reduce(const uint4* __restrict__ in, std::size_t nvec, float* __restrict__ partial) {
  float acc = 0.0f;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const uint4 v = __ldg(in + i);
    acc += __uint_as_float(v.x ^ v.y) + __uint_as_float(v.z ^ v.w);
  }
  __shared__ float s[32];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
  if ((threadIdx.x & 31u) == 0) s[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) t += s[w];
    partial[blockIdx.x] = t;
  }
}

template <class T>
struct input {
  device_matrix<T> x;
  device_buffer<float> partial;
  double reduce_seconds = 0;
};

/// One input per (T, F), generated on the device and reused across K; the reduction
/// floor is measured once per input (best of 5).
template <class T>
input<T>& input_for(int f) {
  static std::map<int, std::unique_ptr<input<T>>> cache;
  auto& slot = cache[f];
  if (!slot) {
    context& c = context::get();
    cache.clear();  // one resident input per type at a time (2 GiB at F = 131072 fp32)
    auto in = std::make_unique<input<T>>();
    in->x.resize(*c.be, batch, f);
    fill_normal<T><<<2048, 256, 0, c.stream>>>(in->x.data(), in->x.size(), std::uint64_t(f));
    HSAE_CUDA_CHECK_LAUNCH();
    const std::size_t nvec = in->x.size() * sizeof(T) / 16;
    int sms = 0;
    HSAE_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c.be->device()));
    const unsigned grid = unsigned(sms) * 8;
    in->partial.resize(*c.be, grid);
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      const double s = c.time([&] {
        read_reduce<T><<<grid, 512, 0, c.stream>>>(reinterpret_cast<const uint4*>(in->x.data()), nvec,
                                                   in->partial.data());
      });
      best = s < best ? s : best;
    }
    in->reduce_seconds = best;
    cache[f] = std::move(in);
    return *cache[f];
  }
  return *slot;
}

template <class T, cuda_topk_kernel Kernel>
void topk_bench(benchmark::State& state) {
  const int f = int(state.range(0)), k = int(state.range(1));
  context& c = context::get();
  input<T>& in = input_for<T>(f);
  device_code code;
  topk<Kernel>(*c.be, std::as_const(in.x).view(), k, code);  // warm-up (allocates the outputs)
  HSAE_CUDA_TRY(cudaStreamSynchronize(c.stream));
  double total = 0;
  for (auto _ : state) {
    const double s = c.time([&] { topk<Kernel>(*c.be, std::as_const(in.x).view(), k, code); });
    state.SetIterationTime(s);
    total += s;
  }
  const double per = total / double(state.iterations());
  const double bytes = double(batch) * double(f) * sizeof(T);
  state.SetBytesProcessed(std::int64_t(bytes) * state.iterations());
  state.counters["bytes_read"] = bytes;
  state.counters["GB/s"] = bytes / per * 1e-9;
  state.counters["frac_peak"] = (bytes / c.peak_bytes_per_s) / per;
  state.counters["frac_reduce"] = in.reduce_seconds / per;
}

template <class T>
void BM_topk(benchmark::State& state) {
  topk_bench<T, cuda_topk_kernel::streaming>(state);
}

template <class T>
void BM_topk_tiled(benchmark::State& state) {
  topk_bench<T, cuda_topk_kernel::tiled>(state);
}

template <class T>
void BM_topk_auto(benchmark::State& state) {
  topk_bench<T, cuda_topk_kernel::automatic>(state);
  const bool tiled = hsae::cuda::detail::automatic_topk_kernel<T>(state.range(0), state.range(1)) == cuda_topk_kernel::tiled;
  state.SetLabel(tiled ? "runs tiled" : "runs streaming");
}

template <class T>
void BM_read_reduce(benchmark::State& state) {
  const int f = int(state.range(0));
  context& c = context::get();
  input<T>& in = input_for<T>(f);
  const std::size_t nvec = in.x.size() * sizeof(T) / 16;
  const unsigned grid = unsigned(in.partial.size());
  double total = 0;
  for (auto _ : state) {
    const double s = c.time([&] {
      read_reduce<T><<<grid, 512, 0, c.stream>>>(reinterpret_cast<const uint4*>(in.x.data()), nvec,
                                                 in.partial.data());
    });
    state.SetIterationTime(s);
    total += s;
  }
  const double per = total / double(state.iterations());
  const double bytes = double(batch) * double(f) * sizeof(T);
  state.SetBytesProcessed(std::int64_t(bytes) * state.iterations());
  state.counters["GB/s"] = bytes / per * 1e-9;
  state.counters["frac_peak"] = (bytes / c.peak_bytes_per_s) / per;
}

template <class T>
void BM_encoder_gemm(benchmark::State& state) {
  const int f = int(state.range(0)), d = 1024;
  context& c = context::get();
  sae<float> m(d, f);  // zero weights are fine for timing; shapes are what matter
  device_sae<T> dm;
  dm.upload(*c.be, m);
  device_matrix<T> x(*c.be, batch, d);
  fill_normal<T><<<1024, 256, 0, c.stream>>>(x.data(), x.size(), 1);
  HSAE_CUDA_CHECK_LAUNCH();
  device_matrix<T> pre;
  encode_workspace<T> ws;
  pre_activations(*c.be, dm, std::as_const(x).view(), pre, ws);  // warm-up
  HSAE_CUDA_TRY(cudaStreamSynchronize(c.stream));
  double total = 0;
  for (auto _ : state) {
    const double s = c.time([&] { pre_activations(*c.be, dm, std::as_const(x).view(), pre, ws); });
    state.SetIterationTime(s);
    total += s;
  }
  const double flops = 2.0 * batch * double(d) * double(f);
  state.counters["TFLOP/s"] = flops / (total / double(state.iterations())) * 1e-12;
  state.counters["cublaslt_epilogue"] = ws.used_cublaslt ? 1 : 0;
}

void topk_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"F", "K"});
  for (int f : {16384, 65536, 131072})
    for (int k : {32, 64, 128, 256}) b->Args({f, k});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

void f_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"F"});
  for (int f : {16384, 65536, 131072}) b->Args({f});
  b->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK_TEMPLATE(BM_topk, float)->Apply(topk_args);
BENCHMARK_TEMPLATE(BM_topk_tiled, float)->Apply(topk_args);
BENCHMARK_TEMPLATE(BM_topk_auto, float)->Apply(topk_args);
BENCHMARK_TEMPLATE(BM_topk, __nv_bfloat16)->Apply(topk_args);
BENCHMARK_TEMPLATE(BM_topk_tiled, __nv_bfloat16)->Apply(topk_args);
BENCHMARK_TEMPLATE(BM_topk_auto, __nv_bfloat16)->Apply(topk_args);
BENCHMARK_TEMPLATE(BM_read_reduce, float)->Apply(f_args);
BENCHMARK_TEMPLATE(BM_read_reduce, __nv_bfloat16)->Apply(f_args);
BENCHMARK_TEMPLATE(BM_encoder_gemm, float)->ArgNames({"F"})->Arg(16384)->Arg(65536)->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_encoder_gemm, __nv_bfloat16)->ArgNames({"F"})->Arg(16384)->Arg(65536)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) { return hsae_bench::run_main(argc, argv, [] {}); }
