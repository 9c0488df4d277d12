// The daemon's threads: one event loop per thread, and the executor that runs an image's requests
// on the thread that received them, under the image's lock.
#pragma once

#include <boost/asio/execution.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <memory>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <sched.h>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "qcowfs/util/task.hpp"

namespace qcowfs {

class Workers;

class ImageLock;

namespace detail {
/// The worker whose loop runs on this thread; null on every other thread.
struct CurrentWorker {
    const Workers* workers = nullptr;
    asio::io_context* context = nullptr;
    unsigned index = 0;
};
inline thread_local CurrentWorker current_worker;
/// The image lock this thread holds (it holds one at most), or null.
inline thread_local ImageLock* held_image_lock = nullptr;
}  // namespace detail

/// The lock of one open image's state: its caches, allocation, range locks and waiters. A
/// coroutine of the image holds it from each resumption to its next suspension, and lets it go
/// around every system call on the image's files (unlocked), so a holder never waits on I/O and
/// the critical sections are short: the work between two waits. A thread holds at most one image
/// lock, and blocks for one only while it holds none, so image locks cannot deadlock.
class ImageLock {
public:
    ImageLock() = default;
    ImageLock(const ImageLock&) = delete;
    ImageLock& operator=(const ImageLock&) = delete;

    bool held_here() const noexcept { return detail::held_image_lock == this; }

    /// Takes the lock for the calling thread; waits while another thread holds it (at most for
    /// one critical section). The caller holds no image lock. A critical section is short, so a
    /// contended lock first yields the CPU a few times (to the holder, when it shares this core)
    /// and looks again; only then does it sleep, since a sleep costs the holder a futex wake-up
    /// and this thread a context switch each time (measured under 4 KiB random writes on two
    /// workers: 25-34k writes/s sleeping at once, 34-43k yielding first).
    void acquire() {
        if (mutex_.try_lock()) {
            detail::held_image_lock = this;
            return;
        }
        // The holder is likely running on the other CPU, within a few microseconds of the end of
        // its section: wait for it on this CPU first (a few microseconds at most), before a yield
        // (a system call, and a switch to another thread of this CPU when there is one). Measured
        // under 4 KiB writes on two workers, side by side, two rounds of five: 23k yields in a
        // copy-on-write run of 32k writes before; medians 17.2-17.8k to 18.6-19.3k IOPS for
        // copy-on-write, 22.4k to 23.7k into an empty image, the 70/30 mix within its noise.
        for (int i = 0; i < kSpins; ++i) {
            for (int k = 0; k < 8; ++k) cpu_relax();
            if (mutex_.try_lock()) {
                detail::held_image_lock = this;
                return;
            }
        }
        for (int i = 0; i < kYields; ++i) {
            if (mutex_.try_lock()) {
                detail::held_image_lock = this;
                return;
            }
            sched_yield();
        }
        mutex_.lock();
        detail::held_image_lock = this;
    }
    void release() noexcept {
        detail::held_image_lock = nullptr;
        mutex_.unlock();
    }

private:
    friend class ImageLockRef;
    static constexpr int kSpins = 32, kYields = 64;
    static void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#elif defined(__aarch64__)
        asm volatile("yield");
#endif
    }
    std::mutex mutex_;
    std::atomic<uint32_t> refs_{0};  // ImageLockRefs to it; the last one deletes it
};

/// Shared ownership of an ImageLock, one pointer wide (an std::shared_ptr would make
/// ImageExecutor too large for Asio's type-erased executor to hold in place, and every copy of
/// it into an any_io_executor would allocate).
class ImageLockRef {
public:
    static ImageLockRef make() { return ImageLockRef(new ImageLock); }
    ImageLockRef(const ImageLockRef& o) noexcept : lock_(o.lock_) { lock_->refs_.fetch_add(1, std::memory_order_relaxed); }
    ImageLockRef(ImageLockRef&& o) noexcept : lock_(std::exchange(o.lock_, nullptr)) {}
    ImageLockRef& operator=(ImageLockRef o) noexcept {
        std::swap(lock_, o.lock_);
        return *this;
    }
    ~ImageLockRef() {
        if (lock_ && lock_->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete lock_;
    }
    ImageLock* get() const noexcept { return lock_; }
    ImageLock* operator->() const noexcept { return lock_; }
    ImageLock& operator*() const noexcept { return *lock_; }

private:
    explicit ImageLockRef(ImageLock* lock) noexcept : lock_(lock) { lock_->refs_.store(1, std::memory_order_relaxed); }
    ImageLock* lock_;
};

/// Holds `lock` for a scope.
class ImageLockHold {
public:
    explicit ImageLockHold(ImageLock& lock) : lock_(lock) { lock_.acquire(); }
    ~ImageLockHold() { lock_.release(); }
    ImageLockHold(const ImageLockHold&) = delete;
    ImageLockHold& operator=(const ImageLockHold&) = delete;

private:
    ImageLock& lock_;
};

/// The executor of one request (or background job) of an image: it runs work on the request's
/// home worker, the one that received it, under the image's lock. When the work may run at once
/// (Asio's "blocking.possibly": dispatch, the resumption of a coroutine after its I/O) and the
/// calling thread is the home worker, it runs inline, taking the lock if the thread does not
/// hold it yet; otherwise ("blocking.never": post, co_spawn; another thread; a thread holding
/// another image's lock) it is queued on the home worker's loop and takes the lock there.
///
/// So a request runs start to reply on the thread that received it, and its I/O completes on that
/// thread's ring. Requests of one image on different workers run at once, and only their
/// critical sections exclude each other: a contended lock makes the other worker wait for the
/// holder's section to end, never for I/O. Timers and I/O objects made with it belong to the home
/// worker's context. It shares ownership of the lock: work that drops the image's last reference
/// while it runs under the lock still lets go of a live lock.
template <bool Never>
class BasicImageExecutor {
public:
    BasicImageExecutor(const Workers& workers, ImageLockRef lock, unsigned home) noexcept
        : workers_(&workers), lock_(std::move(lock)), home_(home) {}

