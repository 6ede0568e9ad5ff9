// SPDX-License-Identifier: Apache-2.0
// File parsing and reading on the CPU, one thread.
//
// BM_safetensors_header/N: safetensors_view over a file of N tensors (names "layers.<i>.w",
// F32 [1], 4 bytes each): the JSON header parse (SAX, duplicate-key and depth checks), the
// schema checks, the offset sort and the name index. Linear in N: counters tensors/s and
// the header bytes per second.
//
// BM_npy_read/<how>/<cache>: one pass over a [rows, 768] float32 .npy file of
// HSAE_BENCH_NPY_MB MiB (default 256) in 4096-row chunks into a float buffer, through
// npy_file::read_rows (how 0: memory-mapped, what hsae does) or pread into the buffer (how 1:
// the alternative that would survive a file truncated under the reader). cache 0: the file's
// pages are evicted (posix_fadvise DONTNEED) before each pass; cache 1: they stay cached.
#include <benchmark/benchmark.h>
#include <hsae/data/npy.hpp>
#include <hsae/io/safetensors.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

namespace {

std::vector<std::byte> many_tensors_file(int n) {
  std::string h = "{";
  for (int i = 0; i < n; ++i) {
    if (i) h += ',';
    const std::string off = std::to_string(4 * std::uint64_t(i));
    h += "\"layers." + std::to_string(i) + ".w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" + off + "," +
         std::to_string(4 * std::uint64_t(i) + 4) + "]}";
  }
  h += "}";
  std::vector<std::byte> file(8 + h.size() + 4 * std::size_t(n));
  for (int i = 0; i < 8; ++i) file[std::size_t(i)] = std::byte((h.size() >> (8 * i)) & 0xffu);
  std::memcpy(file.data() + 8, h.data(), h.size());
  return file;
}

void BM_safetensors_header(benchmark::State& state) {
  const int n = int(state.range(0));
  const auto file = many_tensors_file(n);
  for (auto _ : state) {
    const hsae::safetensors_view v(file, "bench.safetensors");
    benchmark::DoNotOptimize(v.tensors().data());
  }
  state.counters["tensors/s"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(file.size() - 4 * std::size_t(n)));
}
BENCHMARK(BM_safetensors_header)->Arg(1000)->Arg(10000)->Arg(100000)->Unit(benchmark::kMillisecond);

constexpr std::int64_t kCols = 768;
constexpr std::int64_t kChunk = 4096;

/// The scratch .npy file, written on first use and removed at exit.
struct scratch_npy {
  std::filesystem::path path;
  scratch_npy() {
    const char* e = std::getenv("HSAE_BENCH_NPY_MB");
    const std::int64_t mb = e != nullptr ? std::max<std::int64_t>(1, std::atoll(e)) : 256;
    const std::int64_t rows = (mb << 20) / (kCols * 4);
    path = std::filesystem::temp_directory_path() / ("hsae_bench_io_" + std::to_string(::getpid()) + ".npy");
    std::vector<float> v(std::size_t(rows * kCols));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = float(i % 1000) * 0.001f;
    hsae::write_npy(path, v.data(), rows, kCols);
  }
  ~scratch_npy() {
    std::error_code ec;
    std::filesystem::remove(path, ec);
  }
  scratch_npy(const scratch_npy&) = delete;
  scratch_npy& operator=(const scratch_npy&) = delete;
};

const std::filesystem::path& npy_path() {
  static const scratch_npy f;
  return f.path;
}

void evict(const std::filesystem::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void BM_npy_read(benchmark::State& state) {
  const bool use_pread = state.range(0) == 1, warm = state.range(1) == 1;
  const auto& path = npy_path();
  std::vector<float> out(std::size_t(kChunk * kCols));
  std::int64_t bytes = 0;
  for (auto _ : state) {
    if (!warm) {
      state.PauseTiming();
      evict(path);
      state.ResumeTiming();
    }
    const hsae::npy_file f(path);  // both: open and parse the header
    if (!use_pread) {
      for (std::int64_t r = 0; r < f.rows(); r += kChunk) {
        f.read_rows(r, std::min(kChunk, f.rows() - r), out.data());
        benchmark::DoNotOptimize(out.data());
      }
    } else {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      for (std::int64_t r = 0; r < f.rows(); r += kChunk) {
        const auto want = std::size_t(std::min(kChunk, f.rows() - r) * kCols) * sizeof(float);
        const auto at = off_t(f.data_offset() + std::size_t(r * kCols) * sizeof(float));
        auto* dst = reinterpret_cast<char*>(out.data());
        for (std::size_t got = 0; got < want;) {
          const ssize_t k = ::pread(fd, dst + got, want - got, at + off_t(got));
          if (k <= 0) {
            state.SkipWithError("pread failed");
            break;
          }
          got += std::size_t(k);
        }
        benchmark::DoNotOptimize(out.data());
      }
      ::close(fd);
    }
    bytes += std::int64_t(f.rows() * kCols) * std::int64_t(sizeof(float));
  }
  state.SetBytesProcessed(bytes);
  state.SetLabel(std::string(use_pread ? "pread" : "mmap") + (warm ? ", page cache warm" : ", evicted"));
}
BENCHMARK(BM_npy_read)
    ->ArgsProduct({{0, 1}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
