// Python glue for the CPU merge kernel (merge_cpu.cpp stays free of Python so the sanitizers can build and run it
// from csrc/tests/test_merge_cpu.cpp). Jobs cross as tuples of raw addresses; records go back as numpy views.
#include "lora_fast.hpp"
#include "merge_cpu.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>

namespace py = pybind11;
namespace lm = lora_fast::merge;
using namespace lora_fast::merge;

namespace {

// A numpy view of n T's at data, kept alive by owner (no copy).
template <class T>
py::array view_array(void* data, size_t n, const py::capsule& owner) {
    return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))}, static_cast<T*>(data),
                          owner);
}

// A Term from (kind, scale, ua, ub, ru, va, vb, rv, u, um, un, v, vdt, vm, vn) (addresses as ints), checked
// against its job's shape.
Term term_from(py::handle h, const Job& jb) {
    auto t = h.cast<py::tuple>();
    if (t.size() != 15) throw std::invalid_argument("merge_cpu: each term is a 15-tuple");
    auto ptr = [&](size_t i) { return reinterpret_cast<const float*>(t[i].cast<uintptr_t>()); };
    Term tm;
    tm.kind = t[0].cast<int>();
    tm.scale = static_cast<float>(t[1].cast<double>());
    tm.ua = ptr(2);
    tm.ub = ptr(3);
    tm.ru = t[4].cast<int64_t>();
    tm.va = ptr(5);
    tm.vb = ptr(6);
    tm.rv = t[7].cast<int64_t>();
    tm.u = ptr(8);
    tm.um = t[9].cast<int64_t>();
    tm.un = t[10].cast<int64_t>();
    tm.v = reinterpret_cast<const void*>(t[11].cast<uintptr_t>());
    tm.vdt = t[12].cast<int>();
    tm.vm = t[13].cast<int64_t>();
    tm.vn = t[14].cast<int64_t>();
    const bool empty = jb.rows * jb.cols == 0;
    if (tm.kind == TERM_HADA) {
        if (tm.ru < 1 || tm.rv < 1) throw std::invalid_argument("merge_cpu: a Hadamard term needs ranks >= 1");
        if (!empty && (!tm.ua || !tm.ub || !tm.va || !tm.vb)) throw std::invalid_argument("merge_cpu: null pointer");
    } else if (tm.kind == TERM_KRON) {
        if (tm.um < 1 || tm.un < 1 || tm.vm < 1 || tm.vn < 1 || tm.um * tm.vm != jb.rows || tm.un * tm.vn != jb.cols)
            throw std::invalid_argument("merge_cpu: Kronecker term shapes do not multiply to the weight's");
        if (tm.vdt < DT_F32 || tm.vdt > DT_BF16) throw std::invalid_argument("merge_cpu: unknown dtype code");
        if (!empty && (!tm.u || !tm.v)) throw std::invalid_argument("merge_cpu: null pointer");
    } else {
        throw std::invalid_argument("merge_cpu: unknown term kind");
    }
    return tm;
}

