// Worker threads that run (de)compression batches on all cores while results are taken in submission order.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qcowfs::stream {

/// A batch of work; run() executes on a worker thread, the submitter reads its results afterwards.
struct Batch {
    virtual ~Batch() = default;
    virtual void run() = 0;
    std::exception_ptr error;  // set when run() threw
    bool done = false;         // guarded by the pool's mutex
};

/// Runs batches on `threads` workers. The submitting thread keeps them in order: next_done()
/// hands back the oldest batch once it has finished, so output order equals submission order no
/// matter which worker finishes first. At most `max_in_flight` batches are queued or running;
/// submit() waits for the oldest to finish beyond that, so memory stays bounded.
class OrderedPool {
public:
    OrderedPool(unsigned threads, size_t max_in_flight);
    ~OrderedPool();  // stops the workers; batches not yet taken are dropped
    OrderedPool(const OrderedPool&) = delete;
    OrderedPool& operator=(const OrderedPool&) = delete;

    /// Queues `b`. If max_in_flight batches are outstanding, first waits for the oldest and hands
    /// it to `on_done` (which may throw; the error then propagates to the caller).
    void submit(std::unique_ptr<Batch> b, const std::function<void(Batch&)>& on_done);
    /// Hands every finished batch at the head of the order to `on_done`, without waiting.
    void poll(const std::function<void(Batch&)>& on_done);
    /// Waits for all outstanding batches, handing each to `on_done` in order.
    void drain(const std::function<void(Batch&)>& on_done);
    size_t outstanding() const { return order_.size(); }

private:
    void worker();
    /// Pops the head of order_ (waiting for it when `wait`), or returns null.
    std::unique_ptr<Batch> pop_head(bool wait);
    void finish(std::unique_ptr<Batch> b, const std::function<void(Batch&)>& on_done);

    size_t max_in_flight_;
    std::mutex mutex_;
    std::condition_variable work_cv_;  // workers: a batch was queued or stop_ was set
    std::condition_variable done_cv_;  // submitter: a batch finished
    std::deque<Batch*> queue_;         // not yet started, guarded by mutex_
    bool stop_ = false;                // guarded by mutex_
    std::deque<std::unique_ptr<Batch>> order_;  // submitter thread only: all outstanding, oldest first
    std::vector<std::thread> threads_;
};

/// Worker count for (de)compression: the number of online CPUs, at least 1.
unsigned default_threads();

}  // namespace qcowfs::stream
