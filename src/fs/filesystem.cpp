// Filesystem lifetime: the scanner thread, the /dev/fuse reader, image open/close, periodic
// write-back, and orderly shutdown.
#include "qcowfs/fs/filesystem.hpp"

#include <fcntl.h>
#include <fuse_lowlevel.h>

#include <boost/asio/as_tuple.hpp>
#include <algorithm>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstring>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/file.hpp"
#include "qcowfs/qcow2/disk.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::fs {

std::vector<std::unique_ptr<Filesystem::Reader>> Filesystem::make_readers(Workers& workers) {
    std::vector<std::unique_ptr<Reader>> readers;
    for (unsigned i = 0; i < workers.size(); ++i) readers.push_back(std::make_unique<Reader>(workers.context(i)));
    return readers;
}

Filesystem::Filesystem(Workers& workers, FsOptions options)
    : workers_(workers),
      options_(std::move(options)),
      scanner_(options_.source_dir, ScanOptions{&policy_, options_.mountpoint, !options_.read_only}),
      images_(workers),
      readers_(make_readers(workers)),
      serve_strand_(readers_[0]->strand),
      requests_(serve_strand_) {
    policy_.allowed_dirs.push_back(options_.source_dir);
    for (const auto& d : options_.allow_dirs) policy_.allowed_dirs.push_back(d);
    policy_.own_mount = options_.mountpoint;
    policy_.locking = !options_.force_share;
}

namespace {
/// A request buffer starts this far into a page-aligned allocation, so that a write's bytes (after
/// struct fuse_in_header and struct fuse_write_in, 40 bytes each) start on a page: the copy into
/// the image file's page cache goes page to page, and a write could go to the host with O_DIRECT
/// straight from the buffer (qcowfs did until write-behind, io::File::write_at, proved faster).
constexpr size_t kPageBytes = 4096;
constexpr size_t kWritePayloadOffset = 40 + 40;
constexpr size_t kSkew = kPageBytes - kWritePayloadOffset;

char* new_request_buffer(size_t bytes) {
    return static_cast<char*>(::operator new[](kSkew + bytes, std::align_val_t{kPageBytes})) + kSkew;
}
void free_request_buffer(char* p) { ::operator delete[](p - kSkew, std::align_val_t{kPageBytes}); }
}  // namespace

Filesystem::~Filesystem() {
    stop_scanner();
    if (scan_thread_.joinable()) scan_thread_.join();
    for (char* p : spare_buffers_) free_request_buffer(p);
}

void Filesystem::stop_scanner() {
    {
        std::lock_guard lock(scan_mutex_);
        scan_stop_ = true;
    }
    scan_cv_.notify_all();
}

void Filesystem::log_failure(const std::string& what, std::exception_ptr error) {
    if (!error) return;
    try {
        std::rethrow_exception(error);
    } catch (const std::exception& e) {
        log::error(what + " failed: " + e.what());
    } catch (...) {
        log::error(what + " failed");
    }
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
    auto last_end = std::chrono::steady_clock::time_point{};
    while (!scan_stop_) {
        // A request that found the view behind the host asks for a scan now; requested scans still
        // keep kRequestedScanGap between them, so requests cannot keep the scanner busy.
        scan_cv_.wait_for(lock, std::chrono::milliseconds(options_.scan_interval_ms),
                          [this] { return scan_stop_ || !scan_waiters_.empty(); });
        if (scan_stop_) break;
        if (!scan_waiters_.empty()) {
            const auto gap_end = last_end + kRequestedScanGap;
            if (scan_cv_.wait_until(lock, gap_end, [this] { return scan_stop_; })) break;
        }
        // Whoever asked before the scan starts is answered by it: it reads the directory later.
        std::vector<std::function<void()>> answered = std::move(scan_waiters_);
        scan_waiters_.clear();
        lock.unlock();
        try {
            auto tree = scanner_.scan();
            std::lock_guard tree_lock(tree_mutex_);
            tree_ = std::move(tree);
        } catch (const std::system_error& e) {
            // Keep serving the last good view; say so once.
            images_.report(options_.source_dir, describe(e));
        } catch (const std::exception& e) {
            images_.report(options_.source_dir, std::string("directory scan failed: ") + e.what());
        }
        for (auto& wake : answered) wake();
        last_end = std::chrono::steady_clock::now();
        lock.lock();
    }
    // Stopping: nobody waits for a scan that will not come.
    std::vector<std::function<void()>> answered = std::move(scan_waiters_);
    scan_waiters_.clear();
    lock.unlock();
    for (auto& wake : answered) wake();
}

