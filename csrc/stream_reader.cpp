// Streaming reader (see stream_reader.hpp and docs/streaming.md). No Python, no torch.
#include "stream_reader.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>

namespace lora_fast::stream {

namespace st = lora_fast::safetensors;

namespace {

std::atomic<int64_t> g_readers{0};
std::atomic<int64_t> g_threads{0};
std::atomic<int64_t> g_slots{0};
std::atomic<int64_t> g_slot_bytes{0};
std::atomic<int64_t> g_owned_slot_bytes{0};

std::string num(uint64_t v) { return std::to_string(v); }

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Alignment a tensor needs in the destination: its element size (torch views need offset % itemsize == 0).
uint64_t dtype_alignment(st::Dtype dtype) {
    const unsigned bits = st::dtype_bits(dtype);
    return bits >= 8 ? bits / 8 : 1;
}

}  // namespace

Counters counters() {
    return {g_readers.load(), g_threads.load(), g_slots.load(), g_slot_bytes.load(), g_owned_slot_bytes.load()};
}

StreamReader::StreamReader(std::string path, FaultInjection faults) : path_(std::move(path)), faults_(faults) {
    fd_ = st::open_regular_file(path_, &file_size_);
    struct stat sb;
    if (::fstat(fd_.get(), &sb) != 0) throw st::IoError(errno, path_, "cannot stat");
    // The size the header is validated against must be the one compared after the read.
    file_size_ = uint64_t(sb.st_size);
    mtime_sec_ = int64_t(sb.st_mtim.tv_sec);
    mtime_nsec_ = int64_t(sb.st_mtim.tv_nsec);
    header_ = st::read_header_fd(fd_.get(), file_size_, path_);

    ends_.reserve(header_.tensors.size());
    dest_offsets_.reserve(header_.tensors.size());
    uint64_t shift = 0;  // grows only where a tensor must move to be aligned; later tensors keep their spacing
    for (const auto& t : header_.tensors) {
        const uint64_t at = round_up(t.begin + shift, dtype_alignment(t.dtype));
        shift = at - t.begin;
        dest_offsets_.push_back(at);
        ends_.push_back(t.end);
    }
    dest_size_ = header_.data_size + shift;
    g_readers.fetch_add(1);
}

StreamReader::~StreamReader() { close(); }

void StreamReader::start(uint64_t chunk_bytes, const std::vector<uint8_t*>& external_slots, size_t owned_slots,
                         unsigned threads) {
    if (closed_) throw std::logic_error("StreamReader.start: the reader is closed");
    if (started_) throw std::logic_error("StreamReader.start: already started");
    if (chunk_bytes == 0) throw std::invalid_argument("StreamReader.start: chunk_bytes must be positive");
    if (threads == 0) throw std::invalid_argument("StreamReader.start: threads must be positive");
    const size_t nslots = external_slots.empty() ? owned_slots : external_slots.size();
    if (nslots == 0) throw std::invalid_argument("StreamReader.start: at least one slot is needed");
    for (uint8_t* p : external_slots)
        if (!p) throw std::invalid_argument("StreamReader.start: null slot address");

    chunk_bytes_ = chunk_bytes;
    chunk_count_ = (header_.data_size + chunk_bytes - 1) / chunk_bytes;
    started_ = true;
    if (external_slots.empty()) {
        owned_.reserve(nslots);
        for (size_t i = 0; i < nslots; ++i) {
            // Page-aligned: pread copies into it a little faster, and the kernel may use whole pages.
            void* p = std::aligned_alloc(4096, round_up(chunk_bytes, 4096));
            if (!p) throw std::bad_alloc();
            owned_.emplace_back(static_cast<uint8_t*>(p), std::free);
            slots_.push_back(static_cast<uint8_t*>(p));
            g_owned_slot_bytes.fetch_add(int64_t(chunk_bytes));
            g_slots.fetch_add(1);
            g_slot_bytes.fetch_add(int64_t(chunk_bytes));
        }
    } else {
        slots_ = external_slots;
        g_slots.fetch_add(int64_t(slots_.size()));
        g_slot_bytes.fetch_add(int64_t(slots_.size() * chunk_bytes));
    }
    slot_state_.assign(slots_.size(), SlotState::Free);
    slot_chunk_.assign(slots_.size(), 0);
    for (size_t i = slots_.size(); i-- > 0;) free_slots_.push_back(int(i));  // slot 0 first

    if (chunk_count_ == 0) {  // no data: nothing to read, only the final check
        verify_unchanged();
        verified_ = true;
        return;
    }
    const unsigned n = unsigned(std::min<uint64_t>(threads, chunk_count_));
    threads_.reserve(n);
    for (unsigned i = 0; i < n; ++i) {
        threads_.emplace_back([this] { worker(); });
        g_threads.fetch_add(1);
    }
}

void StreamReader::fail(std::exception_ptr error) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!error_) error_ = error;
    stop_ = true;
    slot_freed_.notify_all();
    chunk_ready_.notify_all();
}

