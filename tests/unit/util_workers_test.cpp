// Workers and ImageExecutor: an image's coroutine runs and resumes on the worker that started it;
// one critical section of an image at a time; unlocked lets the lock go; no nested image locks.
#include <doctest/doctest.h>

#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <memory>
#include <optional>
#include <stdexcept>
#include <thread>

#include "qcowfs/util/async_event.hpp"
#include "qcowfs/util/workers.hpp"

using namespace qcowfs;

namespace {

unsigned here() { return detail::current_worker.workers ? detail::current_worker.index : 99; }

/// Runs `workers` until `done` turns true (at most 10 s), then stops them.
template <class Done>
void run_until(Workers& workers, Done done) {
    std::thread watchdog([&] {
        auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!done() && std::chrono::steady_clock::now() < limit) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        workers.stop();
    });
    workers.run_all();
    watchdog.join();
}

/// Spins for `until` to turn true, at most 5 s.
template <class Until>
void spin_for(Until until) {
    auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!until() && std::chrono::steady_clock::now() < limit) std::this_thread::yield();
}

}  // namespace

TEST_CASE("an image's coroutine runs on the worker that started it and resumes there after a wait") {
    Workers workers(2);
    auto lock = ImageLockRef::make();
    std::atomic<int> finished{0};
    unsigned ran_on[2] = {99, 99}, resumed_on[2] = {99, 99};
    bool held[2] = {false, false};
    for (unsigned w = 0; w < 2; ++w) {
        asio::post(workers.context(w), [&, w] {
            asio::co_spawn(workers.image_executor(lock), [&, w]() -> Task<void> {
                ran_on[w] = here();
                asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(1));
                co_await t.async_wait(asio::use_awaitable);
                resumed_on[w] = here();
                held[w] = lock->held_here();
            }, [&](std::exception_ptr) { ++finished; });
        });
    }
    run_until(workers, [&] { return finished == 2; });
    CHECK(finished == 2);
    for (unsigned w = 0; w < 2; ++w) {
        CHECK(ran_on[w] == w);
        CHECK(resumed_on[w] == w);
        CHECK(held[w]);
    }
}

TEST_CASE("coroutines of one image on two workers never run at once, each stays on its worker, all finish") {
    Workers workers(2);
    auto lock = ImageLockRef::make();
    std::atomic<int> inside{0}, max_inside{0}, finished{0};
    std::atomic<int> moved{0};
    constexpr int kPerWorker = 2000;
    for (unsigned w = 0; w < 2; ++w) {
        asio::post(workers.context(w), [&, w] {
            auto ex = workers.image_executor(lock);
            for (int i = 0; i < kPerWorker; ++i) {
                asio::co_spawn(ex, [&, w, i]() -> Task<void> {
                    for (int round = 0; round < 2; ++round) {
                        int now = ++inside;
                        int seen = max_inside;
                        while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {
                        }
                        if (here() != w) ++moved;
                        volatile int spin = 0;
                        for (int k = 0; k < 200; ++k) spin = spin + k;
                        --inside;
                        // Some wait on an event that another coroutine of the image sets, some let
                        // the lock go for a moment.
                        if (i % 7 == 0) {
                            AsyncEvent e(co_await asio::this_coro::executor);
                            asio::co_spawn(co_await asio::this_coro::executor, [&e]() -> Task<void> {
                                e.set();
                                co_return;
                            }, [](std::exception_ptr) {});
                            co_await e.wait();
                        } else if (i % 5 == 0) {
                            unlocked([] { std::this_thread::yield(); });
                        }
                    }
                }, [&](std::exception_ptr) { ++finished; });
            }
        });
    }
    run_until(workers, [&] { return finished == 2 * kPerWorker; });
    CHECK(finished == 2 * kPerWorker);
    CHECK(max_inside == 1);
    CHECK(moved == 0);
}

