// Awaitable positioned I/O on a host file: io_uring through Asio, and an in-memory test double.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qcowfs/util/task.hpp"

namespace qcowfs::io {

/// How an open file takes part in QEMU's image locking protocol (QEMU's block/file-posix.c: OFD
/// read locks on byte 100 + bit for each permission held and on byte 200 + bit for each
/// permission not shared with other users, bits: 0 consistent read, 1 write, 2 write unchanged,
/// 3 resize).
enum class LockMode {
    none,  ///< no lock bytes held
    read,  ///< consistent read held; write and resize not shared (a reader, or a backing file)
    write  ///< consistent read, write and resize held; write and resize not shared
};

/// Why bytes are read: to be used (returned to a reader, kept), or to be copied at once into
/// another cluster (a copy-on-write's old data; see File::read_to_copy).
enum class ReadPurpose { use, copy };

/// A host file addressed by byte offset. Implementations may be used by many coroutines at once.
class File {
public:
    virtual ~File() = default;

    /// Reads buf.size() bytes at `offset`. Returns the count read: less than requested only when
    /// the end of the file is reached. Throws std::system_error on I/O errors.
    virtual Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) = 0;
    /// read_at() for bytes the caller is about to write elsewhere (a copy-on-write's old data):
    /// nobody will read them here again soon, so a file may read them around the host page
    /// cache. The base version: read_at().
    virtual Task<size_t> read_to_copy(uint64_t offset, std::span<std::byte> buf);
    /// Writes all of `buf` at `offset`, extending the file if needed. Throws std::system_error.
    virtual Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) = 0;
    /// Returns once everything written before the call is on stable storage (fdatasync).
    virtual Task<void> flush() = 0;
    /// Makes [offset, offset + length) read as zeros and gives its storage back to the host file
    /// system where it can (punches a hole; the size does not change). Throws std::system_error.
    /// The base version fails with EOPNOTSUPP (test doubles that never need it).
    virtual Task<void> discard(uint64_t offset, uint64_t length);
    /// Makes sure [offset, offset + length) is inside the file, extending it (with zeros) if
    /// needed; reserves the space where the host file system can. Throws std::system_error.
    /// The base version fails with EOPNOTSUPP.
    virtual Task<void> allocate(uint64_t offset, uint64_t length);
    /// allocate() for metadata that will be written later (at a flush): the space is taken now,
    /// so that a full host file system fails the request that needs it, not the flush that
    /// would lose what was written before. A file that cannot allocate (EOPNOTSUPP) is left as
    /// it is. Throws std::system_error (ENOSPC, EIO).
    Task<void> reserve(uint64_t offset, uint64_t length);
    /// Sets the size of the file (bytes past it are dropped; new ones read as zeros).
    /// The base version fails with EOPNOTSUPP.
    virtual Task<void> truncate(uint64_t size);
    /// Current size of the file in bytes. Throws std::system_error.
    virtual uint64_t size() = 0;
    /// Whether the host file has data at `offset` (< size()) or a hole there (SEEK_DATA /
    /// SEEK_HOLE), and where that run ends (at most size()). The base version: data to the end.
    virtual std::pair<bool, uint64_t> data_run(uint64_t /*offset*/) { return {true, size()}; }
    /// The path or label used in log lines and errors.
    virtual const std::string& name() const = 0;
    /// Takes QEMU's lock bytes for `mode` and releases the others, then checks that no other
    /// process holds a permission this mode does not share or refuses one it holds. On a conflict
    /// the previous mode is restored and EBUSY is thrown with QEMU's wording ("Failed to get
    /// "write" lock"). Files opened without locking (force_share, test doubles, host file systems
    /// without OFD locks) accept every mode. Blocking (fcntl), never waits for another process.
    virtual void set_lock(LockMode mode) { lock_mode_ = mode; }
    LockMode lock_mode() const { return lock_mode_; }

protected:
    LockMode lock_mode_ = LockMode::none;
};

/// Opens a host file for awaitable I/O on `executor`'s io_context (io_uring). `writable` opens
/// O_RDWR, else O_RDONLY. Throws std::system_error naming the path. Takes no image locks; tests
/// and tools use it, the file system opens through io/host.hpp.
std::unique_ptr<File> open_file(const Executor& executor, const std::string& path, bool writable);

/// A File over an already open descriptor `fd` (owned from now on), named `name` in messages.
/// `locking`: set_lock() takes QEMU's lock bytes on it; false makes set_lock() a no-op.
std::unique_ptr<File> adopt_file(const Executor& executor, int fd, std::string name, bool locking);

/// An in-memory file for unit tests. Writes (and discard/allocate/truncate) land in a volatile
/// layer until flush(); crash() drops what was not flushed, as a power cut would. Faults can be injected into the next operations.
class MemFile final : public File {
public:
    explicit MemFile(std::string name = "mem", std::vector<std::byte> content = {});

    Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) override;
    Task<void> write_at(uint64_t offset, std::span<const std::byte> buf) override;
    Task<void> flush() override;
    Task<void> discard(uint64_t offset, uint64_t length) override;
    Task<void> allocate(uint64_t offset, uint64_t length) override;
    Task<void> truncate(uint64_t size) override;
    uint64_t size() override;
    const std::string& name() const override { return name_; }

    /// Makes the next `count` operations (reads, writes or flushes) fail with `error_number`.
    void inject_failure(int error_number, int count = 1);
    /// Forgets every write since the last flush().
    void crash();
    /// The current content (including unflushed writes).
    std::vector<std::byte> content() const;
    size_t read_count() const;
    /// Every allocate() that succeeded, as (offset, length), in order.
    std::vector<std::pair<uint64_t, uint64_t>> allocations() const;

private:
    void maybe_fail();
    std::string name_;
    mutable std::mutex mutex_;          // guards everything below
    std::vector<std::byte> durable_;    // content as of the last flush
    std::vector<std::byte> current_;    // content including unflushed writes
    int fail_errno_ = 0;
    int fail_count_ = 0;
    size_t reads_ = 0;
    std::vector<std::pair<uint64_t, uint64_t>> allocations_;
};

}  // namespace qcowfs::io
