# SPDX-License-Identifier: Apache-2.0
# cmake -P script behind the install_consumer test: install hsae from HSAE_BUILD_DIR into a
# fresh prefix under WORK_DIR, build the consumer project against that prefix only, run it.
foreach(var HSAE_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR CXX_COMPILER GENERATOR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer.cmake: ${var} is not set")
  endif()
endforeach()

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

run_step("install" "${CMAKE_COMMAND}" --install "${HSAE_BUILD_DIR}" --prefix "${prefix}")
if(NOT EXISTS "${prefix}/share/hsae/cmake/hsaeConfig.cmake")
  message(FATAL_ERROR "install did not produce share/hsae/cmake/hsaeConfig.cmake")
endif()
run_step("configure consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${build}"
  -G "${GENERATOR}" -D "CMAKE_CXX_COMPILER=${CXX_COMPILER}" -D "CMAKE_BUILD_TYPE=Release"
  -D "CMAKE_PREFIX_PATH=${prefix}" -D "CMAKE_FIND_USE_PACKAGE_REGISTRY=OFF")
run_step("build consumer" "${CMAKE_COMMAND}" --build "${build}")
run_step("run consumer" "${build}/hsae_consumer")
