// Workers and HereExecutor: a free strand runs on the worker that asks, a busy one queues; one
// holder at a time; off_strand frees the strand; AsyncEvent wakes waiters on the setter's worker.
#include <doctest/doctest.h>

#include <atomic>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
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

}  // namespace

TEST_CASE("a coroutine on a free strand of HereExecutor runs on the worker that started it") {
    Workers workers(2);
    auto strand = asio::make_strand(workers.here_executor());
    std::atomic<int> finished{0};
    unsigned ran_on[2] = {99, 99}, resumed_on[2] = {99, 99};
    for (unsigned w = 0; w < 2; ++w) {
        asio::post(workers.context(w), [&, w] {
            // One after the other (worker 1 starts later), so the strand is free each time.
            if (w == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
            asio::co_spawn(strand, [&, w]() -> Task<void> {
                ran_on[w] = here();
                // A wait that completes through worker 0's timer service resumes on worker 0.
                asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(1));
                co_await t.async_wait(asio::use_awaitable);
                resumed_on[w] = here();
            }, [&](std::exception_ptr) { ++finished; });
        });
    }
    run_until(workers, [&] { return finished == 2; });
    CHECK(finished == 2);
    CHECK(ran_on[0] == 0);
    CHECK(ran_on[1] == 1);
    CHECK(resumed_on[0] == 0);
    CHECK(resumed_on[1] == 0);
}

TEST_CASE("workers contending for one strand never run it at once, and every coroutine finishes") {
    Workers workers(2);
    auto strand = asio::make_strand(workers.here_executor());
    std::atomic<int> inside{0}, max_inside{0}, finished{0};
    std::atomic<int> ran_on[2] = {0, 0};
    constexpr int kPerWorker = 2000;
    for (unsigned w = 0; w < 2; ++w) {
        asio::post(workers.context(w), [&] {
            for (int i = 0; i < kPerWorker; ++i) {
                asio::co_spawn(strand, [&, i]() -> Task<void> {
                    int now = ++inside;
                    int seen = max_inside;
                    while (now > seen && !max_inside.compare_exchange_weak(seen, now)) {
                    }
                    ++ran_on[here()];
                    volatile int spin = 0;
                    for (int k = 0; k < 200; ++k) spin = spin + k;
                    --inside;
                    // Some wait on an event set by another coroutine of the strand.
                    if (i % 7 == 0) {
                        AsyncEvent e(co_await asio::this_coro::executor);
                        asio::co_spawn(co_await asio::this_coro::executor, [&e]() -> Task<void> {
                            e.set();
                            co_return;
                        }, [](std::exception_ptr) {});
                        co_await e.wait();
                    }
                }, [&](std::exception_ptr) { ++finished; });
            }
        });
    }
    run_until(workers, [&] { return finished == 2 * kPerWorker; });
    CHECK(finished == 2 * kPerWorker);
    CHECK(max_inside == 1);
    CHECK(ran_on[0] + ran_on[1] == 2 * kPerWorker);
}

TEST_CASE("off_strand runs its function outside the strand: another worker takes the strand meanwhile") {
    Workers workers(2);
    auto strand = asio::make_strand(workers.here_executor());
    std::atomic<bool> other_ran{false}, fn_saw_other{false};
    std::atomic<int> finished{0};
    unsigned fn_on = 99, resumed_on = 99;
    asio::post(workers.context(0), [&] {
        asio::co_spawn(strand, [&]() -> Task<void> {
            int v = co_await off_strand([&] {
                fn_on = here();
                // Worker 1 can only run its coroutine on the strand if this one let it go.
                auto limit = std::chrono::steady_clock::now() + std::chrono::seconds(5);
                while (!other_ran && std::chrono::steady_clock::now() < limit) std::this_thread::yield();
                fn_saw_other = other_ran.load();
                return 42;
            });
            resumed_on = here();
            CHECK(v == 42);
        }, [&](std::exception_ptr) { ++finished; });
        asio::post(workers.context(1), [&] {
            asio::co_spawn(strand, [&]() -> Task<void> {
                other_ran = true;
                co_return;
            }, [&](std::exception_ptr) { ++finished; });
        });
    });
    run_until(workers, [&] { return finished == 2; });
    CHECK(finished == 2);
    CHECK(fn_on == 0);
    CHECK(fn_saw_other);
    // On worker 0, or on worker 1 if it still held the strand when the copy ended.
    CHECK(resumed_on < 2);
}

TEST_CASE("off_strand passes the function's exception to the caller") {
    Workers workers(1);
    auto strand = asio::make_strand(workers.here_executor());
    std::atomic<int> finished{0};
    bool caught = false;
    asio::co_spawn(strand, [&]() -> Task<void> {
        try {
            co_await off_strand([]() -> int { throw std::runtime_error("boom"); });
        } catch (const std::runtime_error& e) {
            caught = std::string(e.what()) == "boom";
        }
    }, [&](std::exception_ptr) { ++finished; });
    run_until(workers, [&] { return finished == 1; });
    CHECK(caught);
}

TEST_CASE("AsyncEvent wakes its waiter on the worker that set it, without a timer") {
    Workers workers(2);
    auto strand = asio::make_strand(workers.here_executor());
    std::atomic<int> finished{0};
    std::atomic<bool> waiting{false};
    unsigned waited_on = 99, woke_on = 99;
    AsyncEvent event(strand);
    asio::post(workers.context(0), [&] {
        asio::co_spawn(strand, [&]() -> Task<void> {
            waited_on = here();
            waiting = true;
            co_await event.wait();
            woke_on = here();
        }, [&](std::exception_ptr) { ++finished; });
    });
    std::thread setter([&] {
        while (!waiting) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        asio::post(workers.context(1), [&] { asio::post(strand, [&] { event.set(); }); });
    });
    run_until(workers, [&] { return finished == 1; });
    setter.join();
    CHECK(finished == 1);
    CHECK(waited_on == 0);
    CHECK(woke_on == 1);
}
