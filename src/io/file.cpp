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

class UringFile final : public File {
public:
    UringFile(const Executor& ex, int fd, std::string path) : file_(ex), path_(std::move(path)) {
        boost::system::error_code ec;
        file_.assign(fd, ec);
        if (ec) {
            ::close(fd);
            fail(ec.value(), "cannot use " + path_ + " for asynchronous I/O");
        }
    }

    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        size_t done = 0;
        while (done < buf.size()) {
            auto [ec, n] = co_await file_.async_read_some_at(
                offset + done, asio::buffer(buf.data() + done, buf.size() - done), asio::as_tuple(asio::use_awaitable));
            if (ec == asio::error::eof || (!ec && n == 0)) break;
            if (ec) fail(ec.value(), "read of " + path_ + " at " + std::to_string(offset + done) + " failed");
            done += n;
        }
        co_return done;
    }

    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        size_t done = 0;
        while (done < buf.size()) {
            auto [ec, n] = co_await file_.async_write_some_at(
                offset + done, asio::buffer(buf.data() + done, buf.size() - done), asio::as_tuple(asio::use_awaitable));
            if (ec) fail(ec.value(), "write of " + path_ + " at " + std::to_string(offset + done) + " failed");
            done += n;
        }
    }

    Task<void> flush() override {
        // Asio has no asynchronous fsync; fdatasync blocks this thread briefly, the only place that does.
        if (::fdatasync(file_.native_handle()) != 0) fail(errno, "fdatasync of " + path_ + " failed");
        co_return;
    }

    uint64_t size() override {
        struct stat st;
        if (::fstat(file_.native_handle(), &st) != 0) fail(errno, "fstat of " + path_ + " failed");
        return static_cast<uint64_t>(st.st_size);
    }

    const std::string& name() const override { return path_; }

private:
    asio::random_access_file file_;
    std::string path_;
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
