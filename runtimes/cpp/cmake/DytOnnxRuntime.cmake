# ONNX Runtime as the imported target dyt::onnxruntime.
#
# -DONNXRUNTIME_ROOT=<dir>: an ONNX Runtime release archive (include/, lib/libonnxruntime.so*).
# Default: the same layout is assembled in <build>/onnxruntime from
#   - libonnxruntime.so.* of the `onnxruntime` wheel in DYT_PYTHON's environment (the library
#     the Python backends run, so C++ and Python results come from the same build), and
#   - the C/C++ headers of Debian's libonnxruntime-dev from suite DYT_ORT_DEBIAN_SUITE, which
#     the wheel lacks; fetched once with a private apt configuration, never installed.
# Headers older than the library work (the C API is backward compatible), newer ones do not:
# a small program built and run at configure time checks that. trixie's headers are ORT 1.21,
# hence pyproject's floor onnxruntime>=1.21; no older suite has libonnxruntime-dev, so an
# older wheel is fixed by upgrading it, not by picking another suite.
set(ONNXRUNTIME_ROOT "" CACHE PATH "ONNX Runtime release-archive folder (include/, lib/); empty: Debian headers + the Python wheel's library")
set(DYT_ORT_DEBIAN_SUITE "trixie" CACHE STRING "Debian suite whose libonnxruntime-dev supplies the headers (trixie or newer: older suites lack the package)")
set(DYT_DEBIAN_ARCHIVE "" CACHE STRING "Debian archive URI for that fetch; empty: the one this machine's apt sources use")

if(ONNXRUNTIME_ROOT)
  set(_dyt_ort_root "${ONNXRUNTIME_ROOT}")
else()
  set(_dyt_ort_root "${CMAKE_CURRENT_BINARY_DIR}/onnxruntime")
  set(_dyt_ort_debian "${_dyt_ort_root}/debian")
  dyt_python_eval(_dyt_ort_wheel_lib
    "import glob, os, onnxruntime as o; print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), 'capi', 'libonnxruntime.so*')))[0])"
    "where the onnxruntime package keeps libonnxruntime.so")
  if(NOT EXISTS "${_dyt_ort_debian}/usr/include/onnxruntime/onnxruntime_c_api.h")
    execute_process(COMMAND sh "${CMAKE_CURRENT_LIST_DIR}/fetch_debian_package.sh" libonnxruntime-dev
                            "${DYT_ORT_DEBIAN_SUITE}" "${_dyt_ort_debian}" "${DYT_DEBIAN_ARCHIVE}"
                    RESULT_VARIABLE _dyt_rc)
    if(NOT _dyt_rc EQUAL 0)
      message(FATAL_ERROR "dyt: could not fetch ONNX Runtime headers (see the line above); "
                          "pass -DONNXRUNTIME_ROOT=<release archive> or -DDYT_WITH_ONNXRUNTIME=OFF")
    endif()
  endif()
  file(MAKE_DIRECTORY "${_dyt_ort_root}/lib")
  file(CREATE_LINK "${_dyt_ort_debian}/usr/include/onnxruntime" "${_dyt_ort_root}/include" SYMBOLIC)
  # libonnxruntime.so.1 is the library's SONAME: the name the loader looks for at run time.
  foreach(_dyt_name libonnxruntime.so libonnxruntime.so.1)
    file(CREATE_LINK "${_dyt_ort_wheel_lib}" "${_dyt_ort_root}/lib/${_dyt_name}" SYMBOLIC)
  endforeach()
endif()

set(_dyt_ort_include "")
foreach(_dyt_dir "${_dyt_ort_root}/include" "${_dyt_ort_root}/include/onnxruntime")
  if(NOT _dyt_ort_include AND EXISTS "${_dyt_dir}/onnxruntime_cxx_api.h")
    set(_dyt_ort_include "${_dyt_dir}")
  endif()
endforeach()
set(_dyt_ort_lib "${_dyt_ort_root}/lib/libonnxruntime.so")
if(NOT _dyt_ort_include OR NOT EXISTS "${_dyt_ort_lib}")
  message(FATAL_ERROR "dyt: ${_dyt_ort_root} lacks include/onnxruntime_cxx_api.h or lib/libonnxruntime.so")
endif()

if(NOT CMAKE_CROSSCOMPILING)
  try_run(_dyt_ort_run _dyt_ort_compiled "${CMAKE_CURRENT_BINARY_DIR}/ort_api_check"
          "${CMAKE_CURRENT_LIST_DIR}/ort_api_check.cpp"
          CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${_dyt_ort_include}"
          LINK_LIBRARIES "${_dyt_ort_lib}"
          COMPILE_OUTPUT_VARIABLE _dyt_ort_log RUN_OUTPUT_VARIABLE _dyt_ort_check)
  if(NOT _dyt_ort_compiled)
    message(FATAL_ERROR "dyt: cannot build a test program against ${_dyt_ort_lib} "
                        "with headers ${_dyt_ort_include}:\n${_dyt_ort_log}")
  elseif(NOT _dyt_ort_run EQUAL 0)
    message(FATAL_ERROR "dyt: a test program linked to ${_dyt_ort_lib} does not run "
                        "(${_dyt_ort_run}): ${_dyt_ort_check}")
  endif()
  if(NOT _dyt_ort_check MATCHES "dyt-ort-check ([0-9]+) ([^ \n]+) ([01])")
    message(FATAL_ERROR "dyt: unexpected output of the ONNX Runtime check: ${_dyt_ort_check}")
  endif()
  set(_dyt_ort_api "${CMAKE_MATCH_1}")
  set(_dyt_ort_version "${CMAKE_MATCH_2}")
  set(_dyt_ort_fits "${CMAKE_MATCH_3}")
  if(NOT _dyt_ort_fits)
    if(ONNXRUNTIME_ROOT)
      set(_dyt_ort_hint "point -DONNXRUNTIME_ROOT at an unmodified release archive, whose headers match its library")
    else()  # ORT_API_VERSION N is the C API of release 1.N
      string(CONCAT _dyt_ort_hint "upgrade the wheel (${DYT_PYTHON} -m pip install -U 'onnxruntime>=1.${_dyt_ort_api}') "
                    "and rerun, or build against an ONNX Runtime release archive with -DONNXRUNTIME_ROOT=<dir>")
    endif()
    message(FATAL_ERROR "dyt: the ONNX Runtime headers in ${_dyt_ort_include} declare ORT_API_VERSION "
                        "${_dyt_ort_api}, newer than the library ${_dyt_ort_lib} (version ${_dyt_ort_version}). "
                        "Headers newer than the library do not work: ${_dyt_ort_hint}.")
  endif()
  message(STATUS "dyt: ONNX Runtime ${_dyt_ort_version} (${_dyt_ort_lib}), headers of API ${_dyt_ort_api} (${_dyt_ort_include})")
endif()

add_library(dyt::onnxruntime SHARED IMPORTED)
set_target_properties(dyt::onnxruntime PROPERTIES
  IMPORTED_LOCATION "${_dyt_ort_lib}"
  INTERFACE_INCLUDE_DIRECTORIES "${_dyt_ort_include}")
