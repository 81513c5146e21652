// Strict safetensors reader/writer (see safetensors.hpp and docs/safetensors.md). No Python, no torch.
#include "safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <random>
#include <unordered_set>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lora_fast's safetensors I/O maps tensor data in place and needs a little-endian host"
#endif

namespace lora_fast::safetensors {

// ---------------------------------------------------------------------------------------------- dtypes

namespace {
struct DtypeEntry {
    const char* name;
    unsigned bits;
};
// Indexed by Dtype.
constexpr DtypeEntry kDtypes[kDtypeCount] = {
    {"BOOL", 8},         {"F4", 4},           {"F6_E2M3", 6},      {"F6_E3M2", 6}, {"U8", 8},
    {"I8", 8},           {"F8_E5M2", 8},      {"F8_E4M3", 8},      {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
    {"F8_E5M2FNUZ", 8},  {"I16", 16},         {"U16", 16},         {"F16", 16},    {"BF16", 16},
    {"I32", 32},         {"U32", 32},         {"F32", 32},         {"C64", 64},    {"F64", 64},
    {"I64", 64},         {"U64", 64},
};
}  // namespace

const char* dtype_name(Dtype dtype) { return kDtypes[int(dtype)].name; }
unsigned dtype_bits(Dtype dtype) { return kDtypes[int(dtype)].bits; }

std::optional<Dtype> parse_dtype(std::string_view name) {
    for (int i = 0; i < kDtypeCount; ++i)
        if (name == kDtypes[i].name) return Dtype(i);
    return std::nullopt;
}

// ---------------------------------------------------------------------------------------------- helpers

namespace {

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool checked_add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

std::string num(uint64_t v) { return std::to_string(v); }

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(std::string_view s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const size_t n = s.size();
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        size_t len;
        unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;  // U+D800..U+DFFF are surrogates
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return false;
        }
        if (n - i < len) return false;
        if (p[i + 1] < lo || p[i + 1] > hi) return false;
        for (size_t k = 2; k < len; ++k)
            if (p[i + k] < 0x80 || p[i + k] > 0xBF) return false;
        i += len;
    }
    return true;
}

void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
        out += char(cp);
    } else if (cp < 0x800) {
        out += char(0xC0 | (cp >> 6));
        out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18));
        out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F));
        out += char(0x80 | (cp & 0x3F));
    }
}

// JSON string escaping exactly as serde_json (and so the safetensors crate) writes it.
void append_json_string(std::string& out, std::string_view s) {
    static const char kHex[] = "0123456789abcdef";
    out += '"';
    for (char ch : s) {
        const auto c = static_cast<unsigned char>(ch);
        switch (c) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\b': out += "\\b"; break;
            case '\f': out += "\\f"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (c < 0x20) {
                    out += "\\u00";
                    out += kHex[c >> 4];
                    out += kHex[c & 0xF];
                } else {
                    out += ch;
                }
        }
    }
    out += '"';
}

// A name as it appears in error messages: JSON-quoted (so control characters are visible) and shortened.
std::string quote(std::string_view name) {
    constexpr size_t kMax = 200;
    std::string out;
    if (name.size() > kMax) {
        size_t cut = kMax;
        while (cut > 0 && (static_cast<unsigned char>(name[cut]) & 0xC0) == 0x80) --cut;  // keep UTF-8 whole
        append_json_string(out, name.substr(0, cut));
        out.insert(out.size() - 1, "...");
    } else {
        append_json_string(out, name);
    }
    return out;
}

// ---------------------------------------------------------------------------------------------- strict JSON

enum class JsonKind : uint8_t { Null, Bool, Number, String, Array, Object };

const char* kind_name(JsonKind kind) {
    switch (kind) {
        case JsonKind::Null: return "null";
        case JsonKind::Bool: return "a boolean";
        case JsonKind::Number: return "a number";
        case JsonKind::String: return "a string";
        case JsonKind::Array: return "an array";
        case JsonKind::Object: return "an object";
    }
    return "?";
}

// A pull parser for RFC 8259 JSON, nothing more: no comments, trailing commas, NaN/Infinity, single quotes, leading
// zeros or raw control characters. The header reader drives it and skips what it does not need, so memory stays
// proportional to what is kept (an adversarial header cannot expand into a huge tree). Duplicate object keys are
// rejected at every level, in skipped values too. The input must already be valid UTF-8.
class JsonReader {
  public:
    explicit JsonReader(std::string_view text) : s_(text) {}

