// The FUSE front end: serves the directory view, image reads and writes as one coroutine per request.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "qcowfs/fs/gate.hpp"
#include "qcowfs/fs/tree.hpp"
#include "qcowfs/io/host.hpp"
#include "qcowfs/util/async_mutex.hpp"
#include "qcowfs/util/task.hpp"
#include "qcowfs/util/workers.hpp"

struct fuse_session;
struct fuse_lowlevel_ops;

namespace qcowfs::qcow2 {
class Disk;
struct OpenOptions;
}  // namespace qcowfs::qcow2

namespace qcowfs::fs {

struct FsOptions {
    std::string source_dir;  // absolute
    std::string mountpoint;  // absolute
    bool read_only = false;
    size_t l2_cache_bytes = 4u << 20;          // per open image
    size_t compressed_cache_bytes = 4u << 20;  // per open image
    size_t write_cache_bytes = 64u << 20;      // per writable open image (DataCache limit)
    /// Canonical directories besides SOURCE_DIR where backing and data files may lie
    /// (-o allow_dir; "/" allows every place, as QEMU does).
    std::vector<std::string> allow_dirs;
    /// -o force_share: images are read without taking or checking QEMU's image locks (QEMU's
    /// -U); the mount is then read-only.
    bool force_share = false;
    /// -o copy_on_read: reads of writable images copy backing data into them (qcow2::Disk::
    /// set_copy_on_read); the xattr user.qcowfs.copy_on_read overrides it per image.
    bool copy_on_read = false;
    size_t refcount_memory_bytes = 32u << 20;  // qcow2::OpenOptions::refcount_memory
    size_t scan_limit_bytes = size_t{1} << 30; // qcow2::OpenOptions::scan_limit
    unsigned scan_interval_ms = 400;
    unsigned writeback_interval_ms = 5000;  // periodic durable write-back of changed images
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

/// One host image file opened for FUSE handles: its lock, and its qcow2::Disk once opened.
///
/// Lifecycle: ImageRegistry::acquire creates the slot (or finds it) and counts a handle; the first
/// open request opens the Disk under `lifecycle`. When the last handle goes, Filesystem closes
/// the Disk under `lifecycle` (write-back, Image::close) and only then removes the slot from the
/// registry, so an open arriving meanwhile finds this slot, waits for the close and reopens: one
/// file never has two Image objects.
struct ImageSlot {
    ImageSlot(const Workers& workers, uint64_t d, uint64_t i, std::string p, bool follow);
    ~ImageSlot();  // out of line: qcow2::Disk is complete there
    /// Where a request or job of this image runs: on the calling worker (its home), under `lock`.
    ImageExecutor executor() { return workers.image_executor(lock); }
    const Workers& workers;
    /// Guards the image state below and everything of the open disk. Shared with the executors,
    /// so that it outlives work that drops the slot's last reference under it.
    ImageLockRef lock = ImageLockRef::make();
    uint64_t dev, ino;  // host identity of the image file
    // Under `lock` only (set when the image is opened):
    std::string path;   // where the image was last opened (or will be), for opens and log lines
    bool follow_final;  // the scan found a symlink at `path`: opens follow it
    /// The open image with its views, data cache, size lock and change counter; null while
    /// closed. Stays while the slot has handles.
    std::unique_ptr<qcow2::Disk> disk;
    AsyncMutex lifecycle;  // held while the disk is opened, closed or periodically flushed
    /// Every host file the open image reads (image, data file, backing chain) with the identity
    /// it had when opened: what each open request is checked against (io::check_user_access).
    std::vector<io::HostFile> files;
    // Any thread:
    std::atomic<uint64_t> live_size{kUnknownSize};  // the disk's size while open
    std::atomic<bool> corrupt{false};               // on_corrupt fired: no more write opens
    static constexpr uint64_t kUnknownSize = ~uint64_t{0};
    // Registry mutex only:
    size_t handles = 0;
};

/// Open images by host identity. An image is opened once, shared by all handles (active disk and
/// snapshots), and closed when its last handle is released. Lock order: leaf lock.
class ImageRegistry {
public:
    explicit ImageRegistry(const Workers& workers) : workers_(workers) {}
    /// The slot of (dev, ino), created if needed, with one more handle.
    std::shared_ptr<ImageSlot> acquire(uint64_t dev, uint64_t ino, const std::string& path, bool follow_final);
    /// Drops a handle; true if it was the last one (the caller then closes the image and calls
    /// remove_if_unused).
    bool release(const std::shared_ptr<ImageSlot>& slot);
    /// Removes `slot` from the registry if it still has no handles; true if removed.
    bool remove_if_unused(const std::shared_ptr<ImageSlot>& slot);
    /// The handle count of `slot` now.
    size_t handles(const std::shared_ptr<ImageSlot>& slot) const;
    /// The slot of (dev, ino) if one exists, else nullptr. Creates nothing.
    std::shared_ptr<ImageSlot> find(uint64_t dev, uint64_t ino) const;
    /// Every slot (for periodic write-back and shutdown).
    std::vector<std::shared_ptr<ImageSlot>> all() const;
    /// Records the size an image had when it was closed, for live_size() until a scan catches up.
    void closed(const ImageSlot& slot, uint64_t size);
    /// The current disk size of image (dev, ino) if qcowfs knows better than a tree scanned at
    /// `scanned`: the open image's size, or its size at a close after that scan. Else nullopt.
    std::optional<uint64_t> live_size(uint64_t dev, uint64_t ino, std::chrono::steady_clock::time_point scanned) const;
    enum class Severity { error, notice };
    /// Logs "PATH: reason" (an error, or a notice for an expected refusal such as a lock held by
    /// QEMU), at most once per image and kind of reason (the reason with its numbers left out)
    /// every 10 minutes; repeats within that time are counted and the count is logged with the
    /// next line of that kind. One image's errors never mute another kind of error of it.
    void report(const std::string& path, const std::string& reason, Severity severity = Severity::error);
    /// Logs a line that says data was lost (what, bytes, ranges). Never rate-limited.
    void report_loss(const std::string& path, const std::string& what);
    /// Logs that the image was marked corrupt; until its slot is removed, its further errors and
    /// refusals are consequences of that and are counted with it, not logged (loss lines still
    /// are).
    void report_corrupt(const std::string& path, const std::string& reason);

private:
    const Workers& workers_;
    mutable std::mutex mutex_;  // guards slots_, reported_, ImageSlot::handles
    std::map<std::pair<uint64_t, uint64_t>, std::shared_ptr<ImageSlot>> slots_;
    struct Closed {
        std::chrono::steady_clock::time_point when;
        uint64_t size;
    };
    std::map<std::pair<uint64_t, uint64_t>, Closed> closed_;  // recent closes (pruned after a minute)
    struct Reported {
        std::chrono::steady_clock::time_point when;
        size_t suppressed = 0;
    };
    std::map<std::string, Reported> reported_;  // key: path + '\n' + kind of reason
    std::set<std::string> corrupt_;              // paths marked corrupt while their slot lives
};

class Filesystem {
public:
    Filesystem(Workers& workers, FsOptions options);
    ~Filesystem();

