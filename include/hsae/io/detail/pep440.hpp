// SPDX-License-Identifier: Apache-2.0
/// \file io/detail/pep440.hpp
/// The PEP 440 version comparison SAELens applies to a config's sae_lens_version: which
/// of its config rules (pre-6.0 or 6.x) a SAELens directory is read with.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../../config.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// PEP 440 test "version >= 6.0.0rc0" (what SAELens' handle_config_defaulting asks of
/// sae_lens_version). nullopt when the text is not a PEP 440 version (SAELens raises).
inline std::optional<bool> saelens_version_at_least_6(std::string_view v) {
  std::string s;
  for (char c : v) s += char(std::tolower(static_cast<unsigned char>(c)));
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(s.begin());
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  std::size_t p = 0;
  auto digits = [&](long long& out) {
    const std::size_t b = p;
    out = 0;
    while (p < s.size() && std::isdigit(static_cast<unsigned char>(s[p]))) {
      if (out > 1'000'000'000'000LL) return false;
      out = out * 10 + (s[p++] - '0');
    }
    return p > b;
  };
  auto sep = [&] {
    if (p < s.size() && (s[p] == '.' || s[p] == '-' || s[p] == '_')) ++p;
  };
  if (p < s.size() && s[p] == 'v') ++p;
  long long epoch = 0, x = 0;
  {
    const std::size_t save = p;
    if (digits(x) && p < s.size() && s[p] == '!') {
      epoch = x;
      ++p;
    } else {
      p = save;
    }
  }
  std::vector<long long> rel;
  if (!digits(x)) return std::nullopt;
  rel.push_back(x);
  while (p + 1 < s.size() && s[p] == '.' && std::isdigit(static_cast<unsigned char>(s[p + 1]))) {
    ++p;
    digits(x);
    rel.push_back(x);
  }
  // pre-release
  enum { none, alpha, beta, rc } pre = none;
  {
    const std::size_t save = p;
    sep();
    static constexpr std::pair<const char*, int> words[] = {
        {"alpha", 1}, {"beta", 2}, {"preview", 3}, {"pre", 3}, {"rc", 3}, {"a", 1}, {"b", 2}, {"c", 3}};
    bool found = false;
    for (const auto& [w, kind] : words) {
      const std::string_view ws(w);
      if (s.compare(p, ws.size(), ws) == 0) {
        p += ws.size();
        pre = kind == 1 ? alpha : kind == 2 ? beta : rc;
        found = true;
        break;
      }
    }
    if (found) {
      sep();
      digits(x);
    } else {
      p = save;
    }
  }
  bool post = false, dev = false;
  {
    const std::size_t save = p;
    if (p < s.size() && s[p] == '-' && p + 1 < s.size() && std::isdigit(static_cast<unsigned char>(s[p + 1]))) {
      ++p;
      digits(x);
      post = true;
    } else {
      sep();
      static constexpr const char* words[] = {"post", "rev", "r"};
      bool found = false;
      for (const char* w : words) {
        const std::string_view ws(w);
        if (s.compare(p, ws.size(), ws) == 0) {
          p += ws.size();
          found = true;
          break;
        }
      }
      if (found) {
        sep();
        digits(x);
        post = true;
      } else {
        p = save;
      }
    }
  }
  {
    const std::size_t save = p;
    sep();
    if (s.compare(p, 3, "dev") == 0) {
      p += 3;
      sep();
      digits(x);
      dev = true;
    } else {
      p = save;
    }
  }
  if (p < s.size() && s[p] == '+') {  // local version label: ignored by the comparison here
    ++p;
    if (p >= s.size()) return std::nullopt;
    for (; p < s.size(); ++p)
      if (!(std::isalnum(static_cast<unsigned char>(s[p])) || s[p] == '.' || s[p] == '-' || s[p] == '_'))
        return std::nullopt;
  }
  if (p != s.size()) return std::nullopt;
  if (epoch > 0) return true;
  rel.resize(std::max<std::size_t>(rel.size(), 3), 0);
  const std::vector<long long> six{6, 0, 0};
  for (std::size_t i = 0; i < rel.size(); ++i) {
    const long long ref = i < 3 ? six[i] : 0;
    if (rel[i] != ref) return rel[i] > ref;
  }
  // release == 6.0.0: >= 6.0.0rc0 unless an alpha/beta pre-release or a dev release
  // without any pre-release (6.0.0.dev1 < 6.0.0rc0); 6.0.0rc0.devN is below rc0 as
  // well, but SAELens never shipped one.
  if (pre == alpha || pre == beta) return false;
  if (pre == none && dev && !post) return false;
  return true;
}

}  // namespace detail

HSAE_NAMESPACE_END
