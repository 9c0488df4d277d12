// Awaitable positioned I/O on a host file: io_uring through Asio, and an in-memory test double.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "qcowfs/util/task.hpp"

namespace qcowfs::io {

/// A host file addressed by byte offset. Implementations may be used by many coroutines at once.
class File {
public:
    virtual ~File() = default;

    /// Reads buf.size() bytes at `offset`. Returns the count read: less than requested only when
    /// the end of the file is reached. Throws std::system_error on I/O errors.
    virtual Task<size_t> read_at(uint64_t offset, std::span<std::byte> buf) = 0;
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
    /// Sets the size of the file (bytes past it are dropped; new ones read as zeros).
    /// The base version fails with EOPNOTSUPP.
    virtual Task<void> truncate(uint64_t size);
    /// Current size of the file in bytes. Throws std::system_error.
    virtual uint64_t size() = 0;
    /// The path or label used in log lines and errors.
    virtual const std::string& name() const = 0;
};

/// Opens a host file for awaitable I/O on `executor`'s io_context (io_uring). `writable` opens
/// O_RDWR, else O_RDONLY. Throws std::system_error naming the path.
std::unique_ptr<File> open_file(const Executor& executor, const std::string& path, bool writable);

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

private:
    void maybe_fail();
    std::string name_;
    mutable std::mutex mutex_;          // guards everything below
    std::vector<std::byte> durable_;    // content as of the last flush
    std::vector<std::byte> current_;    // content including unflushed writes
    int fail_errno_ = 0;
    int fail_count_ = 0;
    size_t reads_ = 0;
};

}  // namespace qcowfs::io
