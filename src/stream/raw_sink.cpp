// RawSink: gathered writev/pwritev, copying only what the caller may change before the write.
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
constexpr size_t kMaxQueued = 4;  // background: jobs waiting for the writer (up to 8 MiB each)
const std::byte* zero_block() {
    static const std::vector<std::byte> zeros(kZeroBytes);
    return zeros.data();
}
}  // namespace

RawSink::RawSink(int fd, bool positioned, bool background) : fd_(fd), positioned_(positioned), copy_(kCopyBytes) {
    iov_.reserve(kMaxIov);
    if (background) thread_ = std::thread([this] { writer(); });
}

RawSink::~RawSink() {
    if (!thread_.joinable()) return;
    {
        std::lock_guard lk(mutex_);
        stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
}

void RawSink::write_job(Job& job) const {
    uint64_t at = job.start;
    size_t first = 0;
    auto& iov = job.iov;
    while (first < iov.size()) {
        int cnt = static_cast<int>(std::min<size_t>(iov.size() - first, kMaxIov));
        ssize_t n = positioned_ ? ::pwritev(fd_, iov.data() + first, cnt, static_cast<off_t>(at))
                                : ::writev(fd_, iov.data() + first, cnt);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail(errno, std::string("cannot write the output") +
                            (positioned_ ? " at offset " + hex(at) : std::string()));
        }
        at += static_cast<uint64_t>(n);
        // Skip what was written; a partial iovec keeps its tail.
        size_t left = static_cast<size_t>(n);
        while (first < iov.size() && left >= iov[first].iov_len) left -= iov[first++].iov_len;
        if (left) {
            iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + left;
            iov[first].iov_len -= left;
        }
    }
}

void RawSink::writer() {
    std::unique_lock lk(mutex_);
    for (;;) {
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        Job job = std::move(queue_.front());
        queue_.pop_front();
        if (!error_) {  // after a failed write nothing more is written
            lk.unlock();
            std::exception_ptr err;
            try {
                write_job(job);
            } catch (...) {
                err = std::current_exception();
            }
            job.keep.clear();  // frees batch outputs: outside the lock
            lk.lock();
            if (err) error_ = err;
        }
        if (!job.copy.empty()) spare_.push_back(std::move(job.copy));
        ++written_ticket_;
        cv_.notify_all();
    }
}

void RawSink::wait_queue(std::unique_lock<std::mutex>& lk, size_t jobs) {
    cv_.wait(lk, [&] { return error_ || queue_.size() <= jobs; });
    if (error_) std::rethrow_exception(error_);
}

uint64_t RawSink::flush() {
    if (iov_.empty() && keep_.empty()) return next_ticket_;
    Job job;
    job.iov.swap(iov_);
    job.start = start_;
    job.keep.swap(keep_);
    start_ += pending_;
    pending_ = 0;
    iov_.reserve(kMaxIov);
    if (!thread_.joinable()) {
        write_job(job);
        copy_used_ = 0;  // copy_ is free again at once
        return ++next_ticket_;
    }
    std::unique_lock lk(mutex_);
    if (copy_used_) {
        job.copy.swap(copy_);
        if (!spare_.empty()) {
            copy_.swap(spare_.back());
            spare_.pop_back();
        }
        copy_used_ = 0;
    }
    wait_queue(lk, kMaxQueued - 1);
    queue_.push_back(std::move(job));
    cv_.notify_all();
    lk.unlock();
    if (copy_.empty()) copy_.resize(kCopyBytes);
    return ++next_ticket_;
}

void RawSink::wait_written(uint64_t ticket) {
    if (!thread_.joinable()) return;
    std::unique_lock lk(mutex_);
    cv_.wait(lk, [&] { return error_ || written_ticket_ >= ticket; });
    if (error_) std::rethrow_exception(error_);
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
