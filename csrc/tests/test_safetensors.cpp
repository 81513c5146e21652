// Test and fuzz driver for the safetensors core, built and run under ASan/UBSan by scripts/sanitize.sh.
// Plain main(), no dependencies. Usage: test_safetensors [fuzz_iterations] [scratch_dir]
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "check.hpp"
#include "safetensors.hpp"

namespace st = lora_fast::safetensors;

namespace {

using lora_fast_test::g_checks;
using lora_fast_test::g_failures;

using Bytes = std::vector<uint8_t>;

Bytes make_file(const std::string& header, size_t data_size, uint64_t declared_size = UINT64_MAX) {
    const uint64_t n = declared_size == UINT64_MAX ? header.size() : declared_size;
    Bytes out(8);
    for (int i = 0; i < 8; ++i) out[i] = uint8_t(n >> (8 * i));
    out.insert(out.end(), header.begin(), header.end());
    for (size_t i = 0; i < data_size; ++i) out.push_back(uint8_t(i * 7 + 1));
    return out;
}

// Parses from an exactly-sized heap copy so that ASan flags any read past the end.
bool parse_exact(const Bytes& file, std::string* error, st::Header* header = nullptr) {
    std::unique_ptr<uint8_t[]> copy(new uint8_t[file.size() ? file.size() : 1]);
    if (!file.empty()) std::memcpy(copy.get(), file.data(), file.size());
    try {
        st::Header h = st::parse_buffer(copy.get(), file.size());
        if (header) *header = std::move(h);
        return true;
    } catch (const st::FormatError& e) {
        *error = e.what();
        return false;
    }
}

void expect_ok(const std::string& header_json, size_t data_size, const char* label) {
    std::string error;
    if (!parse_exact(make_file(header_json, data_size), &error)) {
        ++g_failures;
        std::fprintf(stderr, "expected OK for %s, got: %s\n", label, error.c_str());
    }
    ++g_checks;
}

void expect_error(const Bytes& file, const std::string& needle, const char* label) {
    std::string error;
    ++g_checks;
    if (parse_exact(file, &error)) {
        ++g_failures;
        std::fprintf(stderr, "expected FormatError for %s, but it parsed\n", label);
    } else if (error.find(needle) == std::string::npos) {
        ++g_failures;
        std::fprintf(stderr, "error for %s lacks \"%s\": %s\n", label, needle.c_str(), error.c_str());
    }
}

void expect_error(const std::string& header_json, size_t data_size, const std::string& needle, const char* label) {
    expect_error(make_file(header_json, data_size), needle, label);
}

// Arrays nested this deep inside an unknown field of an entry (itself at depth 2) are still accepted.
constexpr size_t kMaxOkDepth = st::kMaxJsonDepth - 1;

const std::string kF32x2 = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

void test_valid_headers() {
    expect_ok("{}", 0, "empty header");
    expect_ok("{}      ", 0, "space padding");
    expect_ok(" \n{}\t\r\n ", 0, "whitespace around the object");
    expect_ok(R"({"__metadata__":null})", 0, "null metadata");
    expect_ok(R"({"__metadata__":{"format":"pt","k":"\u00e9\ud83d\ude00\n"}})", 0, "metadata escapes");
    expect_ok(R"({"a":)" + kF32x2 + "}", 8, "one tensor");
    expect_ok(R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}})", 8, "0-d scalar");
    expect_ok(R"({"z":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},"y":{"dtype":"I8","shape":[0],)"
              R"("data_offsets":[0,0]}})",
              0, "zero-size tensors sharing an offset");
    expect_ok(R"({"b":{"dtype":"U8","shape":[3],"data_offsets":[5,8]},"a":{"dtype":"F16","shape":[1],)"
              R"("data_offsets":[0,2]},"c":{"dtype":"BOOL","shape":[3],"data_offsets":[2,5]}})",
              8, "entries out of data order");
    expect_ok(R"({"f":{"dtype":"F4","shape":[2,2],"data_offsets":[0,2]}})", 2, "F4");
    expect_ok(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":[1.5e3,{"x":null}]}})", 4,
              "unknown extra fields are ignored");

    st::Header h;
    std::string error;
    CHECK(parse_exact(make_file(R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"__metadata__":{"k":"v"},)"
                                R"("a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})",
                                4),
                      &error, &h));
    CHECK(h.tensors.size() == 2 && h.tensors[0].name == "a" && h.tensors[1].name == "b");
    CHECK(h.has_metadata && h.metadata.size() == 1 && h.metadata[0].first == "k" && h.metadata[0].second == "v");
    CHECK(h.data_size == 4);
}

