// SPDX-License-Identifier: Apache-2.0
// File parsing on the CPU, one thread.
//
// BM_safetensors_header/N: safetensors_view over a file of N tensors (names "layers.<i>.w",
// F32 [1], 4 bytes each): the JSON header parse (SAX, duplicate-key and depth checks), the
// schema checks, the offset sort and the name index. Linear in N: counters tensors/s and
// the header bytes per second.
#include <benchmark/benchmark.h>
#include <hsae/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
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

}  // namespace

BENCHMARK_MAIN();
