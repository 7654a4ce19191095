// Python module stub for engine._C: importing it loads this library, whose static TORCH_LIBRARY blocks register
// torch.ops.sif.*. No pybind11: the ops are reached through the dispatcher only.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Native ops of the SIF engine (torch.ops.sif.*); see engine/ops.py.",
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
}