void StreamReader::worker() {
    for (;;) {
        uint64_t index = 0;
        int slot = -1;
        {
            std::unique_lock<std::mutex> lk(mu_);
            slot_freed_.wait(lk, [&] { return stop_ || next_to_read_ >= chunk_count_ || !free_slots_.empty(); });
            if (stop_ || next_to_read_ >= chunk_count_) return;
            index = next_to_read_++;
            slot = free_slots_.back();
            free_slots_.pop_back();
            slot_state_[size_t(slot)] = SlotState::Reading;
            slot_chunk_[size_t(slot)] = index;
        }
        try {
            read_chunk(index, slots_[size_t(slot)]);
            bool last = false;
            {
                std::lock_guard<std::mutex> lk(mu_);
                slot_state_[size_t(slot)] = SlotState::Filled;
                last = ++chunks_read_ == chunk_count_;
            }
            if (last) {
                verify_unchanged();
                std::lock_guard<std::mutex> lk(mu_);
                verified_ = true;
            }
            chunk_ready_.notify_all();
        } catch (...) {
            fail(std::current_exception());
            return;
        }
    }
}

void StreamReader::inject(uint64_t index) {
    if (faults_.kind == FaultKind::None || index != faults_.chunk || fault_fired_.exchange(true)) return;
    const uint64_t data_start = header_.data_start();
    switch (faults_.kind) {
        case FaultKind::IoError:
            throw st::IoError(EIO, path_, "cannot read");
        case FaultKind::Truncate: {
            // Cut the file where this chunk starts (or at the header when everything was read already).
            const uint64_t at = data_start + std::min(index * chunk_bytes_, header_.data_size) -
                                (index >= chunk_count_ && header_.data_size > 0 ? 1 : 0);
            st::UniqueFd w(::open(path_.c_str(), O_WRONLY | O_CLOEXEC));
            if (w.get() < 0 || ::ftruncate(w.get(), off_t(at)) != 0) throw st::IoError(errno, path_, "test hook");
            break;
        }
        case FaultKind::Modify: {
            // Same size, one byte of the header's padding position rewritten with its own value: only mtime moves.
            st::UniqueFd w(::open(path_.c_str(), O_WRONLY | O_CLOEXEC));
            uint8_t byte = 0;
            if (w.get() < 0 || ::pread(fd_.get(), &byte, 1, 0) != 1 || ::pwrite(w.get(), &byte, 1, 0) != 1)
                throw st::IoError(errno, path_, "test hook");
            break;
        }
        case FaultKind::None:
            break;
    }
}

void StreamReader::read_chunk(uint64_t index, uint8_t* into) {
    if (faults_.read_delay_us) std::this_thread::sleep_for(std::chrono::microseconds(faults_.read_delay_us));
    inject(index);
    const uint64_t begin = index * chunk_bytes_;
    const uint64_t end = std::min(begin + chunk_bytes_, header_.data_size);
    uint64_t offset = header_.data_start() + begin;
    uint64_t left = end - begin;
    while (left > 0) {
        const ssize_t got = ::pread(fd_.get(), into, size_t(left), off_t(offset));
        if (got < 0) {
            if (errno == EINTR) continue;
            throw st::IoError(errno, path_, "cannot read");
        }
        if (got == 0)
            throw st::FormatError(path_ + ": file ended at byte " + num(offset) + " while " + num(left) +
                                  " more bytes of tensor data were expected (" + num(file_size_) +
                                  "-byte file truncated while being read?)");
        into += got;
        offset += uint64_t(got);
        left -= uint64_t(got);
    }
}

void StreamReader::verify_unchanged() {
    inject(chunk_count_);
    struct stat sb;
    if (::fstat(fd_.get(), &sb) != 0) throw st::IoError(errno, path_, "cannot stat");
    if (uint64_t(sb.st_size) != file_size_)
        throw st::FormatError(path_ + ": file changed while being read (size " + num(file_size_) + " -> " +
                              num(uint64_t(sb.st_size)) + " bytes)");
    if (int64_t(sb.st_mtim.tv_sec) != mtime_sec_ || int64_t(sb.st_mtim.tv_nsec) != mtime_nsec_)
        throw st::FormatError(path_ + ": file changed while being read (modification time moved)");
}

