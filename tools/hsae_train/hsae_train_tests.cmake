# SPDX-License-Identifier: Apache-2.0
# hsae-train's tests (label tools): runs of the program, a few seconds each. The parser and
# whole runs on .npy files are unit-tested in tests/test_hsae_train_config.cpp.
set(_ht "${CMAKE_CURRENT_SOURCE_DIR}/check_run.cmake")
set(_work "${CMAKE_CURRENT_BINARY_DIR}/test_runs")
# A small synthetic run (the README's first command at a tenth of a percent of the size).
set(_small "--synthetic|--tokens|20000|--d-sae|256|--k-max|8|--batch|500|--held-out-rows|1000|--init-rows|1000|--log-every|10")
add_test(NAME hsae_train_synthetic
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/synthetic" -D MODE=run
    -D "ARGS=${_small}" -D "STDOUT_REGEX=sparsity-fidelity on the first 1000 rows of the synthetic stream" -P "${_ht}")
add_test(NAME hsae_train_resume_bitwise
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/resume" -D MODE=resume
    -D "ARGS=${_small}" -P "${_ht}")
add_test(NAME hsae_train_interrupt
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/interrupt" -D MODE=interrupt
    -D "ARGS=--synthetic|--tokens|100000000|--d-sae|256|--k-max|8|--batch|500|--held-out-rows|1000|--init-rows|1000"
    -P "${_ht}")
# Bad command lines and configs: exit 2, one line naming the option or key.
add_test(NAME hsae_train_bad_option
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/bad_option" -D MODE=usage
    -D "ARGS=--synthetic|--out|x|--k-max|0"
    -D "STDERR_REGEX=^hsae-train: --k-max: 0 is not an integer in \\[1, 2147483647\\]\n$" -P "${_ht}")
add_test(NAME hsae_train_k_max_above_d_sae
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/k_max" -D MODE=usage
    -D "ARGS=--synthetic|--out|x|--d-sae|2048|--k-max|4096"
    -D "STDERR_REGEX=^hsae-train: --k-max: 4096 is not an integer in \\[1, 2048\\] \\(d_sae\\)\n$" -P "${_ht}")
add_test(NAME hsae_train_bad_config
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/bad_config" -D MODE=usage
    -D "ARGS=--synthetic|--out|x" "-DCONFIG_TEXT={\"k_max\": 16, \"learning_rate\": 0.001}"
    -D "STDERR_REGEX=^hsae-train: config '.*config.json': unknown key \"learning_rate\"\n$" -P "${_ht}")
add_test(NAME hsae_train_missing_glob
  COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/glob" -D MODE=usage
    -D "ARGS=${_work}/glob/acts_*.npy|--out|x"
    -D "STDERR_REGEX=^hsae-train: --data: '.*acts_\\*.npy' matches no file\n$" -P "${_ht}")
set(_tool_tests hsae_train_synthetic hsae_train_resume_bitwise hsae_train_interrupt hsae_train_bad_option
    hsae_train_k_max_above_d_sae hsae_train_bad_config hsae_train_missing_glob)
if(NOT HSAE_WITH_CUDA)
  add_test(NAME hsae_train_no_cuda
    COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/no_cuda" -D MODE=usage
      -D "ARGS=--synthetic|--out|x|--device|cuda"
      -D "STDERR_REGEX=^hsae-train: --device: cuda: this hsae-train was built without CUDA" -P "${_ht}")
  list(APPEND _tool_tests hsae_train_no_cuda)
endif()
# torchrun-style variables without an MPI launcher: refused, whatever the build.
add_test(NAME hsae_train_torchrun_env
  COMMAND "${CMAKE_COMMAND}" -E env WORLD_SIZE=2 RANK=0
    "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/torchrun" -D MODE=usage
    -D "ARGS=--synthetic|--out|x"
    -D "STDERR_REGEX=^hsae-train: started as one of WORLD_SIZE=2 ranks .torchrun-style variables. but not by an MPI launcher"
    -P "${_ht}")
