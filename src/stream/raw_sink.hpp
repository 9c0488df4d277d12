// Where decode writes the raw disk: a pipe in guest order, or a file/device at guest offsets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace qcowfs::stream {

/// Coalesces writes that follow each other into one write of up to 4 MiB. `positioned`: the
/// descriptor is written with pwrite at the given offsets (a file or device); otherwise with
/// write, and every write must continue where the last one ended (a pipe).
class RawSink {
public:
    RawSink(int fd, bool positioned);
    /// Writes `data` at guest offset `offset`. Throws std::system_error when the write fails.
    void write_at(uint64_t offset, std::span<const std::byte> data);
    /// Writes `length` zero bytes at `offset` (used only for sequential, non-sparse output).
    void write_zeros(uint64_t offset, uint64_t length);
    /// Writes out what is buffered. Must be called before the descriptor is closed.
    void flush();
    uint64_t bytes_written() const { return written_; }

private:
    int fd_;
    bool positioned_;
    std::vector<std::byte> buf_;
    size_t len_ = 0;
    uint64_t buf_offset_ = 0;  // guest offset of buf_[0]
    uint64_t written_ = 0;
};

}  // namespace qcowfs::stream
