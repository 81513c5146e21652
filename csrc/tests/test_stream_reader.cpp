// Test driver for the streaming reader, built and run under ASan/UBSan and under TSan by scripts/sanitize.sh.
// Plain main(), no dependencies. Usage: test_stream_reader [rounds] [scratch_dir]
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.hpp"
#include "stream_reader.hpp"

namespace st = lora_fast::safetensors;
namespace ls = lora_fast::stream;

namespace {

using lora_fast_test::g_checks;
using lora_fast_test::g_failures;

using Bytes = std::vector<uint8_t>;

Bytes read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const Bytes& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

// A file of random tensors written by the library's own writer (aligned layout).
Bytes make_aligned_file(const std::string& path, std::mt19937& rng, int count) {
    std::vector<Bytes> payloads;
    std::vector<st::TensorToWrite> tensors;
    const st::Dtype dtypes[] = {st::Dtype::F32, st::Dtype::F16, st::Dtype::U8, st::Dtype::F64, st::Dtype::BF16};
    payloads.reserve(size_t(count));
    for (int i = 0; i < count; ++i) {
        const st::Dtype d = dtypes[rng() % 5];
        const uint64_t n = rng() % 300;  // zero-size tensors included
        Bytes p(size_t(n * st::dtype_bits(d) / 8));
        for (auto& b : p) b = uint8_t(rng());
        payloads.push_back(std::move(p));
        tensors.push_back({"t" + std::to_string(i), d, {n}, payloads.back().data(), payloads.back().size()});
    }
    st::save_file(path, tensors, nullptr);
    return read_all(path);
}

// Legal but misaligned: U8[1] then F32[3] at data offset 1, U8[2], F64[2].
Bytes make_misaligned_file(const std::string& path) {
    const std::string header =
        R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[3],"data_offsets":[1,13]},)"
        R"("c":{"dtype":"U8","shape":[2],"data_offsets":[13,15]},"d":{"dtype":"F64","shape":[2],"data_offsets":[15,31]}})";
    Bytes file(8);
    for (int i = 0; i < 8; ++i) file[size_t(i)] = uint8_t(header.size() >> (8 * i));
    file.insert(file.end(), header.begin(), header.end());
    for (int i = 0; i < 31; ++i) file.push_back(uint8_t(i * 13 + 5));
    write_all(path, file);
    return file;
}

bool counters_zero() {
    const ls::Counters c = ls::counters();
    return c.readers == 0 && c.threads == 0 && c.slots == 0 && c.slot_bytes == 0 && c.owned_slot_bytes == 0;
}

// Streams the whole file, holding up to `hold` delivered slots before giving the oldest back (as a consumer with
// copies in flight does), and checks every tensor's bytes at its destination offset.
void stream_and_check(const std::string& path, const Bytes& file, uint64_t chunk, size_t slots, unsigned threads,
                      size_t hold, bool external) {
    ls::StreamReader r(path);
    std::vector<Bytes> ext;
    std::vector<uint8_t*> ptrs;
    if (external) {
        for (size_t i = 0; i < slots; ++i) ext.emplace_back(size_t(chunk));
        for (auto& e : ext) ptrs.push_back(e.data());
    }
    r.start(chunk, ptrs, slots, threads);
    CHECK(ls::counters().slots == int64_t(slots));
    Bytes dest(size_t(r.dest_size()));
    std::deque<int> held;
    size_t done = 0;
    uint64_t expected_index = 0;
    ls::Chunk c;
    while (r.next(&c)) {
        CHECK(c.index == expected_index++);
        CHECK(c.tensors_done >= done);
        done = c.tensors_done;
        r.copy_chunk(c, dest.data());
        held.push_back(c.slot);
        if (held.size() > std::min(hold, slots - 1)) {
            r.release(held.front());
            held.pop_front();
        }
    }
    CHECK(expected_index == r.chunk_count());
    CHECK(done == r.header().tensors.size());
    const uint64_t data_start = r.header().data_start();
    for (size_t i = 0; i < r.header().tensors.size(); ++i) {
        const auto& t = r.header().tensors[i];
        const uint64_t at = r.dest_offsets()[i];
        const uint64_t align = st::dtype_bits(t.dtype) / 8;
        CHECK(at % (align ? align : 1) == 0);
        CHECK(at + t.nbytes() <= r.dest_size());
        CHECK(t.nbytes() == 0 || std::memcmp(dest.data() + at, file.data() + data_start + t.begin, t.nbytes()) == 0);
    }
}