    /// Scans SOURCE_DIR once (blocking). Throws std::system_error if it cannot be read.
    void initial_scan();
    /// Starts the scanner thread and serving `session` (already mounted). `on_finished` runs once
    /// serving has ended (unmounted, or stop()) and every outstanding request has been answered.
    void start(fuse_session* session, std::function<void()> on_finished);
    /// Stops taking requests; outstanding ones finish. Thread-safe.
    void stop();
    /// The st_dev of the mounted file system: files on it are never opened as images, backing or
    /// data files. Call once mounted, before start().
    void set_mount_device(uint64_t dev) { policy_.own_dev = dev; }

    static const fuse_lowlevel_ops& operations();

    // Request handlers, called by the libfuse callbacks in fuse_ops.cpp.
    struct Handlers;

    /// A request buffer that goes back to the spare buffers when dropped.
    struct BufferReturn {
        Filesystem* fs = nullptr;
        void operator()(char* p) const;
    };
    using RequestBuffer = std::unique_ptr<char[], BufferReturn>;

private:
    friend struct Handlers;
    /// The /dev/fuse reader of worker `worker`, on its serve strand: every worker reads requests
    /// and runs their callbacks. The last reader to end runs drain().
    Task<void> serve(unsigned worker);
    /// Makes every reader end (from any thread).
    void stop_readers();
    /// After serving: waits for the requests (requests_), closes every image still open, stops
    /// the scanner, calls on_finished_. On a serve strand.
    Task<void> drain();
    /// Tells the scanner thread to end (it is joined by the destructor).
    void stop_scanner();
    /// Every writeback_interval_ms: flush_slot() each open image with changes. On serve_strand_.
    Task<void> writeback_loop();
    /// Opens the slot's Image if it is not open (under its lifecycle mutex), writable when
    /// `writable_wanted` and the host file allows it; every file is opened under policy_ and
    /// recorded in slot->files. Then checks that `user` may read (and, with `for_writing`,
    /// write) every one of them on the host, and takes the image's write locks when
    /// `for_writing`. Under the slot's lock. Throws std::system_error: EACCES (the user may not,
    /// or policy refuses a file), EBUSY (QEMU holds the image), ESTALE (replaced since the scan),
    /// EIO/ENOTSUP from opening the image.
    /// `image` is the image file as the current view has it (host_file_of): a slot whose image is
    /// closed opens it there, so a reopen after a rename uses the new path.
    Task<void> open_for(std::shared_ptr<ImageSlot> slot, const io::HostFile& image, bool writable_wanted,
                        const io::Credentials& user, bool for_writing);
    /// The open part of open_for: every file is first checked readable by `user` (so the daemon
    /// never reads a file for a user who could not), then opened as the daemon.
    Task<void> ensure_open(std::shared_ptr<ImageSlot> slot, const io::HostFile& image, bool writable_wanted,
                           const io::Credentials& user);
    /// The options ensure_open opens the slot's image with (not yet `writable`): the opener that
    /// takes every file through policy_ on behalf of `user` and records it in `files`, the cache
    /// sizes, and the corruption report.
    qcow2::OpenOptions open_options(const std::shared_ptr<ImageSlot>& slot, const io::Credentials& user,
                                    std::shared_ptr<std::vector<io::HostFile>> files);
    /// The host file behind an image node, as the scan saw it.
    static io::HostFile host_file_of(const Node& node);
    /// Drops a handle of `slot`; after the last one, closes its image under its lock.
    void release_slot(const std::shared_ptr<ImageSlot>& slot);
    /// Writes back the cache and closes the image (if it has no handles, or `force`); removes the
    /// slot from the registry. Errors are logged. Under the slot's lock.
    Task<void> close_slot(std::shared_ptr<ImageSlot> slot, bool force);
    /// The closing part of close_slot (lifecycle held, disk open): a failed write-back is logged
    /// as lost data, then the image is closed and the disk dropped.
    Task<void> close_disk(ImageSlot& slot);
    /// Durable write-back (Disk::flush) if the disk has changed since the last one.
    Task<void> flush_slot(std::shared_ptr<ImageSlot> slot);
    /// Whether reads of image (dev, ino) copy backing data into it: its xattr setting, else
    /// -o copy_on_read. Any thread.
    bool copy_on_read_for(uint64_t dev, uint64_t ino) const;
    /// Why `node` cannot be opened for writing, or "" if it can.
    std::string write_refusal(const Node& node) const;
    /// Rescans every scan_interval_ms, or sooner when fresh_scan() asks; answers the askers.
    void scanner_loop();
    /// Completes once the view is no older than this call: a scan that started after it has been
    /// published (or failed, or the scanner stopped; kFreshScanLimit at most). For a request that
    /// found an image gone from the path the view has for it (renamed since the scan, or a scan
    /// that ran across a rename): the fresh view has it under its new path, or no longer has it.
    /// Must be awaited on a strand or an image's executor.
    Task<void> fresh_scan();
    /// Calls `redo` (a request handler again, which then replies) on serve_strand_ once
    /// fresh_scan() completes; inside requests_, so shutdown waits for it.
    void redo_after_scan(std::function<void()> redo);
    static constexpr std::chrono::milliseconds kRequestedScanGap{50};
    static constexpr std::chrono::seconds kFreshScanLimit{10};
    std::shared_ptr<const Tree> tree() const;
    /// Attributes to expose for `node` of `tree` (read-only adjustments applied; the live size of
    /// an open or just closed image instead of the scanned one).
    struct stat attr_of(const Tree& tree, const Node& node) const;
    /// Runs `body` (an awaitable, or a function returning one) as a coroutine on `executor`
    /// inside requests_: drain() waits for it. An exception escaping it is logged.
    template <class Executor, class Body>
    void spawn(const Executor& executor, Body body);
    /// Logs "WHAT failed: ..." if `error` holds an exception: the completion of every coroutine
    /// the file system starts, so that none is dropped unseen.
    static void log_failure(const std::string& what, std::exception_ptr error);

