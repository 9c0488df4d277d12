// Range locks: grant in arrival order among conflicting requests, concurrently otherwise.
#include "qcowfs/cache/range_lock.hpp"

#include <algorithm>
#include <limits>

namespace qcowfs::cache {

RangeLock::Guard& RangeLock::Guard::operator=(Guard&& other) noexcept {
    if (this != &other) {
        release();
        owner_ = other.owner_;
        id_ = other.id_;
        other.owner_ = nullptr;
    }
    return *this;
}

void RangeLock::Guard::release() {
    if (owner_) owner_->unlock(id_);
    owner_ = nullptr;
}

bool RangeLock::conflicts_with_held(const Request& r) const {
    return std::any_of(held_.begin(), held_.end(), [&](const Request& h) { return conflict(h, r); });
}

Task<RangeLock::Guard> RangeLock::lock(uint64_t offset, uint64_t length, Mode mode) {
    uint64_t end = length > std::numeric_limits<uint64_t>::max() - offset ? std::numeric_limits<uint64_t>::max()
                                                                          : offset + std::max<uint64_t>(length, 1);
    Request r{next_id_++, offset, end, mode, nullptr};
    bool blocked = conflicts_with_held(r) ||
                   std::any_of(waiters_.begin(), waiters_.end(), [&](const Request& w) { return conflict(w, r); });
    if (!blocked) {
        held_.push_back(r);
        co_return Guard(this, r.id);
    }
    r.granted = std::make_shared<AsyncEvent>(executor_);
    auto granted = r.granted;
    waiters_.push_back(r);
    co_await granted->wait();  // unlock() moved the request to held_ before setting the event
    co_return Guard(this, r.id);
}

void RangeLock::unlock(uint64_t id) {
    auto held = std::find_if(held_.begin(), held_.end(), [&](const Request& h) { return h.id == id; });
    if (held != held_.end()) {
        if (held != held_.end() - 1) *held = std::move(held_.back());
        held_.pop_back();
    }
    // Grant, in order, every waiter that conflicts neither with a held lock nor with an earlier
    // waiter that stays blocked.
    for (auto it = waiters_.begin(); it != waiters_.end();) {
        bool behind = std::any_of(waiters_.begin(), it, [&](const Request& w) { return conflict(w, *it); });
        if (!behind && !conflicts_with_held(*it)) {
            auto event = it->granted;
            held_.push_back(*it);
            held_.back().granted.reset();
            it = waiters_.erase(it);
            event->set();
        } else {
            ++it;
        }
    }
}

}  // namespace qcowfs::cache