Task<void> Filesystem::fresh_scan() {
    // The caller runs on a strand or under an image lock: the wake-up posted to its executor cannot
    // run before the wait starts.
    auto timer = std::make_shared<asio::steady_timer>(co_await asio::this_coro::executor, kFreshScanLimit);
    {
        std::lock_guard lock(scan_mutex_);
        if (scan_stop_) co_return;
        scan_waiters_.push_back([timer] { asio::post(timer->get_executor(), [timer] { timer->cancel(); }); });
    }
    scan_cv_.notify_all();
    co_await timer->async_wait(asio::as_tuple(asio::use_awaitable));  // cancelled: the scan is in
}

void Filesystem::redo_after_scan(std::function<void()> redo) {
    spawn(serve_strand_, [this, redo = std::move(redo)]() -> Task<void> {
        co_await fresh_scan();
        redo();
    });
}

void Filesystem::start(fuse_session* session, std::function<void()> on_finished) {
    session_ = session;
    on_finished_ = std::move(on_finished);
    scan_thread_ = std::thread([this] { scanner_loop(); });
    writeback_timer_ = std::make_unique<asio::steady_timer>(serve_strand_);
    asio::co_spawn(serve_strand_, writeback_loop(),
                   [](std::exception_ptr error) { log_failure("the periodic write-back", error); });
    int fd = fuse_session_fd(session_);
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    serving_ = static_cast<unsigned>(readers_.size());
    for (unsigned i = 0; i < readers_.size(); ++i) {
        asio::co_spawn(readers_[i]->strand, serve(i), [this](std::exception_ptr error) {
            // serve() handles its own errors; anything escaping still ends the mount cleanly.
            if (!error) return;
            log_failure("request loop", error);
            stop();
            if (--serving_ == 0)
                asio::co_spawn(serve_strand_, drain(), [](std::exception_ptr e) { log_failure("shutdown", e); });
        });
    }
}

void Filesystem::stop() {
    if (stopping_.exchange(true)) return;
    if (session_) fuse_session_exit(session_);
    stop_readers();
}

void Filesystem::stop_readers() {
    // Wake each reader, which waits on its strand, so it notices.
    for (auto& r : readers_)
        asio::post(r->strand, [reader = r.get()] {
            if (reader->device) reader->device->cancel();
        });
}

namespace {
constexpr size_t kRequestHeaderBytes = 40;  // struct fuse_in_header
/// The request buffer this thread's reader is processing a request from (inside
/// fuse_session_process_buf), for take_request_buffer.
thread_local Filesystem::RequestBuffer* processing = nullptr;
}  // namespace

void Filesystem::BufferReturn::operator()(char* p) const {
    if (!p) return;
    {
        std::lock_guard lock(fs->spare_mutex_);
        if (fs->spare_buffers_.size() < kSpareBuffers) {
            fs->spare_buffers_.push_back(p);
            return;
        }
    }
    free_request_buffer(p);
}

Filesystem::RequestBuffer Filesystem::request_buffer() {
    {
        std::lock_guard lock(spare_mutex_);
        if (!spare_buffers_.empty()) {
            char* p = spare_buffers_.back();
            spare_buffers_.pop_back();
            return RequestBuffer(p, BufferReturn{this});
        }
    }
    return RequestBuffer(new_request_buffer(kRequestBufferBytes), BufferReturn{this});
}

Filesystem::RequestBuffer Filesystem::take_request_buffer(const char* data, size_t size) {
    if (!processing || !*processing) return RequestBuffer(nullptr, BufferReturn{this});
    const char* begin = processing->get();
    if (data < begin || data + size > begin + kRequestBufferBytes) return RequestBuffer(nullptr, BufferReturn{this});
    return std::move(*processing);
}

