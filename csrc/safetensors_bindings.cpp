// Python glue for the safetensors core (safetensors.cpp stays free of Python so it can be fuzzed under sanitizers).
// Headers cross as plain tuples; a mapped file crosses as a writable buffer-protocol object that owns the mapping.
#include <cstring>

#include "lora_fast.hpp"
#include "safetensors.hpp"

#include <pybind11/stl.h>

#include <memory>

namespace py = pybind11;
namespace st = lora_fast::safetensors;

// (tensors, metadata, data_start, file_size) with tensors = [(name, dtype, shape, begin, end)] in data order and
// metadata None or a dict in header order. Shared with stream_reader_bindings.cpp.
py::tuple safetensors_header_to_python(const st::Header& h) {
    py::list tensors;
    for (const auto& t : h.tensors) {
        py::tuple shape(t.shape.size());
        for (size_t i = 0; i < t.shape.size(); ++i) shape[i] = py::int_(t.shape[i]);
        tensors.append(py::make_tuple(py::str(t.name), py::str(st::dtype_name(t.dtype)), shape, t.begin, t.end));
    }
    py::object metadata = py::none();
    if (h.has_metadata) {
        py::dict d;
        for (const auto& [k, v] : h.metadata) d[py::str(k)] = py::str(v);
        metadata = d;
    }
    return py::make_tuple(tensors, metadata, h.data_start(), h.data_start() + h.data_size);
}

namespace {

py::tuple header_to_python(const st::Header& h) { return safetensors_header_to_python(h); }

// Raises LoraFormatError (imported when needed, so _C does not depend on the package's import order).
void set_format_error(const char* message) {
    PyObject* text = PyUnicode_DecodeUTF8(message, Py_ssize_t(std::strlen(message)), "backslashreplace");
    PyObject* cls = PyExc_ValueError;
    py::object errors;
    try {
        errors = py::module_::import("lora_fast.errors").attr("LoraFormatError");
        cls = errors.ptr();
    } catch (py::error_already_set&) {
        PyErr_Clear();
    }
    PyErr_SetObject(cls, text);
    Py_XDECREF(text);
}

// OSError(errno, "<action>: <strerror>", filename): the errno picks the subclass (FileNotFoundError, ...).
void set_os_error(const st::IoError& e) {
    const std::string message = e.action + ": " + std::strerror(e.error_number);
    PyObject* filename = PyUnicode_DecodeFSDefaultAndSize(e.path.data(), Py_ssize_t(e.path.size()));
    PyObject* error = filename ? PyObject_CallFunction(PyExc_OSError, "isO", e.error_number, message.c_str(),
                                                       filename)
                               : nullptr;
    if (error) {
        PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error)), error);
    }  // otherwise the failed call left its own exception set
    Py_XDECREF(error);
    Py_XDECREF(filename);
}

// A borrowed C-contiguous byte view of any buffer-protocol object, released on scope exit.
class ByteView {
  public:
    explicit ByteView(py::handle obj) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    }
    ~ByteView() { PyBuffer_Release(&view_); }
    ByteView(const ByteView&) = delete;
    ByteView& operator=(const ByteView&) = delete;
    const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
    uint64_t size() const { return uint64_t(view_.len); }

  private:
    Py_buffer view_{};
};

// The (name, dtype string, shape) that both writers' tensor entries start with; data and nbytes are the caller's.
st::TensorToWrite tensor_to_write(const py::tuple& tup) {
    st::TensorToWrite t;
    t.name = tup[0].cast<std::string>();
    const auto dtype_str = tup[1].cast<std::string>();
    const auto dtype = st::parse_dtype(dtype_str);
    if (!dtype) throw st::FormatError("tensor " + t.name + ": unknown dtype " + dtype_str);
    t.dtype = *dtype;
    t.shape = tup[2].cast<std::vector<uint64_t>>();
    return t;
}

}  // namespace