// jobs: sequence of (w_addr, rows, cols, stride_r, stride_c, dtype, up_addr, down_addr, R[, terms]); terms: a
// sequence of term tuples (term_from); with terms, R may be 0 (no LoRA part).
// restore (unfuse only): None or a sequence parallel to jobs of None or
// (off_addr, off_is_int64, off_len, col_addr, val_addr, n), the layout of JobRecords.
py::list merge_cpu_py(py::sequence job_specs, bool negate, bool record, bool check_finite, int num_threads, int isa,
                      py::object restore) {
    std::vector<Job> jobs;
    jobs.reserve(py::len(job_specs));
    std::vector<std::vector<Term>> terms;  // per job; jobs point into these (sized up front: no reallocation)
    terms.reserve(py::len(job_specs));
    for (py::handle h : job_specs) {
        auto t = h.cast<py::tuple>();
        if (t.size() != 9 && t.size() != 10) throw std::invalid_argument("merge_cpu: each job is a 9- or 10-tuple");
        Job jb;
        jb.w = reinterpret_cast<char*>(t[0].cast<uintptr_t>());
        jb.rows = t[1].cast<int64_t>();
        jb.cols = t[2].cast<int64_t>();
        jb.sr = t[3].cast<int64_t>();
        jb.sc = t[4].cast<int64_t>();
        jb.dtype = t[5].cast<int>();
        jb.up = reinterpret_cast<const float*>(t[6].cast<uintptr_t>());
        jb.down = reinterpret_cast<const float*>(t[7].cast<uintptr_t>());
        jb.R = t[8].cast<int64_t>();
        if (jb.dtype < DT_F32 || jb.dtype > DT_E5M2) throw std::invalid_argument("merge_cpu: unknown dtype code");
        terms.emplace_back();
        if (t.size() == 10 && !t[9].is_none())
            for (py::handle th : t[9].cast<py::sequence>()) terms.back().push_back(term_from(th, jb));
        jb.terms = terms.back().data();
        jb.nterms = static_cast<int64_t>(terms.back().size());
        if (jb.rows < 0 || jb.cols < 0 || jb.R < (jb.nterms ? 0 : 1)) throw std::invalid_argument("merge_cpu: bad shape or rank");
        if (jb.rows * jb.cols > 0 && (!jb.w || (jb.R > 0 && (!jb.up || !jb.down))))
            throw std::invalid_argument("merge_cpu: null pointer");
        jb.nseg = std::max<int64_t>(1, (jb.cols + kSegCols - 1) / kSegCols);
        jobs.push_back(jb);
    }
    std::vector<int64_t> noff(jobs.size(), 0);
    if (!restore.is_none()) {
        auto rs = restore.cast<py::sequence>();
        if (py::len(rs) != jobs.size()) throw std::invalid_argument("merge_cpu: restore must parallel jobs");
        for (size_t j = 0; j < jobs.size(); ++j) {
            py::object item = rs[j];
            if (item.is_none()) continue;
            auto t = item.cast<py::tuple>();
            if (t.size() != 6) throw std::invalid_argument("merge_cpu: each restore entry is a 6-tuple");
            Job& jb = jobs[j];
            jb.rest_off = reinterpret_cast<const void*>(t[0].cast<uintptr_t>());
            jb.rest_off64 = t[1].cast<bool>();
            noff[j] = t[2].cast<int64_t>();
            jb.rest_col = reinterpret_cast<const uint16_t*>(t[3].cast<uintptr_t>());
            jb.rest_val = reinterpret_cast<const void*>(t[4].cast<uintptr_t>());
            jb.rest_n = t[5].cast<int64_t>();
            if (jb.rest_n < 0 || (jb.rest_n > 0 && (!jb.rest_off || !jb.rest_col || !jb.rest_val)))
                throw std::invalid_argument("merge_cpu: bad restore entry");
        }
    }
    Options o;
    o.negate = negate;
    o.record = record && !negate;
    o.check_finite = check_finite;
    MergeResult res;
    {
        py::gil_scoped_release nogil;
        res = lm::run(jobs, noff, o, num_threads, isa);
    }
    PhaseTimer timer;
    py::list out;
    // Every array is a view of the call's record buffers; the capsule frees them when the last array goes.
    py::capsule owner;
    if (o.record) {
        std::unique_ptr<std::vector<void*>> held(new std::vector<void*>());
        owner = py::capsule(held.get(), [](void* p) {
            auto* v = static_cast<std::vector<void*>*>(p);
            for (void* b : *v) std::free(b);
            delete v;
        });
        held.release()->swap(res.buffers);
    }
    for (size_t j = 0; j < jobs.size(); ++j) {
        py::object off = py::none(), col = py::none(), val = py::none();
        if (o.record) {
            const JobRecords& jr = res.recs[j];
            if (jr.off64) off = view_array<int64_t>(jr.off, jr.noff, owner);
            else off = view_array<int32_t>(jr.off, jr.noff, owner);
            col = view_array<uint16_t>(jr.col, jr.n, owner);
            if (jobs[j].dtype == DT_F32) val = view_array<uint32_t>(jr.val, jr.n, owner);
            else if (is_fp8(jobs[j].dtype)) val = view_array<uint8_t>(jr.val, jr.n, owner);
            else val = view_array<uint16_t>(jr.val, jr.n, owner);
        }
        out.append(py::make_tuple(off, col, val, static_cast<bool>(res.nonfinite[j])));
    }
    timer.lap("to_numpy");
    return out;
}

}  // namespace

void bind_merge(py::module_& m) {
    m.def("merge_cpu", &merge_cpu_py, py::arg("jobs"), py::arg("negate"), py::arg("record"), py::arg("check_finite"),
          py::arg("num_threads") = 1, py::arg("isa") = 0, py::arg("restore") = py::none(),
          "Fused LoRA merge on CPU: W <- rn(W ± up@down) for a list of jobs. Returns per job "
          "(record offsets int32/int64 | None, record columns uint16 | None, record original bits uint16/uint32 | None, "
          "non-finite flag).");
    m.def("merge_cpu_isa", []() { return std::string(lm::default_isa_name()); },
          "The vector ISA merge_cpu uses by default on this CPU: 'avx512', 'avx2' or 'scalar'.");
    m.attr("MERGE_ISA_SCALAR") = py::int_(static_cast<int>(ISA_SCALAR));
    m.attr("MERGE_ISA_AVX2") = py::int_(static_cast<int>(ISA_AVX2));
    m.attr("MERGE_ISA_AVX512") = py::int_(static_cast<int>(ISA_AVX512));
}