Task<void> Filesystem::serve(unsigned worker) {
    Reader& reader = *readers_[worker];
    // Each reader reads its own dup() of the device, watched by its own worker's epoll; a request
    // is taken by whichever worker reads first. It reads with plain non-blocking read()s while
    // requests are there, and waits through async_read_some, which registers the descriptor
    // once: async_wait would re-arm it with an epoll_ctl at every wait (one per request).
    // stop() cancels the wait through reader.device, on this strand; a stop() that came before
    // the device existed is seen through stopping_.
    int fd = ::dup(fuse_session_fd(session_));
    if (fd < 0) fail(errno, "dup of /dev/fuse failed");
    reader.device = std::make_unique<asio::posix::stream_descriptor>(reader.strand, fd);
    // The kernel refuses reads into a buffer smaller than the largest request (a write of
    // max_write bytes and its headers).
    RequestBuffer mem = request_buffer();
    bool ended = false;
    unsigned since_yield = 0;
    while (!ended && !stopping_ && !fuse_session_exited(session_)) {
        // A request usually runs to its reply inside fuse_session_process_buf, and its last step
        // (the coroutine's completion, which frees its frame and buffers) is queued on this
        // worker's loop. While replies come fast enough that /dev/fuse is never empty, the loop
        // would never get to that queue: frames would pile up without bound, and everything
        // else queued here (wake-ups, timers, other images' work) would wait. So it lets the
        // queue run every few requests.
        if (++since_yield > kRequestsPerYield) {
            since_yield = 0;
            co_await asio::post(reader.strand, asio::use_awaitable);
        }
        if (!mem) mem = request_buffer();  // the last one went with a write (take_request_buffer)
        ssize_t n = ::read(fd, mem.get(), kRequestBufferBytes);
        int error = n < 0 ? errno : 0;
        if (error == EAGAIN) {
            auto [ec, got] = co_await reader.device->async_read_some(asio::buffer(mem.get(), kRequestBufferBytes),
                                                                   asio::as_tuple(asio::use_awaitable));
            n = static_cast<ssize_t>(got);
            error = ec == asio::error::eof ? ENODEV : ec.value();
            if (ec == asio::error::operation_aborted) continue;  // stop(): the loop condition ends it
        }
        if (error == EINTR || error == EAGAIN || error == ENOENT) continue;  // ENOENT: the request was interrupted
        if (error || n == 0) {
            if (error && error != ENODEV) log::error(std::string("reading /dev/fuse failed: ") + std::strerror(error));
            ended = true;  // ENODEV: unmounted
            break;
        }
        if (static_cast<size_t>(n) < kRequestHeaderBytes) {
            log::error("short read on /dev/fuse: " + std::to_string(n) + " bytes");
            continue;
        }
        fuse_buf buf{};
        buf.mem = mem.get();
        buf.size = static_cast<size_t>(n);
        processing = &mem;
        fuse_session_process_buf(session_, &buf);
        processing = nullptr;
    }
    reader.device.reset();  // closes the dup
    // The first reader to end ends the others; the last one starts the drain (on worker 0's
    // reader strand, the gate's).
    if (!stopping_.exchange(true)) stop_readers();
    if (--serving_ == 0)
        asio::co_spawn(serve_strand_, drain(), [](std::exception_ptr e) { log_failure("shutdown", e); });
}

Task<void> Filesystem::drain() {
    if (writeback_timer_) writeback_timer_->cancel();  // writeback_loop sees stopping_ and ends
    if (!co_await requests_.wait_empty(std::chrono::seconds(60)))
        log::error("gave up waiting for " + std::to_string(requests_.count()) + " requests");
    // Unmounted or stopped with images still open (the kernel sends no more releases): close each
    // as the last release would, so every image is left written back and clean.
    for (const auto& slot : images_.all()) spawn(slot->executor(), close_slot(slot, true));
    if (!co_await requests_.wait_empty(std::chrono::seconds(120)))
        log::error("gave up waiting for " + std::to_string(requests_.count()) + " image closes");
    stop_scanner();
    if (on_finished_) on_finished_();
}

