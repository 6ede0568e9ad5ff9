// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the .npy header parser (data/npy.hpp): any byte string either
// parses into a header whose data exactly fills the rest of the buffer, or raises an
// hsae::error. Anything else (a crash, a sanitizer report, another exception, a header
// that does not fit the buffer) is a bug. Built with clang -fsanitize=fuzzer by
// HSAE_FUZZ=ON; replay_main.cpp replays saved inputs in the normal test build.
#include <hsae/data/npy.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const hsae::npy_header h = hsae::npy_header::parse(bytes, "fuzz input");
    const auto item = std::uint64_t(hsae::npy_itemsize(h.dtype));
    // The invariants npy_file relies on to read rows without bounds checks.
    if (h.rows < 1 || h.cols < 1 || h.data_offset > size ||
        std::uint64_t(h.rows) * std::uint64_t(h.cols) * item != size - h.data_offset)
      std::abort();
  } catch (const hsae::error&) {
  }
  return 0;
}
