// The daemon's threads: one event loop per thread, and the executor that keeps work on the thread
// that asked for it.
#pragma once

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/execution.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <exception>
#include <optional>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "qcowfs/util/task.hpp"

namespace qcowfs {

class Workers;

namespace detail {
/// The worker whose loop runs on this thread; null on every other thread.
struct CurrentWorker {
    const Workers* workers = nullptr;
    asio::io_context* context = nullptr;
    unsigned index = 0;
};
inline thread_local CurrentWorker current_worker;
}  // namespace detail

/// An executor that runs work on the worker thread that hands it over. When the work may run at
/// once (Asio's "blocking.possibly": dispatch, the resumption of a coroutine after its I/O), it
/// runs inline on the calling worker; when it may not ("blocking.never": post, co_spawn), it is
/// queued on the calling worker's own loop. From a thread that is no worker (the blocking-call
/// pool), work is queued on worker 0.
///
/// It is the inner executor of every image strand: a request takes its image's strand on the
/// thread that received it and, if nobody holds the strand, runs to its reply there, with no
/// thread switch. When another worker holds the strand, the request waits in the strand's queue
/// and that worker runs it next (Asio's strand), so image state is still touched by one thread at
/// a time. Asio services (timers) of such executors live in worker 0's context.
template <bool Never>
class BasicHereExecutor {
public:
    explicit BasicHereExecutor(const Workers& workers) noexcept : workers_(&workers) {}

    asio::execution_context& query(asio::execution::context_t) const noexcept;
    static constexpr asio::execution::blocking_t query(asio::execution::blocking_t) noexcept {
        if constexpr (Never) return asio::execution::blocking.never;
        else return asio::execution::blocking.possibly;
    }
    BasicHereExecutor<true> require(asio::execution::blocking_t::never_t) const noexcept {
        return BasicHereExecutor<true>(*workers_);
    }
    BasicHereExecutor<false> require(asio::execution::blocking_t::possibly_t) const noexcept {
        return BasicHereExecutor<false>(*workers_);
    }

    template <class F>
    void execute(F&& f) const;

    friend bool operator==(const BasicHereExecutor& a, const BasicHereExecutor& b) noexcept {
        return a.workers_ == b.workers_;
    }
    friend bool operator!=(const BasicHereExecutor& a, const BasicHereExecutor& b) noexcept { return !(a == b); }

private:
    const Workers* workers_;
};
using HereExecutor = BasicHereExecutor<false>;

/// N threads, each running an io_context of its own (concurrency hint 1: no other thread runs
/// it, though any thread may post to it). Each has its own io_uring and epoll.
class Workers {
public:
    explicit Workers(unsigned count) {
        for (unsigned i = 0; i < std::max(1u, count); ++i) {
            contexts_.push_back(std::make_unique<asio::io_context>(1));
            guards_.emplace_back(contexts_.back()->get_executor());
        }
    }
    Workers(const Workers&) = delete;
    Workers& operator=(const Workers&) = delete;

    unsigned size() const { return static_cast<unsigned>(contexts_.size()); }
    asio::io_context& context(unsigned i) const { return *contexts_[i]; }
    /// True on a thread running one of these workers.
    bool on_worker() const { return detail::current_worker.workers == this; }
    /// The index of the calling thread's worker (0 on other threads).
    unsigned here_index() const { return on_worker() ? detail::current_worker.index : 0; }
    /// The calling thread's worker's context (worker 0's on other threads).
    asio::io_context& here() const { return *contexts_[here_index()]; }
    HereExecutor here_executor() const { return HereExecutor(*this); }

    /// Runs worker `i`'s loop on the calling thread until stop().
    void run(unsigned i) {
        detail::current_worker = {this, contexts_[i].get(), i};
        contexts_[i]->run();
        detail::current_worker = {};
    }
    /// Runs every worker, worker 0 on the calling thread, until stop(); joins the others.
    void run_all() {
        std::vector<std::thread> threads;
        for (unsigned i = 1; i < size(); ++i) threads.emplace_back([this, i] { run(i); });
        run(0);
        for (auto& t : threads) t.join();
    }
    /// Makes every loop return. Thread-safe.
    void stop() {
        for (auto& c : contexts_) c->stop();
    }

private:
    std::vector<std::unique_ptr<asio::io_context>> contexts_;
    std::vector<asio::executor_work_guard<asio::io_context::executor_type>> guards_;
};

template <bool Never>
asio::execution_context& BasicHereExecutor<Never>::query(asio::execution::context_t) const noexcept {
    return workers_->context(0);
}

template <bool Never>
template <class F>
void BasicHereExecutor<Never>::execute(F&& f) const {
    if constexpr (!Never) {
        if (workers_->on_worker()) {
            std::decay_t<F> local(std::forward<F>(f));
            std::move(local)();
            return;
        }
    }
    asio::post(workers_->here(), std::forward<F>(f));
}

/// Runs `fn` (a plain function, no I/O wait) outside the calling coroutine's strand, on the
/// calling worker's own loop, and resumes the caller on its strand with fn's result or exception.
/// For long copies that touch no image state (a large read from the page cache): the strand is
/// free meanwhile, so another worker can run the image's other requests. Off a worker, fn runs
/// inline.
template <class Fn>
Task<std::invoke_result_t<Fn&>> off_strand(Fn fn) {
    using R = std::invoke_result_t<Fn&>;
    static_assert(!std::is_void_v<R>, "off_strand: fn returns a value");
    asio::io_context* here = detail::current_worker.context;
    if (!here) co_return fn();
    // use_awaitable rethrows the exception_ptr in the caller.
    std::optional<R> result = co_await asio::async_initiate<decltype(asio::use_awaitable), void(std::exception_ptr, std::optional<R>)>(
        [here, &fn](auto handler) {
            asio::post(*here, [&fn, handler = std::move(handler)]() mutable {
                std::exception_ptr error;
                std::optional<R> result;
                try {
                    result.emplace(fn());
                } catch (...) {
                    error = std::current_exception();
                }
                auto ex = asio::get_associated_executor(handler);
                asio::dispatch(ex, [handler = std::move(handler), error, result = std::move(result)]() mutable {
                    std::move(handler)(error, std::move(result));
                });
            });
        },
        asio::use_awaitable);
    co_return std::move(*result);
}

}  // namespace qcowfs
