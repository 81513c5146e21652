// The CPU merge kernel's interface (merge_cpu.cpp), free of Python: the pybind glue (merge_cpu_bindings.cpp) and
// the sanitizer test driver (tests/test_merge_cpu.cpp) both call it. Numerics and record layout: merge_cpu.cpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

namespace lora_fast::merge {

// Weight dtypes. DT_E4M3 / DT_E5M2: torch.float8_e4m3fn / torch.float8_e5m2 (one byte; the sum is rounded exactly,
// see merge_cpu.cpp, and encoded as torch's cast does: e4m3fn saturates to +-448, e5m2 overflows to +-Inf).
enum : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_E4M3 = 3, DT_E5M2 = 4 };
constexpr bool is_fp8(int dt) { return dt == DT_E4M3 || dt == DT_E5M2; }

// LORA_FAST_MERGE_PROFILE=1 prints the wall time of each phase of a merge_cpu call to stderr.
struct PhaseTimer {
    bool on = std::getenv("LORA_FAST_MERGE_PROFILE") != nullptr;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void lap(const char* what) {
        if (!on) return;
        auto now = std::chrono::steady_clock::now();
        std::fprintf(stderr, "merge_cpu %-10s %8.3f ms\n", what, std::chrono::duration<double, std::milli>(now - t).count());
        t = now;
    }
};
enum : int { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };
enum : int { TERM_HADA = 1, TERM_KRON = 2 };

// A delta term that is not one low-rank product (LyCORIS LoHa, LoKr, full diff). After the job's LoRA chain
// (over k = 0..R-1, from +0) each term adds, element by element, in order:
//   acc = fma(rn32(u[i][j] * scale), v[i][j], acc)
// TERM_HADA (LoHa): u = ua (rows, ru) . ub (ru, cols) and v = va (rows, rv) . vb (rv, cols), each one fp32 FMA chain
//   over its rank from +0 (the same chain as the LoRA delta); fp32 row-major contiguous.
// TERM_KRON (LoKr, full diff): u (um, un) fp32 row-major, v (vm, vn) row-major in dtype vdt (DT_*), whole matrices;
//   rows = um * vm, cols = un * vn, and element (i, j) pairs u[i / vm][j / vn] with v[i % vm][j % vn]. A full diff
//   is um = un = 1, u = {1}.
struct Term {
    int kind = TERM_HADA;
    float scale = 1.0f;
    const float* ua = nullptr;
    const float* ub = nullptr;
    int64_t ru = 0;
    const float* va = nullptr;
    const float* vb = nullptr;
    int64_t rv = 0;
    const float* u = nullptr;
    int64_t um = 0, un = 0;
    const void* v = nullptr;
    int vdt = DT_F32;
    int64_t vm = 0, vn = 0;
};

struct Job {
    char* w = nullptr;          // weight base address
    int64_t rows = 0, cols = 0;  // logical 2-D shape
    int64_t sr = 0, sc = 0;      // strides in elements
    int dtype = DT_F32;
    const float* up = nullptr;    // (rows, R) row-major
    const float* down = nullptr;  // (R, cols) row-major
    int64_t R = 0;               // 0: no LoRA part (up/down unused), the delta is the terms' alone
    const Term* terms = nullptr;  // nterms Terms added after the LoRA chain, in order
    int64_t nterms = 0;
    int64_t nseg = 1;  // column segments per row (see kSegCols)
    // unfuse only: the caller's records (layout of JobRecords), scattered back during the pass
    const void* rest_off = nullptr;  // int32, or int64 when rest_off64
    bool rest_off64 = false;
    const uint16_t* rest_col = nullptr;
    const void* rest_val = nullptr;
    int64_t rest_n = 0;
    int64_t rest_offset(int64_t key) const {
        return rest_off64 ? static_cast<const int64_t*>(rest_off)[key] : static_cast<const int32_t*>(rest_off)[key];
    }
};

// Records name an element by (row, column segment of kSegCols columns, 16-bit column inside the segment), so a
// record costs 2 bytes of position instead of an 8-byte flat index. Tiles never straddle a segment boundary.
constexpr int64_t kSegCols = 65536;

struct Options {
    bool negate = false;  // unfuse: W <- rn(W - delta)
    bool record = false;
    bool check_finite = false;
};

struct JobRecords {
    void* off = nullptr;
    bool off64 = false;
    size_t noff = 0;
    uint16_t* col = nullptr;
    void* val = nullptr;
    size_t n = 0;
};

struct MergeResult {
    std::vector<JobRecords> recs;    // per job, pointing into buffers
    std::vector<uint8_t> nonfinite;  // per job
    std::vector<void*> buffers;      // every job's records (std::free); ownership passes to numpy
    size_t used = 0;                 // gather path: bytes used in its one buffer
    MergeResult() = default;
    MergeResult(const MergeResult&) = delete;
    MergeResult& operator=(const MergeResult&) = delete;
    MergeResult(MergeResult&& other) noexcept { *this = std::move(other); }
    MergeResult& operator=(MergeResult&& other) noexcept {
        if (this != &other) {
            free_buffers();
            recs = std::move(other.recs);
            nonfinite = std::move(other.nonfinite);
            buffers = std::move(other.buffers);
            used = other.used;
            other.buffers.clear();
        }
        return *this;
    }
    ~MergeResult() { free_buffers(); }
    void free_buffers() {
        for (void* b : buffers) std::free(b);
        buffers.clear();
    }
};

// Merges every job: W <- rn(W ± delta), delta = up·down then the job's terms (Options), with records when o.record. restore_noff[j] is the number of
// offsets in job j's restore records (rest_*; unused when rest_n == 0): every job's records are checked to fit its
// weight before anything is written (std::invalid_argument otherwise). isa: ISA_AUTO or a cap.
MergeResult run(const std::vector<Job>& jobs, const std::vector<int64_t>& restore_noff, const Options& o,
                int nthreads, int isa);
// The vector ISA run() uses by default on this CPU (ISA_*), and its name: "avx512", "avx2" or "scalar".
int default_isa();
const char* default_isa_name();

}  // namespace lora_fast::merge