void test_malformed() {
    expect_error(Bytes{}, "shorter than the 8-byte", "empty file");
    expect_error(Bytes{1, 0, 0}, "shorter than the 8-byte", "3-byte file");
    expect_error(make_file("{}", 0, 100'000'001), "exceeds the limit", "header size over the limit");
    expect_error(make_file("{}", 0, UINT64_MAX - 3), "exceeds the limit", "header size near 2^64");
    expect_error(make_file("{}", 0, 3), "runs past the end", "header size past EOF");
    expect_error(make_file("", 0), "header ended", "empty header");
    expect_error(make_file("{}\xff", 0), "not valid UTF-8", "invalid UTF-8");
    expect_error(make_file("{\"\xc0\xaf\":1}", 0), "not valid UTF-8", "overlong UTF-8");
    expect_error(make_file("{\"\xed\xa0\x80\":1}", 0), "not valid UTF-8", "UTF-8 encoded surrogate");
    expect_error(make_file("\xef\xbb\xbf{}", 0), "not valid JSON", "BOM");
    expect_error(make_file(std::string("{}\0\0", 4), 0), "not valid JSON", "NUL padding");
    expect_error("[]", 0, "not a JSON object", "array header");
    expect_error("\"x\"", 0, "not a JSON object", "string header");
    expect_error("{} {}", 0, "after the top-level value", "two objects");
    expect_error(R"({"a":)" + kF32x2 + ",}", 8, "expected a string key", "trailing comma");
    expect_error("{/*c*/}", 0, "not valid JSON", "comment");
    expect_error(R"({"a":NaN})", 0, "not valid JSON", "NaN");
    expect_error(R"({"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}})", 8, "leading zero", "leading zero");
    expect_error(R"({'a':1})", 0, "not valid JSON", "single quotes");
    expect_error("{\"a\t\":1}", 0, "control character", "raw tab in string");
    expect_error(R"({"\ud800":1})", 0, "unpaired high surrogate", "lone high surrogate");
    expect_error(R"({"\udc00":1})", 0, "unpaired low surrogate", "lone low surrogate");
    expect_error(R"({"\x":1})", 0, "invalid escape", "bad escape");
    expect_error(R"({"\u12G4":1})", 0, "invalid hex digit", "bad hex");
    expect_error(R"({"a":)" + kF32x2 + R"(,"a":)" + kF32x2 + "}", 8, "duplicate key", "duplicate tensor");
    expect_error(R"({"__metadata__":{"k":"1","k":"2"}})", 0, "duplicate key", "duplicate metadata key");
    expect_error(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8, "duplicate key",
                 "duplicate field");
    expect_error(R"({"__metadata__":{"k":1}})", 0, "not a string", "non-string metadata");
    expect_error(R"({"__metadata__":{"k":{"n":"v"}}})", 0, "not a string", "nested metadata");
    expect_error(R"({"__metadata__":[]})", 0, "not an object of strings", "metadata array");
    expect_error(R"({"":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})", 0, "empty tensor name", "empty name");
    expect_error(R"({"a\u0000b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})", 0, "NUL", "NUL in name");
    expect_error(R"({"a":[]})", 0, "not an object", "entry not an object");
    expect_error(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8, "missing \"dtype\"", "missing dtype");
    expect_error(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8, "missing \"shape\"", "missing shape");
    expect_error(R"({"a":{"dtype":"F32","shape":[2]}})", 8, "missing \"data_offsets\"", "missing offsets");
    expect_error(R"({"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", 8, "not a string", "dtype type");
    expect_error(R"({"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", 8, "unknown dtype", "lowercase");
    expect_error(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, "not an array", "shape type");
    expect_error(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "negative", "negative dim");
    expect_error(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8, "not an integer", "float dim");
    expect_error(R"({"a":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}})", 8, "not an integer", "exp dim");
    expect_error(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8, "not an integer", "str dim");
    expect_error(R"({"a":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8]}})", 8, "too large",
                 "dim over int64");
    expect_error(R"({"a":{"dtype":"F32","shape":[99999999999999999999999],"data_offsets":[0,8]}})", 8,
                 "too large", "dim over uint64");
    expect_error(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, "overflows",
                 "numel overflow");
    expect_error(R"({"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0,
                 "overflows", "numel overflow hidden by a zero");
    expect_error(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", 8, "overflows",
                 "bits overflow");
    expect_error(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2, "whole number of bytes",
                 "odd F4");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}})", 8, "not 2", "3 offsets");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, "end before", "end < begin");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}})", 12, "span 12 bytes", "size mismatch");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12, "must start at offset 0",
                 "gap at the start");
    expect_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],)"
                 R"("data_offsets":[8,12]}})",
                 12, "unused bytes before tensor \"b\"", "gap in the middle");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],)"
                 R"("data_offsets":[4,8]}})",
                 8, "overlaps", "overlap");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],)"
                 R"("data_offsets":[0,8]}})",
                 8, "overlaps", "aliasing");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0],)"
                 R"("data_offsets":[4,4]}})",
                 8, "overlaps", "empty tensor inside another");
    expect_error(R"({"a":)" + kF32x2 + "}", 4, "past the end", "truncated data");
    expect_error(R"({"a":)" + kF32x2 + "}", 9, "1 trailing bytes", "trailing bytes");
    expect_error("{}", 3, "trailing bytes after the header", "data without tensors");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})", 8, "must start at offset 0",
                 "offsets past the data");
    expect_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,18446744073709551615]}})",
                 0, "span 0 bytes", "offsets at 2^64-1");

    // Deep nesting must fail cleanly, not exhaust the stack.
    const std::string entry_start = R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":)";
    expect_error(entry_start + std::string(100000, '[') + std::string(100000, ']') + "}}", 0, "nesting deeper",
                 "deep arrays");
    expect_ok(entry_start + std::string(kMaxOkDepth, '[') + std::string(kMaxOkDepth, ']') + "}}", 0,
              "nesting up to the limit");
    std::string deep_objects = "{";
    for (int i = 0; i < 5000; ++i) deep_objects += "\"k\":{";
    expect_error(deep_objects, 0, "nesting deeper", "deep objects");
}

