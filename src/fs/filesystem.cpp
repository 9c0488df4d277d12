// Filesystem lifetime: the scanner thread, the /dev/fuse reader coroutine, and orderly shutdown.
#include "qcowfs/fs/filesystem.hpp"

#include <fcntl.h>
#include <fuse_lowlevel.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstring>

#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {

Filesystem::Filesystem(asio::io_context& io, FsOptions options)
    : io_(io),
      options_(std::move(options)),
      scanner_(options_.source_dir, ScanOptions{options_.mountpoint, false}),
      images_(io),
      serve_strand_(asio::make_strand(io)) {}

Filesystem::~Filesystem() {
    {
        std::lock_guard lock(scan_mutex_);
        scan_stop_ = true;
    }
    scan_cv_.notify_all();
    if (scan_thread_.joinable()) scan_thread_.join();
}

void Filesystem::initial_scan() {
    auto tree = scanner_.scan();
    inodes_ = std::make_unique<InodeTable>(tree->root().key);
    std::lock_guard lock(tree_mutex_);
    tree_ = std::move(tree);
}

std::shared_ptr<const Tree> Filesystem::tree() const {
    std::lock_guard lock(tree_mutex_);
    return tree_;
}

void Filesystem::scanner_loop() {
    std::unique_lock lock(scan_mutex_);
    while (!scan_cv_.wait_for(lock, std::chrono::milliseconds(options_.scan_interval_ms), [this] { return scan_stop_; })) {
        lock.unlock();
        try {
            auto tree = scanner_.scan();
            std::lock_guard tree_lock(tree_mutex_);
            tree_ = std::move(tree);
        } catch (const std::system_error& e) {
            // Keep serving the last good view; say so once.
            images_.report(options_.source_dir, reason_of(e));
        } catch (const std::exception& e) {
            images_.report(options_.source_dir, std::string("directory scan failed: ") + e.what());
        }
        lock.lock();
    }
}

void Filesystem::start(fuse_session* session, std::function<void()> on_finished) {
    session_ = session;
    on_finished_ = std::move(on_finished);
    scan_thread_ = std::thread([this] { scanner_loop(); });
    asio::co_spawn(serve_strand_, serve(), [this](std::exception_ptr error) {
        // serve() handles its own errors; anything escaping still ends the mount cleanly.
        if (!error) return;
        try {
            std::rethrow_exception(error);
        } catch (const std::exception& e) {
            log::error(std::string("request loop failed: ") + e.what());
        }
        stopping_ = true;
        asio::co_spawn(serve_strand_, drain(), asio::detached);
    });
}

void Filesystem::stop() {
    if (stopping_.exchange(true)) return;
    // Wake the reader, which waits on serve_strand_, so it notices.
    asio::post(serve_strand_, [this] {
        if (session_) fuse_session_exit(session_);
        if (device_) device_->cancel();
    });
}

Task<void> Filesystem::serve() {
    int fd = fuse_session_fd(session_);
    int flags = ::fcntl(fd, F_GETFL);
    ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    // stop() cancels the wait through device_, on this strand; a stop() that came before the
    // device existed is seen through stopping_.
    device_ = std::make_unique<asio::posix::stream_descriptor>(serve_strand_, fd);
    fuse_buf buf{};
    bool ended = false;
    while (!ended && !stopping_ && !fuse_session_exited(session_)) {
        auto [ec] = co_await device_->async_wait(asio::posix::stream_descriptor::wait_read,
                                                  asio::as_tuple(asio::use_awaitable));
        if (ec) continue;
        for (;;) {
            int res = fuse_session_receive_buf(session_, &buf);
            if (res == -EAGAIN) break;
            if (res == -EINTR) continue;
            if (res <= 0) {
                if (res < 0) log::error(std::string("reading /dev/fuse failed: ") + std::strerror(-res));
                ended = true;  // 0: unmounted (ENODEV) or session exited
                break;
            }
            fuse_session_process_buf(session_, &buf);
        }
    }
    device_->release();  // the session owns the fd
    device_.reset();
    std::free(buf.mem);
    stopping_ = true;
    co_await drain();
}

Task<void> Filesystem::drain() {
    asio::steady_timer timer(serve_strand_);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (inflight_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
        timer.expires_after(std::chrono::milliseconds(5));
        co_await timer.async_wait(asio::use_awaitable);
    }
    if (inflight_.load() > 0) log::error("gave up waiting for " + std::to_string(inflight_.load()) + " requests");
    {
        std::lock_guard lock(scan_mutex_);
        scan_stop_ = true;
    }
    scan_cv_.notify_all();
    if (on_finished_) on_finished_();
}

}  // namespace qcowfs::fs
