# SPDX-License-Identifier: Apache-2.0
# hsae_project_target(<target> [PORTABLE]): the flags hsae's own tests, examples and benchmarks
# build with (PORTABLE: never -march=native, to test the generic SIMD fallbacks).
# Consumers of the installed package never see these.
function(hsae_project_target target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "PORTABLE" "" "")
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
                           -Wnon-virtual-dtor -Wcast-align -Woverloaded-virtual)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # GCC 12 reports Eigen 3.4's AVX-512 packet code (ptranspose, predux: intrinsics
      # with an undefined pass-through operand) as "uninitialized" once it is inlined
      # into our functions; the diagnostic points into <avx512fintrin.h> and cannot be
      # silenced at the include. Our own code is covered by the sanitizer preset.
      target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized -Wno-uninitialized)
    endif()
    if(HSAE_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
    if(HSAE_NATIVE AND NOT arg_PORTABLE)
      target_compile_options(${target} PRIVATE -march=native)
    endif()
  elseif(MSVC)
    target_compile_options(${target} PRIVATE /W4 /permissive-)
    if(HSAE_WERROR)
      target_compile_options(${target} PRIVATE /WX)
    endif()
  endif()
endfunction()
