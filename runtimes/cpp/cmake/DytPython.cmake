# The Python environment whose onnxruntime and openvino wheels supply the libraries.
# Default: the repository's .venv (what `make setup` creates), else the first python3 on PATH.
set(_dyt_venv_python "${CMAKE_CURRENT_LIST_DIR}/../../../.venv/bin/python")
if(NOT DYT_PYTHON AND EXISTS "${_dyt_venv_python}")
  get_filename_component(_dyt_venv_python "${_dyt_venv_python}" ABSOLUTE)
  set(DYT_PYTHON "${_dyt_venv_python}" CACHE FILEPATH "Python whose onnxruntime/openvino packages dyt links")
endif()
if(NOT DYT_PYTHON)
  find_program(DYT_PYTHON NAMES python3 python DOC "Python whose onnxruntime/openvino packages dyt links")
endif()

# dyt_python_eval(<var> <code> <what>): run Python code, store its stripped stdout in <var>;
# a failure stops the configuration naming <what> was being looked for.
function(dyt_python_eval var code what)
  if(NOT DYT_PYTHON)
    message(FATAL_ERROR "dyt: no Python found to locate ${what}; pass -DDYT_PYTHON=/path/to/python")
  endif()
  execute_process(COMMAND "${DYT_PYTHON}" -c "${code}"
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    string(REGEX REPLACE "\n$" "" err "${err}")
    string(REGEX REPLACE ".*\n" "" err "${err}")
    message(FATAL_ERROR "dyt: ${DYT_PYTHON} cannot tell ${what}: ${err}")
  endif()
  set(${var} "${out}" PARENT_SCOPE)
endfunction()