    [[noreturn]] void fail(const std::string& what) const {
        throw FormatError("header is not valid JSON: " + what + " at byte " + num(pos_) + " of the header");
    }

    // The kind of the next value (after whitespace); fails on a character that cannot start a value.
    JsonKind peek_kind() {
        skip_whitespace();
        if (at_end()) fail("expected a value but the header ended");
        switch (s_[pos_]) {
            case '{': return JsonKind::Object;
            case '[': return JsonKind::Array;
            case '"': return JsonKind::String;
            case 't': case 'f': return JsonKind::Bool;
            case 'n': return JsonKind::Null;
            default:
                if (s_[pos_] == '-' || (s_[pos_] >= '0' && s_[pos_] <= '9')) return JsonKind::Number;
                fail("unexpected character " + quote(s_.substr(pos_, 1)));
        }
    }

    void expect_end() {
        skip_whitespace();
        if (!at_end()) fail("unexpected data after the top-level value");
    }

    std::string read_string() {
        skip_whitespace();
        std::string out;
        scan_string(&out);
        return out;
    }

    // The number's lexeme, validated against the JSON grammar.
    std::string_view read_number() {
        skip_whitespace();
        const size_t start = pos_;
        auto digits = [&] {
            const size_t from = pos_;
            while (!at_end() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
            return pos_ - from;
        };
        if (peek() == '-') ++pos_;
        if (peek() == '0') {
            ++pos_;
            if (peek() >= '0' && peek() <= '9') fail("leading zero in a number");
        } else if (digits() == 0) {
            fail("invalid number");
        }
        if (peek() == '.') {
            ++pos_;
            if (digits() == 0) fail("invalid number");
        }
        if (peek() == 'e' || peek() == 'E') {
            ++pos_;
            if (peek() == '+' || peek() == '-') ++pos_;
            if (digits() == 0) fail("invalid number");
        }
        return s_.substr(start, pos_ - start);
    }

    void read_literal() {
        skip_whitespace();
        for (std::string_view word : {"true", "false", "null"}) {
            if (s_.substr(pos_, word.size()) == word) {
                pos_ += word.size();
                return;
            }
        }
        fail("invalid literal");
    }

    // Validates and discards one value.
    void skip_value(int depth) {
        switch (peek_kind()) {
            case JsonKind::Object: {
                std::string key;
                for (Members members(*this, depth); members.next(&key);) skip_value(depth + 1);
                break;
            }
            case JsonKind::Array:
                for (Elements elements(*this, depth); elements.next();) skip_value(depth + 1);
                break;
            case JsonKind::String: scan_string(nullptr); break;
            case JsonKind::Number: read_number(); break;
            case JsonKind::Bool:
            case JsonKind::Null: read_literal(); break;
        }
    }

    // Iterates an object's members: each next() returning true leaves the reader at the member's value, which the
    // caller must consume. Duplicate keys are detected when the object closes.
    class Members {
      public:
        Members(JsonReader& r, int depth) : r_(r) {
            if (depth > kMaxJsonDepth) r_.fail("nesting deeper than " + num(kMaxJsonDepth));
            r_.skip_whitespace();
            r_.expect('{');
        }
        bool next(std::string* key) {
            r_.skip_whitespace();
            if (first_ && r_.peek() == '}') {
                ++r_.pos_;
                return false;
            }
            if (!first_) {
                if (r_.peek() != ',') {
                    r_.expect('}');
                    check_unique();
                    return false;
                }
                ++r_.pos_;
                r_.skip_whitespace();
            }
            first_ = false;
            if (r_.peek() != '"') r_.fail("expected a string key");
            const size_t start = r_.pos_;
            key->clear();
            const bool escaped = r_.scan_string(key);
            // Keys without escapes are compared as spans of the input; only escaped ones are kept decoded.
            if (escaped) {
                decoded_.push_back(*key);
                keys_.emplace_back(decoded_.back());
            } else {
                keys_.emplace_back(r_.s_.substr(start + 1, r_.pos_ - start - 2));
            }
            r_.skip_whitespace();
            r_.expect(':');
            return true;
        }

      private:
        void check_unique() {
            if (keys_.size() < 2) return;
            std::sort(keys_.begin(), keys_.end());
            for (size_t i = 1; i < keys_.size(); ++i)
                if (keys_[i] == keys_[i - 1]) r_.fail("duplicate key " + quote(keys_[i]));
        }
        JsonReader& r_;
        bool first_ = true;
        std::vector<std::string_view> keys_;
        std::deque<std::string> decoded_;  // stable addresses for the views in keys_
    };

    // Iterates an array's elements: each next() returning true leaves the reader at an element to consume.
    class Elements {
      public:
        Elements(JsonReader& r, int depth) : r_(r) {
            if (depth > kMaxJsonDepth) r_.fail("nesting deeper than " + num(kMaxJsonDepth));
            r_.skip_whitespace();
            r_.expect('[');
        }
        bool next() {
            r_.skip_whitespace();
            if (first_ && r_.peek() == ']') {
                ++r_.pos_;
                return false;
            }
            if (!first_) {
                if (r_.peek() != ',') {
                    r_.expect(']');
                    return false;
                }
                ++r_.pos_;
            }
            first_ = false;
            return true;
        }

      private:
        JsonReader& r_;
        bool first_ = true;
    };

  private:
    bool at_end() const { return pos_ >= s_.size(); }
    char peek() const { return at_end() ? '\0' : s_[pos_]; }

    void skip_whitespace() {
        while (!at_end() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
    }

    void expect(char c) {
        if (at_end()) fail(std::string("expected '") + c + "' but the header ended");
        if (s_[pos_] != c) fail(std::string("expected '") + c + "'");
        ++pos_;
    }

    unsigned hex4() {
        if (s_.size() - pos_ < 4) fail("truncated \\u escape");
        unsigned value = 0;
        for (int i = 0; i < 4; ++i) {
            const char c = s_[pos_++];
            unsigned d;
            if (c >= '0' && c <= '9') d = unsigned(c - '0');
            else if (c >= 'a' && c <= 'f') d = unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') d = unsigned(c - 'A' + 10);
            else fail("invalid hex digit in \\u escape");
            value = value * 16 + d;
        }
        return value;
    }

    // Scans a string at pos_, appending its decoded value to *out when out is not null. Returns whether it had
    // escapes.
    bool scan_string(std::string* out) {
        expect('"');
        bool escaped = false;
        for (;;) {
            if (at_end()) fail("unterminated string");
            const auto c = static_cast<unsigned char>(s_[pos_]);
            if (c == '"') {
                ++pos_;
                return escaped;
            }
            if (c < 0x20) fail("unescaped control character in a string");
            if (c != '\\') {
                // Copy the run of plain characters at once.
                size_t end = pos_ + 1;
                while (end < s_.size() && s_[end] != '"' && s_[end] != '\\' &&
                       static_cast<unsigned char>(s_[end]) >= 0x20)
                    ++end;
                if (out) out->append(s_.data() + pos_, end - pos_);
                pos_ = end;
                continue;
            }
            escaped = true;
            ++pos_;
            if (at_end()) fail("unterminated escape");
            const char e = s_[pos_++];
            char simple = 0;
            switch (e) {
                case '"': simple = '"'; break;
                case '\\': simple = '\\'; break;
                case '/': simple = '/'; break;
                case 'b': simple = '\b'; break;
                case 'f': simple = '\f'; break;
                case 'n': simple = '\n'; break;
                case 'r': simple = '\r'; break;
                case 't': simple = '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate in \\u escape");
                    if (cp >= 0xD800 && cp <= 0xDBFF) {
                        if (s_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate in \\u escape");
                        pos_ += 2;
                        const uint32_t low = hex4();
                        if (low < 0xDC00 || low > 0xDFFF) fail("unpaired high surrogate in \\u escape");
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    }
                    if (out) append_utf8(*out, cp);
                    continue;
                }
                default: --pos_; fail("invalid escape");
            }
            if (out) *out += simple;
        }
    }

    std::string_view s_;
    size_t pos_ = 0;
};

// ---------------------------------------------------------------------------------------------- header rules

// The next value must be a non-negative integer <= limit, written without fraction or exponent.
uint64_t read_uint(JsonReader& r, uint64_t limit, const std::string& what) {
    const JsonKind kind = r.peek_kind();
    if (kind != JsonKind::Number) throw FormatError(what + " is " + kind_name(kind) + ", not an integer");
    const std::string_view t = r.read_number();
    if (t[0] == '-') throw FormatError(what + " is negative (" + std::string(t) + ")");
    if (t.find_first_of(".eE") != std::string_view::npos)
        throw FormatError(what + " is not an integer (" + std::string(t) + ")");
    uint64_t value = 0;
    for (char c : t)
        if (!checked_mul(value, 10, &value) || !checked_add(value, uint64_t(c - '0'), &value) || value > limit)
            throw FormatError(what + " is too large (" + std::string(t.substr(0, 40)) + ", limit " + num(limit) +
                              ")");
    return value;
}

// Checked element count: the product of the non-zero dimensions must fit torch's int64, whatever zeros follow.
uint64_t checked_numel(const std::vector<uint64_t>& shape, const std::string& who) {
    uint64_t numel = 1;
    bool has_zero = false;
    for (uint64_t d : shape) {
        if (d == 0) {
            has_zero = true;
            continue;
        }
        if (!checked_mul(numel, d, &numel) || numel > kMaxDim)
            throw FormatError(who + ": element count of the shape overflows 64 bits");
    }
    return has_zero ? 0 : numel;
}

// Byte size of a tensor, with the dtype's bit width; throws when the bit count is not a whole number of bytes.
uint64_t checked_nbytes(Dtype dtype, const std::vector<uint64_t>& shape, const std::string& who) {
    const uint64_t numel = checked_numel(shape, who);
    uint64_t bits;
    if (!checked_mul(numel, dtype_bits(dtype), &bits)) throw FormatError(who + ": size in bits overflows 64 bits");
    if (bits % 8 != 0)
        throw FormatError(who + ": " + num(numel) + " elements of " + dtype_name(dtype) + " are " + num(bits) +
                          " bits, not a whole number of bytes");
    return bits / 8;
}

// Reads the entry object of tensor `name` (depth 1 of the header).
TensorInfo read_tensor_entry(JsonReader& r, const std::string& name) {
    if (name.empty()) throw FormatError("empty tensor name");
    const std::string who = "tensor " + quote(name);
    if (name.find('\0') != std::string::npos) throw FormatError(who + ": name contains a NUL character");
    const JsonKind kind = r.peek_kind();
    if (kind != JsonKind::Object) throw FormatError(who + ": entry is " + kind_name(kind) + ", not an object");

    TensorInfo t;
    t.name = name;
    bool has_dtype = false, has_shape = false;
    size_t n_offsets = 0;
    bool has_offsets = false;
    uint64_t offsets[2] = {0, 0};
    std::string field;
    for (JsonReader::Members fields(r, 1); fields.next(&field);) {
        if (field == "dtype") {
            has_dtype = true;
            const JsonKind k = r.peek_kind();
            if (k != JsonKind::String) throw FormatError(who + ": \"dtype\" is " + kind_name(k) + ", not a string");
            const std::string dtype = r.read_string();
            const auto parsed = parse_dtype(dtype);
            if (!parsed) throw FormatError(who + ": unknown dtype " + quote(dtype));
            t.dtype = *parsed;
        } else if (field == "shape") {
            has_shape = true;
            const JsonKind k = r.peek_kind();
            if (k != JsonKind::Array) throw FormatError(who + ": \"shape\" is " + kind_name(k) + ", not an array");
            t.shape.clear();
            for (JsonReader::Elements dims(r, 2); dims.next();)
                t.shape.push_back(read_uint(r, kMaxDim, who + ": shape[" + num(t.shape.size()) + "]"));
        } else if (field == "data_offsets") {
            has_offsets = true;
            const JsonKind k = r.peek_kind();
            if (k != JsonKind::Array)
                throw FormatError(who + ": \"data_offsets\" is " + kind_name(k) + ", not an array");
            n_offsets = 0;
            for (JsonReader::Elements values(r, 2); values.next(); ++n_offsets) {
                const uint64_t v = read_uint(r, UINT64_MAX, who + ": data_offsets[" + num(n_offsets) + "]");
                if (n_offsets < 2) offsets[n_offsets] = v;
            }
        } else {
            r.skip_value(2);  // unknown fields are ignored, as by safetensors (but must be valid JSON)
        }
    }
    if (!has_dtype) throw FormatError(who + ": missing \"dtype\"");
    if (!has_shape) throw FormatError(who + ": missing \"shape\"");
    if (!has_offsets) throw FormatError(who + ": missing \"data_offsets\"");
    if (n_offsets != 2) throw FormatError(who + ": \"data_offsets\" has " + num(n_offsets) + " values, not 2");
    t.begin = offsets[0];
    t.end = offsets[1];
    if (t.end < t.begin)
        throw FormatError(who + ": data_offsets [" + num(t.begin) + ", " + num(t.end) + "] end before they begin");

    const uint64_t nbytes = checked_nbytes(t.dtype, t.shape, who);
    if (t.end - t.begin != nbytes)
        throw FormatError(who + ": data_offsets [" + num(t.begin) + ", " + num(t.end) + "] span " +
                          num(t.end - t.begin) + " bytes but dtype " + dtype_name(t.dtype) + " and its shape need " +
                          num(nbytes));
    return t;
}

void read_metadata(JsonReader& r, Header& header) {
    const JsonKind kind = r.peek_kind();
    if (kind == JsonKind::Null) {
        r.read_literal();
        return;
    }
    if (kind != JsonKind::Object)
        throw FormatError(std::string("\"__metadata__\" is ") + kind_name(kind) + ", not an object of strings");
    header.has_metadata = true;
    std::string key;
    for (JsonReader::Members members(r, 1); members.next(&key);) {
        const JsonKind k = r.peek_kind();
        if (k != JsonKind::String)
            throw FormatError("\"__metadata__\" value of " + quote(key) + " is " + kind_name(k) + ", not a string");
        header.metadata.emplace_back(key, r.read_string());
    }
}

// Tensors must tile the data buffer exactly: sorted by (begin, end), starting at 0, each beginning where the
// previous ended, the last ending at the end of the file. Zero-size tensors may share an offset.
void check_layout(Header& header) {
    auto& ts = header.tensors;
    std::stable_sort(ts.begin(), ts.end(), [](const TensorInfo& a, const TensorInfo& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t expected = 0;
    for (size_t i = 0; i < ts.size(); ++i) {
        const TensorInfo& t = ts[i];
        if (t.begin < expected)
            throw FormatError("tensor " + quote(t.name) + " (data_offsets [" + num(t.begin) + ", " + num(t.end) +
                              "]) overlaps tensor " + quote(ts[i - 1].name));
        if (t.begin > expected) {
            if (expected >= header.data_size)
                throw FormatError("tensor " + quote(t.name) + " (data_offsets [" + num(t.begin) + ", " +
                                  num(t.end) + "]) lies past the end of the " + num(header.data_size) +
                                  "-byte data buffer (truncated file?)");
            throw FormatError(num(t.begin - expected) + " unused bytes before tensor " + quote(t.name) +
                              (i == 0 ? std::string(" (the first tensor must start at offset 0)")
                                      : " (after tensor " + quote(ts[i - 1].name) + ")"));
        }
        expected = t.end;
    }
    if (expected > header.data_size)
        throw FormatError("tensor " + quote(ts.back().name) + " ends at data offset " + num(expected) +
                          ", past the end of the " + num(header.data_size) + "-byte data buffer (truncated file?)");
    if (expected < header.data_size)
        throw FormatError(num(header.data_size - expected) + " trailing bytes after " +
                          (ts.empty() ? std::string("the header (no tensors)") : "the last tensor"));
}

}  // namespace

uint64_t parse_header_size(const uint8_t* prefix, uint64_t total_size) {
    if (total_size < 8)
        throw FormatError("file is " + num(total_size) + " bytes, shorter than the 8-byte header size field");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];
    if (n > kMaxHeaderSize)
        throw FormatError("header size " + num(n) + " exceeds the limit of " + num(kMaxHeaderSize) + " bytes");
    if (n > total_size - 8)
        throw FormatError("header size " + num(n) + " runs past the end of the " + num(total_size) + "-byte file");
    return n;
}

Header parse_header(std::string_view header_json, uint64_t total_size) {
    const uint64_t n = header_json.size();
    if (total_size < 8 || n > kMaxHeaderSize || n > total_size - 8)
        throw FormatError("header size " + num(n) + " does not fit a " + num(total_size) + "-byte file");
    if (!valid_utf8(header_json)) throw FormatError("header is not valid UTF-8");

    Header header;
    header.header_size = n;
    header.data_size = total_size - 8 - n;
    JsonReader r(header_json);
    const JsonKind kind = r.peek_kind();
    if (kind != JsonKind::Object)
        throw FormatError(std::string("header is ") + kind_name(kind) + ", not a JSON object");
    std::string key;
    for (JsonReader::Members members(r, 0); members.next(&key);) {
        if (key == "__metadata__")
            read_metadata(r, header);
        else
            header.tensors.push_back(read_tensor_entry(r, key));
    }
    r.expect_end();
    check_layout(header);
    return header;
}


Header parse_buffer(const uint8_t* data, uint64_t size) {
    const uint64_t n = parse_header_size(data, size);
    return parse_header(std::string_view(reinterpret_cast<const char*>(data) + 8, n), size);
}

// ---------------------------------------------------------------------------------------------- files

IoError::IoError(int err, const std::string& path_, const std::string& action_)
    : std::runtime_error(action_ + " " + path_ + ": " + std::strerror(err)),
      error_number(err),
      path(path_),
      action(action_) {}

namespace {

[[noreturn]] void throw_errno(const std::string& path, const std::string& action) {
    const int err = errno;
    throw IoError(err, path, action);
}

}  // namespace

void UniqueFd::reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

int UniqueFd::close_checked() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
}

// Opens a regular file for reading and returns it with its size.
UniqueFd open_regular_file(const std::string& path, uint64_t* size) {
    // O_NONBLOCK: opening a FIFO must not hang; it is then rejected as not a regular file.
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (fd.get() < 0) throw_errno(path, "cannot open");
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) throw_errno(path, "cannot stat");
    if (S_ISDIR(st.st_mode)) throw IoError(EISDIR, path, "cannot open");
    if (!S_ISREG(st.st_mode)) throw FormatError(path + ": not a regular file");
    *size = uint64_t(st.st_size);
    return fd;
}

