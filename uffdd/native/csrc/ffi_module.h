/* The preamble of the cffi module uffdd.native._ffi (native/build.py): the declarations
   of the API that csrc/ffi_api.cdef exposes, compiled into cffi's generated wrapper. */
#include "uffdd.h"
