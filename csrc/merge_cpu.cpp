// CPU fused LoRA merge: W <- rn(W ± up·down) in one pass per element, with the exact-unfuse record and a
// non-finite flag computed in the same pass. Torch-free: tensors arrive as raw addresses, shapes, strides.
//
// Numerics (identical on every code path, so fuse and unfuse always agree and ISAs agree with each other):
//  * delta[i][j] = fma chain over k = 0..R-1 starting from +0: acc = fma(up[i][k], down[k][j], acc).
//    Every element uses that same chain whatever the tiling, vector width or thread count.
//  * W' = rn_dtype(fp32(W) + delta): the add is done in fp32 and the sum is rounded once to the weight dtype
//    (nearest even; bf16 by integer ops, or by vcvtneps2bf16 with a fix-up for denormals where the CPU has
//    AVX512_BF16; NaN stays NaN). This is what torch's (W.float() + delta).to(dtype) does.
//    (For fp16/bf16 the fp32 add itself can round, so in about 2^-13 of elements the result may differ by one
//    dtype ulp from the infinitely precise rn(W + delta); making that exact cost ~25% of the epilogue.)
//  * The record keeps (flat index, original bits) wherever rn(W' - delta) differs bitwise from W, so
//    unfuse = same kernel with -delta, then scatter the records.
//  * fp8 weights (DT_E4M3, DT_E5M2): the fp32 sum is formed by TwoSum and rounded to odd (its last bit made sticky
//    when the add was inexact), then encoded; rounding to odd with 20 spare bits makes that one rounding of the
//    exact W + delta (no false tie from the fp32 add), so fp8 results are rn_fp8(W + delta) exactly. The encoding
//    is torch's cast (c10 fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value): nearest even; e4m3fn has no Inf,
//    and a finite value beyond +-464 or an Inf becomes +-448 (saturation, torch >= 2.9), NaN becomes 0x7F|sign;
//    e5m2 overflows to +-Inf, NaN becomes 0x7F|sign. The non-finite flag also flags an e4m3fn result that
//    saturated (|W + delta| > 464): fp8's range was exceeded.
//  * MXCSR is pinned to round-to-nearest without FTZ/DAZ in every worker, so a caller's flush-denormal setting
//    cannot change the bits.

#include "merge_cpu.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define LF_X86 1
#include <immintrin.h>
#else
#define LF_X86 0
#endif

// Vector types cross inline helpers that carry no target attribute of their own; everything is flattened into the
// target-specific tile functions, so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12 reports the _mm512_undefined_* placeholders inside its own intrinsic headers as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Job, Options, JobRecords, MergeResult and the DT_/ISA_ codes: merge_cpu.hpp.
using namespace lora_fast::merge;

