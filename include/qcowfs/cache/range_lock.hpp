// Asynchronous shared/exclusive locks on byte ranges: how overlapping requests to one image are ordered.
#pragma once

#include <cstdint>
#include <list>
#include <vector>
#include <memory>

#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs::cache {

/// Orders requests on overlapping byte ranges of one address space (an image's guest disk).
/// Two locks conflict when their ranges overlap and at least one is exclusive; locks that do not
/// conflict are held at the same time. Grants are first-come first-served among conflicting
/// requests: a request also waits behind an earlier *waiting* request it conflicts with, so a
/// large write is not starved by a stream of small reads.
/// Not thread-safe: lock, and destroy guards, under the owning image's lock.
class RangeLock {
public:
    enum class Mode { shared, exclusive };

    /// Holds a granted lock; releasing it (destruction) grants waiters that no longer conflict.
    class Guard {
    public:
        Guard() = default;
        Guard(Guard&& other) noexcept : owner_(other.owner_), id_(other.id_) { other.owner_ = nullptr; }
        Guard& operator=(Guard&& other) noexcept;
        Guard(const Guard&) = delete;
        Guard& operator=(const Guard&) = delete;
        ~Guard() { release(); }
        /// Releases early; idempotent.
        void release();

    private:
        friend class RangeLock;
        Guard(RangeLock* owner, uint64_t id) : owner_(owner), id_(id) {}
        RangeLock* owner_ = nullptr;
        uint64_t id_ = 0;
    };

    explicit RangeLock(Executor executor) : executor_(std::move(executor)) {}
    RangeLock(const RangeLock&) = delete;
    RangeLock& operator=(const RangeLock&) = delete;

    /// Waits until [offset, offset + length) can be held in `mode`, then holds it. A zero length
    /// is treated as one byte. Never fails.
    Task<Guard> lock(uint64_t offset, uint64_t length, Mode mode);

    size_t held() const { return held_.size(); }
    size_t waiting() const { return waiters_.size(); }

private:
    struct Request {
        uint64_t id;
        uint64_t begin;
        uint64_t end;  // exclusive
        Mode mode;
        std::shared_ptr<AsyncEvent> granted;  // waiters only
    };
    static bool conflict(const Request& a, const Request& b) {
        return a.begin < b.end && b.begin < a.end && (a.mode == Mode::exclusive || b.mode == Mode::exclusive);
    }
    bool conflicts_with_held(const Request& r) const;
    void unlock(uint64_t id);

    Executor executor_;
    uint64_t next_id_ = 1;
    std::vector<Request> held_;   // in no order; a vector, so that locking allocates nothing once warm
    std::list<Request> waiters_;  // in arrival order
};

}  // namespace qcowfs::cache