    asio::execution_context& query(asio::execution::context_t) const noexcept;
    static constexpr asio::execution::blocking_t query(asio::execution::blocking_t) noexcept {
        if constexpr (Never) return asio::execution::blocking.never;
        else return asio::execution::blocking.possibly;
    }
    BasicImageExecutor<true> require(asio::execution::blocking_t::never_t) const noexcept {
        return BasicImageExecutor<true>(*workers_, lock_, home_);
    }
    BasicImageExecutor<false> require(asio::execution::blocking_t::possibly_t) const noexcept {
        return BasicImageExecutor<false>(*workers_, lock_, home_);
    }

    template <class F>
    void execute(F&& f) const;

    unsigned home() const noexcept { return home_; }

    friend bool operator==(const BasicImageExecutor& a, const BasicImageExecutor& b) noexcept {
        return a.workers_ == b.workers_ && a.lock_.get() == b.lock_.get() && a.home_ == b.home_;
    }
    friend bool operator!=(const BasicImageExecutor& a, const BasicImageExecutor& b) noexcept { return !(a == b); }

private:
    const Workers* workers_;
    ImageLockRef lock_;
    unsigned home_;
};
using ImageExecutor = BasicImageExecutor<false>;
// Asio's any_io_executor keeps an executor of up to three pointers in place; a larger one is
// allocated on every conversion, that is several times per request.
static_assert(sizeof(ImageExecutor) <= 3 * sizeof(void*), "ImageExecutor must fit in any_io_executor");

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
    /// An executor of `lock`'s image whose home is the calling thread's worker (worker 0 on
    /// other threads).
    ImageExecutor image_executor(ImageLockRef lock) const {
        return ImageExecutor(*this, std::move(lock), here_index());
    }

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
asio::execution_context& BasicImageExecutor<Never>::query(asio::execution::context_t) const noexcept {
    return workers_->context(home_);
}

template <bool Never>
template <class F>
void BasicImageExecutor<Never>::execute(F&& f) const {
    using Work = std::decay_t<F>;
    if constexpr (!Never) {
        if (workers_->on_worker() && detail::current_worker.index == home_) {
            ImageLock* held = detail::held_image_lock;
            if (held == lock_.get()) {
                Work local(std::forward<F>(f));
                std::move(local)();
                return;
            }
            if (!held) {
                Work local(std::forward<F>(f));
                ImageLockRef lock = lock_;  // `local` may hold the last executor
                ImageLockHold hold(*lock);
                std::move(local)();
                return;
            }
        }
    }
    asio::post(workers_->context(home_), [lock = lock_, work = Work(std::forward<F>(f))]() mutable {
        ImageLockHold hold(*lock);
        std::move(work)();
    });
}

/// Runs `fn` (a system call or a long computation that touches no image state: a read, a write,
/// a decompression) with the calling thread's image lock let go, and takes the lock again before
/// returning fn's result or passing on its exception, so the image's requests on other workers go
/// on meanwhile. Image state read before the call may have changed after it: call it only where
/// the caller co_awaits, i.e. where it already expects other requests to run. Without a held
/// lock, fn just runs.
template <class Fn>
decltype(auto) unlocked(Fn&& fn) {
    ImageLock* held = detail::held_image_lock;
    if (!held) return std::forward<Fn>(fn)();
    held->release();
    struct Retake {
        ImageLock* lock;
        ~Retake() { lock->acquire(); }
    } retake{held};
    return std::forward<Fn>(fn)();
}

}  // namespace qcowfs