namespace {

// One tile's records: how many in each of the tile's rows, then per record the column inside the tile's segment
// and the original bits in the weight's width, rows in order and columns ascending. A tile fills these in its
// thread's scratch (room for every element of the tile, so no growth and no bounds checks). The direct path
// (run_job_direct) merges them into their job's final order at once; the gather path copies them, exactly sized,
// into the thread's record arena and gather_records puts them in order after all tiles ran. No ownership: the
// memory belongs to the scratch or arena.
struct TileRecs {
    uint16_t* col = nullptr;
    char* val = nullptr;
    int32_t* row_n = nullptr;  // per tile row
    size_t n = 0;
};

// Large buffers are 2 MiB aligned and marked for transparent huge pages: a fuse writes its records (about 1 GB at
// SDXL scale) into fresh memory, and faulting that in 4 KiB pages cost seconds. Freed with std::free.
void* big_alloc(size_t bytes) {
    constexpr size_t kHuge = size_t(2) << 20;
    if (bytes < kHuge) {
        void* p = std::malloc(std::max<size_t>(bytes, 64));
        if (!p) throw std::bad_alloc();
        return p;
    }
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (!p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only means small pages
#endif
    return p;
}

// The bytes big_alloc(bytes) really allocated when it took the huge-page path (2 MiB or more), else 0.
size_t big_alloc_size(size_t bytes) {
    constexpr size_t kHuge = size_t(2) << 20;
    return bytes < kHuge ? 0 : (bytes + kHuge - 1) / kHuge * kHuge;
}

// Hands the whole pages of [p + used, p + size) back to the system. A record buffer kept by the caller ends in a
// partly used huge page (up to 2 MiB resident per buffer, i.e. per thread, beyond the records); dropping the pages
// past the last record splits that huge page and keeps only what holds records. The range stays mapped (reads give
// zeros) and is never touched again; it goes when the buffer is freed. Only for big_alloc'd buffers of 2 MiB or
// more, with size as big_alloc_size gives it or smaller (a malloc'd buffer passes 0: nothing happens).
void release_tail(void* p, size_t used, size_t size) {
#if defined(__linux__) && defined(MADV_DONTNEED)
    constexpr size_t kHuge = size_t(2) << 20;
    if (size < kHuge) return;
    static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t base = reinterpret_cast<uintptr_t>(p);
    const uintptr_t lo = (base + used + page - 1) / page * page, hi = (base + size) / page * page;
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advisory: failure keeps the pages
#else
    (void)p, (void)used, (void)size;
#endif
}

// Per-thread bump allocator for records: freed as a whole when the call ends (gather path), or handed to the result
// (direct path, where it holds the final arrays).
class RecArena {
public:
    RecArena() = default;
    RecArena(const RecArena&) = delete;
    RecArena& operator=(const RecArena&) = delete;
    ~RecArena() {
        for (void* c : chunks_) std::free(c);
    }
    // Hands the chunks to the caller (who frees them with std::free); the arena is empty afterwards. The pages past
    // the last record are given back first (release_tail).
    void release_into(std::vector<void*>& out) {
        if (!chunks_.empty()) release_tail(chunks_.back(), size_ - left_, size_);
        out.reserve(out.size() + chunks_.size());
        out.insert(out.end(), chunks_.begin(), chunks_.end());
        chunks_.clear();
        cur_ = nullptr;
        left_ = 0;
    }
    char* take(size_t bytes) {  // 8-byte aligned
        bytes = (bytes + 7) & ~size_t(7);
        if (bytes > left_) {
            const size_t size = std::max(bytes, kChunk);
            chunks_.reserve(chunks_.size() + 1);  // so the push_back below cannot throw and leak the chunk
            void* c = big_alloc(size);
            if (!chunks_.empty()) release_tail(chunks_.back(), size_ - left_, size_);  // nothing more goes there
            chunks_.push_back(c);
            cur_ = static_cast<char*>(c);
            left_ = size_ = size;
        }
        char* p = cur_;
        cur_ += bytes;
        left_ -= bytes;
        return p;
    }

private:
    static constexpr size_t kChunk = size_t(32) << 20;
    std::vector<void*> chunks_;
    char* cur_ = nullptr;
    size_t left_ = 0;
    size_t size_ = 0;  // of the last chunk
};

constexpr int elem_size(int dt) { return dt == DT_F32 ? 4 : is_fp8(dt) ? 1 : 2; }

// ---------------------------------------------------------------- scalar conversions (exact, portable)
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    if (exp == 0x1F) return u2f(sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0u));  // quiets, as vcvtph2ps
    if (exp == 0) {
        float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
        return u2f(sign | f2u(v));
    }
    return u2f(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> fp16, round to nearest even; NaN keeps sign and top payload bits and is quieted (as vcvtps2ph).
inline uint32_t f32_to_f16(float f) {
    uint32_t b = f2u(f), sign = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u | ((a >> 13) & 0x3FFu);
    if (a >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds to inf (ties to even included)
    if (a >= 0x38800000u) {                        // normal fp16
        uint32_t r = a - (112u << 23);
        r += 0xFFFu + ((r >> 13) & 1u);
        return sign | (r >> 13);
    }
    // subnormal fp16: adding 0.5 aligns the fp32 ulp to 2^-24, so the hardware add rounds (nearest even) for us
    float t = u2f(a) + 0.5f;
    return sign | (f2u(t) - 0x3F000000u);
}

inline uint32_t f32_to_bf16(float f) {
    uint32_t b = f2u(f);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (b >> 16) | 0x40u;  // NaN: never let the carry turn it into Inf
    return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}

// fp8 e4m3fn -> fp32, exact: the 7 magnitude bits placed at fp32's exponent/mantissa boundary, scaled by 2^120
// (fp8 subnormals arrive as fp32 subnormals; DAZ is off). 0x7F|sign is NaN (quiet, sign kept).
inline float e4m3_to_f32(uint32_t v) {
    const uint32_t mag = v & 0x7Fu, sign = (v & 0x80u) << 24;
    if (mag == 0x7Fu) return u2f(sign | 0x7FC00000u);
    return u2f(sign | f2u(u2f(mag << 20) * 0x1p120f));
}
// fp32 -> e4m3fn as torch's cast (c10::detail::fp8e4m3fn_from_fp32_value): nearest even; NaN -> 0x7F|sign; a
// finite value that rounds past 448, and +-Inf, saturate to +-448 (0x7E).
inline uint32_t f32_to_e4m3(float f) {
    const uint32_t b = f2u(f), sign = b & 0x80000000u, a = b ^ sign;
    uint32_t r;
    if (a >= (1087u << 20)) r = a > 0x7F800000u ? 0x7Fu : 0x7Eu;
    else if (a < (121u << 23)) r = f2u(u2f(a) + u2f(141u << 23)) - (141u << 23);
    else {
        r = (a + (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
        if (r == 0x7Fu) r = 0x7Eu;
    }
    return r | (sign >> 24);
}
// fp8 e5m2 is the upper byte of an fp16: exact through f16_to_f32 (NaN quieted as vcvtph2ps does).
inline float e5m2_to_f32(uint32_t v) { return f16_to_f32(v << 8); }
// fp32 -> e5m2 as torch's cast (c10::detail::fp8e5m2_from_fp32_value): nearest even, overflow to +-Inf (0x7C),
// NaN -> 0x7F|sign.
inline uint32_t f32_to_e5m2(float f) {
    const uint32_t b = f2u(f), sign = b & 0x80000000u, a = b ^ sign;
    uint32_t r;
    if (a >= (143u << 23)) r = a > 0x7F800000u ? 0x7Fu : 0x7Cu;
    else if (a < (113u << 23)) r = f2u(u2f(a) + u2f(134u << 23)) - (134u << 23);
    else r = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFFFu + ((a >> 21) & 1u)) >> 21;
    return (r | (sign >> 24)) & 0xFFu;
}

// x + b rounded to odd in fp32 (TwoSum: s + e == x + b exactly; where e != 0 and s's last bit is even, s steps one
// ulp towards e). Not finite: s as it is (e is NaN there), except that a NaN x is returned as it is: with two NaN
// operands the hardware's pick (and the compiler's operand order) would decide the sign, the only payload an fp8
// NaN has, and fuse, its record check and unfuse must agree on it. fp8 rounding of this is rn_fp8(x + b) exactly.
inline float sum_odd_s(float x, float b) {
    if (x != x) return x;
    const float s = x + b, bv = s - x, e = (x - (s - bv)) + (b - bv);
    uint32_t sb = f2u(s);
    if ((e < 0.0f || e > 0.0f) && !(sb & 1u)) sb += ((sb ^ f2u(e)) >> 31) ? 0xFFFFFFFFu : 1u;
    return u2f(sb);
}

template <int DT> inline float decode_s(uint32_t raw) {
    if constexpr (DT == DT_F32) return u2f(raw);
    else if constexpr (DT == DT_F16) return f16_to_f32(raw);
    else if constexpr (DT == DT_E4M3) return e4m3_to_f32(raw);
    else if constexpr (DT == DT_E5M2) return e5m2_to_f32(raw);
    else return u2f(raw << 16);
}
template <int DT> inline uint32_t encode_s(float f) {
    if constexpr (DT == DT_F32) return f2u(f);
    else if constexpr (DT == DT_F16) return f32_to_f16(f);
    else if constexpr (DT == DT_E4M3) return f32_to_e4m3(f);
    else if constexpr (DT == DT_E5M2) return f32_to_e5m2(f);
    else return f32_to_bf16(f);
}

// rn_dtype(x + d): the fp32 sum, rounded once to the weight dtype (fp8: the exact sum, through rounding to odd).
template <int DT> inline uint32_t add_round_s(float x, float d) {
    if constexpr (is_fp8(DT)) return encode_s<DT>(sum_odd_s(x, d));
    else return encode_s<DT>(x + d);
}
// e4m3fn: did rn(x + d) saturate (|x + d| > 464, or Inf)? Under check_finite that is flagged like a non-finite.
template <int DT> inline bool overflow_s(float x, float d) {
    if constexpr (DT == DT_E4M3) return std::fabs(sum_odd_s(x, d)) > 464.0f;
    else return false;
}

template <int DT> inline uint32_t load_raw_s(const char* p) {
    if constexpr (DT == DT_F32) { uint32_t v; std::memcpy(&v, p, 4); return v; }
    else if constexpr (is_fp8(DT)) { uint8_t v; std::memcpy(&v, p, 1); return v; }
    else { uint16_t v; std::memcpy(&v, p, 2); return v; }
}
template <int DT> inline void store_raw_s(char* p, uint32_t v) {
    if constexpr (DT == DT_F32) std::memcpy(p, &v, 4);
    else if constexpr (is_fp8(DT)) { uint8_t h = static_cast<uint8_t>(v); std::memcpy(p, &h, 1); }
    else { uint16_t h = static_cast<uint16_t>(v); std::memcpy(p, &h, 2); }
}
template <int DT> inline bool nonfinite_raw(uint32_t v) {
    if constexpr (DT == DT_F32) return (v & 0x7F800000u) == 0x7F800000u;
    else if constexpr (DT == DT_F16) return (v & 0x7C00u) == 0x7C00u;
    else if constexpr (DT == DT_E4M3) return (v & 0x7Fu) == 0x7Fu;
    else if constexpr (DT == DT_E5M2) return (v & 0x7Cu) == 0x7Cu;
    else return (v & 0x7F80u) == 0x7F80u;
}

// Records of one row segment are staged as (column offset, original bits) in per-thread scratch, then appended
// to the tile's list with their flat indices.
struct RowRecs {
    int32_t* col;  // columns (offsets in the row segment) that need a record
    char* orig;    // the segment's original bits, in the weight's width, indexed by column
};

// One element of the epilogue (the scalar ISA and vector tails). Returns the number of records written (0 or 1).
template <int DT>
inline int epilogue_elem(char* wp, float delta, int32_t col, const Options& o, RowRecs rr, bool& nonfinite) {
    uint32_t w = load_raw_s<DT>(wp);
    if (o.record) store_raw_s<DT>(rr.orig + col * elem_size(DT), w);
    float d = o.negate ? -delta : delta;
    uint32_t h = add_round_s<DT>(decode_s<DT>(w), d);
    store_raw_s<DT>(wp, h);
    if (o.check_finite && (nonfinite_raw<DT>(h) || overflow_s<DT>(decode_s<DT>(w), d))) nonfinite = true;
    if (o.record && add_round_s<DT>(decode_s<DT>(h), -d) != w) {
        rr.col[0] = col;
        return 1;
    }
    return 0;
}

// Epilogue of a row segment of n elements at w (element stride `stride`), delta at drow. Returns the record count.
template <int DT>
int64_t epilogue_row_scalar(char* w, int64_t stride, const float* drow, int64_t n, const Options& o, RowRecs rr,
                            bool& nonfinite) {
    const int es = elem_size(DT);
    int64_t cnt = 0;
    for (int64_t j = 0; j < n; ++j)
        cnt += epilogue_elem<DT>(w + j * stride * es, drow[j], static_cast<int32_t>(j), o, {rr.col + cnt, rr.orig}, nonfinite);
    return cnt;
}

// Scalar delta: rows [0, mr) of a row group, columns [c0, c0 + nb), into out (row stride ldo).
void delta_scalar(const Job& jb, int64_t r, int mr, int64_t c0, int64_t nb, float* out, int64_t ldo) {
    for (int i = 0; i < mr; ++i) {
        float* o = out + i * ldo;
        for (int64_t j = 0; j < nb; ++j) o[j] = 0.0f;
        const float* a = jb.up + (r + i) * jb.R;
        for (int64_t k = 0; k < jb.R; ++k) {
            const float ak = a[k];
            const float* b = jb.down + k * jb.cols + c0;
            for (int64_t j = 0; j < nb; ++j) o[j] = std::fma(ak, b[j], o[j]);
        }
    }
}

// A term's v element in fp32 (exact).
inline float term_v(const Term& t, int64_t idx) {
    if (t.vdt == DT_F32) return static_cast<const float*>(t.v)[idx];
    const uint32_t raw = static_cast<const uint16_t*>(t.v)[idx];
    return t.vdt == DT_F16 ? f16_to_f32(raw) : u2f(raw << 16);
}

// The job's terms (Term, merge_cpu.hpp) added to the LoRA delta of rows [r, r + mr), columns [c0, c0 + nb), held at
// out (row stride ldo). Plain loops over the columns, inlined into each ISA's tile function, which the compiler
// vectorizes for that ISA; every operation is a single IEEE fma or multiply, so the bits are the same on every path.
// tp, tq: scratch rows of nb floats.
__attribute__((always_inline)) inline void apply_terms(const Job& jb, int64_t r, int mr, int64_t c0, int64_t nb,
                                                       float* out, int64_t ldo, float* __restrict tp,
                                                       float* __restrict tq) {
    for (int64_t n = 0; n < jb.nterms; ++n) {
        const Term& t = jb.terms[n];
        const float s = t.scale;
        for (int i = 0; i < mr; ++i) {
            const int64_t row = r + i;
            float* __restrict o = out + i * ldo;
            if (t.kind == TERM_HADA) {
                for (int64_t j = 0; j < nb; ++j) tp[j] = 0.0f;
                for (int64_t j = 0; j < nb; ++j) tq[j] = 0.0f;
                for (int64_t k = 0; k < t.ru; ++k) {
                    const float a = t.ua[row * t.ru + k];
                    const float* __restrict b = t.ub + k * jb.cols + c0;
                    for (int64_t j = 0; j < nb; ++j) tp[j] = std::fma(a, b[j], tp[j]);
                }
                for (int64_t k = 0; k < t.rv; ++k) {
                    const float a = t.va[row * t.rv + k];
                    const float* __restrict b = t.vb + k * jb.cols + c0;
                    for (int64_t j = 0; j < nb; ++j) tq[j] = std::fma(a, b[j], tq[j]);
                }
                for (int64_t j = 0; j < nb; ++j) o[j] = std::fma(tp[j] * s, tq[j], o[j]);
            } else {  // TERM_KRON: column j = q * vn + c pairs u[iu][q] with v[iv][c]
                const int64_t iu = row / t.vm, iv = row % t.vm;
                const float* urow = t.u + iu * t.un;
                int64_t j = 0;
                while (j < nb) {
                    const int64_t col = c0 + j, q = col / t.vn, c = col % t.vn;
                    const int64_t len = std::min(nb - j, t.vn - c);
                    const float us = urow[q] * s;
                    float* __restrict oj = o + j;
                    if (t.vdt == DT_F32) {
                        const float* __restrict vr = static_cast<const float*>(t.v) + iv * t.vn + c;
                        for (int64_t e = 0; e < len; ++e) oj[e] = std::fma(us, vr[e], oj[e]);
                    } else {
                        for (int64_t e = 0; e < len; ++e) oj[e] = std::fma(us, term_v(t, iv * t.vn + c + e), oj[e]);
                    }
                    j += len;
                }
            }
        }
    }
}

#if LF_X86
// ---------------------------------------------------------------- vector ISAs
#define LF_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2,bmi,bmi2,popcnt")))
#define LF_T256 __attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt")))

// Float vector ops for the micro-kernel.
struct Avx512 {
    static constexpr int W = 16, MR = 6, NV = 4;
    using F = __m512;
    LF_T512 static inline F loadf(const float* p) { return _mm512_loadu_ps(p); }
    LF_T512 static inline void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
    LF_T512 static inline F zero() { return _mm512_setzero_ps(); }
    LF_T512 static inline F bcast(const float* p) { return _mm512_set1_ps(*p); }
    LF_T512 static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    LF_T512 static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
    LF_T512 static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    LF_T512 static inline F neg(F a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN))); }
    // x + b rounded to odd (as sum_odd_s)
    LF_T512 static inline F sum_odd(F x, F b) {
        const F s = add(x, b), bv = sub(s, x), e = add(sub(x, sub(s, bv)), sub(b, bv));
        const __mmask16 inexact = _mm512_cmp_ps_mask(e, zero(), _CMP_NEQ_OQ);
        const __m512i sb = _mm512_castps_si512(s), one = _mm512_set1_epi32(1);
        const __mmask16 even = _mm512_testn_epi32_mask(sb, one);
        const __m512i adj = _mm512_or_si512(_mm512_srai_epi32(_mm512_xor_si512(sb, _mm512_castps_si512(e)), 31), one);
        const F r = _mm512_castsi512_ps(_mm512_mask_add_epi32(sb, inexact & even, sb, adj));
        return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);  // a NaN x as it is (sum_odd_s)
    }
    // lanes with |v| > 464 (e4m3fn saturation; NaN: no)
    LF_T512 static inline uint32_t above464(F v) {
        const F a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)));
        return _mm512_cmp_ps_mask(a, _mm512_set1_ps(464.0f), _CMP_GT_OQ);
    }
    // Record staging without a branch: the differing lanes' columns are compressed to the scratch row (which has
    // W entries of slack); the original bits were already copied aside. At a few % of records about a third of
    // vectors hold one, so a branch per vector would mispredict constantly.
    LF_T512 static inline int emit(uint32_t differ, int32_t j, int32_t* col) {
        const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(j), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        _mm512_storeu_si512(col, _mm512_maskz_compress_epi32(static_cast<__mmask16>(differ), cols));
        return __builtin_popcount(differ);
    }
};

