// The Python module init of robustft_ext._C. It defines no ops: importing
// robustft_ext._C loads this shared library, which runs the static op
// registrations of schemas.cpp (TORCH_LIBRARY) and the device kernel files
// (TORCH_LIBRARY_IMPL) linked into the same library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "robustft_ext compiled ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
