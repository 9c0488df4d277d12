// Host file I/O: io_uring-backed File through Asio's random_access_file, and the MemFile double.
#include "qcowfs/io/file.hpp"
#include "qcowfs/util/workers.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/random_access_file.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>

#include "qcowfs/format/error.hpp"
#include "qcowfs/util/log.hpp"

namespace qcowfs::io {
namespace {

// ---- QEMU's image locking protocol -----------------------------------------------------------
// QEMU (block/file-posix.c) takes OFD locks, which belong to an open file description, so dup()s
// share them and they go away when the last descriptor of the open closes. One byte per
// permission: 100 + bit is read-locked while the permission is held, 200 + bit while it is not
// shared. A conflict is another description's lock on the byte that our own lock tests.
constexpr off_t kLockPermBase = 100;
constexpr off_t kLockSharedBase = 200;
constexpr int kPermCount = 4;  // consistent read, write, write unchanged, resize (QEMU 7.2: BLK_PERM_ALL)
constexpr const char* kPermNames[kPermCount] = {"consistent read", "write", "write unchanged", "resize"};
constexpr unsigned kPermRead = 1u << 0, kPermWrite = 1u << 1, kPermResize = 1u << 3;

unsigned held_perms(LockMode m) {
    switch (m) {
        case LockMode::none: return 0;
        case LockMode::read: return kPermRead;
        case LockMode::write: return kPermRead | kPermWrite | kPermResize;
    }
    return 0;
}
unsigned unshared_perms(LockMode m) { return m == LockMode::none ? 0 : kPermWrite | kPermResize; }

/// Read-locks (or unlocks) one byte. Returns 0 or the errno.
int lock_byte(int fd, off_t byte, bool lock) {
    struct flock fl {};
    fl.l_type = lock ? F_RDLCK : F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    return ::fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : errno;
}

/// True when another open file description holds a lock on `byte`.
bool byte_taken(int fd, off_t byte) {
    struct flock fl {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = byte;
    fl.l_len = 1;
    if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return false;
    return fl.l_type != F_UNLCK;
}

/// Sets exactly the lock bytes of `mode`. Returns 0 or the errno of the first refusal.
int apply_lock_bytes(int fd, LockMode mode) {
    unsigned held = held_perms(mode), unshared = unshared_perms(mode);
    for (int i = 0; i < kPermCount; ++i) {
        if (int e = lock_byte(fd, kLockPermBase + i, held & (1u << i))) return e;
        if (int e = lock_byte(fd, kLockSharedBase + i, unshared & (1u << i))) return e;
    }
    return 0;
}

/// QEMU's words for the first conflict of `mode` with other users' locks, or "" if none.
std::string lock_conflict(int fd, LockMode mode) {
    unsigned held = held_perms(mode), unshared = unshared_perms(mode);
    for (int i = 0; i < kPermCount; ++i) {
        if ((held & (1u << i)) && byte_taken(fd, kLockSharedBase + i))
            return std::string("Failed to get \"") + kPermNames[i] + "\" lock";
        if ((unshared & (1u << i)) && byte_taken(fd, kLockPermBase + i))
            return std::string("Failed to get shared \"") + kPermNames[i] + "\" lock";
    }
    return {};
}

/// Threads for the system calls io_uring is not asked to do (fdatasync, fallocate, ftruncate), so
/// they never block a thread that serves requests.
asio::thread_pool& blocking_pool() {
    static asio::thread_pool pool(2);
    return pool;
}

/// Runs `fn` on the blocking-call pool and resumes the caller on its own executor with fn's
/// result (or exception).
template <class Fn>
Task<std::invoke_result_t<Fn&>> blocking(Fn fn) {
    using R = std::invoke_result_t<Fn&>;
    co_return co_await asio::co_spawn(
        blocking_pool(), [&fn]() -> asio::awaitable<R> { co_return fn(); }, asio::use_awaitable);
}

/// A host file: reads of what the page cache lacks go through io_uring, on the calling worker's
/// ring; cached reads and every write are plain system calls (see read_at, write_at). Asio
/// submits one operation per I/O object and direction at a time (the ordering stream sockets need), so a single random_access_file would
/// serialize every read of an image. Each operation therefore takes an idle channel: its own
/// random_access_file over a dup() of the descriptor, created on demand up to kMaxChannels.
class UringFile final : public File {
public:
    static constexpr size_t kMaxChannels = 32;

    UringFile(const Executor& ex, int fd, std::string path) : executor_(ex), fd_(fd), path_(std::move(path)) {
        channels_.push_back(make_channel(fd, executor_));
    }

    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override {
        // What the page cache holds is copied at once: a ring round trip (submission, eventfd,
        // epoll, completion) costs more than the copy of a few pages. RWF_NOWAIT fails with
        // EAGAIN instead of waiting for the disk; the rest then goes through the ring.
        // The copy runs with the image's lock let go (unlocked), so that other requests of the
        // image go on meanwhile on another worker.
        size_t done = unlocked([&] { return read_cached(offset, buf); });
        if (done == kEndOfFile) co_return 0;
        if (done == buf.size()) co_return done;
        Lease lease(*this);
        while (done < buf.size()) {
            auto [ec, n] = co_await lease->file.async_read_some_at(
                offset + done, asio::buffer(buf.data() + done, buf.size() - done), asio::as_tuple(asio::use_awaitable));
            if (ec == asio::error::eof || (!ec && n == 0)) break;
            if (ec) fail(ec.value(), "read of " + path_ + " at " + std::to_string(offset + done) + " failed");
            done += n;
        }
        co_return done;
    }

    /// A copy-on-write reads old data to write it to another cluster: the image keeps it from
    /// then on, so the backing file's cached copy would help nobody. When none of the range is
    /// in the page cache, it is read with O_DIRECT through the ring, straight into the caller's
    /// buffer: no new page-cache pages, no readahead past the range (a buffered 64 KiB read of
    /// a random cluster reads 128 KiB), no copy out of the cache. Cached ranges, unaligned ones,
    /// kernels without cachestat (before 6.5) and host file systems without O_DIRECT are read
    /// as by read_at. A direct read of pages dirtied meanwhile is still right: the kernel writes
    /// them back before it reads.
    Task<size_t> read_to_copy(uint64_t offset, std::span<std::byte> buf) override {
        if (!direct_aligned(offset, buf) || !none_cached(offset, buf.size()) || !open_direct())
            co_return co_await read_at(offset, buf);
        Lease lease(*this, Kind::direct);
        size_t done = 0;
        while (done < buf.size()) {
            auto [ec, n] = co_await lease->file.async_read_some_at(
                offset + done, asio::buffer(buf.data() + done, buf.size() - done), asio::as_tuple(asio::use_awaitable));
            if (ec == asio::error::eof || (!ec && n == 0)) break;
            if (ec == asio::error::invalid_argument && done == 0) {
                // An alignment this host file system refuses: buffered from now on.
                direct_ = Direct::off;
                log::info(path_ + ": the host file system refuses aligned O_DIRECT reads; copy-on-write reads go "
                          "through the page cache");
                co_return co_await read_at(offset, buf);
            }
            if (ec) fail(ec.value(), "read of " + path_ + " at " + std::to_string(offset + done) + " failed");
            done += n;
            if (done % kDirectAlign != 0) {  // a short read at the end of the file
                done += co_await read_at(offset + done, buf.subspan(done));
                break;
            }
        }
        co_return done;
    }

    static constexpr uint64_t kDirectAlign = 4096;  // offsets, lengths and memory of direct reads
    bool direct_aligned(uint64_t offset, std::span<std::byte> buf) const {
        return direct_ != Direct::off && !buf.empty() && offset % kDirectAlign == 0 && buf.size() % kDirectAlign == 0 &&
               reinterpret_cast<uintptr_t>(buf.data()) % kDirectAlign == 0;
    }

    /// True when no page of [offset, offset + length) is in the page cache (cachestat, Linux
    /// 6.5); false when some is, or when the kernel cannot tell. Starts no I/O: a preadv2 with
    /// RWF_NOWAIT would start readahead on a miss.
    bool none_cached(uint64_t offset, uint64_t length) {
#ifdef __NR_cachestat
        constexpr long kCachestat = __NR_cachestat;
#else
        constexpr long kCachestat = 451;  // the same number on every architecture
#endif
        struct {
            uint64_t off, len;
        } range{offset, length};
        struct {
            uint64_t cache, dirty, writeback, evicted, recently_evicted;
        } stat{};
        if (::syscall(kCachestat, fd_, &range, &stat, 0) != 0) {
            if (errno == ENOSYS) direct_ = Direct::off;
            return false;
        }
        return stat.cache == 0;
    }

    /// The O_DIRECT descriptor, opened at the first direct read: a new open of the same file
    /// through /proc/self/fd (never through its path again, which may name another file by
    /// now), read-only, and checked to be the same inode.
    bool open_direct() {
        if (direct_ == Direct::on) return true;
        std::lock_guard lock(mutex_);
        if (direct_ == Direct::on) return true;
        if (direct_ == Direct::off) return false;
        direct_ = Direct::off;
        const std::string self = "/proc/self/fd/" + std::to_string(fd_);
        int fd = ::open(self.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {  // no /proc, or a host file system without O_DIRECT (EINVAL)
            log::info(path_ + ": no O_DIRECT descriptor (" + std::strerror(errno) +
                      "); copy-on-write reads go through the page cache");
            return false;
        }
        struct stat a, b;
        if (::fstat(fd_, &a) != 0 || ::fstat(fd, &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) {
            ::close(fd);
            return false;
        }
        try {
            channels_.push_back(make_channel(fd, executor_, Kind::direct));  // closes fd if it throws
        } catch (const std::system_error& e) {
            log::info(path_ + ": " + e.what() + "; copy-on-write reads go through the page cache");
            return false;
        }
        direct_ = Direct::on;
        return true;
    }

    static constexpr size_t kEndOfFile = SIZE_MAX;
    /// Bytes copied from the page cache at `offset` without waiting for the disk (0 if the first
    /// page is not cached, or on any error: the ring path then reads and reports it), or
    /// kEndOfFile when `offset` is at or past the end of the file.
    size_t read_cached(uint64_t offset, std::span<std::byte> buf) const {
        size_t done = 0;
        while (done < buf.size()) {
            iovec iov{buf.data() + done, buf.size() - done};
            ssize_t n = ::preadv2(fd_, &iov, 1, static_cast<off_t>(offset + done), RWF_NOWAIT);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) break;
            if (n == 0) return done == 0 ? kEndOfFile : done;
            done += static_cast<size_t>(n);
        }
        return done;
    }

    /// Writes go to the page cache with pwritev, not through io_uring: io_uring cannot do a
    /// buffered write on ext4 without blocking, so it hands each one to a kernel worker thread
    /// and the completion comes back through the eventfd and epoll, two thread switches for a
    /// copy of a few pages (measured under 4 KiB random writes: 17 % of the daemon's time in
    /// io-wq workers, 23 % in the scheduler). The write runs on the calling thread with the
    /// image's lock let go (unlocked), so that the image's other requests go on meanwhile on
    /// another worker. The cost: while the kernel throttles a writer for dirty pages, this worker
    /// waits too. Streaming writes are written behind (write_behind).
    ///
    /// Smaller writes are combined: one thread at a time writes the file (the writer), and a
    /// write that arrives meanwhile is queued and its coroutine parked, so its worker serves
    /// other requests instead of spinning in the kernel on the inode lock the writer holds
    /// (measured under copy-on-write 4 KiB writes on two workers: 13 % of all CPU time in that
    /// spin). The writer writes its own bytes, then everything queued, adjacent writes in one
    /// pwritev, and resumes each queued coroutine on its own executor when its bytes are in the
    /// page cache. After kWriterRounds rounds it hands the writer's role to the oldest queued
    /// write, so no request waits long for others' writes.
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
        if (buf.size() >= kStreamBytes) {
            unlocked([&] {
                write_all(offset, buf);
                write_behind(offset, buf.size());
            });
            co_return;
        }
        QueuedWrite me;
        me.offset = offset, me.buf = buf;
        bool writer = false;
        {
            std::lock_guard lock(queue_mutex_);
            if (!writing_) writing_ = writer = true;
        }
        if (!writer) {
            co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
                [this, &me](auto handler) {
                    Executor ex = asio::get_associated_executor(handler);
                    std::unique_lock lock(queue_mutex_);
                    if (!writing_) {
                        // The writer left between the look above and now: this one writes.
                        writing_ = true;
                        me.take_over = true;
                        lock.unlock();
                        asio::post(ex, std::move(handler));
                        return;
                    }
                    me.executor = std::move(ex);
                    // Not by assignment: Boost 1.81's move assignment of any_completion_handler
                    // copies its argument as an lvalue, which wraps it in itself endlessly.
                    asio::any_completion_handler<void()> resume(std::move(handler));
                    me.resume.swap(resume);
                    (queue_tail_ ? queue_tail_->next : queue_head_) = &me;
                    queue_tail_ = &me;
                },
                asio::use_awaitable);
            writer = me.take_over;
        }
        if (writer) unlocked([&] { write_queued(me); });
        if (me.error != 0) fail(me.error, "write of " + path_ + " at " + std::to_string(offset) + " failed");
    }

    /// Streaming writes (kStreamBytes or more: dd, cp, a guest's sequential writes) are written
    /// behind: the disk starts on each one as soon as it is in the page cache, and once more
    /// than kBehindBytes of them are in flight, the oldest is waited for and its pages are
    /// dropped from the cache. So the disk writes while the daemon copies, instead of all at
    /// the flush; a stream holds at most kBehindBytes of the page cache, and the pages it drops
    /// are the ones its next writes get (on a VM that hands free memory back to its host, new
    /// pages cost a host fault each). Measured on the 2-vCPU VM, 2 GiB of 1 MiB writes with a
    /// final fdatasync, in one round: 1.8-2.4 s this way, 3.1-3.8 s with O_DIRECT, 5.7-7.2 s
    /// written behind without the drop. A write-back error that the wait sees is kept for the next flush: the
    /// wait takes it from the file's error state, so fdatasync alone would not report it.
    struct Span {  // a byte range of the file
        uint64_t offset = 0, length = 0;
    };
    static constexpr size_t kStreamBytes = 1 << 20;
    static constexpr uint64_t kBehindBytes = 8 << 20;

    void write_behind(uint64_t offset, uint64_t length) {
        ::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE);
        Span oldest;
        {
            std::lock_guard lock(behind_mutex_);
            if (behind_.full()) oldest = behind_.pop();
            behind_.push(Span{offset, length});
            if (oldest.length == 0 && behind_.bytes > kBehindBytes) oldest = behind_.pop();
        }
        if (oldest.length == 0) return;
        if (::sync_file_range(fd_, static_cast<off_t>(oldest.offset), static_cast<off_t>(oldest.length),
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) != 0) {
            int expected = 0;
            behind_error_.compare_exchange_strong(expected, errno);
        }
        drop(oldest);
    }