struct Avx2 {
    static constexpr int W = 8, MR = 6, NV = 2;
    using F = __m256;
    LF_T256 static inline F loadf(const float* p) { return _mm256_loadu_ps(p); }
    LF_T256 static inline void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
    LF_T256 static inline F zero() { return _mm256_setzero_ps(); }
    LF_T256 static inline F bcast(const float* p) { return _mm256_broadcast_ss(p); }
    LF_T256 static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    LF_T256 static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
    LF_T256 static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    LF_T256 static inline F neg(F a) { return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN))); }
    LF_T256 static inline F sum_odd(F x, F b) {
        const F s = add(x, b), bv = sub(s, x), e = add(sub(x, sub(s, bv)), sub(b, bv));
        const __m256i inexact = _mm256_castps_si256(_mm256_cmp_ps(e, zero(), _CMP_NEQ_OQ));
        const __m256i sb = _mm256_castps_si256(s), one = _mm256_set1_epi32(1);
        const __m256i even = _mm256_cmpeq_epi32(_mm256_and_si256(sb, one), _mm256_setzero_si256());
        const __m256i adj = _mm256_or_si256(_mm256_srai_epi32(_mm256_xor_si256(sb, _mm256_castps_si256(e)), 31), one);
        const F r = _mm256_castsi256_ps(_mm256_add_epi32(sb, _mm256_and_si256(_mm256_and_si256(inexact, even), adj)));
        return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // a NaN x as it is (sum_odd_s)
    }
    LF_T256 static inline uint32_t above464(F v) {
        const F a = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
        return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(464.0f), _CMP_GT_OQ)));
    }
    LF_T256 static inline int emit(uint32_t differ, int32_t j, int32_t* col) {
        int c = 0;
        while (differ) {
            col[c++] = j + __builtin_ctz(differ);
            differ &= differ - 1;
        }
        return c;
    }
    LF_T256 static inline uint32_t mask32(__m256i m) { return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(m))); }
};

// Epilogue ops per (ISA, dtype): Raw holds the weight's own bits in a register (bf16 zero-extended to 32-bit
// lanes because its rounding is done with integer ops there). encode() is the plain fp32 -> dtype rounding.
template <class V, int DT> struct Ep;

template <> struct Ep<Avx512, DT_F32> {
    using Raw = __m512i;
    LF_T512 static inline Raw load(const char* p) { return _mm512_loadu_si512(p); }
    LF_T512 static inline void store(char* p, Raw v) { _mm512_storeu_si512(p, v); }
    LF_T512 static inline __m512 decode(Raw v) { return _mm512_castsi512_ps(v); }
    LF_T512 static inline Raw encode(__m512 s) { return _mm512_castps_si512(s); }
    LF_T512 static inline uint32_t differ(Raw a, Raw b) { return _mm512_cmpneq_epi32_mask(a, b); }
    LF_T512 static inline uint32_t nonfinite(Raw h) { return _mm512_fpclass_ps_mask(_mm512_castsi512_ps(h), 0x99); }
};
template <> struct Ep<Avx512, DT_F16> {
    using Raw = __m256i;
    LF_T512 static inline Raw load(const char* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    LF_T512 static inline void store(char* p, Raw v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
    LF_T512 static inline __m512 decode(Raw v) { return _mm512_cvtph_ps(v); }
    LF_T512 static inline Raw encode(__m512 s) { return _mm512_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    LF_T512 static inline uint32_t differ(Raw a, Raw b) { return _mm256_cmpneq_epi16_mask(a, b); }
    LF_T512 static inline uint32_t nonfinite(Raw h) {
        const __m256i e = _mm256_set1_epi16(0x7C00);
        return _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, e), e);
    }
};
template <> struct Ep<Avx512, DT_BF16> {
    using Raw = __m512i;
    LF_T512 static inline Raw load(const char* p) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
    LF_T512 static inline void store(char* p, Raw v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v)); }
    LF_T512 static inline __m512 decode(Raw v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
    LF_T512 static inline Raw encode(__m512 s) {
        __m512i b = _mm512_castps_si512(s);
        __m512i hi = _mm512_srli_epi32(b, 16);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);  // NaN: quiet it; the rounding carry could make it Inf
        return _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
    }
    LF_T512 static inline uint32_t differ(Raw a, Raw b) { return _mm512_cmpneq_epi32_mask(a, b); }
    LF_T512 static inline uint32_t nonfinite(Raw h) {
        const __m512i e = _mm512_set1_epi32(0x7F80);
        return _mm512_cmpeq_epi32_mask(_mm512_and_si512(h, e), e);
    }
};

template <> struct Ep<Avx2, DT_F32> {
    using Raw = __m256i;
    LF_T256 static inline Raw load(const char* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    LF_T256 static inline void store(char* p, Raw v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
    LF_T256 static inline __m256 decode(Raw v) { return _mm256_castsi256_ps(v); }
    LF_T256 static inline Raw encode(__m256 s) { return _mm256_castps_si256(s); }
    LF_T256 static inline uint32_t differ(Raw a, Raw b) { return Avx2::mask32(_mm256_cmpeq_epi32(a, b)) ^ 0xFFu; }
    LF_T256 static inline uint32_t nonfinite(Raw h) {
        const __m256i e = _mm256_set1_epi32(0x7F800000);
        return Avx2::mask32(_mm256_cmpeq_epi32(_mm256_and_si256(h, e), e));
    }
};
template <> struct Ep<Avx2, DT_F16> {
    using Raw = __m128i;
    LF_T256 static inline uint32_t mask16(__m128i m) {  // 8 lanes of 16-bit all-ones/zero -> 8 bits
        return static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(m, _mm_setzero_si128())));
    }
    LF_T256 static inline Raw load(const char* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
    LF_T256 static inline void store(char* p, Raw v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
    LF_T256 static inline __m256 decode(Raw v) { return _mm256_cvtph_ps(v); }
    LF_T256 static inline Raw encode(__m256 s) { return _mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
    LF_T256 static inline uint32_t differ(Raw a, Raw b) { return mask16(_mm_cmpeq_epi16(a, b)) ^ 0xFFu; }
    LF_T256 static inline uint32_t nonfinite(Raw h) {
        const __m128i e = _mm_set1_epi16(0x7C00);
        return mask16(_mm_cmpeq_epi16(_mm_and_si128(h, e), e));
    }
};
template <> struct Ep<Avx2, DT_BF16> {
    using Raw = __m256i;
    LF_T256 static inline Raw load(const char* p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    LF_T256 static inline void store(char* p, Raw v) {  // lanes hold values < 2^16, so unsigned saturation just narrows
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08)));
    }
    LF_T256 static inline __m256 decode(Raw v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
    LF_T256 static inline Raw encode(__m256 s) {
        __m256i b = _mm256_castps_si256(s);
        __m256i hi = _mm256_srli_epi32(b, 16);
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF))), 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q));
        return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    }
    LF_T256 static inline uint32_t differ(Raw a, Raw b) { return Avx2::mask32(_mm256_cmpeq_epi32(a, b)) ^ 0xFFu; }
    LF_T256 static inline uint32_t nonfinite(Raw h) {
        const __m256i e = _mm256_set1_epi32(0x7F80);
        return Avx2::mask32(_mm256_cmpeq_epi32(_mm256_and_si256(h, e), e));
    }
};

