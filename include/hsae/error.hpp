// SPDX-License-Identifier: Apache-2.0
/// \file error.hpp
/// The exceptions hsae throws. Every one derives from hsae::error, and every
/// message names the offending quantity and its value.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "config.hpp"

HSAE_NAMESPACE_BEGIN

/// Base of every exception thrown by hsae.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Tensor shapes that do not fit together (e.g. a batch whose width is not d_model).
class shape_error : public error {
 public:
  using error::error;
};

/// An invalid setting: k_max > d_sae, an empty or non-increasing k-schedule,
/// a non-positive weight, a negative learning rate, ...
class config_error : public error {
 public:
  using error::error;
};

/// Non-finite values (NaN or Inf) where finite data is required.
class numeric_error : public error {
 public:
  using error::error;
};

/// File and stream problems (truncated, corrupt, unwritable).
class io_error : public error {
 public:
  using error::error;
};

/// A failed collective between processes or devices (comm/): the message names the
/// collective, the rank and the library's own error text.
class comm_error : public error {
 public:
  using error::error;
};

namespace detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Throws `Error` with the concatenated message when `cond` is false.
template <class Error, class... Args>
inline void expects(bool cond, Args&&... args) {
  if (!cond) [[unlikely]] {
    throw Error(concat("hsae: ", std::forward<Args>(args)...));
  }
}

/// Throws `Error` with the concatenated message.
template <class Error, class... Args>
[[noreturn]] inline void throw_error(Args&&... args) {
  throw Error(concat("hsae: ", std::forward<Args>(args)...));
}

}  // namespace detail

HSAE_NAMESPACE_END