    /// Drops the pages of `s` from the page cache (those dirty or being written stay). Rounded
    /// out to kFolioBytes: the kernel drops only folios wholly inside the range, and ext4 keeps a
    /// file's cache in folios of up to 2 MiB, so an unaligned stream would keep every folio it
    /// touches. A clean neighbour dropped with them costs a read at most.
    static constexpr uint64_t kFolioBytes = 2 << 20;
    void drop(Span s) const {
        const uint64_t from = s.offset / kFolioBytes * kFolioBytes;
        const uint64_t to = (s.offset + s.length + kFolioBytes - 1) / kFolioBytes * kFolioBytes;
        ::posix_fadvise(fd_, static_cast<off_t>(from), static_cast<off_t>(to - from), POSIX_FADV_DONTNEED);
    }

    void write_all(uint64_t offset, std::span<const std::byte> buf) const {
        if (int e = write_all_errno(offset, buf)) fail(e, "write of " + path_ + " at " + std::to_string(offset) + " failed");
    }

    /// A write of fewer than kStreamBytes waiting for the file's writer (write_at).
    struct QueuedWrite {
        uint64_t offset = 0;
        std::span<const std::byte> buf;
        int error = 0;           // the write's errno, once written
        bool take_over = false;  // resumed to become the writer, its bytes not written yet
        QueuedWrite* next = nullptr;
        Executor executor;       // the parked coroutine's
        asio::any_completion_handler<void()> resume;
    };
    static constexpr int kWriterRounds = 4;

