# SPDX-License-Identifier: Apache-2.0
# The include rules of docs/ARCHITECTURE.md, checked on the tree (cmake -P, no compiler):
#
#   cmake -D INCLUDE_DIR=<repo>/include -P tests/layering.cmake
#
# Every header's `#include "..."` and `#include <hsae/...>` lines are resolved to paths
# under include/hsae, each header is put in its layer by its path, and every edge must be
# one the table allows. Then the transitive closure of the CUDA umbrella (cuda.cuh), of
# every vocabulary header and of every comm/ header must hold no cpu/ header. A violation fails the test and
# names the file, the header it includes and the rule.
cmake_minimum_required(VERSION 3.21)

if(NOT INCLUDE_DIR)
  message(FATAL_ERROR "layering: pass -D INCLUDE_DIR=<repository>/include")
endif()
set(root "${INCLUDE_DIR}/hsae")
file(GLOB_RECURSE headers RELATIVE "${root}" "${root}/*.hpp" "${root}/*.cuh")
list(SORT headers)
list(LENGTH headers n_headers)
if(n_headers LESS 20)
  message(FATAL_ERROR "layering: found only ${n_headers} headers under ${root}")
endif()

# The layer of a header (path relative to include/hsae).
set(trainer_layer trainer.hpp checkpoint.hpp pareto.hpp)
function(layer_of path out)
  if(path STREQUAL "hsae.hpp")
    set(l umbrella)
  elseif(path STREQUAL "cuda.cuh" OR path MATCHES "^cuda/")
    set(l cuda)
  elseif(path MATCHES "^cpu/")
    set(l cpu)
  elseif(path MATCHES "^comm/")
    set(l comm)
  elseif(path MATCHES "^distributed/")
    set(l distributed)
  elseif(path MATCHES "^detail/")
    set(l detail)
  elseif(path MATCHES "^io/")
    set(l io)
  elseif(path MATCHES "^data/")
    set(l data)
  elseif(path IN_LIST trainer_layer OR path MATCHES "^trainer_")
    set(l trainer)
  else()
    set(l vocabulary)
  endif()
  set(${out} ${l} PARENT_SCOPE)
endfunction()

# What each layer may include (by the included header's layer); `exceptions` lists single
# allowed edges "from->to" that the table does not cover.
set(allowed_umbrella umbrella vocabulary detail cpu io data trainer)
set(allowed_trainer vocabulary detail cpu io data trainer comm)
set(allowed_cuda cuda vocabulary detail)
set(allowed_cpu cpu vocabulary detail)
# comm/: the communicators and the sharded top-k; no backend, so CPU and CUDA code share
# them. A comm/ .cuh header (the NCCL communicator) may also use cuda/.
set(allowed_comm comm vocabulary detail)
# distributed/: the grid, the shards and the distributed CPU step and engine, composed from
# the CPU kernels and the communicators, with the trainer's checkpoint entries; not in the
# umbrella (its users pick a communicator).
set(allowed_distributed distributed cpu comm vocabulary detail trainer)
set(allowed_vocabulary vocabulary detail)
set(allowed_io io vocabulary detail)
set(allowed_data data vocabulary detail)
set(allowed_detail detail)
# The base of the vocabulary (config.hpp, error.hpp) is what detail/ builds on.
set(detail_base config.hpp error.hpp)
# data/synthetic.hpp generates its rows over the host's threads (the CPU backend handle).
# data/row_file.hpp reads activations from safetensors files with io/'s parser (one parser).
set(exceptions "data/synthetic.hpp->cpu/backend.hpp" "data/row_file.hpp->io/safetensors.hpp")

set(failures "")
foreach(h IN LISTS headers)
  layer_of("${h}" from)
  get_filename_component(dir "${root}/${h}" DIRECTORY)
  file(STRINGS "${root}/${h}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[\"<]")
  set(deps "")
  foreach(line IN LISTS lines)
    if(line MATCHES "#[ \t]*include[ \t]*\"([^\"]+)\"")
      get_filename_component(abs "${dir}/${CMAKE_MATCH_1}" ABSOLUTE)
    elseif(line MATCHES "#[ \t]*include[ \t]*<hsae/([^>]+)>")
      get_filename_component(abs "${root}/${CMAKE_MATCH_1}" ABSOLUTE)
    else()
      continue()
    endif()
    file(RELATIVE_PATH dep "${root}" "${abs}")
    if(dep MATCHES "^\\.\\." OR NOT EXISTS "${abs}")
      list(APPEND failures "${h}: includes '${line}', which is not a header under include/hsae")
      continue()
    endif()
    list(APPEND deps "${dep}")
    layer_of("${dep}" to)
    if("${h}->${dep}" IN_LIST exceptions)
      continue()
    endif()
    if(from STREQUAL "detail" AND dep IN_LIST detail_base)
      continue()
    endif()
    if(from STREQUAL "comm" AND to STREQUAL "cuda" AND h MATCHES "\\.cuh$")
      continue()
    endif()
    if(NOT to IN_LIST allowed_${from})
      list(JOIN allowed_${from} ", " may)
      list(APPEND failures "${h} (${from}) includes ${dep} (${to}): ${from} may include only ${may}")
    endif()
  endforeach()
  string(MAKE_C_IDENTIFIER "${h}" id)
  set(deps_${id} "${deps}")
endforeach()

# Transitive closure: the CUDA umbrella, every vocabulary header and every comm/ header
# must not reach cpu/.
foreach(h IN LISTS headers)
  layer_of("${h}" from)
  if(NOT (h STREQUAL "cuda.cuh" OR from STREQUAL "vocabulary" OR from STREQUAL "comm"))
    continue()
  endif()
  set(seen "${h}")
  set(todo "${h}")
  while(todo)
    list(POP_FRONT todo cur)
    string(MAKE_C_IDENTIFIER "${cur}" id)
    foreach(d IN LISTS deps_${id})
      if(NOT d IN_LIST seen)
        list(APPEND seen "${d}")
        list(APPEND todo "${d}")
        if(d MATCHES "^cpu/")
          list(APPEND failures "${h} reaches ${d} (through ${cur}): it must build without any cpu/ header")
        endif()
      endif()
    endforeach()
  endwhile()
endforeach()

if(failures)
  list(LENGTH failures n)
  list(JOIN failures "\n  " text)
  message(FATAL_ERROR "layering: ${n} include(s) break docs/ARCHITECTURE.md's rules:\n  ${text}")
endif()
message(STATUS "layering: ${n_headers} headers follow the include rules")
