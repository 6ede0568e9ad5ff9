# SPDX-License-Identifier: Apache-2.0
# Finds oneDNN (dnnl.hpp, libdnnl) and defines the imported target DNNL::DNNL, DNNL_FOUND,
# DNNL_INCLUDE_DIR, DNNL_LIBRARY, DNNL_VERSION and DNNL_CPU_RUNTIME (OMP, TBB, SEQ or
# THREADPOOL). Searched in DNNL_ROOT (or DNNLROOT, oneAPI's variable), then the system paths
# (Debian's libdnnl-dev). oneDNN's own package file is not used: Debian's requires OpenCL
# (its GPU runtime) even where only the CPU engine is wanted, and fails the configure.
include(FindPackageHandleStandardArgs)
find_path(DNNL_INCLUDE_DIR dnnl.hpp
  HINTS "${DNNL_ROOT}" ENV DNNL_ROOT ENV DNNLROOT
  PATH_SUFFIXES include)
find_library(DNNL_LIBRARY dnnl
  HINTS "${DNNL_ROOT}" ENV DNNL_ROOT ENV DNNLROOT
  PATH_SUFFIXES lib lib64)
set(_dnnl_header "${DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_version.h")
if(DNNL_INCLUDE_DIR AND NOT EXISTS "${_dnnl_header}")
  set(_dnnl_header "${DNNL_INCLUDE_DIR}/dnnl_version.h")
endif()
if(DNNL_INCLUDE_DIR AND EXISTS "${_dnnl_header}")
  file(STRINGS "${_dnnl_header}" _dnnl_version_lines REGEX "^#define DNNL_VERSION_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(_line IN LISTS _dnnl_version_lines)
    string(REGEX MATCH "DNNL_VERSION_([A-Z]+) +([0-9]+)" _ "${_line}")
    set(_dnnl_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}")
  endforeach()
  set(DNNL_VERSION "${_dnnl_MAJOR}.${_dnnl_MINOR}.${_dnnl_PATCH}")
  set(_dnnl_config "${DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_config.h")
  if(EXISTS "${_dnnl_config}")
    file(STRINGS "${_dnnl_config}" _dnnl_runtime REGEX "^#define DNNL_CPU_RUNTIME DNNL_RUNTIME_[A-Z]+")
    string(REGEX MATCH "DNNL_RUNTIME_([A-Z]+)" _ "${_dnnl_runtime}")
    set(DNNL_CPU_RUNTIME "${CMAKE_MATCH_1}")
  endif()
endif()
find_package_handle_standard_args(DNNL REQUIRED_VARS DNNL_LIBRARY DNNL_INCLUDE_DIR VERSION_VAR DNNL_VERSION)
if(DNNL_FOUND AND NOT TARGET DNNL::DNNL)
  add_library(DNNL::DNNL UNKNOWN IMPORTED)
  set_target_properties(DNNL::DNNL PROPERTIES
    IMPORTED_LOCATION "${DNNL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${DNNL_INCLUDE_DIR}")
endif()
mark_as_advanced(DNNL_INCLUDE_DIR DNNL_LIBRARY)
