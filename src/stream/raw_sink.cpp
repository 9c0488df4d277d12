// RawSink: gathered writev/pwritev, copying only what the caller may change before the flush.
#include "stream/raw_sink.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "qcowfs/format/error.hpp"

namespace qcowfs::stream {

namespace {
constexpr size_t kCopyBytes = 4u << 20;
constexpr uint64_t kMaxPending = 8u << 20;
constexpr size_t kMaxIov = 512;  // below IOV_MAX (1024)
constexpr size_t kZeroBytes = 1u << 20;
const std::byte* zero_block() {
    static const std::vector<std::byte> zeros(kZeroBytes);
    return zeros.data();
}
}  // namespace

RawSink::RawSink(int fd, bool positioned) : fd_(fd), positioned_(positioned), copy_(kCopyBytes) {
    iov_.reserve(kMaxIov);
}

void RawSink::flush() {
    size_t first = 0;
    while (first < iov_.size()) {
        int cnt = static_cast<int>(std::min<size_t>(iov_.size() - first, kMaxIov));
        ssize_t n = positioned_ ? ::pwritev(fd_, iov_.data() + first, cnt, static_cast<off_t>(start_))
                                : ::writev(fd_, iov_.data() + first, cnt);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(errno, std::string("cannot write the output") +
                            (positioned_ ? " at offset " + hex(start_) : std::string()));
        }
        start_ += static_cast<uint64_t>(n);
        written_ += static_cast<uint64_t>(n);
        pending_ -= static_cast<uint64_t>(n);
        // Skip what was written; a partial iovec keeps its tail.
        size_t left = static_cast<size_t>(n);
        while (first < iov_.size() && left >= iov_[first].iov_len) left -= iov_[first++].iov_len;
        if (left) {
            iov_[first].iov_base = static_cast<std::byte*>(iov_[first].iov_base) + left;
            iov_[first].iov_len -= left;
        }
    }
    iov_.clear();
    copy_used_ = 0;
}

void RawSink::make_room(uint64_t offset, size_t n) {
    if (pending_ && (offset != start_ + pending_ || iov_.size() == kMaxIov || pending_ + n > kMaxPending)) flush();
    if (!pending_) {
        if (!positioned_ && offset != start_)
            fail(EINVAL, "internal error: out-of-order write at " + hex(offset) + " to a pipe, expected " +
                             hex(start_));
        start_ = offset;
    }
}

void RawSink::add(const std::byte* p, size_t n) {
    if (!iov_.empty()) {
        auto& last = iov_.back();
        if (static_cast<const std::byte*>(last.iov_base) + last.iov_len == p) {
            last.iov_len += n;  // continues the previous piece in memory too
            pending_ += n;
            return;
        }
    }
    iov_.push_back({const_cast<std::byte*>(p), n});
    pending_ += n;
}

void RawSink::write_at(uint64_t offset, std::span<const std::byte> data) {
    while (!data.empty()) {
        if (data.data() >= stable_begin_ && data.data() + data.size() <= stable_end_) {
            make_room(offset, data.size());
            add(data.data(), data.size());
            return;
        }
        size_t n = std::min<size_t>(data.size(), kCopyBytes);
        make_room(offset, n);
        if (copy_.size() - copy_used_ < n) {
            flush();
            start_ = offset;
        }
        std::byte* dst = copy_.data() + copy_used_;
        std::memcpy(dst, data.data(), n);
        copy_used_ += n;
        add(dst, n);
        offset += n;
        data = data.subspan(n);
    }
}

void RawSink::write_zeros(uint64_t offset, uint64_t length) {
    while (length) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(length, kZeroBytes));
        make_room(offset, n);
        add(zero_block(), n);
        offset += n;
        length -= n;
    }
}

}  // namespace qcowfs::stream
