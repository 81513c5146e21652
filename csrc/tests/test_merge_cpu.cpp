// Test driver for the CPU merge kernel (merge_cpu.cpp), built and run under ASan/UBSan and under TSan by
// scripts/sanitize.sh. Plain main(), no Python. Usage: test_merge_cpu [rounds]
//
// Checks, for fp32/fp16/bf16 weights, row- and column-major strides, one and several column segments, the scalar
// and the best vector ISA, one and four threads:
//  * fuse against a reference written here (fma chain over k from +0, one fp32 add, one rounding to the dtype);
//  * every ISA and thread count gives the same bits;
//  * unfuse with the fuse's records restores every weight bit for bit;
//  * the non-finite flag, and records that do not fit their job are refused before anything is written;
//  * LyCORIS terms (LoHa, LoKr, full diff) after the LoRA chain: reference bits, every ISA, unfuse exact.
//  * fp8 weights (e4m3fn, e5m2; every byte value, NaN included): the exact sum rounded once (a reference on the fp8
//    grid in double, torch's saturation/overflow rules), the flag (NaN/Inf, e4m3fn beyond +-464), every ISA and
//    thread count, unfuse exact.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "merge_cpu.hpp"

namespace lm = lora_fast::merge;

namespace {

using lora_fast_test::g_checks;
using lora_fast_test::g_failures;

uint32_t f2u(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
float u2f(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

float f16_decode(uint16_t h) {
    const int sign = h >> 15, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float v;
    if (exp == 0) v = std::ldexp(float(man), -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp(float(man | 0x400), exp - 25);
    return sign ? -v : v;
}

// Round-to-nearest-even float -> fp16 bits, written independently of the kernel (finite inputs).
uint16_t f16_encode(float f) {
    const uint32_t sign = (f2u(f) >> 16) & 0x8000u;
    const double a = std::fabs(double(f));
    if (a >= 65520.0) return uint16_t(sign | 0x7C00u);  // rounds to infinity
    int e;
    std::frexp(a, &e);  // a = m·2^e, m in [0.5, 1)
    const int q = std::max(e - 11, -24);  // quantum: 2^q (11 significant bits, subnormals at 2^-24)
    const double units = std::nearbyint(std::ldexp(a, -q));  // ties to even (default rounding mode)
    const double r = std::ldexp(units, q);
    if (r == 0) return uint16_t(sign);
    int re;
    std::frexp(r, &re);
    if (re - 1 < -14) return uint16_t(sign | uint32_t(std::ldexp(r, 24)));  // subnormal
    const uint32_t exp = uint32_t(re - 1 + 15), man = uint32_t(std::ldexp(r, 11 - re)) & 0x3FFu;
    return uint16_t(sign | (exp << 10) | man);
}

uint16_t bf16_encode(float f) {
    const uint32_t u = f2u(f);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

int elem_size(int dt) { return dt == lm::DT_F32 ? 4 : lm::is_fp8(dt) ? 1 : 2; }

float load(const std::vector<uint8_t>& w, int dt, int64_t i) {
    if (dt == lm::DT_F32) {
        uint32_t u;
        std::memcpy(&u, &w[size_t(i) * 4], 4);
        return u2f(u);
    }
    uint16_t h;
    std::memcpy(&h, &w[size_t(i) * 2], 2);
    return dt == lm::DT_F16 ? f16_decode(h) : u2f(uint32_t(h) << 16);
}

struct Case {
    int dt;
    int64_t rows, cols, R;
    bool col_major;
    std::vector<uint8_t> w0;  // original weight bytes
    std::vector<float> up, down;
};

Case make_case(std::mt19937& rng, int dt, int64_t rows, int64_t cols, int64_t R, bool col_major, float scale) {
    Case c{dt, rows, cols, R, col_major, {}, {}, {}};
    std::normal_distribution<float> normal(0.f, 1.f);
    c.w0.resize(size_t(rows * cols) * size_t(elem_size(dt)));
    for (int64_t i = 0; i < rows * cols; ++i) {
        const float v = normal(rng);
        if (dt == lm::DT_F32) std::memcpy(&c.w0[size_t(i) * 4], &v, 4);
        else {
            const uint16_t h = dt == lm::DT_F16 ? f16_encode(v) : bf16_encode(v);
            std::memcpy(&c.w0[size_t(i) * 2], &h, 2);
        }
    }
    c.up.resize(size_t(rows * R));
    c.down.resize(size_t(R * cols));
    for (auto& v : c.up) v = normal(rng) * scale;
    for (auto& v : c.down) v = normal(rng) * scale;
    return c;
}

lm::Job job_for(const Case& c, std::vector<uint8_t>& w) {
    lm::Job jb;
    jb.w = reinterpret_cast<char*>(w.data());
    jb.rows = c.rows;
    jb.cols = c.cols;
    jb.sr = c.col_major ? 1 : c.cols;
    jb.sc = c.col_major ? c.rows : 1;
    jb.dtype = c.dt;
    jb.up = c.up.data();
    jb.down = c.down.data();
    jb.R = c.R;
    jb.nseg = std::max<int64_t>(1, (c.cols + lm::kSegCols - 1) / lm::kSegCols);
    return jb;
}

// The reference fused bytes: fma chain from +0 over k, fp32 add, one rounding (NaN stays NaN: compared as "NaN").
void check_reference(const Case& c, const std::vector<uint8_t>& fused) {
    int64_t bad = 0;
    for (int64_t i = 0; i < c.rows; ++i)
        for (int64_t j = 0; j < c.cols; ++j) {
            float acc = 0.f;
            for (int64_t k = 0; k < c.R; ++k) acc = std::fma(c.up[size_t(i * c.R + k)], c.down[size_t(k * c.cols + j)], acc);
            const int64_t idx = c.col_major ? j * c.rows + i : i * c.cols + j;
            const float sum = load(c.w0, c.dt, idx) + acc;
            bool ok;
            if (c.dt == lm::DT_F32) {
                uint32_t got;
                std::memcpy(&got, &fused[size_t(idx) * 4], 4);
                ok = got == f2u(sum);
            } else {
                uint16_t got;
                std::memcpy(&got, &fused[size_t(idx) * 2], 2);
                ok = got == (c.dt == lm::DT_F16 ? f16_encode(sum) : bf16_encode(sum));
            }
            bad += !ok;
        }
    CHECK(bad == 0);
    if (bad) std::fprintf(stderr, "  dtype %d %lldx%lld: %lld elements differ from the reference\n", c.dt,
                          (long long)c.rows, (long long)c.cols, (long long)bad);
}

void test_fuse_unfuse(std::mt19937& rng) {
    const int dts[] = {lm::DT_F32, lm::DT_F16, lm::DT_BF16};
    const int isas[] = {lm::ISA_SCALAR, lm::ISA_AUTO};
    const int threads[] = {1, 4};
    for (int dt : dts) {
        // several jobs of different shapes in one call: small, odd-sized, column-major, more than one segment
        std::vector<Case> cases;
        cases.push_back(make_case(rng, dt, 7, 13, 3, false, 0.3f));
        cases.push_back(make_case(rng, dt, 33, 70, 8, true, 0.2f));
        cases.push_back(make_case(rng, dt, 2, lm::kSegCols + 100, 2, false, 0.5f));
        cases.push_back(make_case(rng, dt, 64, 48, 16, false, 0.1f));
        std::vector<std::vector<uint8_t>> first;
        for (int isa : isas)
            for (int nt : threads) {
                std::vector<std::vector<uint8_t>> w;
                std::vector<lm::Job> jobs;
                for (auto& c : cases) w.push_back(c.w0);
                for (size_t j = 0; j < cases.size(); ++j) jobs.push_back(job_for(cases[j], w[j]));
                lm::Options fuse;
                fuse.record = true;
                fuse.check_finite = true;
                lm::MergeResult res = lm::run(jobs, std::vector<int64_t>(jobs.size(), 0), fuse, nt, isa);
                CHECK(res.recs.size() == jobs.size() && res.nonfinite.size() == jobs.size());
                for (size_t j = 0; j < cases.size(); ++j) {
                    CHECK(!res.nonfinite[j]);
                    if (isa == lm::ISA_SCALAR && nt == 1) check_reference(cases[j], w[j]);
                }
                if (first.empty()) first = w;
                else
                    for (size_t j = 0; j < cases.size(); ++j) CHECK(w[j] == first[j]);  // same bits on every path

                // unfuse with the records: every bit comes back
                std::vector<int64_t> noff(jobs.size());
                for (size_t j = 0; j < jobs.size(); ++j) {
                    const lm::JobRecords& r = res.recs[j];
                    jobs[j].rest_off = r.off;
                    jobs[j].rest_off64 = r.off64;
                    jobs[j].rest_col = r.col;
                    jobs[j].rest_val = r.val;
                    jobs[j].rest_n = int64_t(r.n);
                    noff[j] = int64_t(r.noff);
                }
                lm::Options unfuse;
                unfuse.negate = true;
                lm::MergeResult back = lm::run(jobs, noff, unfuse, nt, isa);
                for (size_t j = 0; j < cases.size(); ++j) CHECK(w[j] == cases[j].w0);
                (void)back;
            }
    }
}

void test_nonfinite_and_bad_records(std::mt19937& rng) {
    Case c = make_case(rng, lm::DT_F16, 5, 9, 2, false, 1.f);
    c.up[0] = 3e4f;
    c.down[0] = 3e4f;  // 9e8: overflows fp16 in element (0, 0)
    std::vector<uint8_t> w = c.w0;
    std::vector<lm::Job> jobs{job_for(c, w)};
    lm::Options o;
    o.record = true;
    o.check_finite = true;
    lm::MergeResult res = lm::run(jobs, {0}, o, 2, lm::ISA_AUTO);
    CHECK(res.nonfinite.size() == 1 && res.nonfinite[0]);

    // records that do not fit the job (a column past the weight) are refused before the weight is touched
    Case small = make_case(rng, lm::DT_BF16, 4, 6, 2, false, 0.5f);
    std::vector<uint8_t> ws = small.w0;
    lm::Job jb = job_for(small, ws);
    std::vector<int32_t> off{0, 1, 1, 1, 1};  // per row: one record in row 0
    std::vector<uint16_t> col{200};            // column 200 of a 6-column weight
    std::vector<uint16_t> val{0x3F80};
    jb.rest_off = off.data();
    jb.rest_col = col.data();
    jb.rest_val = val.data();
    jb.rest_n = 1;
    lm::Options un;
    un.negate = true;
    bool refused = false;
    try {
        lm::run({jb}, {int64_t(off.size())}, un, 2, lm::ISA_AUTO);
    } catch (const std::invalid_argument&) {
        refused = true;
    }
    CHECK(refused);
    CHECK(ws == small.w0);
}

// LyCORIS terms (merge_cpu.hpp, Term): a job with a LoRA part, one LoHa term and one LoKr term (v in fp16), and a
// job with only a full-diff term (bf16 v, R = 0). Fused against a reference written here (the LoRA chain, then per
// term fma(rn32(u * scale), v, acc)), same bits on every ISA and thread count, unfuse exact.
void test_terms(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.f, 1.f);
    auto randv = [&](size_t n, float sc) {
        std::vector<float> v(n);
        for (auto& x : v) x = normal(rng) * sc;
        return v;
    };
    const int dts[] = {lm::DT_F32, lm::DT_F16, lm::DT_BF16};
    for (int dt : dts) {
        Case a = make_case(rng, dt, 35, 77, 3, false, 0.3f);  // LoRA part + LoHa + LoKr (u 5x7, v 7x11)
        Case b = make_case(rng, dt, 9, 130, 1, true, 0.f);    // full diff only (column-major weight)
        std::vector<float> ua = randv(35 * 4, 0.5f), ub = randv(4 * 77, 0.5f), va = randv(35 * 2, 0.5f),
                           vb = randv(2 * 77, 0.5f), ku = randv(5 * 7, 1.f), one{1.0f};
        std::vector<uint16_t> kv(7 * 11), diff(9 * 130);
        for (auto& x : kv) x = f16_encode(normal(rng));
        for (auto& x : diff) x = bf16_encode(normal(rng) * 0.1f);
        lm::Term hada;
        hada.kind = lm::TERM_HADA;
        hada.scale = 0.75f;
        hada.ua = ua.data(), hada.ub = ub.data(), hada.ru = 4, hada.va = va.data(), hada.vb = vb.data(), hada.rv = 2;
        lm::Term kron;
        kron.kind = lm::TERM_KRON;
        kron.scale = 0.3f;
        kron.u = ku.data(), kron.um = 5, kron.un = 7, kron.v = kv.data(), kron.vdt = lm::DT_F16, kron.vm = 7, kron.vn = 11;
        lm::Term full;
        full.kind = lm::TERM_KRON;
        full.scale = 1.5f;
        full.u = one.data(), full.um = 1, full.un = 1, full.v = diff.data(), full.vdt = lm::DT_BF16, full.vm = 9,
        full.vn = 130;
        std::vector<lm::Term> ta{hada, kron}, tb{full};

        // reference fused bytes
        auto ref = [&](const Case& c, const std::vector<lm::Term>& terms) {
            std::vector<uint8_t> out = c.w0;
            for (int64_t i = 0; i < c.rows; ++i)
                for (int64_t j = 0; j < c.cols; ++j) {
                    float acc = 0.f;
                    for (int64_t k = 0; k < c.R; ++k)
                        acc = std::fma(c.up[size_t(i * c.R + k)], c.down[size_t(k * c.cols + j)], acc);
                    for (const lm::Term& t : terms) {
                        float u, v;
                        if (t.kind == lm::TERM_HADA) {
                            u = v = 0.f;
                            for (int64_t k = 0; k < t.ru; ++k) u = std::fma(t.ua[i * t.ru + k], t.ub[k * c.cols + j], u);
                            for (int64_t k = 0; k < t.rv; ++k) v = std::fma(t.va[i * t.rv + k], t.vb[k * c.cols + j], v);
                        } else {
                            u = t.u[(i / t.vm) * t.un + j / t.vn];
                            const uint16_t h = static_cast<const uint16_t*>(t.v)[(i % t.vm) * t.vn + j % t.vn];
                            v = t.vdt == lm::DT_F16 ? f16_decode(h) : u2f(uint32_t(h) << 16);
                        }
                        acc = std::fma(u * t.scale, v, acc);
                    }
                    const int64_t idx = c.col_major ? j * c.rows + i : i * c.cols + j;
                    const float sum = load(c.w0, c.dt, idx) + acc;
                    if (c.dt == lm::DT_F32) std::memcpy(&out[size_t(idx) * 4], &sum, 4);
                    else {
                        const uint16_t h = c.dt == lm::DT_F16 ? f16_encode(sum) : bf16_encode(sum);
                        std::memcpy(&out[size_t(idx) * 2], &h, 2);
                    }
                }
            return out;
        };
        const std::vector<uint8_t> ra = ref(a, ta), rb = ref(b, tb);
        const int isas[] = {lm::ISA_SCALAR, lm::ISA_AVX2, lm::ISA_AUTO};
        for (int isa : isas)
            for (int nt : {1, 3}) {
                std::vector<uint8_t> wa = a.w0, wb = b.w0;
                std::vector<lm::Job> jobs{job_for(a, wa), job_for(b, wb)};
                jobs[0].terms = ta.data(), jobs[0].nterms = 2;
                jobs[1].terms = tb.data(), jobs[1].nterms = 1, jobs[1].R = 0, jobs[1].up = nullptr, jobs[1].down = nullptr;
                lm::Options fuse;
                fuse.record = true;
                fuse.check_finite = true;
                lm::MergeResult res = lm::run(jobs, {0, 0}, fuse, nt, isa);
                CHECK(wa == ra);
                CHECK(wb == rb);
                CHECK(!res.nonfinite[0] && !res.nonfinite[1]);
                std::vector<int64_t> noff(2);
                for (size_t j = 0; j < 2; ++j) {
                    const lm::JobRecords& r = res.recs[j];
                    jobs[j].rest_off = r.off, jobs[j].rest_off64 = r.off64, jobs[j].rest_col = r.col;
                    jobs[j].rest_val = r.val, jobs[j].rest_n = int64_t(r.n), noff[j] = int64_t(r.noff);
                }
                lm::Options unfuse;
                unfuse.negate = true;
                lm::run(jobs, noff, unfuse, nt, isa);
                CHECK(wa == a.w0);
                CHECK(wb == b.w0);
            }
    }
}

// fp8 code -> value (independent of the kernel); NaN for e4m3fn 0x7F|s and e5m2 exponent 31 with a mantissa.
double fp8_value(int dt, int c) {
    const double sign = (c & 0x80) ? -1.0 : 1.0;
    if (dt == lm::DT_E4M3) {
        const int e = (c >> 3) & 15, m = c & 7;
        if ((c & 0x7F) == 0x7F) return NAN;
        return sign * (e == 0 ? std::ldexp(double(m), -9) : std::ldexp(1.0 + m / 8.0, e - 7));
    }
    const int e = (c >> 2) & 31, m = c & 3;
    if (e == 31) return m ? NAN : sign * INFINITY;
    return sign * (e == 0 ? std::ldexp(double(m), -16) : std::ldexp(1.0 + m / 4.0, e - 15));
}

// rn_fp8(x) of a double by search on the grid: nearest, ties to the even code; e4m3fn saturates beyond 464 (torch's
// cast), e5m2 overflows to Inf from 61440; NaN -> 0x7F with x's sign.
int fp8_round(int dt, double x) {
    const int sign = std::signbit(x) ? 0x80 : 0;
    if (std::isnan(x)) return 0x7F | sign;
    const double a = std::fabs(x);
    const int last = dt == lm::DT_E4M3 ? 0x7E : 0x7B;
    if (dt == lm::DT_E4M3 && a > 464.0) return 0x7E | sign;
    if (dt == lm::DT_E5M2 && a >= 61440.0) return 0x7C | sign;
    int best = 0;
    for (int c = 1; c <= last; ++c) {
        const double d = std::fabs(a - fp8_value(dt, c)), db = std::fabs(a - fp8_value(dt, best));
        if (d < db || (d == db && (c & 1) == 0)) best = c;
    }
    return best | sign;
}

void test_fp8(std::mt19937& rng) {
    std::normal_distribution<float> normal(0.f, 1.f);
    const int dts[] = {lm::DT_E4M3, lm::DT_E5M2};
    const int isas[] = {lm::ISA_SCALAR, lm::ISA_AVX2, lm::ISA_AUTO};
    const int threads[] = {1, 4};
    for (int dt : dts) {
        // every byte value twice per row, 37 rows of 512 columns (vector bodies and tails), rank 3; the delta is
        // scaled per row from 1e-3 to 300 so rows see small moves, binade crossings, and (large rows) overflow
        const int64_t rows = 37, cols = 512, R = 3;
        Case c{dt, rows, cols, R, false, {}, {}, {}};
        c.w0.resize(size_t(rows * cols));
        for (int64_t i = 0; i < rows * cols; ++i) c.w0[size_t(i)] = uint8_t((i * 7 + i / cols) & 0xFF);
        c.up.resize(size_t(rows * R));
        c.down.resize(size_t(R * cols));
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t k = 0; k < R; ++k) c.up[size_t(i * R + k)] = normal(rng) * float(std::pow(10.0, -3.0 + 5.5 * i / rows));
        for (auto& v : c.down) v = normal(rng);
        std::vector<uint8_t> ref(c.w0.size());
        std::vector<uint8_t> ref_flag(1, 0);
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < cols; ++j) {
                float acc = 0.f;
                for (int64_t k = 0; k < R; ++k) acc = std::fma(c.up[size_t(i * R + k)], c.down[size_t(k * cols + j)], acc);
                const int w = c.w0[size_t(i * cols + j)];
                const double x = fp8_value(dt, w);
                const double sum = std::isnan(x) ? std::copysign(NAN, (w & 0x80) ? -1.0 : 1.0) : x + double(acc);
                const int h = fp8_round(dt, sum);
                ref[size_t(i * cols + j)] = uint8_t(h);
                const bool nf = dt == lm::DT_E4M3 ? ((h & 0x7F) == 0x7F || std::fabs(sum) > 464.0) : (h & 0x7C) == 0x7C;
                ref_flag[0] |= nf;
            }
        for (int isa : isas)
            for (int nt : threads) {
                std::vector<uint8_t> w = c.w0;
                std::vector<lm::Job> jobs{job_for(c, w)};
                lm::Options fuse;
                fuse.record = true;
                fuse.check_finite = true;
                lm::MergeResult res = lm::run(jobs, {0}, fuse, nt, isa);
                int64_t bad = 0;
                for (size_t q = 0; q < w.size(); ++q) bad += w[q] != ref[q];
                CHECK(bad == 0);
                if (bad) std::fprintf(stderr, "  fp8 dtype %d isa %d: %lld elements differ from the reference\n", dt, isa, (long long)bad);
                CHECK(res.nonfinite[0] == ref_flag[0]);
                const lm::JobRecords& r = res.recs[0];
                jobs[0].rest_off = r.off, jobs[0].rest_off64 = r.off64, jobs[0].rest_col = r.col;
                jobs[0].rest_val = r.val, jobs[0].rest_n = int64_t(r.n);
                lm::Options unfuse;
                unfuse.negate = true;
                lm::run(jobs, {int64_t(r.noff)}, unfuse, nt, isa);
                CHECK(w == c.w0);
            }
        // the flag alone: e4m3fn 448 + 20 saturates (flagged); e5m2 57344 + 8192 overflows to Inf (flagged)
        Case o{dt, 1, 16, 1, false, std::vector<uint8_t>(16, uint8_t(dt == lm::DT_E4M3 ? 0x7E : 0x7B)),
               std::vector<float>{1.f}, std::vector<float>(16, 0.f)};
        o.down[5] = dt == lm::DT_E4M3 ? 20.f : 8192.f;
        for (int isa : isas) {
            std::vector<uint8_t> w = o.w0;
            lm::Options chk;
            chk.check_finite = true;
            lm::MergeResult res = lm::run({job_for(o, w)}, {0}, chk, 1, isa);
            CHECK(res.nonfinite[0]);
            CHECK(w[5] == (dt == lm::DT_E4M3 ? 0x7E : 0x7C));
        }
        // NaN weights of both signs plus a NaN delta of the other sign (row 0): the weight's NaN is kept, so every
        // path gives the same bytes and unfuse is exact
        Case n{dt, 2, 40, 1, false, std::vector<uint8_t>(80), std::vector<float>{std::copysign(NAN, -1.f), 1.f},
               std::vector<float>(40, 1.f)};
        for (int q = 0; q < 80; ++q) n.w0[size_t(q)] = uint8_t(q % 3 == 0 ? 0x7F : q % 3 == 1 ? 0xFF : 0x3C);
        for (int isa : isas) {
            std::vector<uint8_t> w = n.w0;
            std::vector<lm::Job> jobs{job_for(n, w)};
            lm::Options fuse;
            fuse.record = true;
            lm::MergeResult res = lm::run(jobs, {0}, fuse, 1, isa);
            for (int q = 0; q < 40; ++q)
                CHECK(w[size_t(q)] == (q % 3 == 2 ? 0xFF : n.w0[size_t(q)]));  // NaN weights kept; 0x3C + (-NaN)
            const lm::JobRecords& r = res.recs[0];
            jobs[0].rest_off = r.off, jobs[0].rest_off64 = r.off64, jobs[0].rest_col = r.col;
            jobs[0].rest_val = r.val, jobs[0].rest_n = int64_t(r.n);
            lm::Options unfuse;
            unfuse.negate = true;
            lm::run(jobs, {int64_t(r.noff)}, unfuse, 1, isa);
            CHECK(w == n.w0);
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    const int rounds = argc > 1 ? std::atoi(argv[1]) : 2;
    std::mt19937 rng(12345);
    std::printf("merge_cpu: default ISA %s\n", lm::default_isa_name());
    for (int r = 0; r < rounds; ++r) test_fuse_unfuse(rng);
    test_nonfinite_and_bad_records(rng);
    test_terms(rng);
    test_fp8(rng);
    std::printf("merge_cpu: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