bool StreamReader::next(Chunk* out) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!started_) throw std::logic_error("StreamReader.next: not started");
    auto find_ready = [&]() -> int {
        if (next_to_deliver_ + 1 == chunk_count_ && !verified_) return -1;
        for (size_t s = 0; s < slot_state_.size(); ++s)
            if (slot_state_[s] == SlotState::Filled && slot_chunk_[s] == next_to_deliver_) return int(s);
        return -1;
    };
    int slot = -1;
    chunk_ready_.wait(lk, [&] {
        if (error_ || closed_ || next_to_deliver_ >= chunk_count_) return true;
        slot = find_ready();
        return slot >= 0;
    });
    if (error_) {
        const std::exception_ptr e = error_;
        lk.unlock();
        try {
            std::rethrow_exception(e);
        } catch (const st::IoError& io) {
            // Mid-stream I/O errors are reported as format errors naming the file: the load failed as a whole.
            throw st::FormatError(path_ + ": I/O error while streaming: " + io.what());
        }
    }
    if (closed_) throw std::logic_error("StreamReader.next: the reader is closed");
    if (next_to_deliver_ >= chunk_count_) return false;
    slot_state_[size_t(slot)] = SlotState::Delivered;
    Chunk c;
    c.slot = slot;
    c.index = next_to_deliver_++;
    c.begin = c.index * chunk_bytes_;
    c.end = std::min(c.begin + chunk_bytes_, header_.data_size);
    c.tensors_done = size_t(std::upper_bound(ends_.begin(), ends_.end(), c.end) - ends_.begin());
    *out = c;
    return true;
}

std::vector<Segment> StreamReader::segments(const Chunk& c) const {
    std::vector<Segment> out;
    // First tensor that ends after the chunk begins; zero-size tensors contribute no bytes.
    size_t i = size_t(std::upper_bound(ends_.begin(), ends_.end(), c.begin) - ends_.begin());
    for (; i < header_.tensors.size() && header_.tensors[i].begin < c.end; ++i) {
        const auto& t = header_.tensors[i];
        if (t.end == t.begin) continue;
        const uint64_t from = std::max(c.begin, t.begin);
        const uint64_t to = std::min(c.end, t.end);
        const Segment s{from - c.begin, dest_offsets_[i] + (from - t.begin), to - from};
        if (!out.empty() && out.back().slot_offset + out.back().nbytes == s.slot_offset &&
            out.back().dest_offset + out.back().nbytes == s.dest_offset)
            out.back().nbytes += s.nbytes;
        else
            out.push_back(s);
    }
    return out;
}

void StreamReader::copy_chunk(const Chunk& c, uint8_t* dest) {
    std::lock_guard<std::mutex> guard(copy_mu_);
    if (closed_ || c.slot < 0 || size_t(c.slot) >= slots_.size())
        throw std::logic_error("StreamReader.copy_chunk: no such delivered chunk");
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (slot_state_[size_t(c.slot)] != SlotState::Delivered || slot_chunk_[size_t(c.slot)] != c.index)
            throw std::logic_error("StreamReader.copy_chunk: the slot does not hold that chunk");
    }
    const uint8_t* src = slots_[size_t(c.slot)];
    for (const Segment& s : segments(c)) std::memcpy(dest + s.dest_offset, src + s.slot_offset, size_t(s.nbytes));
}

void StreamReader::release(int slot) {
    std::lock_guard<std::mutex> lk(mu_);
    if (slot < 0 || size_t(slot) >= slot_state_.size() || slot_state_[size_t(slot)] != SlotState::Delivered)
        throw std::logic_error("StreamReader.release: slot " + std::to_string(slot) + " is not delivered");
    slot_state_[size_t(slot)] = SlotState::Free;
    free_slots_.push_back(slot);
    slot_freed_.notify_one();
}

void StreamReader::close() {
    std::lock_guard<std::mutex> guard(copy_mu_);
    {
        std::lock_guard<std::mutex> lk(mu_);
        if (closed_) return;
        closed_ = true;
        stop_ = true;
    }
    slot_freed_.notify_all();
    chunk_ready_.notify_all();
    for (auto& t : threads_) {
        t.join();
        g_threads.fetch_sub(1);
    }
    threads_.clear();
    g_slots.fetch_sub(int64_t(slots_.size()));
    g_slot_bytes.fetch_sub(int64_t(slots_.size() * chunk_bytes_));
    g_owned_slot_bytes.fetch_sub(int64_t(owned_.size() * chunk_bytes_));
    owned_.clear();
    slots_.clear();
    fd_.reset();
    g_readers.fetch_sub(1);
}

}  // namespace lora_fast::stream
