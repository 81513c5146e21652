// Python glue for the streaming reader (stream_reader.cpp stays free of Python so it runs under sanitizers).
// Slots cross as raw addresses (pinned or ordinary memory the caller allocated with torch and keeps alive), the
// destination as a raw address; every blocking call releases the GIL.
#include "lora_fast.hpp"
#include "stream_reader.hpp"

#include <pybind11/stl.h>

#include <memory>

namespace py = pybind11;
namespace st = lora_fast::safetensors;
namespace ls = lora_fast::stream;

py::tuple safetensors_header_to_python(const st::Header& h);  // safetensors_bindings.cpp

namespace {

ls::FaultKind parse_fault(const std::string& kind) {
    if (kind.empty() || kind == "none") return ls::FaultKind::None;
    if (kind == "truncate") return ls::FaultKind::Truncate;
    if (kind == "modify") return ls::FaultKind::Modify;
    if (kind == "io_error") return ls::FaultKind::IoError;
    throw py::value_error("unknown fault kind " + kind + " (none, truncate, modify, io_error)");
}

// The reader plus the chunk each delivered slot holds, so Python refers to chunks by slot number.
class PyStreamReader {
  public:
    PyStreamReader(const std::string& path, const ls::FaultInjection& faults) {
        py::gil_scoped_release release;
        reader_ = std::make_unique<ls::StreamReader>(path, faults);
    }

    ls::StreamReader& reader() { return *reader_; }

    void start(uint64_t chunk_bytes, const std::vector<uintptr_t>& slot_addresses, size_t owned_slots,
               unsigned threads) {
        std::vector<uint8_t*> slots;
        slots.reserve(slot_addresses.size());
        for (uintptr_t a : slot_addresses) slots.push_back(reinterpret_cast<uint8_t*>(a));
        reader_->start(chunk_bytes, slots, owned_slots, threads);
        delivered_.assign(reader_->slot_count(), ls::Chunk{});
    }

    py::object next() {
        ls::Chunk c;
        bool more = false;
        {
            py::gil_scoped_release release;
            more = reader_->next(&c);
        }
        if (!more) return py::none();
        delivered_[size_t(c.slot)] = c;
        return py::make_tuple(c.slot, c.index, c.tensors_done);
    }

    const ls::Chunk& delivered(int slot) const {
        if (slot < 0 || size_t(slot) >= delivered_.size() || delivered_[size_t(slot)].slot != slot)
            throw py::value_error("slot " + std::to_string(slot) + " holds no delivered chunk");
        return delivered_[size_t(slot)];
    }

    py::list segments(int slot) const {
        py::list out;
        for (const ls::Segment& s : reader_->segments(delivered(slot)))
            out.append(py::make_tuple(s.slot_offset, s.dest_offset, s.nbytes));
        return out;
    }

    void copy_chunk(int slot, uintptr_t dest) {
        const ls::Chunk c = delivered(slot);
        py::gil_scoped_release release;
        reader_->copy_chunk(c, reinterpret_cast<uint8_t*>(dest));
    }

    void release(int slot) {
        delivered(slot);
        reader_->release(slot);
        delivered_[size_t(slot)] = ls::Chunk{};
    }

    void close() {
        py::gil_scoped_release release;
        reader_->close();
    }

  private:
    std::unique_ptr<ls::StreamReader> reader_;
    std::vector<ls::Chunk> delivered_;
};

}  // namespace

void bind_stream_reader(py::module_& m) {
    py::class_<PyStreamReader>(m, "StreamReader",
                               "Reader threads that pread a safetensors file's data in chunks into a ring of slots "
                               "and deliver the chunks in file order (see docs/streaming.md).")
        .def(py::init([](const std::string& path, const std::string& fault, uint64_t fault_chunk,
                         uint32_t read_delay_us) {
                 ls::FaultInjection f;
                 f.kind = parse_fault(fault);
                 f.chunk = fault_chunk;
                 f.read_delay_us = read_delay_us;
                 return std::make_unique<PyStreamReader>(path, f);
             }),
             py::arg("path"), py::arg("fault") = "", py::arg("fault_chunk") = 0, py::arg("read_delay_us") = 0,
             "Open a file (path as bytes) and validate its header. fault/fault_chunk/read_delay_us: test hooks.")
        .def_property_readonly("header",
                               [](PyStreamReader& r) { return safetensors_header_to_python(r.reader().header()); })
        .def_property_readonly("dest_size", [](PyStreamReader& r) { return r.reader().dest_size(); })
        .def_property_readonly("dest_offsets", [](PyStreamReader& r) { return r.reader().dest_offsets(); })
        .def_property_readonly("file_size", [](PyStreamReader& r) { return r.reader().file_size(); })
        .def_property_readonly("chunk_count", [](PyStreamReader& r) { return r.reader().chunk_count(); })
        .def_property_readonly("slot_count", [](PyStreamReader& r) { return r.reader().slot_count(); })
        .def("start", &PyStreamReader::start, py::arg("chunk_bytes"), py::arg("slot_addresses"),
             py::arg("owned_slots"), py::arg("threads"),
             "Start the threads. slot_addresses: buffers of chunk_bytes each kept alive by the caller until close(); "
             "empty: allocate owned_slots buffers in C++.")
        .def("next", &PyStreamReader::next,
             "Block until the next chunk (file order) is read: (slot, chunk_index, tensors_done), or None at the end.")
        .def("segments", &PyStreamReader::segments, py::arg("slot"),
             "[(slot_offset, dest_offset, nbytes)] that copy the chunk delivered in `slot` to the destination.")
        .def("copy_chunk", &PyStreamReader::copy_chunk, py::arg("slot"), py::arg("dest_address"),
             "memcpy the chunk delivered in `slot` into the destination (dest_size bytes at dest_address).")
        .def("release", &PyStreamReader::release, py::arg("slot"), "Give a delivered slot back to the readers.")
        .def("close", &PyStreamReader::close, "Stop and join the threads and free owned slots (idempotent).");

    m.def(
        "stream_counters",
        [] {
            const ls::Counters c = ls::counters();
            py::dict d;
            d["readers"] = c.readers;
            d["threads"] = c.threads;
            d["slots"] = c.slots;
            d["slot_bytes"] = c.slot_bytes;
            d["owned_slot_bytes"] = c.owned_slot_bytes;
            return d;
        },
        "Process-wide counts of what open stream readers hold (readers, threads, slots, slot_bytes, "
        "owned_slot_bytes); all zero when nothing leaks.");
}