    /// The writer's work (writing_ is ours): `own`, then what is queued, in rounds of one batch
    /// each; each queued write is resumed once its bytes are written.
    void write_queued(QueuedWrite& own) {
        std::vector<QueuedWrite*> batch = std::move(batch_);
        batch.clear();
        batch.push_back(&own);
        for (int round = 1;; ++round) {
            write_batch(batch);
            for (QueuedWrite* q : batch)
                if (q != &own) wake(*q);
            batch.clear();
            std::unique_lock lock(queue_mutex_);
            if (!queue_head_) {
                writing_ = false;
                batch_ = std::move(batch);  // its storage, for the next writer
                return;
            }
            if (round == kWriterRounds) {
                // Enough for one request: the oldest queued write takes over.
                QueuedWrite* next = queue_head_;
                queue_head_ = next->next;
                if (!queue_head_) queue_tail_ = nullptr;
                batch_ = std::move(batch);
                lock.unlock();
                next->take_over = true;
                wake(*next);
                return;
            }
            for (QueuedWrite* q = queue_head_; q; q = q->next) batch.push_back(q);
            queue_head_ = queue_tail_ = nullptr;
        }
    }

    /// Resumes a parked write on its coroutine's executor; `q` may be gone once this returns.
    static void wake(QueuedWrite& q) {
        Executor ex = std::move(q.executor);
        asio::post(ex, [h = std::move(q.resume)]() mutable { std::move(h)(); });
    }

