// Where decode writes the raw disk: a pipe in guest order, or a file/device at guest offsets.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qcowfs::stream {

/// Gathers writes that follow each other into one writev/pwritev of up to 8 MiB. `positioned`:
/// the descriptor is written with pwritev at the given offsets (a file or device); otherwise with
/// writev, and every write must continue where the last one ended (a pipe).
///
/// Bytes inside the stable range (set_stable_range: the caller's input buffer) and zeros are not
/// copied: the sink keeps pointers to them, so the caller must flush() before it changes that
/// range. Everything else is copied into the sink's own buffer at once.
class RawSink {
public:
    RawSink(int fd, bool positioned);
    /// Bytes in [begin, end) stay unchanged until the next flush(); they are written from there.
    void set_stable_range(const std::byte* begin, const std::byte* end) {
        stable_begin_ = begin;
        stable_end_ = end;
    }
    const std::byte* stable_begin() const { return stable_begin_; }
    const std::byte* stable_end() const { return stable_end_; }
    /// Writes `data` at guest offset `offset`. Throws std::system_error when a write fails.
    void write_at(uint64_t offset, std::span<const std::byte> data);
    /// Writes `length` zero bytes at `offset` (sequential, non-sparse output).
    void write_zeros(uint64_t offset, uint64_t length);
    /// Writes out everything gathered. Must be called before the stable range changes and before
    /// the descriptor is closed.
    void flush();
    uint64_t bytes_written() const { return written_; }

private:
    /// Flushes first if `n` bytes at `offset` cannot join what is gathered.
    void make_room(uint64_t offset, size_t n);
    void add(const std::byte* p, size_t n);

    int fd_;
    bool positioned_;
    std::vector<std::byte> copy_;  // copies of unstable data, referenced by iov_
    size_t copy_used_ = 0;
    std::vector<iovec> iov_;
    uint64_t start_ = 0;    // guest offset of the first gathered byte
    uint64_t pending_ = 0;  // bytes gathered
    const std::byte* stable_begin_ = nullptr;
    const std::byte* stable_end_ = nullptr;
    uint64_t written_ = 0;
};

}  // namespace qcowfs::stream
