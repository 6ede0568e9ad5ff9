// SPDX-License-Identifier: Apache-2.0
/// \file version.hpp
#pragma once

#include "config.hpp"

HSAE_NAMESPACE_BEGIN

/// "MAJOR.MINOR.PATCH" of the headers in use.
inline constexpr const char* version_string = "0.1.0";
inline constexpr int version_major = HSAE_VERSION_MAJOR;
inline constexpr int version_minor = HSAE_VERSION_MINOR;
inline constexpr int version_patch = HSAE_VERSION_PATCH;

HSAE_NAMESPACE_END
