# OpenVINO from the `openvino` wheel, which ships headers, libraries and OpenVINOConfig.cmake;
# an OpenVINO_DIR given on the command line (e.g. an OpenVINO archive) wins.
if(NOT OpenVINO_DIR)
  dyt_python_eval(_dyt_ov_dir "import openvino.utils as u; print(u.get_cmake_path())"
                  "where the openvino package keeps OpenVINOConfig.cmake")
  if(NOT EXISTS "${_dyt_ov_dir}/OpenVINOConfig.cmake")
    message(FATAL_ERROR "dyt: the openvino package of ${DYT_PYTHON} has no OpenVINOConfig.cmake; "
                        "pass -DOpenVINO_DIR=<dir> or -DDYT_WITH_OPENVINO=OFF")
  endif()
  set(OpenVINO_DIR "${_dyt_ov_dir}" CACHE PATH "Folder holding OpenVINOConfig.cmake")
endif()
find_package(OpenVINO REQUIRED COMPONENTS Runtime)
message(STATUS "dyt: OpenVINO ${OpenVINO_VERSION} from ${OpenVINO_DIR}")