// fp8 (e4m3fn, e5m2): one byte per lane, zero-extended to 32-bit lanes; decode and encode as the scalar
// e4m3_to_f32 / f32_to_e4m3 / e5m2_to_f32 / f32_to_e5m2 (torch's cast), lane by lane with integer ops.
template <class V> struct Fp8Ops;
template <> struct Fp8Ops<Avx512> {
    using I = __m512i;
    using F = __m512;
    LF_T512 static inline I load(const char* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    LF_T512 static inline void store(char* p, I v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v)); }
    LF_T512 static inline I set(int32_t v) { return _mm512_set1_epi32(v); }
    LF_T512 static inline I band(I a, I b) { return _mm512_and_si512(a, b); }
    LF_T512 static inline I bor(I a, I b) { return _mm512_or_si512(a, b); }
    LF_T512 static inline I bxor(I a, I b) { return _mm512_xor_si512(a, b); }
    LF_T512 static inline I addi(I a, I b) { return _mm512_add_epi32(a, b); }
    LF_T512 static inline I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
    template <int N> LF_T512 static inline I shl(I a) { return _mm512_slli_epi32(a, N); }
    template <int N> LF_T512 static inline I shr(I a) { return _mm512_srli_epi32(a, N); }
    LF_T512 static inline I sel(I mask, I a, I b) { return _mm512_mask_mov_epi32(b, _mm512_test_epi32_mask(mask, mask), a); }  // mask ? a : b
    LF_T512 static inline I eq(I a, I b) { return _mm512_movm_epi32(_mm512_cmpeq_epi32_mask(a, b)); }
    LF_T512 static inline I ge_u(I a, I b) { return _mm512_movm_epi32(_mm512_cmpge_epu32_mask(a, b)); }
    LF_T512 static inline I gt_u(I a, I b) { return _mm512_movm_epi32(_mm512_cmpgt_epu32_mask(a, b)); }
    LF_T512 static inline F asf(I a) { return _mm512_castsi512_ps(a); }
    LF_T512 static inline I asi(F a) { return _mm512_castps_si512(a); }
    LF_T512 static inline F mulf(F a, F b) { return _mm512_mul_ps(a, b); }
    LF_T512 static inline F addf(F a, F b) { return _mm512_add_ps(a, b); }
    LF_T512 static inline uint32_t differ(I a, I b) { return _mm512_cmpneq_epi32_mask(a, b); }
    LF_T512 static inline uint32_t bits(I m) { return _mm512_movepi32_mask(m); }
    LF_T512 static inline F f16_to_f32(I v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }  // lanes < 2^16
};
template <> struct Fp8Ops<Avx2> {
    using I = __m256i;
    using F = __m256;
    LF_T256 static inline I load(const char* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
    LF_T256 static inline void store(char* p, I v) {  // lanes hold values < 2^8
        const __m128i w = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
    }
    LF_T256 static inline I set(int32_t v) { return _mm256_set1_epi32(v); }
    LF_T256 static inline I band(I a, I b) { return _mm256_and_si256(a, b); }
    LF_T256 static inline I bor(I a, I b) { return _mm256_or_si256(a, b); }
    LF_T256 static inline I bxor(I a, I b) { return _mm256_xor_si256(a, b); }
    LF_T256 static inline I addi(I a, I b) { return _mm256_add_epi32(a, b); }
    LF_T256 static inline I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
    template <int N> LF_T256 static inline I shl(I a) { return _mm256_slli_epi32(a, N); }
    template <int N> LF_T256 static inline I shr(I a) { return _mm256_srli_epi32(a, N); }
    LF_T256 static inline I sel(I mask, I a, I b) { return _mm256_blendv_epi8(b, a, mask); }
    LF_T256 static inline I eq(I a, I b) { return _mm256_cmpeq_epi32(a, b); }
    LF_T256 static inline I ge_u(I a, I b) { return _mm256_cmpeq_epi32(_mm256_max_epu32(a, b), a); }
    LF_T256 static inline I gt_u(I a, I b) { return _mm256_andnot_si256(_mm256_cmpeq_epi32(a, b), ge_u(a, b)); }
    LF_T256 static inline F asf(I a) { return _mm256_castsi256_ps(a); }
    LF_T256 static inline I asi(F a) { return _mm256_castps_si256(a); }
    LF_T256 static inline F mulf(F a, F b) { return _mm256_mul_ps(a, b); }
    LF_T256 static inline F addf(F a, F b) { return _mm256_add_ps(a, b); }
    LF_T256 static inline uint32_t differ(I a, I b) { return Avx2::mask32(_mm256_cmpeq_epi32(a, b)) ^ 0xFFu; }
    LF_T256 static inline uint32_t bits(I m) { return Avx2::mask32(m); }
    LF_T256 static inline F f16_to_f32(I v) {  // lanes < 2^16
        return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08)));
    }
};

