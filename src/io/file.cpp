// Host file I/O: io_uring-backed File through Asio's random_access_file, and the MemFile double.
#include "qcowfs/io/file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/random_access_file.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>

#include "qcowfs/format/error.hpp"

namespace qcowfs::io {
namespace {

/// A host file read and written through io_uring. Asio submits one operation per I/O object and
/// direction at a time (the ordering stream sockets need), so a single random_access_file would
/// serialize every read of an image. Each operation therefore takes an idle channel: its own
/// random_access_file over a dup() of the descriptor, created on demand up to kMaxChannels.
class UringFile final : public File {
public:
    static constexpr size_t kMaxChannels = 32;

    UringFile(const Executor& ex, int fd, std::string path) : executor_(ex), fd_(fd), path_(std::move(path)) {
        channels_.push_back(make_channel(fd));
    }

    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        Lease lease(*this);
        size_t done = 0;
        while (done < buf.size()) {
            auto [ec, n] = co_await lease->file.async_read_some_at(
                offset + done, asio::buffer(buf.data() + done, buf.size() - done), asio::as_tuple(asio::use_awaitable));
            if (ec == asio::error::eof || (!ec && n == 0)) break;
            if (ec) fail(ec.value(), "read of " + path_ + " at " + std::to_string(offset + done) + " failed");
            done += n;
        }
        co_return done;
    }

    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        Lease lease(*this);
        size_t done = 0;
        while (done < buf.size()) {
            auto [ec, n] = co_await lease->file.async_write_some_at(
                offset + done, asio::buffer(buf.data() + done, buf.size() - done), asio::as_tuple(asio::use_awaitable));
            if (ec) fail(ec.value(), "write of " + path_ + " at " + std::to_string(offset + done) + " failed");
            done += n;
        }
    }

    Task<void> flush() override {
        // Asio has no asynchronous fsync; fdatasync blocks this thread briefly, the only place that does.
        if (::fdatasync(fd_) != 0) fail(errno, "fdatasync of " + path_ + " failed");
        co_return;
    }

    uint64_t size() override {
        struct stat st;
        if (::fstat(fd_, &st) != 0) fail(errno, "fstat of " + path_ + " failed");
        return static_cast<uint64_t>(st.st_size);
    }

    const std::string& name() const override { return path_; }

private:
    struct Channel {
        explicit Channel(const Executor& ex) : file(ex) {}
        asio::random_access_file file;
        int busy = 0;
    };

    /// Holds a channel for one operation.
    class Lease {
    public:
        explicit Lease(UringFile& owner) : owner_(owner), channel_(owner.acquire()) {}
        ~Lease() { owner_.release(channel_); }
        Lease(const Lease&) = delete;
        Lease& operator=(const Lease&) = delete;
        Channel* operator->() const { return &channel_; }

    private:
        UringFile& owner_;
        Channel& channel_;
    };

    std::unique_ptr<Channel> make_channel(int fd) {
        auto channel = std::make_unique<Channel>(executor_);
        boost::system::error_code ec;
        channel->file.assign(fd, ec);
        if (ec) {
            ::close(fd);
            fail(ec.value(), "cannot use " + path_ + " for asynchronous I/O");
        }
        return channel;
    }

    Channel& acquire() {
        std::lock_guard lock(mutex_);
        Channel* best = nullptr;
        for (auto& c : channels_) {
            if (c->busy == 0) {
                best = c.get();
                break;
            }
            if (!best || c->busy < best->busy) best = c.get();
        }
        if (best->busy > 0 && channels_.size() < kMaxChannels) {
            int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
            if (fd >= 0) {
                channels_.push_back(make_channel(fd));
                best = channels_.back().get();
            }  // out of descriptors: share the least busy channel
        }
        ++best->busy;
        return *best;
    }

    void release(Channel& c) {
        std::lock_guard lock(mutex_);
        --c.busy;
    }

    Executor executor_;
    int fd_;  // owned by channels_[0]
    std::string path_;
    std::mutex mutex_;  // guards channels_ and their busy counts
    std::vector<std::unique_ptr<Channel>> channels_;
};

}  // namespace

std::unique_ptr<File> open_file(const Executor& executor, const std::string& path, bool writable) {
    int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) fail(errno, "cannot open " + path);
    return std::make_unique<UringFile>(executor, fd, path);
}

MemFile::MemFile(std::string name, std::vector<std::byte> content)
    : name_(std::move(name)), durable_(content), current_(std::move(content)) {}

void MemFile::maybe_fail() {
    if (fail_count_ > 0) {
        --fail_count_;
        fail(fail_errno_, "injected failure on " + name_);
    }
}

Task<size_t> MemFile::read_at(uint64_t offset, std::span<std::byte> buf) {
    std::lock_guard lock(mutex_);
    maybe_fail();
    ++reads_;
    if (offset >= current_.size()) co_return 0;
    size_t n = std::min<uint64_t>(buf.size(), current_.size() - offset);
    std::memcpy(buf.data(), current_.data() + offset, n);
    co_return n;
}

Task<void> MemFile::write_at(uint64_t offset, std::span<const std::byte> buf) {
    std::lock_guard lock(mutex_);
    maybe_fail();
    if (offset + buf.size() > current_.size()) current_.resize(offset + buf.size());
    std::memcpy(current_.data() + offset, buf.data(), buf.size());
    co_return;
}

Task<void> MemFile::flush() {
    std::lock_guard lock(mutex_);
    maybe_fail();
    durable_ = current_;
    co_return;
}

uint64_t MemFile::size() {
    std::lock_guard lock(mutex_);
    return current_.size();
}

void MemFile::inject_failure(int error_number, int count) {
    std::lock_guard lock(mutex_);
    fail_errno_ = error_number;
    fail_count_ = count;
}

void MemFile::crash() {
    std::lock_guard lock(mutex_);
    current_ = durable_;
}

std::vector<std::byte> MemFile::content() const {
    std::lock_guard lock(mutex_);
    return current_;
}

size_t MemFile::read_count() const {
    std::lock_guard lock(mutex_);
    return reads_;
}

}  // namespace qcowfs::io
