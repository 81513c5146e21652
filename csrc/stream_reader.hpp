// Streaming reader for safetensors files: reader threads pread the data buffer in chunks into a small ring of
// host buffers ("slots"), and hand the chunks to one consumer in file order. No Python, no torch, no CUDA: the
// consumer (lora_fast/io.py) copies each chunk to its destination (memcpy here for the CPU, an asynchronous copy on
// a CUDA stream for a GPU) and gives the slot back once that copy no longer needs it.
//
// Guarantees: at most `slot count` chunks are ever buffered; the file's size and mtime are compared at open and
// after the last read (a change raises FormatError); a short read (file truncated while read), an I/O error or a
// fault injected by a test raises FormatError naming the file. close() (also run by the destructor) stops and joins
// every thread and frees the slots this reader allocated; the counters below let tests check that nothing leaks.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "safetensors.hpp"

namespace lora_fast::stream {

// Process-wide counts of what live readers hold (for leak tests).
struct Counters {
    int64_t readers;     // StreamReader objects not yet closed
    int64_t threads;     // reader threads running
    int64_t slots;       // ring slots registered by readers not yet closed (owned or external)
    int64_t slot_bytes;  // their bytes
    int64_t owned_slot_bytes;  // bytes of the slots readers allocated themselves (external ones excluded)
};
Counters counters();

// Test-only fault injection. `chunk` is the index of the chunk before whose read the fault fires; a chunk equal to
// the chunk count fires just before the final size/mtime check.
enum class FaultKind { None, Truncate, Modify, IoError };
struct FaultInjection {
    FaultKind kind = FaultKind::None;
    uint64_t chunk = 0;
    uint32_t read_delay_us = 0;  // sleep before every read (to test abandoning a stream with reads in flight)
};

// A contiguous run of bytes of one delivered chunk: slot[slot_offset, +nbytes) -> destination[dest_offset, +nbytes).
struct Segment {
    uint64_t slot_offset;
    uint64_t dest_offset;
    uint64_t nbytes;
};

struct Chunk {
    int slot = -1;
    uint64_t index = 0;
    uint64_t begin = 0;  // [begin, end) relative to the start of the data buffer
    uint64_t end = 0;
    size_t tensors_done = 0;  // tensors (data order) whose bytes all lie in chunks <= index
};

class StreamReader {
  public:
    // Opens the file, fstat()s it and reads and validates its header (FormatError / IoError as read_header_file).
    explicit StreamReader(std::string path, FaultInjection faults = {});
    ~StreamReader();
    StreamReader(const StreamReader&) = delete;
    StreamReader& operator=(const StreamReader&) = delete;

    const std::string& path() const { return path_; }
    const safetensors::Header& header() const { return header_; }
    uint64_t file_size() const { return file_size_; }
    // Destination layout: tensor i (data order) goes to dest_offsets()[i], aligned for its dtype; the layout equals
    // the data buffer's when every tensor is aligned there, and otherwise shifts only what must move.
    const std::vector<uint64_t>& dest_offsets() const { return dest_offsets_; }
    uint64_t dest_size() const { return dest_size_; }

    // Starts `threads` reader threads over chunks of chunk_bytes. external_slots: that many buffers of chunk_bytes
    // each, owned by the caller and kept alive until close(); empty: allocate `owned_slots` buffers here.
    void start(uint64_t chunk_bytes, const std::vector<uint8_t*>& external_slots, size_t owned_slots,
               unsigned threads);
    uint64_t chunk_count() const { return chunk_count_; }
    size_t slot_count() const { return slots_.size(); }

    // Blocks until the next chunk in file order has been read (the last one also verified), and hands its slot to
    // the caller. Returns false after the last chunk. Rethrows the first reader error (FormatError).
    bool next(Chunk* out);
    // The runs that copy `chunk` (as returned by next) into the destination layout.
    std::vector<Segment> segments(const Chunk& chunk) const;
    // Copies `chunk` from its slot into dest (dest_size() bytes) with memcpy.
    void copy_chunk(const Chunk& chunk, uint8_t* dest);
    // Gives a delivered chunk's slot back to the readers.
    void release(int slot);
    // Stops and joins the threads, frees owned slots, closes the file. Idempotent; a blocked next() then throws.
    void close();

  private:
    void worker();
    void read_chunk(uint64_t index, uint8_t* into);
    void verify_unchanged();
    void inject(uint64_t index);
    void fail(std::exception_ptr error);

    std::string path_;
    FaultInjection faults_;
    std::atomic<bool> fault_fired_{false};
    safetensors::UniqueFd fd_;
    uint64_t file_size_ = 0;
    int64_t mtime_sec_ = 0;
    int64_t mtime_nsec_ = 0;
    safetensors::Header header_;
    std::vector<uint64_t> ends_;  // tensor ends (data order; nondecreasing), for searching
    std::vector<uint64_t> dest_offsets_;
    uint64_t dest_size_ = 0;

    uint64_t chunk_bytes_ = 0;
    uint64_t chunk_count_ = 0;
    std::vector<uint8_t*> slots_;
    std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> owned_;
    std::vector<std::thread> threads_;
    bool started_ = false;
    bool closed_ = false;

    enum class SlotState : uint8_t { Free, Reading, Filled, Delivered };
    std::mutex mu_;
    std::condition_variable slot_freed_;   // readers wait for a free slot
    std::condition_variable chunk_ready_;  // the consumer waits for the next chunk
    std::vector<SlotState> slot_state_;
    std::vector<uint64_t> slot_chunk_;
    std::vector<int> free_slots_;
    uint64_t next_to_read_ = 0;
    uint64_t next_to_deliver_ = 0;
    uint64_t chunks_read_ = 0;
    bool verified_ = false;
    bool stop_ = false;
    std::exception_ptr error_;
    std::mutex copy_mu_;  // close() waits for a copy_chunk() in progress
};

}  // namespace lora_fast::stream