// Both ISAs' fp8 epilogue ops, each with its ISA's target attribute (so no vector value crosses a function
// compiled for the baseline ISA).
#define LF_EP_FP8(LF_V, LF_A) \
template <> struct Ep<LF_V, DT_E4M3> {                                                                                                   \
    using O = Fp8Ops<LF_V>;                                                                                                              \
    using Raw = O::I;                                                                                                                    \
    using F = O::F;                                                                                                                      \
    LF_A static inline Raw load(const char* p) { return O::load(p); }                                                                    \
    LF_A static inline void store(char* p, Raw v) { O::store(p, v); }                                                                    \
    LF_A static inline F decode(Raw v) {                                                                                                 \
        const Raw mag = O::band(v, O::set(0x7F)), sign = O::shl<24>(O::band(v, O::set(0x80)));                                           \
        const F f = O::mulf(O::asf(O::shl<20>(mag)), O::asf(O::set(0x7B800000)));  /* * 2^120 */                                         \
        const Raw r = O::sel(O::eq(mag, O::set(0x7F)), O::set(0x7FC00000), O::asi(f));                                                   \
        return O::asf(O::bor(r, sign));                                                                                                  \
    }                                                                                                                                    \
    LF_A static inline Raw encode(F s) {                                                                                                 \
        const Raw b = O::asi(s), sign = O::band(b, O::set(INT32_MIN)), a = O::bxor(b, sign);                                             \
        Raw nrm = O::shr<20>(O::addi(O::addi(a, O::set(static_cast<int32_t>((static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFFu))),        \
                                     O::band(O::shr<20>(a), O::set(1))));                                                                \
        nrm = O::sel(O::eq(nrm, O::set(0x7F)), O::set(0x7E), nrm);                                                                       \
        const Raw den = O::subi(O::asi(O::addf(O::asf(a), O::asf(O::set(141 << 23)))), O::set(141 << 23));                               \
        const Raw big = O::sel(O::gt_u(a, O::set(0x7F800000)), O::set(0x7F), O::set(0x7E));                                              \
        Raw r = O::sel(O::ge_u(a, O::set(1087 << 20)), big, O::sel(O::gt_u(O::set(121 << 23), a), den, nrm));                            \
        return O::bor(r, O::shr<24>(sign));                                                                                              \
    }                                                                                                                                    \
    LF_A static inline uint32_t differ(Raw a, Raw b) { return O::differ(a, b); }                                                         \
    LF_A static inline uint32_t nonfinite(Raw h) { return O::bits(O::eq(O::band(h, O::set(0x7F)), O::set(0x7F))); }                      \
};                                                                                                                                       \
template <> struct Ep<LF_V, DT_E5M2> {                                                                                                   \
    using O = Fp8Ops<LF_V>;                                                                                                              \
    using Raw = O::I;                                                                                                                    \
    using F = O::F;                                                                                                                      \
    LF_A static inline Raw load(const char* p) { return O::load(p); }                                                                    \
    LF_A static inline void store(char* p, Raw v) { O::store(p, v); }                                                                    \
    LF_A static inline F decode(Raw v) { return O::f16_to_f32(O::shl<8>(v)); }                                                           \
    LF_A static inline Raw encode(F s) {                                                                                                 \
        const Raw b = O::asi(s), sign = O::band(b, O::set(INT32_MIN)), a = O::bxor(b, sign);                                             \
        const Raw nrm = O::shr<21>(O::addi(O::addi(a, O::set(static_cast<int32_t>((static_cast<uint32_t>(15 - 127) << 23) + 0xFFFFFu))), \
                                           O::band(O::shr<21>(a), O::set(1))));                                                          \
        const Raw den = O::subi(O::asi(O::addf(O::asf(a), O::asf(O::set(134 << 23)))), O::set(134 << 23));                               \
        const Raw big = O::sel(O::gt_u(a, O::set(0x7F800000)), O::set(0x7F), O::set(0x7C));                                              \
        Raw r = O::sel(O::ge_u(a, O::set(143 << 23)), big, O::sel(O::gt_u(O::set(113 << 23), a), den, nrm));                             \
        return O::bor(r, O::shr<24>(sign));                                                                                              \
    }                                                                                                                                    \
    LF_A static inline uint32_t differ(Raw a, Raw b) { return O::differ(a, b); }                                                         \
    LF_A static inline uint32_t nonfinite(Raw h) { return O::bits(O::eq(O::band(h, O::set(0x7C)), O::set(0x7C))); }                      \
};
LF_EP_FP8(Avx512, LF_T512)
LF_EP_FP8(Avx2, LF_T256)
#undef LF_EP_FP8

// bf16 on AVX-512 CPUs with AVX512_BF16: the weight's own 16-bit lanes, rounded by vcvtneps2bf16. That instruction
// rounds to nearest even and quiets NaN exactly as the integer ops above, except that it flushes denormal inputs to
// zero; vectors holding one take the integer path for those lanes, so the bits are those of every other path.
// LORA_FAST_MERGE_NO_BF16=1 keeps bf16 on the integer path (tests, comparisons).
#define LF_T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c,avx2,bmi,bmi2,popcnt")))
struct Avx512Bf16 : Avx512 {};
template <> struct Ep<Avx512Bf16, DT_BF16> {
    using Raw = __m256i;
    LF_T512BF static inline Raw load(const char* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    LF_T512BF static inline void store(char* p, Raw v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
    LF_T512BF static inline __m512 decode(Raw v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
    LF_T512BF static inline Raw encode(__m512 s) {
        Raw r = reinterpret_cast<Raw>(_mm512_cvtneps_pbh(s));
        const __mmask16 den = _mm512_fpclass_ps_mask(s, 0x20);
        if (__builtin_expect(den != 0, 0))
            r = _mm256_mask_mov_epi16(r, den, _mm512_cvtepi32_epi16(Ep<Avx512, DT_BF16>::encode(s)));
        return r;
    }
    LF_T512BF static inline uint32_t differ(Raw a, Raw b) { return _mm256_cmpneq_epi16_mask(a, b); }
    LF_T512BF static inline uint32_t nonfinite(Raw h) {
        const __m256i e = _mm256_set1_epi16(0x7F80);
        return _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, e), e);
    }
};

// rn_dtype(x ± d): the fp32 sum, rounded once to the weight dtype (as add_round_s; x - d is exactly x + (-d)).
// fp8: the sum rounded to odd first (sum_odd), so the encode is one rounding of the exact sum.
template <class V, int DT, bool SUB>
__attribute__((always_inline)) inline typename Ep<V, DT>::Raw add_round(const typename V::F& x, const typename V::F& d) {
    if constexpr (is_fp8(DT)) return Ep<V, DT>::encode(V::sum_odd(x, SUB ? V::neg(d) : d));
    else return Ep<V, DT>::encode(SUB ? V::sub(x, d) : V::add(x, d));
}

template <class V, int DT, bool REC>
__attribute__((always_inline)) inline int64_t epilogue_row_vec(char* w, const float* drow, int64_t n, const Options& o,
                                                               RowRecs rr, bool& nonfinite, const char* prefetch) {
    using E = Ep<V, DT>;
    using F = typename V::F;
    constexpr int W = V::W;
    const int es = elem_size(DT);
    const bool neg = o.negate, chk = o.check_finite;
    int32_t* rcol = rr.col;
    uint32_t nf = 0;
    int64_t j = 0;
    for (; j + W <= n; j += W) {
        char* p = w + j * es;
        // Pull in the matching part of the row MR rows below, so its memory latency overlaps this group's work
        // (the micro-kernel phase touches no weight memory, and each short row segment defeats the prefetcher).
        if (prefetch && ((j * es) & 63) == 0) _mm_prefetch(prefetch + j * es, _MM_HINT_T0);
        typename E::Raw wr = E::load(p);
        F x = E::decode(wr);
        F d = V::loadf(drow + j);
        typename E::Raw h = neg ? add_round<V, DT, true>(x, d) : add_round<V, DT, false>(x, d);
        E::store(p, h);
        if (chk) {
            nf |= E::nonfinite(h);
            if constexpr (DT == DT_E4M3) nf |= V::above464(V::sum_odd(x, neg ? V::neg(d) : d));
        }
        if constexpr (REC) {
            typename E::Raw r = add_round<V, DT, true>(E::decode(h), d);  // REC implies fuse (d not negated)
            E::store(rr.orig + j * es, wr);
            rcol += V::emit(E::differ(r, wr), static_cast<int32_t>(j), rcol);
        }
    }
    if (nf) nonfinite = true;
    int64_t cnt = rcol - rr.col;
    for (; j < n; ++j)
        cnt += epilogue_elem<DT>(w + j * es, drow[j], static_cast<int32_t>(j), o, {rr.col + cnt, rr.orig}, nonfinite);
    return cnt;
}

// Register-blocked micro-kernel: MR rows x (NV vectors) columns, loop over R with broadcast FMAs.
// ap: packed A [R][MR]; bp: packed B [R][NV*W]; out: row stride ldo.
template <class V>
__attribute__((always_inline)) inline void micro_kernel(const float* ap, const float* bp, int64_t R, float* out, int64_t ldo) {
    constexpr int MR = V::MR, NV = V::NV, W = V::W;
    typename V::F acc[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) acc[i][v] = V::zero();
    for (int64_t k = 0; k < R; ++k) {
        typename V::F b[NV];
        for (int v = 0; v < NV; ++v) b[v] = V::loadf(bp + k * NV * W + v * W);
        for (int i = 0; i < MR; ++i) {
            typename V::F a = V::bcast(ap + k * MR + i);
            for (int v = 0; v < NV; ++v) acc[i][v] = V::fma(a, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v) V::storef(out + i * ldo + v * W, acc[i][v]);
}
#endif  // LF_X86

// Per-thread scratch, reused across tiles.
struct Scratch {
    std::vector<float> bp, ap, dbuf;
    std::vector<float> tp, tq;  // apply_terms' rows
    void term_rows(int64_t nb) {
        if (tp.size() < static_cast<size_t>(nb)) tp.resize(static_cast<size_t>(nb));
        if (tq.size() < static_cast<size_t>(nb)) tq.resize(static_cast<size_t>(nb));
    }
    std::vector<uint32_t> wtmp;  // strided rows are staged here (raw bits, contiguous)
    std::vector<int32_t> rcol;   // one row's records before they get flat indices
    std::vector<uint32_t> rorig;
    std::vector<uint16_t> tcol;  // a tile's records, before they are copied to the arena
    std::vector<char> tval;
    std::vector<int32_t> trow_n;
    TileRecs stage(size_t rows, size_t bound, int es) {
        if (tcol.size() < bound) tcol.resize(bound);
        if (tval.size() < bound * static_cast<size_t>(es)) tval.resize(bound * static_cast<size_t>(es));
        if (trow_n.size() < rows) trow_n.resize(rows);
        return {tcol.data(), tval.data(), trow_n.data(), 0};
    }
    RowRecs row_recs(int64_t nb) {
        rcol.resize(static_cast<size_t>(nb + 64));  // + slack for full-vector compress stores
        rorig.resize(static_cast<size_t>(nb + 64));
        return {rcol.data(), reinterpret_cast<char*>(rorig.data())};
    }
};

struct Tile {
    int32_t job;
    int64_t r0, r1, c0, c1;
};

// Unfuse: scatter the caller's records that fall in this row segment while it is still in cache.
inline void restore_row(const Job& jb, int64_t row, int64_t c0, int64_t c1) {
    if (jb.rest_n <= 0) return;
    const int64_t seg = c0 / kSegCols, key = row * jb.nseg + seg;
    const int64_t lo = jb.rest_offset(key), hi = jb.rest_offset(key + 1);
    if (lo == hi) return;
    const uint32_t lo_c = static_cast<uint32_t>(c0 - seg * kSegCols), hi_c = static_cast<uint32_t>(c1 - seg * kSegCols);
    const uint16_t* end = jb.rest_col + hi;
    const uint16_t* it = jb.rest_col + lo;
    if (lo_c > 0) it = std::lower_bound(it, end, lo_c);  // columns ascend within a segment (checked up front)
    const int es = elem_size(jb.dtype);
    const char* vals = static_cast<const char*>(jb.rest_val);
    char* base = jb.w + (row * jb.sr + seg * kSegCols * jb.sc) * es;
    for (; it != end && *it < hi_c; ++it) {
        const int64_t q = it - jb.rest_col;
        if (es == 4) std::memcpy(base + *it * jb.sc * 4, vals + q * 4, 4);
        else if (es == 1) base[*it * jb.sc] = vals[q];
        else std::memcpy(base + *it * jb.sc * 2, vals + q * 2, 2);
    }
}

// Appends one row's staged records to the tile's list. seg_c0: the row segment's first column inside its segment.
template <int DT>
inline void flush_row(TileRecs* rec, const RowRecs& rr, int64_t cnt, int64_t tile_row, int64_t seg_c0) {
    rec->row_n[tile_row] = static_cast<int32_t>(cnt);
    if (cnt == 0) return;
    constexpr int es = elem_size(DT);
    uint16_t* c = rec->col + rec->n;
    char* v = rec->val + rec->n * es;
    for (int64_t q = 0; q < cnt; ++q) {
        const int32_t j = rr.col[q];
        c[q] = static_cast<uint16_t>(seg_c0 + j);
        std::memcpy(v + q * es, rr.orig + j * es, es);
    }
    rec->n += static_cast<size_t>(cnt);
}

#if LF_X86
// One tile: pack down[:, c0:c1] once, then per group of MR rows compute delta (MR x nb) with the micro-kernel
// into an L1-sized buffer and run the epilogue row by row. Rows run top to bottom and left to right, so a tile's
// records come out sorted by flat index.
template <class V, int DT, bool REC>
__attribute__((always_inline)) inline void run_tile_vec(const Job& jb, const Tile& t, const Options& o, Scratch& s,
                                                        TileRecs* rec, bool& nonfinite) {
    constexpr int MR = V::MR, NR = V::NV * V::W;
    const int64_t R = jb.R, nb = t.c1 - t.c0;
    const int64_t npanel = (nb + NR - 1) / NR, ldo = npanel * NR;
    const int es = elem_size(DT);
    s.bp.resize(static_cast<size_t>(R * ldo));
    s.ap.resize(static_cast<size_t>(R * MR));
    s.dbuf.resize(static_cast<size_t>(MR * ldo));
    const RowRecs rr = s.row_recs(nb);
    // pack down[:, c0:c1] as panels [p][k][NR], zero padded
    for (int64_t p = 0; p < npanel; ++p) {
        const int64_t cj = t.c0 + p * NR, cw = std::min<int64_t>(NR, t.c1 - cj);
        float* dst = s.bp.data() + p * R * NR;
        for (int64_t k = 0; k < R; ++k) {
            const float* src = jb.down + k * jb.cols + cj;
            float* d = dst + k * NR;
            std::memcpy(d, src, static_cast<size_t>(cw) * 4);
            for (int64_t q = cw; q < NR; ++q) d[q] = 0.0f;
        }
    }
    const bool contiguous = jb.sc == 1;
    if (!contiguous) s.wtmp.resize(static_cast<size_t>(nb));
    if (jb.nterms) s.term_rows(nb);
    for (int64_t r = t.r0; r < t.r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, t.r1 - r));
        for (int64_t k = 0; k < R; ++k)
            for (int i = 0; i < MR; ++i) s.ap[k * MR + i] = i < mr ? jb.up[(r + i) * R + k] : 0.0f;
        for (int64_t p = 0; p < npanel; ++p)
            micro_kernel<V>(s.ap.data(), s.bp.data() + p * R * NR, R, s.dbuf.data() + p * NR, ldo);
        if (jb.nterms) apply_terms(jb, r, mr, t.c0, nb, s.dbuf.data(), ldo, s.tp.data(), s.tq.data());
        for (int i = 0; i < mr; ++i) {
            const int64_t row = r + i;
            char* wrow = jb.w + (row * jb.sr + t.c0 * jb.sc) * es;
            const float* drow = s.dbuf.data() + i * ldo;
            int64_t cnt;
            if (contiguous) {
                const char* pf = row + MR < t.r1 ? wrow + MR * jb.sr * es : nullptr;
                cnt = epilogue_row_vec<V, DT, REC>(wrow, drow, nb, o, rr, nonfinite, pf);
            } else {
                char* tmp = reinterpret_cast<char*>(s.wtmp.data());
                for (int64_t j = 0; j < nb; ++j) std::memcpy(tmp + j * es, wrow + j * jb.sc * es, es);
                cnt = epilogue_row_vec<V, DT, REC>(tmp, drow, nb, o, rr, nonfinite, nullptr);
                for (int64_t j = 0; j < nb; ++j) std::memcpy(wrow + j * jb.sc * es, tmp + j * es, es);
            }
            if (REC) flush_row<DT>(rec, rr, cnt, row - t.r0, t.c0 % kSegCols);
            else restore_row(jb, row, t.c0, t.c1);
        }
    }
}

template <int DT, bool REC>
LF_T512 __attribute__((flatten)) void run_tile_avx512(const Job& jb, const Tile& t, const Options& o, Scratch& s, TileRecs* rec, bool& nf) {
    run_tile_vec<Avx512, DT, REC>(jb, t, o, s, rec, nf);
}
template <bool REC>
LF_T512BF __attribute__((flatten)) void run_tile_avx512bf16(const Job& jb, const Tile& t, const Options& o, Scratch& s, TileRecs* rec, bool& nf) {
    run_tile_vec<Avx512Bf16, DT_BF16, REC>(jb, t, o, s, rec, nf);
}
template <int DT, bool REC>
LF_T256 __attribute__((flatten)) void run_tile_avx2(const Job& jb, const Tile& t, const Options& o, Scratch& s, TileRecs* rec, bool& nf) {
    run_tile_vec<Avx2, DT, REC>(jb, t, o, s, rec, nf);
}
#endif

template <int DT>
void run_tile_scalar(const Job& jb, const Tile& t, const Options& o, Scratch& s, TileRecs* rec, bool& nonfinite) {
    constexpr int MR = 4;
    const int64_t nb = t.c1 - t.c0;
    const int es = elem_size(DT);
    s.dbuf.resize(static_cast<size_t>(MR * nb));
    const RowRecs rr = s.row_recs(nb);
    for (int64_t r = t.r0; r < t.r1; r += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, t.r1 - r));
        delta_scalar(jb, r, mr, t.c0, nb, s.dbuf.data(), nb);
        if (jb.nterms) {
            s.term_rows(nb);
            apply_terms(jb, r, mr, t.c0, nb, s.dbuf.data(), nb, s.tp.data(), s.tq.data());
        }
        for (int i = 0; i < mr; ++i) {
            const int64_t row = r + i;
            char* wrow = jb.w + (row * jb.sr + t.c0 * jb.sc) * es;
            int64_t cnt = epilogue_row_scalar<DT>(wrow, jb.sc, s.dbuf.data() + i * nb, nb, o, rr, nonfinite);
            if (o.record) flush_row<DT>(rec, rr, cnt, row - t.r0, t.c0 % kSegCols);
            else restore_row(jb, row, t.c0, t.c1);
        }
    }
}