Task<void> Filesystem::writeback_loop() {
    // Like a journaling file system's commit interval: changed images are made durable every few
    // seconds, so a crash or power cut loses at most that much of what was written.
    while (!stopping_) {
        writeback_timer_->expires_after(std::chrono::milliseconds(options_.writeback_interval_ms));
        co_await writeback_timer_->async_wait(asio::as_tuple(asio::use_awaitable));  // cancelled: stopping
        if (stopping_) break;
        for (const auto& slot : images_.all()) spawn(slot->executor(), flush_slot(slot));
    }
}

Task<void> Filesystem::ensure_open(std::shared_ptr<ImageSlot> slot, const io::HostFile& image, bool writable_wanted,
                                   const io::Credentials& user) {
    // One open or close per image at a time; later handles share the Disk.
    auto guard = co_await slot->lifecycle.lock();
    if (slot->disk) co_return;
    // The slot may outlive a rename (an open that failed, a close that is still running): open
    // the image where the view has it now.
    slot->path = image.path;
    slot->follow_final = image.follow_final;
    auto files = std::make_shared<std::vector<io::HostFile>>();
    qcow2::OpenOptions options = open_options(slot, user, files);
    options.writable = writable_wanted && !slot->corrupt;
    qcow2::DiskOptions disk_options;
    disk_options.write_cache_bytes = options_.write_cache_bytes;
    disk_options.on_resize = [&live_size = slot->live_size](uint64_t size) { live_size = size; };
    slot->disk = co_await qcow2::Disk::open(slot->path, std::move(options), std::move(disk_options));
    slot->live_size = slot->disk->size();
    slot->files = std::move(*files);
    slot->disk->set_copy_on_read(copy_on_read_for(slot->dev, slot->ino));
}

bool Filesystem::copy_on_read_for(uint64_t dev, uint64_t ino) const {
    std::lock_guard lock(copy_on_read_mutex_);
    auto it = copy_on_read_.find({dev, ino});
    return it != copy_on_read_.end() ? it->second : options_.copy_on_read;
}

qcow2::OpenOptions Filesystem::open_options(const std::shared_ptr<ImageSlot>& slot, const io::Credentials& user,
                                            std::shared_ptr<std::vector<io::HostFile>> files) {
    qcow2::OpenOptions options;
    // Every file goes through the host policy; each one opened is recorded for the access checks
    // of later requests. The image is the file the scan saw; any other path is a file it depends
    // on: its data file when opened for writing (only the top image's is), else a backing file or
    // a read-only data file, which get the same rules.
    options.opener = [this, slot, files, user](const std::string& path, bool writable) {
        io::HostOpen request;
        request.path = path;
        request.writable = writable;
        request.on_behalf_of = &user;
        if (path == slot->path) {
            request.role = io::FileRole::image;
            request.follow_final = slot->follow_final;
            request.expect = io::FileIdentity{slot->dev, slot->ino};
        } else {
            request.role = writable ? io::FileRole::data_file : io::FileRole::backing;
        }
        io::FileIdentity identity;
        auto file = io::open_host_file(workers_.context(0).get_executor(), policy_, request, &identity);
        io::HostFile record{path, request.role, request.follow_final, identity};
        bool known = std::any_of(files->begin(), files->end(), [&](const io::HostFile& f) {
            return f.path == record.path && f.identity == record.identity;
        });
        if (!known) files->push_back(std::move(record));
        return file;
    };
    options.l2_cache_bytes = options_.l2_cache_bytes;
    options.compressed_cache_bytes = options_.compressed_cache_bytes;
    options.refcount_memory = options_.refcount_memory_bytes;
    options.scan_limit = options_.scan_limit_bytes;
    options.on_corrupt = [this, weak = std::weak_ptr<ImageSlot>(slot)](const std::string& reason) {
        auto s = weak.lock();
        if (!s) return;
        s->corrupt = true;
        // The failing request and the close that follow add no more lines (but loss lines).
        images_.report_corrupt(s->path, reason);
    };
    return options;
}

