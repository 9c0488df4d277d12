// An asynchronous mutex for the coroutines of one image: serializes multi-step operations that wait.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <deque>

#include "qcowfs/util/task.hpp"

namespace qcowfs {

/// lock() returns a Guard once no other coroutine holds the mutex; the Guard unlocks when it goes.
/// Waiters queue in arrival order, and an unlock hands the mutex to the first of them directly:
/// it stays held, and only that one coroutine is woken (posted to its own executor, so on its
/// home worker). Waking every waiter to let one win would cost, under contention, a wake-up per
/// waiter per unlock, most of them on another worker.
/// Not thread-safe: use under one image's lock (each image has its own). Must not be destroyed
/// while a coroutine waits.
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

    /// Waits until the mutex is this coroutine's, then holds it until the returned Guard is
    /// destroyed.
    Task<Guard> lock() {
        if (!locked_) {
            locked_ = true;
            co_return Guard(this);
        }
        co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
            [this](auto handler) {
                Executor ex = asio::get_associated_executor(handler);
                waiters_.push_back(Waiter{std::move(ex), std::move(handler)});
            },
            asio::use_awaitable);
        // unlock() handed it over: still locked, now ours.
        co_return Guard(this);
    }

    bool locked() const { return locked_; }

private:
    void unlock() {
        if (waiters_.empty()) {
            locked_ = false;
            return;
        }
        Waiter next = std::move(waiters_.front());
        waiters_.pop_front();
        asio::post(next.executor, [h = std::move(next.handler)]() mutable { std::move(h)(); });
    }

    struct Waiter {
        Executor executor;  // the waiting coroutine's
        asio::any_completion_handler<void()> handler;
    };
    bool locked_ = false;
    std::deque<Waiter> waiters_;  // in arrival order
};

}  // namespace qcowfs
