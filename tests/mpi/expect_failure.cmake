# SPDX-License-Identifier: Apache-2.0
# cmake -P script of the mpi failure tests: runs
#   timeout -k 5 <MAX_SECONDS> <MPIEXEC> <NP_FLAG> <NP> <FLAGS...> <PROGRAM> <MODE>
# and requires that the job ends nonzero before the timeout (so: not a hang), within
# MAX_SECONDS, with output matching EXPECT (a regex). FLAGS is a list separated by '|'.
foreach(var MPIEXEC NP_FLAG NP PROGRAM MODE MAX_SECONDS EXPECT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "expect_failure.cmake: ${var} is not set")
  endif()
endforeach()
string(REPLACE "|" ";" flags "${FLAGS}")
string(TIMESTAMP t0 "%s")
execute_process(
  COMMAND timeout -k 5 ${MAX_SECONDS} "${MPIEXEC}" ${NP_FLAG} ${NP} ${flags} "${PROGRAM}" ${MODE}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
string(TIMESTAMP t1 "%s")
math(EXPR elapsed "${t1} - ${t0}")
message(STATUS "mpi_failure ${MODE} on ${NP} ranks: exit ${rc} after ${elapsed} s\n${out}${err}")
if(rc EQUAL 0)
  message(FATAL_ERROR "the job succeeded although rank 1 failed (mode ${MODE})")
endif()
if(rc EQUAL 124 OR rc EQUAL 137 OR NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the job hung: timeout ended it after ${elapsed} s (exit ${rc}, mode ${MODE})")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "the output does not name the failure: expected a match of '${EXPECT}'")
endif()
message(STATUS "mpi_failure ${MODE}: every rank ended (exit ${rc}) in ${elapsed} s")
