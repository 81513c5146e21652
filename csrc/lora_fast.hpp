// Declarations shared by the binding glue: one bind_* function per op file.
#pragma once
#include <pybind11/pybind11.h>
void bind_safetensors(pybind11::module_& m);
void bind_merge(pybind11::module_& m);
void bind_stream_reader(pybind11::module_& m);
