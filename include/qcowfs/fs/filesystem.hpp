// The FUSE front end: serves the directory view and image reads as one coroutine per request.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/strand.hpp>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>

#include "qcowfs/fs/tree.hpp"
#include "qcowfs/util/async_mutex.hpp"
#include "qcowfs/util/task.hpp"

struct fuse_session;
struct fuse_lowlevel_ops;

namespace qcowfs::qcow2 {
class Image;
class BlockSource;
}  // namespace qcowfs::qcow2

namespace qcowfs::fs {

struct FsOptions {
    std::string source_dir;  // absolute
    std::string mountpoint;  // absolute
    bool read_only = false;
    size_t l2_cache_bytes = 4u << 20;          // per open image
    size_t compressed_cache_bytes = 4u << 20;  // per open image
    unsigned scan_interval_ms = 400;
};

/// FUSE inode numbers for view nodes. Lock order: InodeTable::mutex_ is a leaf lock.
class InodeTable {
public:
    explicit InodeTable(NodeKey root);
    /// The inode of `key` for a lookup reply: created if needed, one more kernel reference.
    uint64_t ref(const NodeKey& key, const struct stat& attr);
    /// Refreshes the attributes of `key` if it has an inode. Creates nothing.
    void update(const NodeKey& key, const struct stat& attr);
    /// The inode of `key` if the kernel holds one, else 0. Creates nothing.
    uint64_t find(const NodeKey& key) const;
    /// The key and last attributes of `ino`; false if unknown.
    bool get(uint64_t ino, NodeKey& key, struct stat& attr) const;
    /// Drops `n` kernel references; the inode is forgotten when none are left.
    void forget(uint64_t ino, uint64_t n);
    size_t size() const;

private:
    struct Inode {
        NodeKey key;
        uint64_t nlookup = 0;
        struct stat attr {};
    };
    mutable std::mutex mutex_;  // guards everything below
    std::unordered_map<uint64_t, Inode> by_ino_;
    std::map<NodeKey, uint64_t> by_key_;
    uint64_t next_ = 2;
};

/// One host image file opened for FUSE handles: its strand, and the Image once opened.
struct ImageSlot {
    using Strand = asio::strand<asio::io_context::executor_type>;
    ImageSlot(asio::io_context& io, std::string p) : strand(asio::make_strand(io)), path(std::move(p)) {}
    Strand strand;
    std::string path;
    // Strand only:
    std::shared_ptr<qcow2::Image> image;
    AsyncMutex open_mutex;  // held while the image is being opened
    // Registry mutex only:
    size_t handles = 0;
};

/// Open images by host identity. An image is opened once, shared by all handles (active disk and
/// snapshots), and closed when its last handle is released. Lock order: leaf lock.
class ImageRegistry {
public:
    explicit ImageRegistry(asio::io_context& io) : io_(io) {}
    std::shared_ptr<ImageSlot> acquire(uint64_t dev, uint64_t ino, const std::string& path);
    void release(const std::shared_ptr<ImageSlot>& slot);
    /// Logs "PATH: reason" once per image; further errors of the same image within 10 minutes
    /// are counted, not logged.
    void report(const std::string& path, const std::string& reason);
    size_t open_images() const;

private:
    asio::io_context& io_;
    mutable std::mutex mutex_;  // guards slots_, reported_
    std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<ImageSlot>> slots_;
    struct Reported {
        std::chrono::steady_clock::time_point when;
        size_t suppressed = 0;
    };
    std::map<std::string, Reported> reported_;
};

class Filesystem {
public:
    Filesystem(asio::io_context& io, FsOptions options);
    ~Filesystem();

    /// Scans SOURCE_DIR once (blocking). Throws std::system_error if it cannot be read.
    void initial_scan();
    /// Starts the scanner thread and serving `session` (already mounted). `on_finished` runs once
    /// serving has ended (unmounted, or stop()) and every outstanding request has been answered.
    void start(fuse_session* session, std::function<void()> on_finished);
    /// Stops taking requests; outstanding ones finish. Thread-safe.
    void stop();

    static const fuse_lowlevel_ops& operations();

    // Request handlers, called by the libfuse callbacks in fuse_ops.cpp.
    struct Handlers;

private:
    friend struct Handlers;
    Task<void> serve();
    Task<void> drain();
    void scanner_loop();
    std::shared_ptr<const Tree> tree() const;
    /// Attributes to expose for `node` (read-only adjustments applied).
    struct stat attr_of(const Node& node) const;
    /// Runs `body` as a tracked request coroutine on `executor`.
    template <class Executor, class Body>
    void spawn(const Executor& executor, Body body);

    asio::io_context& io_;
    FsOptions options_;
    Scanner scanner_;
    ImageRegistry images_;
    std::unique_ptr<InodeTable> inodes_;
    asio::strand<asio::io_context::executor_type> serve_strand_;
    fuse_session* session_ = nullptr;
    std::unique_ptr<asio::posix::stream_descriptor> device_;  // /dev/fuse; serve_strand_ only
    std::function<void()> on_finished_;
    std::atomic<bool> stopping_{false};
    std::atomic<int64_t> inflight_{0};

    mutable std::mutex tree_mutex_;  // guards tree_
    std::shared_ptr<const Tree> tree_;

    std::mutex scan_mutex_;  // guards scan_stop_
    std::condition_variable scan_cv_;
    bool scan_stop_ = false;
    std::thread scan_thread_;
};

}  // namespace qcowfs::fs