    /// Writes every write of `batch` (none overlap: each is a different request's range), those
    /// adjacent on the file with one pwritev, and sets each one's error.
    void write_batch(std::vector<QueuedWrite*>& batch) const {
        if (batch.size() > 1)
            std::sort(batch.begin(), batch.end(), [](const QueuedWrite* a, const QueuedWrite* b) { return a->offset < b->offset; });
        std::array<iovec, 64> iov;
        for (size_t i = 0, j = 0; i < batch.size(); i = j) {
            uint64_t end = batch[i]->offset + batch[i]->buf.size();
            for (j = i + 1; j < batch.size() && j - i < iov.size() && batch[j]->offset == end; ++j)
                end += batch[j]->buf.size();
            if (j - i == 1) {
                batch[i]->error = write_all_errno(batch[i]->offset, batch[i]->buf);
                continue;
            }
            for (size_t k = i; k < j; ++k)
                iov[k - i] = iovec{const_cast<std::byte*>(batch[k]->buf.data()), batch[k]->buf.size()};
            if (pwritev_all(batch[i]->offset, std::span<iovec>(iov.data(), j - i)) == 0) {
                for (size_t k = i; k < j; ++k) batch[k]->error = 0;
                continue;
            }
            // Each one alone, so each is told its own error.
            for (size_t k = i; k < j; ++k) batch[k]->error = write_all_errno(batch[k]->offset, batch[k]->buf);
        }
    }