// ----------------------------------------------------------------------------------------------- writer

std::vector<st::TensorToWrite> sample_tensors(std::vector<std::vector<uint8_t>>& storage) {
    std::vector<st::TensorToWrite> ts;
    auto add = [&](const std::string& name, st::Dtype dtype, std::vector<uint64_t> shape) {
        uint64_t numel = 1;
        for (auto d : shape) numel *= d;
        const uint64_t nbytes = numel * st::dtype_bits(dtype) / 8;
        storage.emplace_back(nbytes);
        for (uint64_t i = 0; i < nbytes; ++i) storage.back()[i] = uint8_t(i * 31 + name.size());
        ts.push_back({name, dtype, std::move(shape), storage.back().data(), nbytes});
    };
    add("w.f16", st::Dtype::F16, {3, 5});
    add("a.f32", st::Dtype::F32, {2, 2});
    add("scalar", st::Dtype::F64, {});
    add("empty", st::Dtype::I8, {0, 4});
    add("bytes", st::Dtype::U8, {7});
    add("q\"uote\n", st::Dtype::BF16, {1});
    return ts;
}

void test_build_and_reparse() {
    std::vector<std::vector<uint8_t>> storage;
    auto ts = sample_tensors(storage);
    st::Metadata md = {{"format", "pt"}, {"ctl", std::string("\x01\x7f", 2)}};
    const std::string json = st::build_header(ts, &md);
    CHECK(json.size() % 8 == 0);
    CHECK(json.rfind("{\"__metadata__\":{\"format\":\"pt\",\"ctl\":\"\\u0001\x7f\"}", 0) == 0);
    // Data order: dtype descending, then name.
    CHECK(ts[0].name == "scalar" && ts[1].name == "a.f32" && ts[2].name == "q\"uote\n" && ts[3].name == "w.f16" &&
          ts[4].name == "empty" && ts[5].name == "bytes");

    Bytes file = make_file(json, 0);
    for (const auto& t : ts) file.insert(file.end(), static_cast<const uint8_t*>(t.data),
                                         static_cast<const uint8_t*>(t.data) + t.nbytes);
    std::string error;
    st::Header h;
    CHECK(parse_exact(file, &error, &h));
    CHECK(h.tensors.size() == ts.size());
    for (size_t i = 0; i < ts.size() && i < h.tensors.size(); ++i) {
        CHECK(h.tensors[i].name == ts[i].name);
        CHECK(h.tensors[i].shape == ts[i].shape);
        CHECK(h.tensors[i].nbytes() == ts[i].nbytes);
        CHECK(ts[i].nbytes == 0 ||
              std::memcmp(file.data() + h.data_start() + h.tensors[i].begin, ts[i].data, ts[i].nbytes) == 0);
    }
    CHECK(h.metadata == md);

    std::vector<st::TensorToWrite> bad = {{"x", st::Dtype::F32, {3}, storage[0].data(), 8}};
    bool threw = false;
    try {
        st::build_header(bad, nullptr);
    } catch (const st::FormatError&) {
        threw = true;
    }
    CHECK(threw);
    std::vector<st::TensorToWrite> named_metadata = {{"__metadata__", st::Dtype::U8, {0}, nullptr, 0}};
    threw = false;
    try {
        st::build_header(named_metadata, nullptr);
    } catch (const st::FormatError&) {
        threw = true;
    }
    CHECK(threw);
    std::vector<st::TensorToWrite> none;
    CHECK(st::build_header(none, nullptr) == "{}      ");
}