static void pread_all(int fd, uint8_t* out, uint64_t n, uint64_t offset, const std::string& path) {
    while (n > 0) {
        const ssize_t got = ::pread(fd, out, std::min<uint64_t>(n, 1u << 30), off_t(offset));
        if (got < 0) {
            if (errno == EINTR) continue;
            throw_errno(path, "cannot read");
        }
        // The file shrank under us after fstat.
        if (got == 0) throw FormatError(path + ": file ended early while reading the header (modified while read?)");
        out += got;
        n -= uint64_t(got);
        offset += uint64_t(got);
    }
}

Header read_header_file(const std::string& path) {
    uint64_t size = 0;
    UniqueFd fd = open_regular_file(path, &size);
    return read_header_fd(fd.get(), size, path);
}

Header read_header_fd(int fd, uint64_t size, const std::string& path) {
    try {
        uint8_t prefix[8] = {};
        if (size < 8) parse_header_size(prefix, size);  // throws: too short
        pread_all(fd, prefix, 8, 0, path);
        const uint64_t n = parse_header_size(prefix, size);
        std::string json(n, '\0');  // n is bounded by kMaxHeaderSize and by the file size here
        pread_all(fd, reinterpret_cast<uint8_t*>(json.data()), n, 8, path);
        return parse_header(json, size);
    } catch (const FormatError& e) {
        if (std::string_view(e.what()).substr(0, path.size() + 1) == path + ":") throw;
        throw FormatError(path + ": " + e.what());
    }
}

