// pybind11 module lora_fast._C: thin glue only; each op lives in its own file and registers here.
#include "lora_fast.hpp"

PYBIND11_MODULE(_C, m) {
    m.doc() = "lora_fast C++ core (torch-free: data crosses as buffers and raw pointers)";
    bind_safetensors(m);
    bind_stream_reader(m);
    bind_merge(m);
}