list(APPEND _tool_tests hsae_train_torchrun_env)
if(TARGET hsae_mpi)
  # Distributed runs (labels mpi, tools): docs/DISTRIBUTED.md. The same table as one
  # process on 2 and 3 latent shards (3: uneven slices of the 256 latents and 128 columns),
  # a stopped and resumed 2 x 2 grid equal to an uninterrupted one, a configuration that
  # differs between ranks, and a grid the ranks cannot form.
  list(JOIN HSAE_MPIEXEC_FLAGS "|" _mpi_flags)
  set(_mpi "${MPIEXEC_EXECUTABLE}|${MPIEXEC_NUMPROC_FLAG}")
  set(_small_mpi "--synthetic|--tokens|20000|--d-sae|256|--k-max|8|--batch|500|--held-out-rows|1000|--init-rows|1000|--log-every|10|--dead-tokens|2000|--rank-timeout|60")
  foreach(np 2 3)
    add_test(NAME hsae_train_mpi_shards${np}
      COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/mpi_shards${np}" -D MODE=same_table
        -D "LAUNCH=${_mpi}|${np}|${_mpi_flags}" -D "ARGS=${_small_mpi}" -D "GRID_ARGS=--shards;${np}" -P "${_ht}")
    set_tests_properties(hsae_train_mpi_shards${np} PROPERTIES PROCESSORS ${np})
  endforeach()
  add_test(NAME hsae_train_mpi_resume_2x2
    COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/mpi_resume" -D MODE=resume
      -D "LAUNCH=${_mpi}|4|${_mpi_flags}" -D "ARGS=${_small_mpi}|--shards|2" -P "${_ht}")
  set_tests_properties(hsae_train_mpi_resume_2x2 PROPERTIES PROCESSORS 4)
  add_test(NAME hsae_train_mpi_mismatch
    COMMAND "${CMAKE_COMMAND}" -D "TOOL=${MPIEXEC_EXECUTABLE}" -D "WORK=${_work}/mpi_mismatch" -D MODE=fails
      -D "ARGS=${_mpi_flags}|${MPIEXEC_NUMPROC_FLAG}|1|$<TARGET_FILE:hsae-train>|${_small_mpi}|--k-max|8|--out|${_work}/mpi_mismatch/o|:|${MPIEXEC_NUMPROC_FLAG}|1|$<TARGET_FILE:hsae-train>|${_small_mpi}|--k-max|16|--out|${_work}/mpi_mismatch/o"
      -D "STDERR_REGEX='k_max' differs between ranks" -P "${_ht}")
  add_test(NAME hsae_train_mpi_bad_grid
    COMMAND "${CMAKE_COMMAND}" -D "TOOL=$<TARGET_FILE:hsae-train>" -D "WORK=${_work}/mpi_bad_grid" -D MODE=fails
      -D "LAUNCH=${_mpi}|3|${_mpi_flags}" -D "ARGS=${_small_mpi}|--shards|2|--out|${_work}/mpi_bad_grid/o"
      -D "STDERR_REGEX=--shards: 2 shards do not divide the 3 ranks" -P "${_ht}")
  set_tests_properties(hsae_train_mpi_mismatch PROPERTIES PROCESSORS 2)
  set_tests_properties(hsae_train_mpi_bad_grid PROPERTIES PROCESSORS 3)
  set_tests_properties(hsae_train_mpi_shards2 hsae_train_mpi_shards3 hsae_train_mpi_resume_2x2 hsae_train_mpi_mismatch
    hsae_train_mpi_bad_grid PROPERTIES LABELS "cpu;tools;mpi" TIMEOUT 300)
endif()
# The OpenMP wait policy (wait_policy.cpp): passive by default, the user's when given.
# libgomp prints its settings with OMP_DISPLAY_ENV=VERBOSE (a program executed again prints
# them twice): its spin count is 0 only when the passive policy took effect (it shows
# OMP_WAIT_POLICY = 'PASSIVE' when the variable is unset, too).
add_test(NAME hsae_train_wait_policy
  COMMAND "${CMAKE_COMMAND}" -E env OMP_DISPLAY_ENV=VERBOSE $<TARGET_FILE:hsae-train> --version)
set_tests_properties(hsae_train_wait_policy PROPERTIES PASS_REGULAR_EXPRESSION "GOMP_SPINCOUNT = '0'")
add_test(NAME hsae_train_wait_policy_user
  COMMAND "${CMAKE_COMMAND}" -E env OMP_DISPLAY_ENV=VERBOSE OMP_WAIT_POLICY=ACTIVE $<TARGET_FILE:hsae-train> --version)
set_tests_properties(hsae_train_wait_policy_user PROPERTIES PASS_REGULAR_EXPRESSION "OMP_WAIT_POLICY = 'ACTIVE'"
  FAIL_REGULAR_EXPRESSION "GOMP_SPINCOUNT = '0'")
list(APPEND _tool_tests hsae_train_wait_policy hsae_train_wait_policy_user)
add_test(NAME hsae_train_help COMMAND hsae-train --help)
set_tests_properties(hsae_train_help PROPERTIES PASS_REGULAR_EXPRESSION "--k-max K")
list(APPEND _tool_tests hsae_train_help)
set_tests_properties(${_tool_tests} PROPERTIES LABELS "cpu;tools")
# The training runs take about a second each in Release but up to a minute at -O0 with the
# sanitizers: labelled slow, as test_training, so that the sanitizer stage of .ci/run leaves
# them out; test_hsae_train_config runs the same code paths (whole runs included) there.
set_tests_properties(hsae_train_synthetic hsae_train_resume_bitwise hsae_train_interrupt
  PROPERTIES LABELS "cpu;tools;slow")

# The sanitizer stage of .ci/run builds hsae_sanitize_suite and runs every test not
# labelled slow, example or package: hsae-train is part of it.
if(TARGET hsae_sanitize_suite)
  add_dependencies(hsae_sanitize_suite hsae-train)
endif()
