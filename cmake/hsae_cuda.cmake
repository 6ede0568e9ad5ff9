# SPDX-License-Identifier: Apache-2.0
# hsae_cuda_target(<target>): the flags hsae's own CUDA tests and benchmarks build with
# (the CUDA counterpart of hsae_project_target). Consumers of the installed package never
# see these. -march=native (HSAE_NATIVE) is deliberately not passed: nvcc does not accept
# it, and the device side has no use for it.
function(hsae_cuda_target target)
  target_link_libraries(${target} PRIVATE hsae::cuda)
  # nvcc's own diagnostics (cudafe, ptxas) and the host compiler's, both as errors.
  target_compile_options(${target} PRIVATE
    "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>"
    "$<$<COMPILE_LANGUAGE:CUDA>:-Xcudafe=--display_error_number>")
  if(CMAKE_CUDA_HOST_COMPILER_ID STREQUAL "GNU" OR CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # Same reason as in hsae_project_target: GCC 12 misreports Eigen's packet code.
    target_compile_options(${target} PRIVATE
      "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wno-maybe-uninitialized,-Wno-uninitialized>")
  endif()
  if(HSAE_WERROR)
    target_compile_options(${target} PRIVATE
      "$<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings>"
      "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Werror>")
  endif()
endfunction()
