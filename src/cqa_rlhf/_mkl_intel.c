/* MKL's vendor check, answered "Intel" on every CPU (numerics.py).
 *
 * MKL honours a conditional-numerical-reproducibility branch such as MKL_CBWR=AVX2,STRICT on
 * Intel CPUs only; on others it falls back to its automatic dispatch, whose bits differ between
 * CPUs. torch links MKL statically but calls this function through the PLT, so a library that
 * defines it and is loaded with RTLD_GLOBAL before torch takes its place (pytorch/builder#1245).
 * Every x86-64 CPU with AVX2 runs MKL's AVX2 kernels, so the answer is safe wherever the pin
 * applies. The Python-extension entry point lets pip build it as one; nothing imports it. */
#include <Python.h>

int mkl_serv_intel_cpu_true(void) { return 1; }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mkl_intel", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__mkl_intel(void) { return PyModule_Create(&module); }
