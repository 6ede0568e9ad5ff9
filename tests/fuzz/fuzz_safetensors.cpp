// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the safetensors parser (io/safetensors.hpp): any byte string
// either parses, and then every tensor converts to float within the buffer, or raises
// an hsae::error. Anything else is a bug. Built with clang -fsanitize=fuzzer by
// HSAE_FUZZ=ON; replay_main.cpp replays saved inputs in the normal test build.
#include <hsae/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const hsae::safetensors_view v(bytes, "fuzz input");
    std::vector<float> out;
    for (const auto& t : v.tensors()) {
      const std::span<const std::byte> raw = v.bytes(t);
      // Tensors lie inside the buffer, after the header.
      if (raw.data() < bytes.data() + v.data_offset() || raw.data() + raw.size() > bytes.data() + size) std::abort();
      if (!hsae::safetensors_dtype_is_float(t.dtype)) continue;
      out.resize(std::size_t(t.numel()));
      v.read_to(t.name, out.data());
    }
  } catch (const hsae::error&) {
  }
  return 0;
}
