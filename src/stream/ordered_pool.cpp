// OrderedPool: a shared queue for the workers, a submission-ordered list for the submitter.
#include "stream/ordered_pool.hpp"

namespace qcowfs::stream {

OrderedPool::OrderedPool(unsigned threads, size_t max_in_flight) : max_in_flight_(max_in_flight ? max_in_flight : 1) {
    for (unsigned i = 0; i < (threads ? threads : 1); ++i) threads_.emplace_back([this] { worker(); });
}

OrderedPool::~OrderedPool() {
    {
        std::lock_guard lk(mutex_);
        stop_ = true;
        queue_.clear();
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
}

void OrderedPool::worker() {
    for (;;) {
        Batch* b = nullptr;
        {
            std::unique_lock lk(mutex_);
            work_cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
            if (stop_) return;
            b = queue_.front();
            queue_.pop_front();
        }
        try {
            b->run();
        } catch (...) {
            b->error = std::current_exception();
        }
        {
            std::lock_guard lk(mutex_);
            b->done = true;
        }
        done_cv_.notify_one();
    }
}

std::unique_ptr<Batch> OrderedPool::pop_head(bool wait) {
    if (order_.empty()) return nullptr;
    Batch* head = order_.front().get();
    std::unique_lock lk(mutex_);
    if (!head->done) {
        if (!wait) return nullptr;
        done_cv_.wait(lk, [&] { return head->done; });
    }
    lk.unlock();
    auto b = std::move(order_.front());
    order_.pop_front();
    return b;
}

void OrderedPool::finish(std::unique_ptr<Batch> b, const std::function<void(Batch&)>& on_done) {
    if (b->error) std::rethrow_exception(b->error);
    on_done(*b);
}

void OrderedPool::submit(std::unique_ptr<Batch> b, const std::function<void(Batch&)>& on_done) {
    while (order_.size() >= max_in_flight_) finish(pop_head(true), on_done);
    {
        std::lock_guard lk(mutex_);
        queue_.push_back(b.get());
    }
    order_.push_back(std::move(b));
    work_cv_.notify_one();
}

void OrderedPool::poll(const std::function<void(Batch&)>& on_done) {
    while (auto b = pop_head(false)) finish(std::move(b), on_done);
}

void OrderedPool::drain(const std::function<void(Batch&)>& on_done) {
    while (auto b = pop_head(true)) finish(std::move(b), on_done);
}

unsigned default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n ? n : 1;
}

}  // namespace qcowfs::stream
