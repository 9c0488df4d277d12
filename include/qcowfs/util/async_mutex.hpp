// An asynchronous mutex for coroutines of one strand: serializes multi-step operations that wait.
#pragma once

#include <memory>

#include <boost/asio/this_coro.hpp>

#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/task.hpp"

namespace qcowfs {

/// lock() returns a Guard once no other coroutine holds the mutex; the Guard unlocks when it goes.
/// Waiters park on an AsyncEvent that the unlock sets; all wake and the first to run takes it.
/// Not thread-safe: use from one strand (each image has its own).
class AsyncMutex {
public:
    class Guard {
    public:
        Guard(Guard&& other) noexcept : mutex_(other.mutex_) { other.mutex_ = nullptr; }
        Guard(const Guard&) = delete;
        Guard& operator=(const Guard&) = delete;
        Guard& operator=(Guard&&) = delete;
        ~Guard() {
            if (mutex_) mutex_->unlock();
        }

    private:
        friend class AsyncMutex;
        explicit Guard(AsyncMutex* mutex) : mutex_(mutex) {}
        AsyncMutex* mutex_;
    };

    /// Waits until the mutex is free, then holds it until the returned Guard is destroyed.
    Task<Guard> lock() {
        while (locked_) {
            if (!released_) released_ = std::make_shared<AsyncEvent>(co_await asio::this_coro::executor);
            auto released = released_;
            co_await released->wait();
        }
        locked_ = true;
        co_return Guard(this);
    }

    bool locked() const { return locked_; }

private:
    void unlock() {
        locked_ = false;
        if (auto released = std::move(released_)) released->set();
    }

    bool locked_ = false;
    std::shared_ptr<AsyncEvent> released_;  // exists while someone waits
};

}  // namespace qcowfs