    Workers& workers_;
    FsOptions options_;
    io::HostPolicy policy_;  // fixed once serving starts
    Scanner scanner_;
    ImageRegistry images_;
    std::unique_ptr<InodeTable> inodes_;
    /// Per worker: the strand of its /dev/fuse reader and the reader's wait on the device (a
    /// dup() of the session's descriptor, so each worker's epoll watches its own; only that
    /// strand touches it).
    struct Reader {
        explicit Reader(asio::io_context& io) : strand(asio::make_strand(io)) {}
        asio::strand<asio::io_context::executor_type> strand;
        std::unique_ptr<asio::posix::stream_descriptor> device;
    };
    static std::vector<std::unique_ptr<Reader>> make_readers(Workers& workers);
    /// Requests a reader takes from /dev/fuse before it lets its worker's queue run (serve).
    static constexpr unsigned kRequestsPerYield = 4;
    /// A reader's buffer: the largest request (a write of max_write = 1 MiB) and its headers.
    static constexpr size_t kRequestBufferBytes = (1u << 20) + (64u << 10);
    /// A spare request buffer, or a new one.
    RequestBuffer request_buffer();
    /// The buffer of the request this worker is processing now, if `data` lies in it: handed
    /// over (the reader takes another), so that a large write keeps its bytes without a copy.
    /// Only inside a libfuse callback; null otherwise.
    RequestBuffer take_request_buffer(const char* data, size_t size);
    std::mutex spare_mutex_;  // leaf lock; guards spare_buffers_
    std::vector<char*> spare_buffers_;  // at most kSpareBuffers
    // Enough for a queue of 1 MiB writes (fio at QD8, the kernel's readahead-sized writeback)
    // to take them over without a new buffer each; kept only once such a burst came.
    static constexpr size_t kSpareBuffers = 8;
    std::vector<std::unique_ptr<Reader>> readers_;
    asio::strand<asio::io_context::executor_type>& serve_strand_;  // worker 0's reader strand
    std::atomic<unsigned> serving_{0};  // readers still running
    fuse_session* session_ = nullptr;
    /// Handles opened with O_DIRECT bypass the kernel's page cache (FOPEN_DIRECT_IO): set by
    /// init() where the kernel keeps other handles' cached pages right under direct writes.
    std::atomic<bool> direct_io_for_o_direct_{false};
    std::function<void()> on_finished_;
    std::atomic<bool> stopping_{false};
    Gate requests_;  // every coroutine spawn() starts; its waiter runs on serve_strand_
    std::unique_ptr<asio::steady_timer> writeback_timer_;  // serve_strand_ only

    /// Copy-on-read set per image through its xattr (host identity -> on), for the mount's life.
    mutable std::mutex copy_on_read_mutex_;  // leaf lock; guards copy_on_read_
    std::map<std::pair<uint64_t, uint64_t>, bool> copy_on_read_;

    mutable std::mutex tree_mutex_;  // guards tree_
    std::shared_ptr<const Tree> tree_;

    std::mutex scan_mutex_;  // guards scan_stop_, scan_waiters_
    std::condition_variable scan_cv_;
    bool scan_stop_ = false;
    std::vector<std::function<void()>> scan_waiters_;  // fresh_scan()s waiting: called after the next scan
    std::thread scan_thread_;
};

template <class Ex, class Body>
void Filesystem::spawn(const Ex& executor, Body body) {
    requests_.enter();
    asio::co_spawn(executor, std::move(body), [this](std::exception_ptr error) {
        log_failure("a request", error);
        requests_.leave();
    });
}

}  // namespace qcowfs::fs