using TileFn = void (*)(const Job&, const Tile&, const Options&, Scratch&, TileRecs*, bool&);

#if LF_X86
bool has_avx512bf16() {
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512bf16") != 0;
    }();
    return yes;
}
#endif

TileFn pick_tile_fn(int isa, int dt, bool rec) {
#if LF_X86
    if (isa == ISA_AVX512) {
        if (dt == DT_F32) return rec ? run_tile_avx512<DT_F32, true> : run_tile_avx512<DT_F32, false>;
        if (dt == DT_F16) return rec ? run_tile_avx512<DT_F16, true> : run_tile_avx512<DT_F16, false>;
        if (dt == DT_E4M3) return rec ? run_tile_avx512<DT_E4M3, true> : run_tile_avx512<DT_E4M3, false>;
        if (dt == DT_E5M2) return rec ? run_tile_avx512<DT_E5M2, true> : run_tile_avx512<DT_E5M2, false>;
        if (has_avx512bf16() && !std::getenv("LORA_FAST_MERGE_NO_BF16"))
            return rec ? run_tile_avx512bf16<true> : run_tile_avx512bf16<false>;
        return rec ? run_tile_avx512<DT_BF16, true> : run_tile_avx512<DT_BF16, false>;
    }
    if (isa == ISA_AVX2) {
        if (dt == DT_F32) return rec ? run_tile_avx2<DT_F32, true> : run_tile_avx2<DT_F32, false>;
        if (dt == DT_F16) return rec ? run_tile_avx2<DT_F16, true> : run_tile_avx2<DT_F16, false>;
        if (dt == DT_E4M3) return rec ? run_tile_avx2<DT_E4M3, true> : run_tile_avx2<DT_E4M3, false>;
        if (dt == DT_E5M2) return rec ? run_tile_avx2<DT_E5M2, true> : run_tile_avx2<DT_E5M2, false>;
        return rec ? run_tile_avx2<DT_BF16, true> : run_tile_avx2<DT_BF16, false>;
    }
#else
    (void)rec;
#endif
    if (dt == DT_F32) return run_tile_scalar<DT_F32>;
    if (dt == DT_F16) return run_tile_scalar<DT_F16>;
    if (dt == DT_E4M3) return run_tile_scalar<DT_E4M3>;
    if (dt == DT_E5M2) return run_tile_scalar<DT_E5M2>;
    return run_tile_scalar<DT_BF16>;
}

int best_isa() {
#if LF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

const char* isa_name(int isa) {
    return isa == ISA_AVX512 ? "avx512" : isa == ISA_AVX2 ? "avx2" : "scalar";
}

// Pins the floating-point environment for the numerics above, restoring the caller's on exit.
struct FpEnvGuard {
#if LF_X86
    unsigned int saved;
    FpEnvGuard() : saved(_mm_getcsr()) { _mm_setcsr(0x1F80u); }  // all exceptions masked, nearest, no FTZ/DAZ
    ~FpEnvGuard() { _mm_setcsr(saved); }
#endif
};

// Dynamic schedule over [0, n). An exception in any worker (e.g. bad_alloc) stops the others and is rethrown
// on the calling thread after the join, instead of terminating the process.
template <class Fn>
void parallel_for(int64_t n, int nthreads, Fn&& fn) {
    std::atomic<int64_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mu;
    auto worker = [&](int tid) {
        FpEnvGuard env;
        try {
            for (;;) {
                if (failed.load(std::memory_order_relaxed)) break;
                int64_t i = next.fetch_add(1, std::memory_order_relaxed);
                if (i >= n) break;
                fn(tid, i);
            }
        } catch (...) {
            std::lock_guard<std::mutex> lock(error_mu);
            if (!error) error = std::current_exception();
            failed.store(true);
        }
    };
    int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n)));
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(nt - 1));
    for (int t = 1; t < nt; ++t) pool.emplace_back(worker, t);
    worker(0);
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
}