void bind_safetensors(py::module_& m) {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const st::FormatError& e) {
            set_format_error(e.what());
        } catch (const st::IoError& e) {
            set_os_error(e);
        }
    });

    py::class_<st::MappedSafetensors>(m, "SafetensorsMapping", py::buffer_protocol(),
                                      "A safetensors file mapped MAP_PRIVATE with its validated header. The buffer "
                                      "is the whole file, writable copy-on-write (writes never reach the file).")
        .def_buffer([](st::MappedSafetensors& f) {
            return py::buffer_info(f.file.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                                   {py::ssize_t(f.file.size())}, {py::ssize_t(1)}, /*readonly=*/false);
        })
        .def_property_readonly("header", [](const st::MappedSafetensors& f) { return header_to_python(f.header); })
        .def_property_readonly("address", [](const st::MappedSafetensors& f) {
            return reinterpret_cast<uintptr_t>(f.file.data());
        })
        .def_property_readonly("size", [](const st::MappedSafetensors& f) { return f.file.size(); });

    m.def(
        "safetensors_mmap",
        [](const std::string& path) {
            std::unique_ptr<st::MappedSafetensors> mapped;
            {
                py::gil_scoped_release release;
                mapped = std::make_unique<st::MappedSafetensors>(path);
            }
            return mapped;
        },
        py::arg("path"), "Map a safetensors file (path as bytes) and validate its header.");

    m.def(
        "safetensors_read_header",
        [](const std::string& path) {
            st::Header header;
            {
                py::gil_scoped_release release;
                header = st::read_header_file(path);
            }
            return header_to_python(header);
        },
        py::arg("path"), "Validate and return the header of a safetensors file without reading its data.");

    m.def(
        "safetensors_parse",
        [](py::handle buffer) {
            ByteView view(buffer);
            try {
                return header_to_python(st::parse_buffer(view.data(), view.size()));
            } catch (const st::FormatError& e) {
                throw st::FormatError(std::string("<bytes>: ") + e.what());
            }
        },
        py::arg("buffer"), "Validate a complete safetensors file held in a buffer and return its header.");

    m.def(
        "safetensors_dtypes",
        [] {
            py::list out;
            for (int i = 0; i < st::kDtypeCount; ++i)
                out.append(py::make_tuple(st::dtype_name(st::Dtype(i)), st::dtype_bits(st::Dtype(i))));
            return out;
        },
        "The dtype table: [(name, bits per element)] in the safetensors enum order (the writer sorts by it).");

    py::class_<st::StreamingWriter>(m, "SafetensorsStreamingWriter",
                                    "save_file one tensor at a time: the header is written at construction, write() "
                                    "appends data in the order `order` gives, commit() renames into place; dropped "
                                    "uncommitted, the temporary file is removed.")
        .def(py::init([](const std::string& path, const py::list& tensors, const py::object& metadata) {
                 std::vector<st::TensorToWrite> items;
                 items.reserve(tensors.size());
                 for (const py::handle entry : tensors) {
                     const auto tup = entry.cast<py::tuple>();
                     if (tup.size() != 4) throw py::value_error("tensor entries are (name, dtype, shape, nbytes)");
                     st::TensorToWrite t = tensor_to_write(tup);
                     t.data = nullptr;
                     t.nbytes = tup[3].cast<uint64_t>();
                     items.push_back(std::move(t));
                 }
                 std::optional<st::Metadata> md;
                 if (!metadata.is_none()) md = metadata.cast<st::Metadata>();
                 py::gil_scoped_release release;
                 return std::make_unique<st::StreamingWriter>(path, std::move(items), md ? &*md : nullptr);
             }),
             py::arg("path"), py::arg("tensors"), py::arg("metadata"),
             "tensors: [(name, dtype, shape, nbytes)]; metadata: None or [(key, value)]. Validates as save_file.")
        .def_property_readonly("order",
                               [](const st::StreamingWriter& w) {
                                   py::list out;
                                   for (const auto& t : w.order()) out.append(py::make_tuple(py::str(t.name), t.nbytes));
                                   return out;
                               },
                               "[(name, nbytes)] in data order.")
        .def(
            "write",
            [](st::StreamingWriter& w, py::handle buffer) {
                ByteView view(buffer);
                py::gil_scoped_release release;
                w.write(view.data(), view.size());
            },
            py::arg("buffer"), "Append the next bytes of data (any buffer-protocol object).")
        .def(
            "commit",
            [](st::StreamingWriter& w) {
                py::gil_scoped_release release;
                w.commit();
            },
            "Check every data byte came, fsync, rename into place, fsync the directory.");

    m.def(
        "safetensors_save",
        [](const std::string& path, const py::list& tensors, const py::object& metadata, int64_t fail_after_bytes) {
            std::vector<st::TensorToWrite> items;
            items.reserve(tensors.size());
            for (const py::handle entry : tensors) {
                const auto tup = entry.cast<py::tuple>();
                if (tup.size() != 5) throw py::value_error("tensor entries are (name, dtype, shape, address, nbytes)");
                st::TensorToWrite t = tensor_to_write(tup);
                t.data = reinterpret_cast<const void*>(tup[3].cast<uintptr_t>());
                t.nbytes = tup[4].cast<uint64_t>();
                items.push_back(std::move(t));
            }
            std::optional<st::Metadata> md;
            if (!metadata.is_none()) md = metadata.cast<st::Metadata>();
            const uint64_t fail_after = fail_after_bytes < 0 ? UINT64_MAX : uint64_t(fail_after_bytes);
            py::gil_scoped_release release;
            try {
                st::save_file(path, std::move(items), md ? &*md : nullptr, fail_after);
            } catch (const st::FormatError& e) {
                throw st::FormatError(path + ": " + e.what());
            }
        },
        py::arg("path"), py::arg("tensors"), py::arg("metadata"), py::arg("fail_after_bytes") = -1,
        "Write a safetensors file atomically. tensors: [(name, dtype, shape, address, nbytes)], the memory kept "
        "alive by the caller; metadata: None or [(key, value)]. fail_after_bytes >= 0 injects a write failure "
        "(tests).");
}