MappedFile::MappedFile(const std::string& path) {
    uint64_t size = 0;
    UniqueFd fd = open_regular_file(path, &size);
    if (size == 0) return;  // nothing to map; mmap rejects length 0
    if (size > uint64_t(SIZE_MAX)) throw IoError(EFBIG, path, "cannot mmap");
    // PROT_WRITE on a MAP_PRIVATE mapping only ever writes to private copy-on-write pages; the fd stays read-only.
    void* p = ::mmap(nullptr, size_t(size), PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.get(), 0);
    if (p == MAP_FAILED) throw_errno(path, "cannot mmap");
    data_ = static_cast<uint8_t*>(p);
    size_ = size;
}  // the mapping keeps the file alive; the descriptor is no longer needed

MappedFile::~MappedFile() {
    if (data_) ::munmap(data_, size_t(size_));
}

MappedSafetensors::MappedSafetensors(const std::string& path) : file(path) {
    try {
        header = parse_buffer(file.data(), file.size());
    } catch (const FormatError& e) {
        throw FormatError(path + ": " + e.what());
    }
}

// ---------------------------------------------------------------------------------------------- writing

std::string build_header(std::vector<TensorToWrite>& tensors, const Metadata* metadata) {
    std::unordered_set<std::string_view> names;
    names.reserve(tensors.size() * 2);
    for (const auto& t : tensors) {
        const std::string who = "tensor " + quote(t.name);
        if (t.name.empty()) throw FormatError("empty tensor name");
        if (t.name == "__metadata__") throw FormatError("a tensor may not be named \"__metadata__\"");
        if (t.name.find('\0') != std::string::npos) throw FormatError(who + ": name contains a NUL character");
        if (!valid_utf8(t.name)) throw FormatError(who + ": name is not valid UTF-8");
        if (!names.insert(t.name).second) throw FormatError(who + ": name used twice");
        for (uint64_t d : t.shape)
            if (d > kMaxDim) throw FormatError(who + ": dimension " + num(d) + " too large");
        const uint64_t need = checked_nbytes(t.dtype, t.shape, who);
        if (need != t.nbytes)
            throw FormatError(who + ": " + num(t.nbytes) + " bytes of data but dtype " + dtype_name(t.dtype) +
                              " and its shape need " + num(need));
        if (t.nbytes > 0 && t.data == nullptr) throw FormatError(who + ": no data");
    }
    if (metadata) {
        std::unordered_set<std::string_view> keys;
        for (const auto& [k, v] : *metadata) {
            if (!valid_utf8(k) || !valid_utf8(v))
                throw FormatError("metadata entry " + quote(k) + " is not valid UTF-8");
            if (!keys.insert(k).second) throw FormatError("metadata key " + quote(k) + " used twice");
        }
    }

    // The safetensors crate's data order: larger dtypes first (so every tensor ends up naturally aligned), then name.
    std::stable_sort(tensors.begin(), tensors.end(), [](const TensorToWrite& a, const TensorToWrite& b) {
        if (a.dtype != b.dtype) return a.dtype > b.dtype;
        return a.name < b.name;
    });

    std::string json = "{";
    bool first = true;
    if (metadata) {
        json += "\"__metadata__\":{";
        for (size_t i = 0; i < metadata->size(); ++i) {
            if (i) json += ',';
            append_json_string(json, (*metadata)[i].first);
            json += ':';
            append_json_string(json, (*metadata)[i].second);
        }
        json += '}';
        first = false;
    }
    uint64_t offset = 0;
    for (const auto& t : tensors) {
        if (!first) json += ',';
        first = false;
        append_json_string(json, t.name);
        json += ":{\"dtype\":\"";
        json += dtype_name(t.dtype);
        json += "\",\"shape\":[";
        for (size_t i = 0; i < t.shape.size(); ++i) {
            if (i) json += ',';
            json += num(t.shape[i]);
        }
        uint64_t end;
        if (!checked_add(offset, t.nbytes, &end)) throw FormatError("total data size overflows 64 bits");
        json += "],\"data_offsets\":[" + num(offset) + "," + num(end) + "]}";
        offset = end;
    }
    json += '}';
    json.append((8 - json.size() % 8) % 8, ' ');
    if (json.size() > kMaxHeaderSize)
        throw FormatError("header would be " + num(json.size()) + " bytes, over the limit of " +
                          num(kMaxHeaderSize));
    return json;
}

