# Injected with -DCMAKE_PROJECT_INCLUDE= when lmm_fusion_msgs is built against the ROS 2 PyPI wheels.
#
# The wheels' exported *__rosidl_generator_pyExport.cmake files name include folders of the machine
# that built the wheels (/opt/python/cp311-cp311/...). CMake refuses imported targets whose include
# folders do not exist, so at the end of configuration we point them at this interpreter's Python
# and NumPy headers instead. On a system ROS 2 install this file is not used.
find_package(Python3 REQUIRED COMPONENTS Interpreter Development NumPy)

function(lmm_fusion_fix_wheel_includes)
  get_property(_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
  foreach(_t IN LISTS _targets)
    get_target_property(_inc ${_t} INTERFACE_INCLUDE_DIRECTORIES)
    if(_inc AND "${_inc}" MATCHES "/opt/python/")
      set_target_properties(${_t} PROPERTIES
        INTERFACE_INCLUDE_DIRECTORIES "${Python3_INCLUDE_DIRS};${Python3_NumPy_INCLUDE_DIRS}")
    endif()
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL lmm_fusion_fix_wheel_includes)