    /// pwritev of all of `iov` at `offset` (advancing `iov` over partial writes): 0 or an errno.
    int pwritev_all(uint64_t offset, std::span<iovec> iov) const {
        size_t first = 0;
        while (first < iov.size()) {
            ssize_t n = ::pwritev(fd_, iov.data() + first, static_cast<int>(iov.size() - first), static_cast<off_t>(offset));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return n < 0 ? errno : EIO;
            offset += static_cast<uint64_t>(n);
            for (size_t left = static_cast<size_t>(n); left > 0;) {
                if (left >= iov[first].iov_len) {
                    left -= iov[first].iov_len;
                    ++first;
                } else {
                    iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + left;
                    iov[first].iov_len -= left;
                    left = 0;
                }
            }
            while (first < iov.size() && iov[first].iov_len == 0) ++first;
        }
        return 0;
    }

    /// All of `buf` at `offset`: pwritev_all of one piece, so every write goes through one loop.
    int write_all_errno(uint64_t offset, std::span<const std::byte> buf) const {
        if (buf.empty()) return 0;
        iovec one{const_cast<std::byte*>(buf.data()), buf.size()};
        return pwritev_all(offset, std::span<iovec>(&one, 1));
    }

    Task<void> flush() override {
        // Asio has no asynchronous fsync: it runs on the blocking-call pool, not on this thread.
        co_await blocking([this] {
            const int behind = behind_error_.exchange(0);
            if (::fdatasync(fd_) != 0) fail(errno, "fdatasync of " + path_ + " failed");
            if (behind != 0) fail(behind, "writing back " + path_ + " failed");
            // What was written behind is on the disk now: its pages leave the cache too.
            for (;;) {
                Span s;
                {
                    std::lock_guard lock(behind_mutex_);
                    if (behind_.count == 0) break;
                    s = behind_.pop();
                }
                drop(s);
            }
        });
    }

