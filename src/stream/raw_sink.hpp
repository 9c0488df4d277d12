// Where decode writes the raw disk: a pipe in guest order, or a file/device at guest offsets.
#pragma once

#include <sys/uio.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

namespace qcowfs::stream {

/// Gathers writes that follow each other into one writev/pwritev of up to 8 MiB. `positioned`:
/// the descriptor is written with pwritev at the given offsets (a file or device); otherwise with
/// writev, and every write must continue where the last one ended (a pipe).
///
/// Bytes inside the stable range (set_stable_range: the caller's input buffer) and zeros are not
/// copied: the sink keeps pointers to them until they are written. Everything else is copied into
/// the sink's own buffers at once.
///
/// `background`: the gathered writes are made by a thread of the sink's own, in order, while the
/// caller goes on (reading the next input). flush() then only hands them over: the caller may
/// change the stable range's bytes once wait_written() has returned for flush()'s ticket. A write
/// error is thrown by the next flush(), wait_written() or sync(). Without `background`, flush()
/// writes before it returns.
class RawSink {
public:
    RawSink(int fd, bool positioned, bool background = false);
    ~RawSink();  // stops the writer thread; writes not yet made are dropped
    RawSink(const RawSink&) = delete;
    RawSink& operator=(const RawSink&) = delete;

    /// Bytes in [begin, end) stay unchanged until they are written (see flush); they are written
    /// from there.
    void set_stable_range(const std::byte* begin, const std::byte* end) {
        stable_begin_ = begin;
        stable_end_ = end;
    }
    const std::byte* stable_begin() const { return stable_begin_; }
    const std::byte* stable_end() const { return stable_end_; }
    /// Writes `data` at guest offset `offset`. Throws std::system_error when a write fails.
    void write_at(uint64_t offset, std::span<const std::byte> data);
    /// Writes `length` zero bytes at `offset` (sequential, non-sparse output).
    void write_zeros(uint64_t offset, uint64_t length);
    /// Keeps `owner` (the memory of a stable range) alive until what is gathered so far is written.
    void keep_until_written(std::shared_ptr<void> owner) { keep_.push_back(std::move(owner)); }
    /// Writes out (or, in the background, hands over) everything gathered; returns its ticket.
    /// Must be called before the stable range changes and before the descriptor is closed.
    uint64_t flush();
    /// Waits until everything flushed up to `ticket` is written. Throws a write error.
    void wait_written(uint64_t ticket);
    /// flush() and wait until all of it is written.
    void sync() { wait_written(flush()); }

private:
    /// Gathered writes, handed to the writer as one.
    struct Job {
        std::vector<iovec> iov;
        uint64_t start = 0;                        // guest offset of the first byte
        std::vector<std::byte> copy;               // copies that iov points into
        std::vector<std::shared_ptr<void>> keep;   // stable memory iov points into
    };
    /// Flushes first if `n` bytes at `offset` cannot join what is gathered.
    void make_room(uint64_t offset, size_t n);
    void add(const std::byte* p, size_t n);
    /// Makes the job's writes (any thread). Throws std::system_error naming the offset.
    void write_job(Job& job) const;
    void writer();
    /// Background: waits until the writer holds at most `jobs` jobs; rethrows its error.
    void wait_queue(std::unique_lock<std::mutex>& lk, size_t jobs);

    int fd_;
    bool positioned_;
    std::vector<iovec> iov_;
    std::vector<std::byte> copy_;  // copies of unstable data, referenced by iov_
    size_t copy_used_ = 0;
    std::vector<std::shared_ptr<void>> keep_;
    uint64_t start_ = 0;    // guest offset of the first gathered byte
    uint64_t pending_ = 0;  // bytes gathered
    const std::byte* stable_begin_ = nullptr;
    const std::byte* stable_end_ = nullptr;
    uint64_t next_ticket_ = 0;  // tickets handed out by flush()

    // The writer thread (background only). Lock order: mutex_ alone.
    std::thread thread_;
    std::mutex mutex_;
    std::condition_variable cv_;                // a job was queued, written, or stop_ set
    std::deque<Job> queue_;                     // guarded by mutex_, oldest first
    std::vector<std::vector<std::byte>> spare_; // guarded by mutex_: copy buffers to reuse
    uint64_t written_ticket_ = 0;               // guarded by mutex_: every job up to it is written
    std::exception_ptr error_;                  // guarded by mutex_: the first write error
    bool stop_ = false;                         // guarded by mutex_
};

}  // namespace qcowfs::stream
