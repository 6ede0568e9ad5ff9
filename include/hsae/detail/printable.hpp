// SPDX-License-Identifier: Apache-2.0
/// \file detail/printable.hpp
/// Quoting hostile bytes in error messages: the file parsers (data/npy.hpp,
/// io/safetensors.hpp, io/detail/sae_common.hpp) put header text and names from the file into
/// their messages, which end up on terminals and in logs.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "../config.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// `s` with every byte that is not part of valid UTF-8, and every control character
/// (C0, DEL and the C1 range U+0080..U+009F, which some terminals obey as escapes), written
/// as \xNN per byte: error messages quote hostile file contents. ESC (0x1b) becomes "\x1b".
inline std::string printable_utf8(std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned c = b[i];
    std::size_t len = 0;
    if (c >= 0x20 && c < 0x7f) len = 1;
    else if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) len = 3;
    else if (c >= 0xf0 && c <= 0xf4) len = 4;
    bool ok = len > 0 && i + len <= n;
    for (std::size_t j = 1; ok && j < len; ++j) ok = (b[i + j] & 0xc0u) == 0x80u;
    if (ok && len == 2) ok = !(c == 0xc2 && b[i + 1] < 0xa0);  // C1 controls
    if (ok && len == 3) {
      const unsigned c1 = b[i + 1];
      ok = !(c == 0xe0 && c1 < 0xa0) && !(c == 0xed && c1 >= 0xa0);  // overlong, surrogates
    }
    if (ok && len == 4) {
      const unsigned c1 = b[i + 1];
      ok = !(c == 0xf0 && c1 < 0x90) && !(c == 0xf4 && c1 >= 0x90);  // overlong, > U+10FFFF
    }
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
      ++i;
    }
  }
  return out;
}

}  // namespace detail

HSAE_NAMESPACE_END
