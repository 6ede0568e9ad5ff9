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