namespace {

// A temporary file next to the target; removed on destruction unless committed by rename.
class TempFile {
  public:
    explicit TempFile(const std::string& target) : target_(target) {
        const size_t slash = target.rfind('/');
        dir_ = slash == std::string::npos ? "." : (slash == 0 ? "/" : target.substr(0, slash));
        const std::string base = slash == std::string::npos ? target : target.substr(slash + 1);
        static std::atomic<uint64_t> counter{0};
        std::random_device rd;
        for (int attempt = 0; attempt < 100; ++attempt) {
            char suffix[64];
            std::snprintf(suffix, sizeof suffix, ".tmp.%d.%llx%08x", int(::getpid()),
                          static_cast<unsigned long long>(counter.fetch_add(1)), unsigned(rd()));
            path_ = dir_ + "/." + base + suffix;
            // 0666 and the process umask: the same permissions a plain open() of a new file gets.
            fd_ = UniqueFd(::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666));
            if (fd_.get() >= 0) return;
            if (errno != EEXIST) throw_errno(target_, "cannot create a temporary file for");
        }
        throw IoError(EEXIST, target_, "cannot create a temporary file for");
    }
    ~TempFile() {
        fd_.reset();
        if (!committed_) ::unlink(path_.c_str());
    }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;

    int fd() const { return fd_.get(); }