struct TileShape {
    int64_t mb, nb;
};

// Row bands of mb rows and column blocks of nb columns. The packed down block (R x nb floats) stays in L2 and the
// per-row-group delta buffer (MR x nb) in L1.
TileShape tile_shape(int isa, const Job& jb) {
    int64_t nr = isa == ISA_AVX512 ? 64 : isa == ISA_AVX2 ? 16 : 16;
    int64_t rk = jb.R;  // LoHa terms' factor rows are read per tile like down's
    for (int64_t n = 0; n < jb.nterms; ++n) rk += jb.terms[n].ru + jb.terms[n].rv;
    int64_t nb = std::max<int64_t>(nr, (262144 / 4 / std::max<int64_t>(rk, 1)) / nr * nr);  // <= 256 KiB of down
    nb = std::min<int64_t>(nb, 1024);
    if (jb.cols <= nb) nb = jb.cols;
    int64_t mb = 48;
    return {mb, nb};
}

// A job's final records, inside the call's one record buffer (MergeResult::buffer). Segment key
// k = row * nseg + column / kSegCols; the records of key k are [off[k], off[k + 1]): columns inside the segment
// (ascending) and original bits in the weight's own width. off has rows * nseg + 1 entries, int64 when the job has
// 2^31 elements or more (int32 otherwise), and is empty when the job has no record at all.

inline bool needs_off64(const Job& jb) { return jb.rows * jb.cols >= (int64_t(1) << 31); }

// A caller's records must fit their job before anything is written: offsets run from 0 to n without decreasing,
// and inside each segment the columns ascend strictly and stay inside the weight.
bool records_fit(const Job& jb, int64_t noff) {
    const int64_t nkeys = jb.rows * jb.nseg;
    if (noff != nkeys + 1 || jb.rest_offset(0) != 0 || jb.rest_offset(nkeys) != jb.rest_n) return false;
    for (int64_t k = 0; k < nkeys; ++k) {
        const int64_t lo = jb.rest_offset(k), hi = jb.rest_offset(k + 1);
        if (hi < lo || hi > jb.rest_n) return false;
        const int64_t width = std::min(kSegCols, jb.cols - (k % jb.nseg) * kSegCols);
        int64_t prev = -1;
        for (int64_t q = lo; q < hi; ++q) {
            const int64_t c = jb.rest_col[q];
            if (c <= prev || c >= width) return false;
            prev = c;
        }
    }
    return true;
}

// Gather path, second phase of a fuse, per job: the tiles' records are copied into the job's place in the record
// buffer (out's pointers and n are set). Counts per segment key first, then each band's tiles are copied left to right, so
// every segment's columns come out ascending.
void gather_records(const Job& jb, const std::vector<Tile>& tiles, const std::vector<TileRecs>& tile_recs,
                    int64_t t0, int64_t t1, JobRecords& out) {
    const int es = elem_size(jb.dtype);
    const int64_t nkeys = jb.rows * jb.nseg;
    std::vector<int64_t> cur(static_cast<size_t>(nkeys + 1), 0);
    for (int64_t i = t0; i < t1; ++i) {
        const Tile& t = tiles[static_cast<size_t>(i)];
        const TileRecs& tr = tile_recs[static_cast<size_t>(i)];
        const int64_t seg = t.c0 / kSegCols;
        for (int64_t r = t.r0; r < t.r1; ++r) cur[static_cast<size_t>(r * jb.nseg + seg + 1)] += tr.row_n[r - t.r0];
    }
    for (int64_t k = 0; k < nkeys; ++k) cur[static_cast<size_t>(k + 1)] += cur[static_cast<size_t>(k)];
    for (size_t k = 0; k < out.noff; ++k) {
        if (out.off64) static_cast<int64_t*>(out.off)[k] = cur[k];
        else static_cast<int32_t*>(out.off)[k] = static_cast<int32_t>(cur[k]);
    }
    char* val = static_cast<char*>(out.val);
    for (int64_t i = t0; i < t1; ++i) {  // tiles are band-major, column blocks left to right inside a band
        const Tile& t = tiles[static_cast<size_t>(i)];
        const TileRecs& tr = tile_recs[static_cast<size_t>(i)];
        const int64_t seg = t.c0 / kSegCols;
        size_t p = 0;
        for (int64_t r = t.r0; r < t.r1; ++r) {
            const size_t m = static_cast<size_t>(tr.row_n[r - t.r0]);
            if (m == 0) continue;
            int64_t& dst = cur[static_cast<size_t>(r * jb.nseg + seg)];
            std::memcpy(out.col + dst, tr.col + p, m * sizeof(uint16_t));
            std::memcpy(val + dst * es, tr.val + p * es, m * static_cast<size_t>(es));
            dst += static_cast<int64_t>(m);
            p += m;
        }
    }
}

// Lays every job's records out in one buffer (each array 64-byte aligned); jobs without a record get empty arrays.
void layout_records(const std::vector<Job>& jobs, const std::vector<TileRecs>& tile_recs,
                    const std::vector<int64_t>& job_tile0, MergeResult& res) {
    constexpr size_t kAlign = 64;
    auto up = [](size_t x) { return (x + kAlign - 1) / kAlign * kAlign; };
    std::vector<size_t> at(jobs.size() * 3, 0);
    size_t bytes = 0;
    for (size_t j = 0; j < jobs.size(); ++j) {
        const Job& jb = jobs[j];
        JobRecords& jr = res.recs[j];
        jr.n = 0;
        for (int64_t i = job_tile0[j]; i < job_tile0[j + 1]; ++i) jr.n += tile_recs[static_cast<size_t>(i)].n;
        jr.off64 = needs_off64(jb);
        if (jr.n == 0) continue;
        jr.noff = static_cast<size_t>(jb.rows * jb.nseg + 1);
        at[j * 3] = bytes;
        bytes = up(bytes + jr.noff * (jr.off64 ? 8 : 4));
        at[j * 3 + 1] = bytes;
        bytes = up(bytes + jr.n * sizeof(uint16_t));
        at[j * 3 + 2] = bytes;
        bytes = up(bytes + jr.n * static_cast<size_t>(elem_size(jb.dtype)));
    }
    res.buffers.reserve(1);  // so the push_back cannot throw and leak the buffer
    char* base = static_cast<char*>(big_alloc(bytes));
    res.buffers.push_back(base);
    res.used = bytes;
    for (size_t j = 0; j < jobs.size(); ++j) {
        JobRecords& jr = res.recs[j];
        jr.off = base + at[j * 3];  // empty arrays still need a valid address
        jr.col = reinterpret_cast<uint16_t*>(base + at[j * 3 + 1]);
        jr.val = base + at[j * 3 + 2];
    }
}

// Per-thread buffers of the direct record path, reused across jobs.
struct DirectStage {
    std::vector<uint16_t> bcol;  // one band's tiles' records, tile after tile
    std::vector<char> bval;
    std::vector<int32_t> brow_n;
    std::vector<TileRecs> btiles;
    std::vector<uint16_t> jcol;  // the job's records so far, in final order
    std::vector<char> jval;
    std::vector<int64_t> key_n;  // records per segment key, then offsets
    template <class T>
    static T* room(std::vector<T>& v, size_t need) {
        if (v.size() < need) v.resize(std::max(need, v.size() * 2));
        return v.data();
    }
};

