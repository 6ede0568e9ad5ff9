# SPDX-License-Identifier: Apache-2.0
# cmake -P script behind the package tests. MODE=install (install_consumer): install hsae from
# HSAE_BUILD_DIR into a fresh prefix under WORK_DIR, build the consumer project against that
# prefix only, run it. MODE=build_tree (build_tree_consumer): build the consumer's version
# check against HSAE_BUILD_DIR itself (hsae_DIR=<build dir>, nothing installed), run it.
# WITH_CUDA=ON (a build with the CUDA backend) makes the consumer require the cuda component;
# WITH_MPI=ON (a build with hsae::mpi) the mpi component, whose program runs as one process;
# WITH_NCCL=ON the nccl component (configure-time only, as cuda).
# PROGRAMS (install mode): programs that must be installed into bin/ and answer --version.
foreach(var HSAE_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR CXX_COMPILER GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT DEFINED MODE)
  set(MODE install)
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")

function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "${what}:\n${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (exit ${rc})")
  endif()
endfunction()

set(consumer_args -D "CMAKE_FIND_USE_PACKAGE_REGISTRY=OFF")
if(WITH_CUDA)
  list(APPEND consumer_args -D "HSAE_CONSUMER_CUDA=ON")
  if(CUDA_TOOLKIT_ROOT)
    list(APPEND consumer_args -D "CUDAToolkit_ROOT=${CUDA_TOOLKIT_ROOT}")
  endif()
endif()
if(WITH_MPI)
  list(APPEND consumer_args -D "HSAE_CONSUMER_MPI=ON")
endif()
if(WITH_NCCL)
  list(APPEND consumer_args -D "HSAE_CONSUMER_NCCL=ON")
endif()
if(MODE STREQUAL "install")
  run_step("install" "${CMAKE_COMMAND}" --install "${HSAE_BUILD_DIR}" --prefix "${prefix}")
  if(NOT EXISTS "${prefix}/share/hsae/cmake/hsaeConfig.cmake")
    message(FATAL_ERROR "install did not produce share/hsae/cmake/hsaeConfig.cmake")
  endif()
  list(APPEND consumer_args -D "CMAKE_PREFIX_PATH=${prefix}")
  # The installed programs (PROGRAMS: a list, e.g. hsae-train) are in bin/ and run.
  foreach(program IN LISTS PROGRAMS)
    if(NOT EXISTS "${prefix}/bin/${program}")
      message(FATAL_ERROR "install did not put ${program} into ${prefix}/bin")
    endif()
    run_step("${program} --version" "${prefix}/bin/${program}" --version)
  endforeach()
elseif(MODE STREQUAL "build_tree")
  foreach(file hsaeConfig.cmake hsaeConfigVersion.cmake hsaeTargets.cmake)
    if(NOT EXISTS "${HSAE_BUILD_DIR}/${file}")
      message(FATAL_ERROR "the build tree ${HSAE_BUILD_DIR} has no ${file}")
    endif()
  endforeach()
  list(APPEND consumer_args -D "hsae_DIR=${HSAE_BUILD_DIR}" -D "HSAE_CONSUMER_SMOKE=ON")
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE is '${MODE}', expected install or build_tree")
endif()

run_step("configure consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${build}"
  -G "${GENERATOR}" -D "CMAKE_CXX_COMPILER=${CXX_COMPILER}" -D "CMAKE_BUILD_TYPE=Release" ${consumer_args})
run_step("build consumer" "${CMAKE_COMMAND}" --build "${build}")
run_step("run consumer" "${build}/hsae_consumer")
if(WITH_MPI)
  run_step("run the mpi consumer (one process)" "${build}/hsae_consumer_mpi")
endif()