Bytes read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return Bytes(std::istreambuf_iterator<char>(in), {});
}

std::vector<std::string> list_dir(const std::string& dir) {
    std::vector<std::string> names;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* e = readdir(d))
            if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.push_back(e->d_name);
        closedir(d);
    }
    return names;
}

void test_files(const std::string& scratch) {
    const std::string dir = scratch + "/st_files";
    ::mkdir(dir.c_str(), 0700);
    const std::string path = dir + "/model.safetensors";
    std::vector<std::vector<uint8_t>> storage;
    st::Metadata md = {{"format", "pt"}};
    st::save_file(path, sample_tensors(storage), &md);
    const Bytes saved = read_all(path);
    CHECK(list_dir(dir).size() == 1);

    const st::Header from_file = st::read_header_file(path);
    CHECK(from_file.tensors.size() == 6 && from_file.metadata == md);
    {
        st::MappedSafetensors mapped(path);
        CHECK(mapped.file.size() == saved.size());
        CHECK(std::memcmp(mapped.file.data(), saved.data(), saved.size()) == 0);
        mapped.file.data()[saved.size() - 1] ^= 0xFF;  // copy-on-write: the file must not change
    }
    CHECK(read_all(path) == saved);

    // A failed write leaves the existing file and no temporary behind.
    for (uint64_t fail_after : {uint64_t(0), uint64_t(5), uint64_t(100)}) {
        std::vector<std::vector<uint8_t>> other;
        bool threw = false;
        try {
            st::save_file(path, sample_tensors(other), nullptr, fail_after);
        } catch (const st::IoError& e) {
            threw = e.error_number == EIO;
        }
        CHECK(threw);
        CHECK(read_all(path) == saved);
        CHECK(list_dir(dir).size() == 1);
    }
    // Renaming over a directory fails after the data was written: same guarantees.
    const std::string subdir = dir + "/sub";
    ::mkdir(subdir.c_str(), 0700);
    bool threw = false;
    try {
        std::vector<std::vector<uint8_t>> other;
        st::save_file(subdir, sample_tensors(other), nullptr);
    } catch (const st::IoError&) {
        threw = true;
    }
    CHECK(threw);
    CHECK(list_dir(dir).size() == 2);

    // Errors name the file.
    const std::string bad = dir + "/bad.safetensors";
    { std::ofstream(bad, std::ios::binary) << "abc"; }
    for (int mode = 0; mode < 2; ++mode) {
        std::string message;
        try {
            if (mode == 0) st::read_header_file(bad);
            else st::MappedSafetensors m(bad);
        } catch (const st::FormatError& e) {
            message = e.what();
        }
        CHECK(message.rfind(bad + ": ", 0) == 0);
    }
    ::unlink(bad.c_str());
    ::unlink(path.c_str());
    ::rmdir(subdir.c_str());
    ::rmdir(dir.c_str());
}

