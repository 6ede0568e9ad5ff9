// SPDX-License-Identifier: Apache-2.0
/// \file cuda/detail/kernel.cuh
/// How hsae declares its kernels: `HSAE_KERNEL` instead of `__global__` on every kernel,
/// and `HSAE_KERNEL_NAMESPACE_BEGIN` / `_END` around the detail code that holds kernels and
/// launches them (the bodies of `hsae::cuda::detail` in cuda/detail/). The same two
/// measures as CUB's (CUB_DETAIL_KERNEL_ATTRIBUTES, CUB_DETAIL_MAGIC_NS), for the same
/// reason: hsae is header-only, so every shared library that includes the CUDA backend
/// compiles its own copy of each kernel, for the architectures it was built for, while
/// template kernels and inline launchers have vague linkage. With default visibility the
/// dynamic linker merges same-named copies across libraries, and library A may launch
/// library B's kernel, registered only with B's fatbinary: "no kernel image is available"
/// when B was built for other architectures, or B's code silently.
///  - `HSAE_KERNEL` is `__global__` with hidden visibility on ELF hosts: a kernel's host
///    stub never leaves the library that compiled it.
///  - The inline namespace `HSAE_KERNEL_NAMESPACE` spells hsae's version and nvcc's
///    `__CUDA_ARCH_LIST__` (the virtual architectures of the translation unit, the same in
///    its host and device passes; nvcc >= 11.5), e.g. `kernels_v0_1_0_sm_800_900`, so
///    kernels and launchers built for other architectures or another version have other
///    mangled names. The namespace is inline: code names the kernels as before
///    (`hsae::cuda::detail::topk_kernel`).
/// Public types (hsae::sae, hsae::cuda::device_sae, ...) stay outside the tagged namespace:
/// every translation unit, CPU or CUDA, whatever its architectures, must agree on their
/// mangled names.
#pragma once

#include "../../config.hpp"

#if defined(__ELF__)
#define HSAE_KERNEL_VISIBILITY __attribute__((visibility("hidden")))
#else
#define HSAE_KERNEL_VISIBILITY
#endif

/// Every hsae kernel: `template <...> HSAE_KERNEL void __launch_bounds__(256) name(...)`.
/// tests/check_kernel_attributes.cmake fails on a `__global__` in include/hsae/cuda without it.
#define HSAE_KERNEL __global__ HSAE_KERNEL_VISIBILITY

#define HSAE_DETAIL_PP_CAT_(a, b) a##b
#define HSAE_DETAIL_PP_CAT(a, b) HSAE_DETAIL_PP_CAT_(a, b)
// `_a_b_c` from the list `a, b, c` (1 to 16 items: __CUDA_ARCH_LIST__).
#define HSAE_DETAIL_PP_COUNT_(_1, _2, _3, _4, _5, _6, _7, _8, _9, _10, _11, _12, _13, _14, _15, _16, n, ...) n
#define HSAE_DETAIL_PP_COUNT(...) \
  HSAE_DETAIL_PP_COUNT_(__VA_ARGS__, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
#define HSAE_DETAIL_PP_JOIN(...) \
  HSAE_DETAIL_PP_CAT(HSAE_DETAIL_PP_JOIN_, HSAE_DETAIL_PP_COUNT(__VA_ARGS__))(__VA_ARGS__)
#define HSAE_DETAIL_PP_JOIN_1(a) _##a
#define HSAE_DETAIL_PP_JOIN_2(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_1(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_3(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_2(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_4(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_3(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_5(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_4(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_6(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_5(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_7(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_6(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_8(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_7(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_9(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_8(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_10(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_9(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_11(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_10(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_12(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_11(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_13(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_12(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_14(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_13(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_15(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_14(__VA_ARGS__))
#define HSAE_DETAIL_PP_JOIN_16(a, ...) HSAE_DETAIL_PP_CAT(_##a, HSAE_DETAIL_PP_JOIN_15(__VA_ARGS__))

#define HSAE_DETAIL_KERNEL_VERSION                                                                       \
  HSAE_DETAIL_PP_CAT(HSAE_DETAIL_PP_CAT(HSAE_DETAIL_PP_CAT(kernels_v, HSAE_VERSION_MAJOR), _),           \
                     HSAE_DETAIL_PP_CAT(HSAE_DETAIL_PP_CAT(HSAE_VERSION_MINOR, _), HSAE_VERSION_PATCH))
#if defined(__CUDA_ARCH_LIST__)
#define HSAE_KERNEL_NAMESPACE \
  HSAE_DETAIL_PP_CAT(HSAE_DETAIL_PP_CAT(HSAE_DETAIL_KERNEL_VERSION, _sm), HSAE_DETAIL_PP_JOIN(__CUDA_ARCH_LIST__))
#else
#define HSAE_KERNEL_NAMESPACE HSAE_DETAIL_KERNEL_VERSION
#endif

/// Opens and closes the tagged namespace; used inside `namespace cuda::detail { ... }`.
#define HSAE_KERNEL_NAMESPACE_BEGIN inline namespace HSAE_KERNEL_NAMESPACE {
#define HSAE_KERNEL_NAMESPACE_END }