    Task<void> discard(uint64_t offset, uint64_t length) override {
        if (length == 0) co_return;
        bool punched = co_await blocking([&] {
            if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                            static_cast<off_t>(length)) == 0)
                return true;
            if (errno != EOPNOTSUPP && errno != ENOSYS) fail(errno, "punching a hole in " + path_ + " failed");
            return false;
        });
        if (punched) co_return;
        // The host file system cannot punch holes: write zeros over the part inside the file.
        uint64_t end = std::min(offset + length, size());
        std::vector<std::byte> zeros(std::min<uint64_t>(1 << 20, end > offset ? end - offset : 0));
        for (uint64_t at = offset; at < end; at += zeros.size())
            co_await write_at(at, std::span<const std::byte>(zeros).first(std::min<uint64_t>(zeros.size(), end - at)));
    }

    Task<void> allocate(uint64_t offset, uint64_t length) override {
        if (length == 0) co_return;
        co_await blocking([&] {
            if (::fallocate(fd_, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return;
            if (errno != EOPNOTSUPP && errno != ENOSYS) fail(errno, "allocating space in " + path_ + " failed");
            struct stat st;
            if (::fstat(fd_, &st) != 0) fail(errno, "fstat of " + path_ + " failed");
            if (static_cast<uint64_t>(st.st_size) < offset + length &&
                ::ftruncate(fd_, static_cast<off_t>(offset + length)) != 0)
                fail(errno, "extending " + path_ + " failed");
        });
    }

    Task<void> truncate(uint64_t new_size) override {
        co_await blocking([&] {
            if (::ftruncate(fd_, static_cast<off_t>(new_size)) != 0) fail(errno, "truncating " + path_ + " failed");
        });
    }

    uint64_t size() override {
        struct stat st;
        if (::fstat(fd_, &st) != 0) fail(errno, "fstat of " + path_ + " failed");
        return static_cast<uint64_t>(st.st_size);
    }

    std::pair<bool, uint64_t> data_run(uint64_t offset) override {
        const uint64_t end = size();
        if (offset >= end) return {false, offset};
        off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) return {false, end};  // only a hole up to the end
            return {true, end};                       // no SEEK_DATA here: all data
        }
        if (static_cast<uint64_t>(data) > offset) return {false, std::min<uint64_t>(data, end)};
        off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
        if (hole < 0 || static_cast<uint64_t>(hole) <= offset) return {true, end};
        return {true, std::min<uint64_t>(hole, end)};
    }

    const std::string& name() const override { return path_; }

    void set_lock(LockMode mode) override {
        if (!locking_ || mode == lock_mode_) {
            lock_mode_ = mode;
            return;
        }
        if (int e = apply_lock_bytes(fd_, mode)) {
            if (e == EINVAL || e == ENOTSUP || e == ENOLCK || e == EOPNOTSUPP) {
                // As QEMU's locking=auto: a host file system without OFD locks is used unlocked,
                // and said once.
                static std::atomic<bool> said{false};
                if (!said.exchange(true))
                    log::info(path_ + ": the host file system refuses OFD locks (" + std::strerror(e) +
                              "); files on it are used without QEMU image locks");
                locking_ = false;
                lock_mode_ = mode;
                return;
            }
            apply_lock_bytes(fd_, lock_mode_);
            fail(e, "cannot lock " + path_);
        }
        if (std::string conflict = lock_conflict(fd_, mode); !conflict.empty()) {
            apply_lock_bytes(fd_, lock_mode_);  // back to what was held
            fail(EBUSY, conflict + ": another process (QEMU?) is using the image");
        }
        lock_mode_ = mode;
    }

    void enable_locking(bool on) { locking_ = on; }