// Direct record path: one thread runs all of a job's tiles, band by band, and merges each band's records row by row
// into the job's final order while they are still in cache; at the end of the job they are copied once, exactly
// sized, into the thread's arena, which the result keeps (no second pass over every record in fresh memory).
void run_job_direct(const Job& jb, const Tile* tiles, int64_t ntiles, TileFn fn, const Options& o, Scratch& s,
                    DirectStage& ds, RecArena& arena, JobRecords& out, bool& nonfinite) {
    const size_t es = static_cast<size_t>(elem_size(jb.dtype));
    const int64_t nkeys = jb.rows * jb.nseg;
    ds.key_n.assign(static_cast<size_t>(nkeys + 1), 0);
    size_t jn = 0;
    for (int64_t i = 0; i < ntiles;) {
        int64_t k = i;
        while (k < ntiles && tiles[k].r0 == tiles[i].r0) ++k;  // tiles are band-major, column blocks left to right
        const int64_t r0 = tiles[i].r0, rows = tiles[i].r1 - r0, nbt = k - i;
        const size_t bound = static_cast<size_t>(rows * jb.cols);
        uint16_t* bcol = DirectStage::room(ds.bcol, bound);
        char* bval = DirectStage::room(ds.bval, bound * es);
        int32_t* brow = DirectStage::room(ds.brow_n, static_cast<size_t>(rows * nbt));
        TileRecs* bt = DirectStage::room(ds.btiles, static_cast<size_t>(nbt));
        size_t pos = 0;
        for (int64_t t = 0; t < nbt; ++t) {
            bt[t] = {bcol + pos, bval + pos * es, brow + t * rows, 0};
            bool nf = false;
            fn(jb, tiles[i + t], o, s, &bt[t], nf);
            nonfinite |= nf;
            pos += bt[t].n;
        }
        uint16_t* jcol = DirectStage::room(ds.jcol, jn + pos);
        char* jval = DirectStage::room(ds.jval, (jn + pos) * es);
        for (int64_t t = 0; t < nbt; ++t) bt[t].n = 0;  // reused as each tile's read cursor
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t t = 0; t < nbt; ++t) {
                TileRecs& tr = bt[t];
                const size_t m = static_cast<size_t>(tr.row_n[r]);
                if (m == 0) continue;
                std::memcpy(jcol + jn, tr.col + tr.n, m * sizeof(uint16_t));
                std::memcpy(jval + jn * es, tr.val + tr.n * es, m * es);
                ds.key_n[static_cast<size_t>((r0 + r) * jb.nseg + tiles[i + t].c0 / kSegCols + 1)] += static_cast<int64_t>(m);
                tr.n += m;
                jn += m;
            }
        i = k;
    }
    out.n = jn;
    out.off64 = needs_off64(jb);
    out.noff = jn == 0 ? 0 : static_cast<size_t>(nkeys + 1);
    const size_t off_bytes = out.noff * (out.off64 ? 8 : 4);
    char* p = arena.take(std::max<size_t>(8, off_bytes + 8 + jn * 2 + 8 + jn * es));
    out.off = p;
    out.col = reinterpret_cast<uint16_t*>(p + ((off_bytes + 7) & ~size_t(7)));
    out.val = reinterpret_cast<char*>(out.col) + ((jn * 2 + 7) & ~size_t(7));
    if (jn == 0) return;
    int64_t acc = 0;
    for (size_t q = 0; q < out.noff; ++q) {
        acc += ds.key_n[q];
        if (out.off64) static_cast<int64_t*>(out.off)[q] = acc;
        else static_cast<int32_t*>(out.off)[q] = static_cast<int32_t>(acc);
    }
    std::memcpy(out.col, ds.jcol.data(), jn * 2);
    std::memcpy(out.val, ds.jval.data(), jn * es);
}

// The direct path keeps each job on one thread, so it is used when jobs are small enough to balance the threads
// (largest first): one thread, or no job above a quarter of a thread's share. LORA_FAST_MERGE_RECORDS=direct or
// =gather forces a path (tests).
bool use_direct_records(const std::vector<Job>& jobs, int nthreads) {
    if (const char* e = std::getenv("LORA_FAST_MERGE_RECORDS")) {
        if (std::strcmp(e, "direct") == 0) return true;
        if (std::strcmp(e, "gather") == 0) return false;
    }
    if (nthreads <= 1) return true;
    int64_t total = 0, biggest = 0;
    for (const Job& jb : jobs) {
        total += jb.rows * jb.cols;
        biggest = std::max(biggest, jb.rows * jb.cols);
    }
    return biggest * 4 * nthreads <= total;
}

MergeResult merge_run(const std::vector<Job>& jobs, const Options& o, int nthreads, int isa) {
    if (isa == ISA_AUTO || isa > best_isa()) isa = best_isa();
    std::vector<Tile> tiles;
    std::vector<int64_t> job_tile0(jobs.size() + 1, 0);
    for (size_t j = 0; j < jobs.size(); ++j) {
        const Job& jb = jobs[j];
        job_tile0[j] = static_cast<int64_t>(tiles.size());
        if (jb.rows <= 0 || jb.cols <= 0) continue;
        TileShape ts = tile_shape(isa, jb);
        for (int64_t r = 0; r < jb.rows; r += ts.mb)
            for (int64_t c = 0; c < jb.cols;) {
                const int64_t ce = std::min({jb.cols, c + ts.nb, (c / kSegCols + 1) * kSegCols});
                tiles.push_back({static_cast<int32_t>(j), r, std::min(jb.rows, r + ts.mb), c, ce});
                c = ce;
            }
    }
    job_tile0[jobs.size()] = static_cast<int64_t>(tiles.size());

    if (o.record && use_direct_records(jobs, nthreads)) {
        const int nt = std::max(nthreads, 1);
        std::vector<size_t> order(jobs.size());
        for (size_t j = 0; j < order.size(); ++j) order[j] = j;
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
            return jobs[a].rows * jobs[a].cols > jobs[b].rows * jobs[b].cols;
        });
        std::unique_ptr<RecArena[]> arenas(new RecArena[static_cast<size_t>(nt)]);
        std::vector<Scratch> scratch(static_cast<size_t>(nt));
        std::vector<DirectStage> stages(static_cast<size_t>(nt));
        MergeResult res;
        res.recs.resize(jobs.size());
        res.nonfinite.assign(jobs.size(), 0);
        PhaseTimer timer;
        parallel_for(static_cast<int64_t>(jobs.size()), nt, [&](int tid, int64_t q) {
            const size_t j = order[static_cast<size_t>(q)];
            const Job& jb = jobs[j];
            bool nf = false;
            run_job_direct(jb, tiles.data() + job_tile0[j], job_tile0[j + 1] - job_tile0[j],
                           pick_tile_fn(isa, jb.dtype, true), o, scratch[static_cast<size_t>(tid)],
                           stages[static_cast<size_t>(tid)], arenas[static_cast<size_t>(tid)], res.recs[j], nf);
            res.nonfinite[j] = nf;
        });
        for (int t = 0; t < nt; ++t) arenas[static_cast<size_t>(t)].release_into(res.buffers);
        timer.lap("direct");
        return res;
    }

    std::vector<TileRecs> tile_recs(o.record ? tiles.size() : 0);
    const int nt = std::max(nthreads, 1);
    std::unique_ptr<RecArena[]> arenas(o.record ? new RecArena[static_cast<size_t>(nt)] : nullptr);
    std::vector<uint8_t> tile_nf(tiles.size(), 0);
    std::vector<Scratch> scratch(static_cast<size_t>(std::max(nthreads, 1)));
    std::vector<TileFn> fns(jobs.size());
    for (size_t j = 0; j < jobs.size(); ++j) fns[j] = pick_tile_fn(isa, jobs[j].dtype, o.record);

    PhaseTimer timer;
    parallel_for(static_cast<int64_t>(tiles.size()), nthreads, [&](int tid, int64_t i) {
        const Tile& t = tiles[static_cast<size_t>(i)];
        bool nf = false;
        Scratch& s = scratch[static_cast<size_t>(tid)];
        if (!o.record) {
            fns[t.job](jobs[t.job], t, o, s, nullptr, nf);
            tile_nf[static_cast<size_t>(i)] = nf;
            return;
        }
        const size_t rows = static_cast<size_t>(t.r1 - t.r0);
        const size_t es = static_cast<size_t>(elem_size(jobs[t.job].dtype));
        TileRecs stage = s.stage(rows, rows * static_cast<size_t>(t.c1 - t.c0), static_cast<int>(es));
        fns[t.job](jobs[t.job], t, o, s, &stage, nf);
        tile_nf[static_cast<size_t>(i)] = nf;
        // one exactly sized copy, while the staged records are still in cache: row counts, values, columns
        char* p = arenas[static_cast<size_t>(tid)].take(rows * 4 + stage.n * (es + 2));
        TileRecs& kept = tile_recs[static_cast<size_t>(i)];
        kept.row_n = reinterpret_cast<int32_t*>(p);
        kept.val = p + rows * 4;
        kept.col = reinterpret_cast<uint16_t*>(kept.val + stage.n * es);
        kept.n = stage.n;
        std::memcpy(kept.row_n, stage.row_n, rows * 4);
        std::memcpy(kept.val, stage.val, stage.n * es);
        std::memcpy(kept.col, stage.col, stage.n * 2);
    });

    MergeResult res;
    res.recs.resize(jobs.size());
    res.nonfinite.assign(jobs.size(), 0);
    for (size_t j = 0; j < jobs.size(); ++j)
        for (int64_t i = job_tile0[j]; i < job_tile0[j + 1]; ++i) res.nonfinite[j] |= tile_nf[static_cast<size_t>(i)];
    timer.lap("tiles");
    if (o.record) {
        layout_records(jobs, tile_recs, job_tile0, res);
        parallel_for(static_cast<int64_t>(jobs.size()), nthreads, [&](int, int64_t jj) {
            const size_t j = static_cast<size_t>(jj);
            if (res.recs[j].n > 0) gather_records(jobs[j], tiles, tile_recs, job_tile0[j], job_tile0[j + 1], res.recs[j]);
        });
        release_tail(res.buffers[0], res.used, big_alloc_size(res.used));
        timer.lap("gather");
    }
    return res;
}

}  // namespace

namespace lora_fast::merge {

MergeResult run(const std::vector<Job>& jobs, const std::vector<int64_t>& restore_noff, const Options& o,
                int nthreads, int isa) {
    std::vector<uint8_t> fits(jobs.size(), 1);
    parallel_for(static_cast<int64_t>(jobs.size()), std::max(1, nthreads), [&](int, int64_t j) {
        const Job& jb = jobs[static_cast<size_t>(j)];
        if (jb.rest_n > 0) fits[static_cast<size_t>(j)] = records_fit(jb, restore_noff[static_cast<size_t>(j)]);
    });
    for (size_t j = 0; j < jobs.size(); ++j)
        if (!fits[j])
            throw std::invalid_argument("merge_cpu: the record of job " + std::to_string(j) +
                                        " does not fit its weight (wrong job, or corrupted)");
    return merge_run(jobs, o, std::max(1, nthreads), isa);
}

int default_isa() { return best_isa(); }

const char* default_isa_name() { return isa_name(best_isa()); }

}  // namespace lora_fast::merge
