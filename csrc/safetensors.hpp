// Strict safetensors reader/writer: the format, its validation and atomic writing. No Python, no torch.
//
// File layout: [u64 LE header size N][N bytes of UTF-8 JSON header][data buffer]. docs/safetensors.md lists every
// rule parse_header enforces. Every violation throws FormatError; operating-system failures throw IoError.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lora_fast::safetensors {

// Same variants and order as the safetensors crate's Dtype enum: the writer sorts data by this order (descending).
enum class Dtype : uint8_t {
    BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
    I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};
constexpr int kDtypeCount = 22;

const char* dtype_name(Dtype dtype);
unsigned dtype_bits(Dtype dtype);
std::optional<Dtype> parse_dtype(std::string_view name);

// Largest header accepted (and written), as in the safetensors crate; checked before anything is allocated.
constexpr uint64_t kMaxHeaderSize = 100'000'000;
// Largest dimension and element count: torch sizes are int64.
constexpr uint64_t kMaxDim = uint64_t(INT64_MAX);
// JSON nesting deeper than this is rejected (a valid header nests 3 deep); keeps the recursive parser's stack bounded.
constexpr int kMaxJsonDepth = 64;

class FormatError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

class IoError : public std::runtime_error {
  public:
    // what(): "<action> <path>: <strerror>", e.g. "cannot open /x.safetensors: No such file or directory".
    IoError(int err, const std::string& path, const std::string& action);
    int error_number;
    std::string path;
    std::string action;
};

struct TensorInfo {
    std::string name;
    Dtype dtype;
    std::vector<uint64_t> shape;
    uint64_t begin;  // data_offsets, relative to the start of the data buffer; end is exclusive
    uint64_t end;
    uint64_t nbytes() const { return end - begin; }
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

struct Header {
    uint64_t header_size = 0;  // N
    uint64_t data_size = 0;    // bytes after the header
    std::vector<TensorInfo> tensors;  // data order: by (begin, end), ties in header order
    bool has_metadata = false;        // false when "__metadata__" is absent or null
    Metadata metadata;                // header order
    uint64_t data_start() const { return 8 + header_size; }
};

// Rules on the 8-byte prefix: returns N. total_size is the whole file's size.
uint64_t parse_header_size(const uint8_t* prefix, uint64_t total_size);
// Parses and validates the N header bytes of a file of total_size bytes (everything but the data's content).
Header parse_header(std::string_view header_json, uint64_t total_size);
// Both steps over a complete in-memory file.
Header parse_buffer(const uint8_t* data, uint64_t size);

// Reads and validates only the prefix and header of a file (pread; the data is never touched).
// FormatError messages start with the path.
Header read_header_file(const std::string& path);
// The same over an open descriptor of a file of `size` bytes (the size its caller got from fstat).
Header read_header_fd(int fd, uint64_t size, const std::string& path);

// An owned file descriptor, closed on destruction.
class UniqueFd {
  public:
    explicit UniqueFd(int fd = -1) : fd_(fd) {}
    ~UniqueFd() { reset(); }
    UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
    UniqueFd& operator=(UniqueFd&& other) noexcept {
        if (this != &other) {
            reset();
            fd_ = std::exchange(other.fd_, -1);
        }
        return *this;
    }
    int get() const { return fd_; }
    void reset();
    // Closes and reports the error close() may carry (delayed write errors on some file systems).
    int close_checked();

  private:
    int fd_;
};

// Opens a regular file read-only (never blocking, so a FIFO is rejected rather than waited on) and returns it with
// its size. Not a regular file: FormatError; a directory or an open failure: IoError.
UniqueFd open_regular_file(const std::string& path, uint64_t* size);

// A whole file mapped MAP_PRIVATE, readable and writable: writes are copy-on-write and never reach the file.
class MappedFile {
  public:
    explicit MappedFile(const std::string& path);
    ~MappedFile();
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;
    uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }

  private:
    uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
};

// A mapped file whose header has been validated against it.
struct MappedSafetensors {
    explicit MappedSafetensors(const std::string& path);
    MappedFile file;
    Header header;
};

struct TensorToWrite {
    std::string name;
    Dtype dtype;
    std::vector<uint64_t> shape;
    const void* data;  // nbytes bytes, little-endian, row-major
    uint64_t nbytes;
};

// Puts tensors in the writer's data order (dtype descending, then name) and returns the padded header JSON
// exactly as the safetensors crate writes it. Validates names, sizes and metadata (FormatError).
std::string build_header(std::vector<TensorToWrite>& tensors, const Metadata* metadata);

// Writes a safetensors file atomically: a temporary file in the same directory, fsync, rename over path, fsync
// the directory. On any failure the temporary file is removed and an existing file at path is untouched.
// fail_after_bytes is fault injection for tests: the write fails with EIO once that many bytes went out.
void save_file(const std::string& path, std::vector<TensorToWrite> tensors, const Metadata* metadata,
               uint64_t fail_after_bytes = UINT64_MAX);

// save_file for a caller that produces the tensors one at a time and never holds them all (lora-fast merge):
// the same header (build_header; the tensors' data pointers are not used), then write() appends the data in the
// data order order() gives, in pieces of any size; commit() checks that every byte came and renames the file into
// place exactly as save_file does. Destroyed without commit(), the temporary file is removed and path untouched.
class StreamingWriter {
  public:
    StreamingWriter(const std::string& path, std::vector<TensorToWrite> tensors, const Metadata* metadata);
    ~StreamingWriter();
    StreamingWriter(const StreamingWriter&) = delete;
    StreamingWriter& operator=(const StreamingWriter&) = delete;
    const std::vector<TensorToWrite>& order() const;
    void write(const void* data, uint64_t n);
    void commit();

  private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace lora_fast::safetensors