private:
    /// Channels over fd_ (buffered) or over the O_DIRECT descriptor (read_to_copy).
    enum class Kind { cached, direct };
    struct Channel {
        Channel(const Executor& ex, Kind kind)
            : file(ex), context(&asio::query(ex, asio::execution::context)), kind(kind) {}
        asio::random_access_file file;
        const asio::execution_context* context;  // whose ring completes its operations
        Kind kind;
        int busy = 0;
    };

    /// Holds a channel for one operation.
    class Lease {
    public:
        explicit Lease(UringFile& owner, Kind kind = Kind::cached) : owner_(owner), channel_(owner.acquire(kind)) {}
        ~Lease() { owner_.release(channel_); }
        Lease(const Lease&) = delete;
        Lease& operator=(const Lease&) = delete;
        Channel* operator->() const { return &channel_; }

    private:
        UringFile& owner_;
        Channel& channel_;
    };

    std::unique_ptr<Channel> make_channel(int fd, const Executor& ex, Kind kind = Kind::cached) {
        auto channel = std::make_unique<Channel>(ex, kind);
        boost::system::error_code ec;
        channel->file.assign(fd, ec);
        if (ec) {
            ::close(fd);
            fail(ec.value(), "cannot use " + path_ + " for asynchronous I/O");
        }
        return channel;
    }

    /// An idle channel of `kind` of the calling worker's ring (so the completion comes back to
    /// this thread), a new one while there are fewer than kMaxChannels of the kind, else the
    /// least busy one. A direct channel exists once open_direct() has succeeded.
    Channel& acquire(Kind kind) {
        asio::io_context* here = detail::current_worker.context;
        std::lock_guard lock(mutex_);
        Channel* best = nullptr;
        size_t of_kind = 0;
        for (auto& c : channels_) {
            if (c->kind != kind) continue;
            ++of_kind;
            if (c->busy == 0 && (!here || c->context == here)) {
                best = c.get();
                break;
            }
            if (!best || c->busy < best->busy) best = c.get();
        }
        const bool fits = best->busy == 0 && (!here || best->context == here);
        if (!fits && of_kind < kMaxChannels) {
            int fd = ::fcntl(best->file.native_handle(), F_DUPFD_CLOEXEC, 0);
            if (fd >= 0) {
                channels_.push_back(make_channel(fd, here ? here->get_executor() : executor_, kind));
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
    bool locking_ = false;  // set_lock() takes QEMU lock bytes on fd_
    int fd_;  // owned by channels_[0]
    std::string path_;
    std::mutex mutex_;  // guards channels_ and their busy counts
    std::vector<std::unique_ptr<Channel>> channels_;
    enum class Direct { untried, on, off };
    std::atomic<Direct> direct_{Direct::untried};  // whether read_to_copy may read with O_DIRECT
    /// Streaming writes being written behind, oldest first (a ring: no allocation).
    struct Behind {
        static constexpr size_t kSlots = 16;
        std::array<Span, kSlots> spans{};
        size_t first = 0, count = 0;
        uint64_t bytes = 0;
        bool full() const { return count == kSlots; }
        void push(Span s) {  // not full()
            spans[(first + count++) % kSlots] = s;
            bytes += s.length;
        }
        Span pop() {
            Span s = spans[first];
            first = (first + 1) % kSlots, --count, bytes -= s.length;
            return s;
        }
    };
    std::mutex behind_mutex_;
    Behind behind_;
    std::atomic<int> behind_error_{0};  // the first write-back error a wait saw since the last flush
    std::mutex queue_mutex_;  // guards writing_ and the queue
    bool writing_ = false;    // a writer is at work (write_queued)
    QueuedWrite* queue_head_ = nullptr;  // parked writes, oldest first (in their coroutines' frames)
    QueuedWrite* queue_tail_ = nullptr;
    std::vector<QueuedWrite*> batch_;  // the writer's batch storage, kept between writers
};

}  // namespace

std::unique_ptr<File> open_file(const Executor& executor, const std::string& path, bool writable) {
    int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) fail(errno, "cannot open " + path);
    return std::make_unique<UringFile>(executor, fd, path);
}

