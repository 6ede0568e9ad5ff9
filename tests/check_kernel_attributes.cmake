# SPDX-License-Identifier: Apache-2.0
# cmake -P script behind the kernel_attributes test: every kernel in INCLUDE_DIR (include/hsae)
# is declared with HSAE_KERNEL (cuda/detail/kernel.cuh: __global__ with hidden visibility),
# never with a bare __global__, and every header that declares one opens the arch-tagged
# HSAE_KERNEL_NAMESPACE_BEGIN. Comments are ignored. The scan first proves itself on two
# generated headers, a bad one and a good one, so it cannot pass by finding nothing.
if(NOT DEFINED INCLUDE_DIR OR NOT IS_DIRECTORY "${INCLUDE_DIR}")
  message(FATAL_ERROR "check_kernel_attributes.cmake: INCLUDE_DIR is not a directory: '${INCLUDE_DIR}'")
endif()

# Sets <out_problems> to "file:line: problem" entries and <out_kernels> to the number of
# HSAE_KERNEL declarations, over the given files.
function(hsae_scan_kernels out_problems out_kernels)
  set(problems "")
  set(kernels 0)
  foreach(file IN LISTS ARGN)
    get_filename_component(name "${file}" NAME)
    file(READ "${file}" text)
    # One list element per line: protect the characters CMake lists treat specially.
    string(REPLACE ";" "<semicolon>" text "${text}")
    string(REPLACE "[" "<lbracket>" text "${text}")
    string(REPLACE "]" "<rbracket>" text "${text}")
    string(REPLACE "\n" ";" lines "${text}")
    set(number 0)
    set(file_kernels 0)
    set(tagged FALSE)
    foreach(line IN LISTS lines)
      math(EXPR number "${number} + 1")
      string(REGEX REPLACE "//.*$" "" code "${line}")
      if(name STREQUAL "kernel.cuh" AND code MATCHES "^#define HSAE_KERNEL __global__ ")
        continue()  # the macro itself
      endif()
      if(code MATCHES "(^|[^A-Za-z0-9_])__global__([^A-Za-z0-9_]|$)")
        list(APPEND problems "${file}:${number}: __global__ without HSAE_KERNEL")
      endif()
      if(code MATCHES "(^|[^A-Za-z0-9_])HSAE_KERNEL [^\n]*\\(")
        math(EXPR file_kernels "${file_kernels} + 1")
      endif()
      if(code MATCHES "^HSAE_KERNEL_NAMESPACE_BEGIN$")
        set(tagged TRUE)
      endif()
    endforeach()
    if(file_kernels GREATER 0 AND NOT tagged)
      list(APPEND problems "${file}: ${file_kernels} kernel(s) outside HSAE_KERNEL_NAMESPACE_BEGIN/END")
    endif()
    math(EXPR kernels "${kernels} + ${file_kernels}")
  endforeach()
  set(${out_problems} "${problems}" PARENT_SCOPE)
  set(${out_kernels} "${kernels}" PARENT_SCOPE)
endfunction()

# Self-test on generated headers.
set(scratch "${CMAKE_CURRENT_BINARY_DIR}/check_kernel_attributes_selftest")
file(REMOVE_RECURSE "${scratch}")
file(WRITE "${scratch}/bad.cuh" "namespace x {\n// a __global__ in a comment is fine\ntemplate <int D = 0>\n__global__ void k(int* p) { p[0] = D; }\n}\n")
file(WRITE "${scratch}/good.cuh" "namespace x {\nHSAE_KERNEL_NAMESPACE_BEGIN\ntemplate <int D = 0>\nHSAE_KERNEL void k(int* p) { p[0] = D; }\nHSAE_KERNEL_NAMESPACE_END\n}\n")
file(WRITE "${scratch}/untagged.cuh" "template <int D = 0>\nHSAE_KERNEL void k(int* p) { p[0] = D; }\n")
hsae_scan_kernels(bad_problems bad_kernels "${scratch}/bad.cuh")
hsae_scan_kernels(good_problems good_kernels "${scratch}/good.cuh")
hsae_scan_kernels(untagged_problems untagged_kernels "${scratch}/untagged.cuh")
file(REMOVE_RECURSE "${scratch}")
if(NOT bad_problems MATCHES "bad.cuh:4: __global__ without HSAE_KERNEL" OR good_problems OR NOT good_kernels EQUAL 1
   OR NOT untagged_problems MATCHES "outside HSAE_KERNEL_NAMESPACE_BEGIN")
  message(FATAL_ERROR "check_kernel_attributes.cmake: the self-test failed (bad: '${bad_problems}', good: "
                      "'${good_problems}' with ${good_kernels} kernel(s), untagged: '${untagged_problems}')")
endif()

file(GLOB_RECURSE headers "${INCLUDE_DIR}/*.cuh" "${INCLUDE_DIR}/*.hpp" "${INCLUDE_DIR}/*.h" "${INCLUDE_DIR}/*.inl")
hsae_scan_kernels(problems kernels ${headers})
if(problems)
  list(JOIN problems "\n  " text)
  message(FATAL_ERROR "kernels must be declared with HSAE_KERNEL inside HSAE_KERNEL_NAMESPACE_BEGIN/END "
                      "(include/hsae/cuda/detail/kernel.cuh):\n  ${text}")
endif()
if(kernels EQUAL 0)
  message(FATAL_ERROR "check_kernel_attributes.cmake: no HSAE_KERNEL declaration under ${INCLUDE_DIR}")
endif()
list(LENGTH headers n)
message(STATUS "${kernels} kernels in ${n} headers, all declared with HSAE_KERNEL in the tagged namespace")