// The streaming writer: the same bytes as save_file, data in pieces of any size; dropped uncommitted or short of
// data, nothing appears; too much data is refused.
void test_streaming_writer(const std::string& scratch) {
    const std::string dir = scratch + "/st_stream";
    ::mkdir(dir.c_str(), 0700);
    const std::string ref = dir + "/ref.safetensors", path = dir + "/s.safetensors";
    std::vector<std::vector<uint8_t>> storage;
    st::Metadata md = {{"format", "pt"}};
    st::save_file(ref, sample_tensors(storage), &md);
    {
        st::StreamingWriter w(path, sample_tensors(storage), &md);
        for (const auto& t : w.order()) {
            // find the tensor's bytes by name, write them in 3-byte pieces
            for (const auto& src : sample_tensors(storage))
                if (src.name == t.name)
                    for (uint64_t o = 0; o < src.nbytes; o += 3)
                        w.write(static_cast<const uint8_t*>(src.data) + o, std::min<uint64_t>(3, src.nbytes - o));
        }
        w.commit();
    }
    CHECK(read_all(path) == read_all(ref));
    ::unlink(path.c_str());
    {
        st::StreamingWriter w(path, sample_tensors(storage), &md);  // dropped without commit
        CHECK(list_dir(dir).size() == 2);                              // ref + the temporary file
    }
    CHECK(list_dir(dir).size() == 1);
    bool threw = false;
    try {
        st::StreamingWriter w(path, sample_tensors(storage), nullptr);
        w.commit();  // no data written
    } catch (const st::FormatError&) {
        threw = true;
    }
    CHECK(threw && list_dir(dir).size() == 1);
    threw = false;
    try {
        std::vector<st::TensorToWrite> one = {{"x", st::Dtype::U8, {2}, nullptr, 2}};
        st::StreamingWriter w(path, one, nullptr);
        const uint8_t three[3] = {1, 2, 3};
        w.write(three, 3);
    } catch (const st::FormatError&) {
        threw = true;
    }
    CHECK(threw && list_dir(dir).size() == 1);
    ::unlink(ref.c_str());
    ::rmdir(dir.c_str());
}

// ----------------------------------------------------------------------------------------------- fuzzing

struct Rng {
    uint64_t s;
    uint64_t next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    }
    size_t below(size_t n) { return n ? size_t(next() % n) : 0; }
};

// Invariants of any header that parse_buffer accepts.
void check_accepted(const Bytes& file, const st::Header& h) {
    CHECK(8 + h.header_size + h.data_size == file.size());
    uint64_t expected = 0;
    for (const auto& t : h.tensors) {
        CHECK(t.begin == expected && t.end >= t.begin && t.end <= h.data_size);
        CHECK(!t.name.empty() && t.name != "__metadata__");
        expected = t.end;
    }
    CHECK(expected == h.data_size);
}