TEST_CASE("unlocked lets the image's lock go: its coroutine on another worker runs meanwhile") {
    Workers workers(2);
    auto lock = ImageLockRef::make();
    std::atomic<bool> in_section{false}, other_ran{false}, fn_saw_other{false}, held_in_fn{true}, held_after{false};
    std::atomic<int> finished{0};
    unsigned fn_on = 99, resumed_on = 99;
    asio::post(workers.context(0), [&] {
        asio::co_spawn(workers.image_executor(lock), [&]() -> Task<void> {
            in_section = true;
            int v = unlocked([&] {
                fn_on = here();
                held_in_fn = lock->held_here();
                // Worker 1 can only run its coroutine of the image if this one let the lock go.
                spin_for([&] { return other_ran.load(); });
                fn_saw_other = other_ran.load();
                return 42;
            });
            resumed_on = here();
            held_after = lock->held_here();
            CHECK(v == 42);
            co_return;
        }, [&](std::exception_ptr) { ++finished; });
    });
    asio::post(workers.context(1), [&] {
        // Only once worker 0's coroutine holds the lock.
        spin_for([&] { return in_section.load(); });
        asio::co_spawn(workers.image_executor(lock), [&]() -> Task<void> {
            other_ran = true;
            co_return;
        }, [&](std::exception_ptr) { ++finished; });
    });
    run_until(workers, [&] { return finished == 2; });
    CHECK(finished == 2);
    CHECK(fn_on == 0);
    CHECK_FALSE(held_in_fn);
    CHECK(fn_saw_other);
    CHECK(resumed_on == 0);
    CHECK(held_after);
}

TEST_CASE("unlocked passes the function's exception on and takes the lock again") {
    Workers workers(1);
    auto lock = ImageLockRef::make();
    std::atomic<int> finished{0};
    bool caught = false, held = false;
    asio::co_spawn(workers.image_executor(lock), [&]() -> Task<void> {
        try {
            unlocked([]() -> int { throw std::runtime_error("boom"); });
        } catch (const std::runtime_error& e) {
            caught = std::string(e.what()) == "boom";
            held = lock->held_here();
        }
        co_return;
    }, [&](std::exception_ptr) { ++finished; });
    run_until(workers, [&] { return finished == 1; });
    CHECK(caught);
    CHECK(held);
}

TEST_CASE("AsyncEvent wakes its waiter on the waiter's own worker, without a timer") {
    Workers workers(2);
    auto lock = ImageLockRef::make();
    std::atomic<int> finished{0};
    std::atomic<bool> waiting{false};
    unsigned waited_on = 99, woke_on = 99, set_on = 99;
    std::optional<AsyncEvent> event;
    asio::post(workers.context(0), [&] {
        auto ex = workers.image_executor(lock);
        event.emplace(ex);
        asio::co_spawn(ex, [&]() -> Task<void> {
            waited_on = here();
            waiting = true;
            co_await event->wait();
            woke_on = here();
        }, [&](std::exception_ptr) { ++finished; });
    });
    std::thread setter([&] {
        while (!waiting) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        asio::post(workers.context(1), [&] {
            asio::co_spawn(workers.image_executor(lock), [&]() -> Task<void> {
                set_on = here();
                event->set();
                co_return;
            }, [](std::exception_ptr) {});
        });
    });
    run_until(workers, [&] { return finished == 1; });
    setter.join();
    CHECK(finished == 1);
    CHECK(set_on == 1);
    CHECK(waited_on == 0);
    CHECK(woke_on == 0);
}

TEST_CASE("a thread holding one image's lock queues another image's work instead of waiting for its lock") {
    Workers workers(1);
    auto lock_a = ImageLockRef::make(), lock_b = ImageLockRef::make();
    std::atomic<int> finished{0};
    bool ran_inline = false, b_held_alone = false, same_image_inline = false;
    asio::co_spawn(workers.image_executor(lock_a), [&]() -> Task<void> {
        bool ran = false;
        asio::dispatch(workers.image_executor(lock_b), [&] {
            ran = true;
            b_held_alone = lock_b->held_here() && !lock_a->held_here();
            ++finished;
        });
        ran_inline = ran;
        // Work of the same image may run at once: the lock is already this thread's.
        bool ran_same = false;
        asio::dispatch(workers.image_executor(lock_a), [&] { ran_same = lock_a->held_here(); });
        same_image_inline = ran_same;
        co_return;
    }, [&](std::exception_ptr) { ++finished; });
    run_until(workers, [&] { return finished == 2; });
    CHECK(finished == 2);
    CHECK_FALSE(ran_inline);
    CHECK(b_held_alone);
    CHECK(same_image_inline);
}

TEST_CASE("the last reference to an image's lock may go while work runs under it") {
    Workers workers(1);
    std::atomic<int> finished{0};
    bool held = false;
    {
        auto lock = ImageLockRef::make();
        ImageLock* raw = lock.get();  // alive while the coroutine's executors own it
        asio::co_spawn(workers.image_executor(std::move(lock)), [&, raw]() -> Task<void> {
            held = raw->held_here();
            co_return;
        }, [&](std::exception_ptr) { ++finished; });
    }
    // Only the coroutine's executors own the lock now; it ends, and they go, under the lock.
    run_until(workers, [&] { return finished == 1; });
    CHECK(finished == 1);
    CHECK(held);
}
