# SPDX-License-Identifier: Apache-2.0
# Finds NCCL (nccl.h, libnccl) and defines the imported target NCCL::NCCL, NCCL_FOUND,
# NCCL_INCLUDE_DIR, NCCL_LIBRARY and NCCL_VERSION. Searched in NCCL_ROOT, then beside the
# CUDA toolkit (CUDAToolkit_INCLUDE_DIRS / CUDAToolkit_LIBRARY_DIR, which the CUDA install
# of NCCL uses), then the system paths (Debian's libnccl-dev).
include(FindPackageHandleStandardArgs)
find_path(NCCL_INCLUDE_DIR nccl.h
  HINTS "${NCCL_ROOT}" ENV NCCL_ROOT ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES include)
find_library(NCCL_LIBRARY nccl
  HINTS "${NCCL_ROOT}" ENV NCCL_ROOT "${CUDAToolkit_LIBRARY_DIR}"
  PATH_SUFFIXES lib lib64)
if(NCCL_INCLUDE_DIR AND EXISTS "${NCCL_INCLUDE_DIR}/nccl.h")
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_version_lines REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(_line IN LISTS _nccl_version_lines)
    string(REGEX MATCH "NCCL_([A-Z]+) +([0-9]+)" _ "${_line}")
    set(_nccl_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}")
  endforeach()
  set(NCCL_VERSION "${_nccl_MAJOR}.${_nccl_MINOR}.${_nccl_PATCH}")
endif()
find_package_handle_standard_args(NCCL REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR VERSION_VAR NCCL_VERSION)
if(NCCL_FOUND AND NOT TARGET NCCL::NCCL)
  add_library(NCCL::NCCL UNKNOWN IMPORTED)
  set_target_properties(NCCL::NCCL PROPERTIES
    IMPORTED_LOCATION "${NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
endif()
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)
