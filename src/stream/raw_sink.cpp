// RawSink: a 4 MiB write-combining buffer in front of write/pwrite.
#include "stream/raw_sink.hpp"

#include <algorithm>
#include <cstring>

#include "qcowfs/format/error.hpp"
#include "stream/sysio.hpp"

namespace qcowfs::stream {

namespace {
constexpr size_t kBufferBytes = 4u << 20;
}

RawSink::RawSink(int fd, bool positioned) : fd_(fd), positioned_(positioned), buf_(kBufferBytes) {}

void RawSink::flush() {
    if (!len_) return;
    std::span<const std::byte> data(buf_.data(), len_);
    if (positioned_)
        pwrite_all(fd_, data, buf_offset_, "the output");
    else
        write_all(fd_, data, "the output");
    written_ += len_;
    buf_offset_ += len_;
    len_ = 0;
}

void RawSink::write_at(uint64_t offset, std::span<const std::byte> data) {
    if (len_ && offset != buf_offset_ + len_) flush();
    if (!len_) {
        if (!positioned_ && offset != buf_offset_)
            fail(EINVAL, "internal error: out-of-order write at " + hex(offset) + " to a pipe, expected " +
                             hex(buf_offset_));
        buf_offset_ = offset;
    }
    while (!data.empty()) {
        size_t n = std::min(data.size(), buf_.size() - len_);
        std::memcpy(buf_.data() + len_, data.data(), n);
        len_ += n;
        data = data.subspan(n);
        if (len_ == buf_.size()) flush();
    }
}

void RawSink::write_zeros(uint64_t offset, uint64_t length) {
    if (len_ && offset != buf_offset_ + len_) flush();
    if (!len_) buf_offset_ = offset;
    while (length) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(length, buf_.size() - len_));
        std::memset(buf_.data() + len_, 0, n);
        len_ += n;
        length -= n;
        if (len_ == buf_.size()) flush();
    }
}

}  // namespace qcowfs::stream