    void commit() {
        if (::fsync(fd_.get()) != 0) throw_errno(target_, "cannot fsync");
        if (fd_.close_checked() != 0) throw_errno(target_, "cannot close");
        if (::rename(path_.c_str(), target_.c_str()) != 0) throw_errno(target_, "cannot rename the temporary file to");
        committed_ = true;
        // Makes the rename itself durable. Some file systems cannot fsync a directory (EINVAL); that is not an error.
        UniqueFd dir(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
        if (dir.get() >= 0 && ::fsync(dir.get()) != 0 && errno != EINVAL && errno != ENOTSUP)
            throw_errno(dir_, "cannot fsync directory");
    }

  private:
    std::string target_, dir_, path_;
    UniqueFd fd_;
    bool committed_ = false;
};

// Coalesces small pieces into large write() calls; large pieces go straight from the caller's memory.
class Writer {
  public:
    Writer(int fd, const std::string& path, uint64_t fail_after) : fd_(fd), path_(path), fail_after_(fail_after) {
        buffer_.reserve(kBufferSize);
    }
    void write(const void* data, uint64_t n) {
        const auto* p = static_cast<const uint8_t*>(data);
        if (buffer_.size() + n <= kBufferSize) {
            buffer_.insert(buffer_.end(), p, p + n);
            return;
        }
        flush();
        if (n < kBufferSize)
            buffer_.insert(buffer_.end(), p, p + n);
        else
            write_all(p, n);
    }
    void flush() {
        write_all(buffer_.data(), buffer_.size());
        buffer_.clear();
    }