Bytes mutate(const Bytes& seed, Rng& rng) {
    static const std::vector<std::string> kTokens = {
        "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "0", "-1", "1e5", "1.5", "null", "true",
        "18446744073709551615", "18446744073709551616", "9223372036854775807", "\"__metadata__\"", "\"dtype\"",
        "\"shape\"", "\"data_offsets\"", "\"F32\"", "\"F4\"", "\"BOOL\"", " ", "\n", "\xff", "\xc3\xa9", "\x00"};
    Bytes b = seed;
    const int edits = 1 + int(rng.below(4));
    for (int e = 0; e < edits; ++e) {
        const size_t pos = rng.below(b.size() + 1);
        switch (rng.below(8)) {
            case 0:  // flip bits in one byte
                if (!b.empty()) b[rng.below(b.size())] ^= uint8_t(1u << rng.below(8));
                break;
            case 1:  // random byte
                if (!b.empty()) b[rng.below(b.size())] = uint8_t(rng.next());
                break;
            case 2: {  // insert a JSON-ish token
                const std::string& tok = kTokens[rng.below(kTokens.size())];
                b.insert(b.begin() + long(pos), tok.begin(), tok.end());
                break;
            }
            case 3: {  // delete a range
                const size_t len = std::min(b.size() - std::min(pos, b.size()), rng.below(6));
                b.erase(b.begin() + long(pos), b.begin() + long(pos + len));
                break;
            }
            case 4:  // truncate
                b.resize(rng.below(b.size() + 1));
                break;
            case 5: {  // duplicate a range
                if (b.empty()) break;
                const size_t from = rng.below(b.size());
                const size_t len = std::min(b.size() - from, 1 + rng.below(24));
                Bytes piece(b.begin() + long(from), b.begin() + long(from + len));
                b.insert(b.begin() + long(pos), piece.begin(), piece.end());
                break;
            }
            case 6: {  // rewrite the size prefix to stay consistent with the (edited) header, or not
                if (b.size() < 8) break;
                const uint64_t n = rng.below(2) ? b.size() - 8 - rng.below(16) : rng.next();
                for (int i = 0; i < 8; ++i) b[i] = uint8_t(n >> (8 * i));
                break;
            }
            case 7: {  // replace a digit run by another number
                if (b.size() <= 8) break;
                size_t i = 8 + rng.below(b.size() - 8);
                while (i < b.size() && !(b[i] >= '0' && b[i] <= '9')) ++i;
                size_t j = i;
                while (j < b.size() && b[j] >= '0' && b[j] <= '9') ++j;
                const std::string repl = std::to_string(rng.below(3) ? rng.below(64) : rng.next());
                b.erase(b.begin() + long(i), b.begin() + long(j));
                b.insert(b.begin() + long(i), repl.begin(), repl.end());
                break;
            }
        }
    }
    return b;
}

// Mutations that change the header's length keep the prefix in sync (so mutations reach the JSON rules).
Bytes resync_prefix(Bytes b, size_t data_size) {
    if (b.size() < 8 + data_size) return b;
    const uint64_t n = b.size() - 8 - data_size;
    for (int i = 0; i < 8; ++i) b[i] = uint8_t(n >> (8 * i));
    return b;
}

void fuzz(int iterations) {
    std::vector<std::vector<uint8_t>> storage;
    auto ts = sample_tensors(storage);
    st::Metadata md = {{"format", "pt"}, {"k\\", "v\u00e9"}};
    const std::string json = st::build_header(ts, &md);
    uint64_t data_size = 0;
    for (const auto& t : ts) data_size += t.nbytes;
    std::vector<std::pair<Bytes, size_t>> seeds = {
        {make_file(json, data_size), data_size},
        {make_file("{}", 0), 0},
        {make_file(R"({"a":)" + kF32x2 + R"(,"__metadata__":null})", 8), 8},
        {make_file(R"({"s":{"dtype":"F4","shape":[2,2],"data_offsets":[0,2]},"e":{"dtype":"BOOL","shape":[0],)"
                   R"("data_offsets":[2,2]}})",
                   2),
         2},
    };
    Rng rng{0x9E3779B97F4A7C15ull};
    int accepted = 0;
    for (int it = 0; it < iterations; ++it) {
        const auto& [seed, seed_data] = seeds[rng.below(seeds.size())];
        Bytes file = mutate(seed, rng);
        if (rng.below(2)) file = resync_prefix(std::move(file), seed_data);
        std::string error;
        st::Header h;
        try {
            if (parse_exact(file, &error, &h)) {
                ++accepted;
                check_accepted(file, h);
            }
        } catch (const std::exception& e) {  // anything but FormatError is a bug
            ++g_failures;
            std::fprintf(stderr, "fuzz iteration %d: unexpected exception %s\n", it, e.what());
        }
    }
    // Every truncation of a valid file is rejected.
    const Bytes full = seeds[0].first;
    for (size_t len = 0; len < full.size(); ++len) {
        std::string error;
        CHECK(!parse_exact(Bytes(full.begin(), full.begin() + long(len)), &error));
    }
    std::printf("fuzz: %d mutations, %d accepted, %zu truncations rejected\n", iterations, accepted, full.size());
}

}  // namespace

int main(int argc, char** argv) {
    const int iterations = argc > 1 ? std::atoi(argv[1]) : 20000;
    const std::string scratch = argc > 2 ? argv[2] : "/tmp";
    test_valid_headers();
    test_malformed();
    test_build_and_reparse();
    test_files(scratch);
    test_streaming_writer(scratch);
    fuzz(iterations);
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