void expect_fault(const std::string& path, const Bytes& good, ls::FaultKind kind, uint64_t chunk_index,
                  unsigned threads, const char* needle) {
    write_all(path, good);
    ls::FaultInjection f;
    f.kind = kind;
    f.chunk = chunk_index;
    bool threw = false;
    {
        ls::StreamReader r(path, f);
        r.start(64, {}, 3, threads);
        ls::Chunk c;
        try {
            while (r.next(&c)) r.release(c.slot);
        } catch (const st::FormatError& e) {
            threw = std::strstr(e.what(), needle) != nullptr && std::strstr(e.what(), path.c_str()) != nullptr;
            if (!threw) std::fprintf(stderr, "unexpected message: %s\n", e.what());
        }
    }
    CHECK(threw);
    CHECK(counters_zero());
}

void test_streaming(const std::string& dir, int rounds) {
    std::mt19937 rng(1234);
    const std::string aligned = dir + "/aligned.safetensors";
    const std::string misaligned = dir + "/misaligned.safetensors";
    const Bytes mis = make_misaligned_file(misaligned);
    for (int round = 0; round < rounds; ++round) {
        const Bytes file = make_aligned_file(aligned, rng, 1 + int(rng() % 40));
        const uint64_t chunk = 1 + rng() % 700;
        const size_t slots = 1 + rng() % 4;
        const unsigned threads = 1 + unsigned(rng() % 4);
        stream_and_check(aligned, file, chunk, slots, threads, rng() % 4, rng() % 2);
        stream_and_check(misaligned, mis, 1 + rng() % 9, slots, threads, rng() % 4, rng() % 2);
    }
    CHECK(counters_zero());
}

void test_faults(const std::string& dir) {
    std::mt19937 rng(99);
    const std::string path = dir + "/faults.safetensors";
    const Bytes good = make_aligned_file(path, rng, 30);
    uint64_t chunks = 0;
    {
        ls::StreamReader r(path);
        r.start(64, {}, 3, 1);
        chunks = r.chunk_count();
    }
    CHECK(chunks > 10);
    for (unsigned threads = 1; threads <= 4; ++threads) {
        for (uint64_t at : {uint64_t(0), chunks / 2, chunks - 1, chunks}) {
            expect_fault(path, good, ls::FaultKind::Truncate, at, threads, at < chunks ? "truncated" : "size ");
            expect_fault(path, good, ls::FaultKind::IoError, at, threads, "Input/output error");
            // Same size: only the modification time tells; make the old one unmistakable first.
            write_all(path, good);
            struct timespec old[2] = {{1000000000, 0}, {1000000000, 0}};
            CHECK(::utimensat(AT_FDCWD, path.c_str(), old, 0) == 0);
            ls::FaultInjection f;
            f.kind = ls::FaultKind::Modify;
            f.chunk = at;
            bool threw = false;
            {
                ls::StreamReader r(path, f);
                r.start(64, {}, 2, threads);
                ls::Chunk c;
                try {
                    while (r.next(&c)) r.release(c.slot);
                } catch (const st::FormatError& e) {
                    threw = std::strstr(e.what(), "changed while being read") != nullptr;
                }
            }
            CHECK(threw);
            CHECK(counters_zero());
        }
    }
    write_all(path, good);
}

void test_abandon(const std::string& dir) {
    std::mt19937 rng(7);
    const std::string path = dir + "/abandon.safetensors";
    make_aligned_file(path, rng, 40);
    for (unsigned threads = 1; threads <= 4; ++threads) {
        ls::FaultInjection slow;
        slow.read_delay_us = 300;
        {  // destroyed while holding a delivered slot, readers waiting for slots or sleeping before a read
            ls::StreamReader r(path, slow);
            r.start(32, {}, 2, threads);
            ls::Chunk c;
            CHECK(r.next(&c));
        }
        CHECK(counters_zero());
        {  // closed from another thread while the consumer blocks in next()
            ls::StreamReader r(path, slow);
            r.start(32, {}, 2, threads);
            std::thread closer([&] {
                std::this_thread::sleep_for(std::chrono::milliseconds(2));
                r.close();
            });
            bool stopped = false;
            try {
                ls::Chunk c;
                while (r.next(&c)) r.release(c.slot);
            } catch (const std::logic_error&) {
                stopped = true;
            }
            closer.join();
            CHECK(stopped);
            r.close();
        }
        CHECK(counters_zero());
        {  // never started
            ls::StreamReader r(path);
        }
        CHECK(counters_zero());
    }
}

}  // namespace

int main(int argc, char** argv) {
    const int rounds = argc > 1 ? std::atoi(argv[1]) : 200;
    const std::string scratch = argc > 2 ? argv[2] : "/tmp";
    test_streaming(scratch, rounds);
    test_faults(scratch);
    test_abandon(scratch);
    std::printf("stream reader: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