  private:
    static constexpr uint64_t kBufferSize = 4 << 20;

    void write_all(const uint8_t* p, uint64_t n) {
        while (n > 0) {
            uint64_t chunk = std::min<uint64_t>(n, 1u << 30);
            if (written_ + chunk > fail_after_) {
                chunk = fail_after_ - written_;
                if (chunk == 0) {
                    errno = EIO;
                    throw_errno(path_, "cannot write (injected failure)");
                }
            }
            const ssize_t put = ::write(fd_, p, chunk);
            if (put < 0) {
                if (errno == EINTR) continue;
                throw_errno(path_, "cannot write");
            }
            p += put;
            n -= uint64_t(put);
            written_ += uint64_t(put);
        }
    }

    int fd_;
    const std::string& path_;
    uint64_t fail_after_;
    uint64_t written_ = 0;
    std::vector<uint8_t> buffer_;
};

}  // namespace

void save_file(const std::string& path, std::vector<TensorToWrite> tensors, const Metadata* metadata,
               uint64_t fail_after_bytes) {
    const std::string json = build_header(tensors, metadata);  // validates everything before touching the disk
    TempFile tmp(path);
    Writer out(tmp.fd(), path, fail_after_bytes);
    uint8_t prefix[8];
    uint64_t n = json.size();
    for (int i = 0; i < 8; ++i, n >>= 8) prefix[i] = uint8_t(n & 0xFF);
    out.write(prefix, 8);
    out.write(json.data(), json.size());
    for (const auto& t : tensors)
        if (t.nbytes) out.write(t.data, t.nbytes);
    out.flush();
    tmp.commit();
}