std::unique_ptr<File> adopt_file(const Executor& executor, int fd, std::string name, bool locking) {
    auto file = std::make_unique<UringFile>(executor, fd, std::move(name));
    file->enable_locking(locking);
    return file;
}

Task<size_t> File::read_to_copy(uint64_t offset, std::span<std::byte> buf) { co_return co_await read_at(offset, buf); }
Task<void> File::discard(uint64_t, uint64_t) { fail(EOPNOTSUPP, "discard is not supported by " + name()); }
Task<void> File::allocate(uint64_t, uint64_t) { fail(EOPNOTSUPP, "allocate is not supported by " + name()); }
Task<void> File::truncate(uint64_t) { fail(EOPNOTSUPP, "truncate is not supported by " + name()); }

Task<void> File::reserve(uint64_t offset, uint64_t length) {
    try {
        co_await allocate(offset, length);
    } catch (const std::system_error& e) {
        if (errno_of(e) != EOPNOTSUPP) throw;
    }
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
    if (offset >= current_.size() || buf.empty()) co_return 0;  // memcpy must not see an empty buffer's null pointer
    size_t n = std::min<uint64_t>(buf.size(), current_.size() - offset);
    std::memcpy(buf.data(), current_.data() + offset, n);
    co_return n;
}

Task<void> MemFile::write_at(uint64_t offset, std::span<const std::byte> buf) {
    std::lock_guard lock(mutex_);
    maybe_fail();
    if (buf.empty()) co_return;  // nothing to write; an empty span's data() may be null
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

Task<void> MemFile::discard(uint64_t offset, uint64_t length) {
    std::lock_guard lock(mutex_);
    maybe_fail();
    if (offset < current_.size())
        std::fill_n(current_.begin() + offset, std::min<uint64_t>(length, current_.size() - offset), std::byte{0});
    co_return;
}

Task<void> MemFile::allocate(uint64_t offset, uint64_t length) {
    std::lock_guard lock(mutex_);
    maybe_fail();
    if (offset + length > current_.size()) current_.resize(offset + length);
    allocations_.emplace_back(offset, length);
    co_return;
}

std::vector<std::pair<uint64_t, uint64_t>> MemFile::allocations() const {
    std::lock_guard lock(mutex_);
    return allocations_;
}

Task<void> MemFile::truncate(uint64_t new_size) {
    std::lock_guard lock(mutex_);
    maybe_fail();
    current_.resize(new_size);
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