Task<void> Filesystem::open_for(std::shared_ptr<ImageSlot> slot, const io::HostFile& image, bool writable_wanted,
                                const io::Credentials& user, bool for_writing) {
    co_await ensure_open(slot, image, writable_wanted, user);
    // Whoever opened the image first, this user gets only what the host would give them: checked
    // on the image where the view has it now (it may have been renamed since it was opened), and
    // on the files it depends on where they were opened.
    std::vector<io::HostFile> files = slot->files;
    for (io::HostFile& f : files) {
        if (f.role != io::FileRole::image || f.identity != image.identity) continue;
        f.path = image.path;
        f.follow_final = image.follow_final;
    }
    // The image's directory renamed with the chain in it: the files it depends on went along.
    // Tried first where the image went; every file must still be the open one either way.
    auto parent = [](const std::string& path) { return path.substr(0, path.rfind('/') + 1); };
    const std::string from = parent(slot->path), to = parent(image.path);
    bool checked = false;
    if (from != to) {
        std::vector<io::HostFile> moved = files;
        bool any = false;
        for (io::HostFile& f : moved) {
            if (f.role == io::FileRole::image || !f.path.starts_with(from)) continue;
            f.path = to + f.path.substr(from.size());
            any = true;
        }
        if (any) {
            try {
                io::check_user_access(policy_, user, moved, for_writing);
                checked = true;
            } catch (const std::system_error&) {
                // Not all of them went along: the paths they were opened by decide.
            }
        }
    }
    if (!checked) io::check_user_access(policy_, user, files, for_writing);
    if (for_writing && slot->disk->writable() && !slot->corrupt) slot->disk->image().lock_for_writing();
}

io::HostFile Filesystem::host_file_of(const Node& node) {
    return io::HostFile{node.image->path, io::FileRole::image, node.image->path_is_symlink,
                        io::FileIdentity{node.key.dev, node.key.ino}};
}

void Filesystem::release_slot(const std::shared_ptr<ImageSlot>& slot) {
    if (images_.release(slot)) spawn(slot->executor(), close_slot(slot, false));
}

Task<void> Filesystem::close_slot(std::shared_ptr<ImageSlot> slot, bool force) {
    {
        auto guard = co_await slot->lifecycle.lock();
        // An open that came in since the last release keeps the image (it waited for this lock
        // and finds it open); a close that forced its way at shutdown needs no second try.
        if (!force && images_.handles(slot) > 0) co_return;
        if (slot->disk) co_await close_disk(*slot);
    }
    if (!force) images_.remove_if_unused(slot);
}

Task<void> Filesystem::close_disk(ImageSlot& slot) {
    qcow2::Disk& disk = *slot.disk;
    try {
        co_await disk.write_back();
    } catch (const std::system_error& e) {
        // What the cache still holds is dropped with it: say exactly what.
        images_.report_loss(slot.path, disk.lost_writes("writing back at close failed: " + describe(e)));
    }
    // What the last durable flush did not cover depends on the metadata the close writes.
    const bool unflushed = disk.changed_since_flush();
    try {
        co_await disk.close();
    } catch (const std::system_error& e) {
        if (unflushed)
            images_.report_loss(slot.path, "closing the image failed before its metadata was on disk, so what was "
                                           "written since the last fsync or periodic write-back may read as "
                                           "before: " + describe(e));
        else
            images_.report(slot.path, "closing the image failed: " + describe(e));
    }
    images_.closed(slot, disk.size());
    slot.disk.reset();  // the cache, then the active view, then the image
    slot.live_size = ImageSlot::kUnknownSize;
}

Task<void> Filesystem::flush_slot(std::shared_ptr<ImageSlot> slot) {
    auto guard = co_await slot->lifecycle.lock();
    if (!slot->disk || !slot->disk->changed_since_flush()) co_return;
    try {
        co_await slot->disk->flush();
    } catch (const std::system_error& e) {
        images_.report(slot->path, "periodic write-back failed (the data stays cached, retried later): " + describe(e));
    }
}

}  // namespace qcowfs::fs