struct StreamingWriter::Impl {
    Impl(const std::string& p, std::vector<TensorToWrite> t) : path(p), tensors(std::move(t)), tmp(path),
                                                                out(tmp.fd(), path, UINT64_MAX) {}
    std::string path;
    std::vector<TensorToWrite> tensors;
    uint64_t expected = 0, written = 0;
    TempFile tmp;
    Writer out;
};

namespace {
// build_header refuses a tensor with bytes and no data; the streaming writer's data comes later.
std::vector<TensorToWrite> with_placeholder_data(std::vector<TensorToWrite> tensors) {
    static const uint8_t kLater = 0;
    for (auto& t : tensors) t.data = &kLater;
    return tensors;
}
}  // namespace

StreamingWriter::StreamingWriter(const std::string& path, std::vector<TensorToWrite> tensors,
                                 const Metadata* metadata) {
    tensors = with_placeholder_data(std::move(tensors));
    const std::string json = build_header(tensors, metadata);  // validates everything before touching the disk
    impl_ = std::make_unique<Impl>(path, std::move(tensors));
    for (const auto& t : impl_->tensors) impl_->expected += t.nbytes;
    uint8_t prefix[8];
    uint64_t n = json.size();
    for (int i = 0; i < 8; ++i, n >>= 8) prefix[i] = uint8_t(n & 0xFF);
    impl_->out.write(prefix, 8);
    impl_->out.write(json.data(), json.size());
}

StreamingWriter::~StreamingWriter() = default;

const std::vector<TensorToWrite>& StreamingWriter::order() const { return impl_->tensors; }

void StreamingWriter::write(const void* data, uint64_t n) {
    if (n > impl_->expected - impl_->written)
        throw FormatError("more data than the header declares (" + num(impl_->expected) + " bytes)");
    impl_->out.write(data, n);
    impl_->written += n;
}

void StreamingWriter::commit() {
    if (impl_->written != impl_->expected)
        throw FormatError("only " + num(impl_->written) + " of " + num(impl_->expected) + " data bytes were written");
    impl_->out.flush();
    impl_->tmp.commit();
}

}  // namespace lora_fast::safetensors
