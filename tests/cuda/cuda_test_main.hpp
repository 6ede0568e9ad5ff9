// SPDX-License-Identifier: Apache-2.0
// Shared by the GPU test executables. Included by every test file (Catch2 and helpers);
// compiled once more as a C++ object with HSAE_CUDA_TEST_MAIN defined (see
// CMakeLists.txt) to provide Catch2's runner and `main`, so that each .cu does not
// rebuild Catch2's implementation (about 30 s of host compile per test binary).
//
// `main`: without a CUDA device the binary prints "no CUDA device: skipped" and exits
// with 77, which CMakeLists.txt registers as SKIP_RETURN_CODE (ctest: Skipped).
// HSAE_SANITIZER=1 in the environment asks the tests for small shapes
// (compute-sanitizer runs kernels one to two orders of magnitude slower).
// Include guard, not #pragma once: GCC warns about the pragma when this file is the
// main file of the runner object.
#ifndef HSAE_TESTS_CUDA_TEST_MAIN_HPP
#define HSAE_TESTS_CUDA_TEST_MAIN_HPP

#if defined(HSAE_CUDA_TEST_MAIN)
#define CATCH_CONFIG_RUNNER
#endif
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <hsae/cuda/backend.cuh>

namespace hsae_test {

/// True when HSAE_SANITIZER is set to something other than "" or "0".
inline bool sanitizer_mode() {
  const char* v = std::getenv("HSAE_SANITIZER");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// A non-blocking stream owned by the test, destroyed at scope exit.
struct test_stream {
  cudaStream_t s = nullptr;
  test_stream() { HSAE_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~test_stream() { (void)cudaStreamDestroy(s); }
  test_stream(const test_stream&) = delete;
  test_stream& operator=(const test_stream&) = delete;
};

}  // namespace hsae_test

#if defined(HSAE_CUDA_TEST_MAIN)
int main(int argc, char** argv) {
  if (!hsae::cuda_device_available()) {
    std::puts("no CUDA device: skipped");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
#endif

#endif  // HSAE_TESTS_CUDA_TEST_MAIN_HPP
