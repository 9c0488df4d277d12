// A one-shot event that the coroutines of one image can await: the engine's only wait primitive.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <utility>
#include <vector>

#include "qcowfs/util/task.hpp"

namespace qcowfs {

/// Waiters park as completion handlers; set() posts every one to its own executor (the waiting
/// coroutine's: in the daemon, its home worker under the image's lock), with no timer involved.
/// Not thread-safe: create, wait and set under one image's lock (or on one strand). Must not be
/// destroyed while a coroutine waits.
class AsyncEvent {
public:
    /// `ex` is unused; kept so that the creator's executor is visibly the one waiters use.
    explicit AsyncEvent(const Executor&) {}
    AsyncEvent(const AsyncEvent&) = delete;
    AsyncEvent& operator=(const AsyncEvent&) = delete;

    /// Returns once set() has been called (at once if it already was).
    Task<void> wait() {
        if (set_) co_return;
        co_await asio::async_initiate<decltype(asio::use_awaitable), void()>(
            [this](auto handler) {
                Executor ex = asio::get_associated_executor(handler);
                waiters_.push_back(Waiter{std::move(ex), std::move(handler)});
            },
            asio::use_awaitable);
    }
    void set() {
        set_ = true;
        auto waiters = std::move(waiters_);
        waiters_.clear();
        for (auto& w : waiters) asio::post(w.executor, [h = std::move(w.handler)]() mutable { std::move(h)(); });
    }
    bool is_set() const { return set_; }

private:
    struct Waiter {
        Executor executor;  // the waiting coroutine's
        asio::any_completion_handler<void()> handler;
    };
    std::vector<Waiter> waiters_;
    bool set_ = false;
};

}  // namespace qcowfs
