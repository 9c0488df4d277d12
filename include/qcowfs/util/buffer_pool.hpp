#pragma once
// Request-sized byte buffers that go back to a small shared cache instead of to malloc.
//
// Every read reply and every small write needs a buffer for the life of one request. A
// PooledBuffer takes one from the cache (or from malloc) and returns it there when dropped (or to
// free, when the cache is full). The cache is shared by all threads, behind a mutex held for a
// scan of a few slots: a buffer may be filled on one worker and dropped on another, which would
// leave a per-thread cache empty on the first and full on the second. It keeps at most
// kCachedBuffers buffers of at most kMaxCachedBytes (1 MiB: the largest read FUSE sends) each,
// kBudgetBytes (8 MiB) in all; larger buffers always come from malloc. Buffers start on a page
// (4 KiB), so that a copy-on-write can read the old cluster into one with O_DIRECT.

#include <array>
#include <bit>
#include <cstddef>
#include <mutex>
#include <new>
#include <utility>

namespace qcowfs {

namespace detail {

class BufferCache {
public:
    static constexpr size_t kCachedBuffers = 16;
    static constexpr size_t kMaxCachedBytes = 1 << 20;
    static constexpr size_t kBudgetBytes = 8 << 20;

    /// A cached buffer of exactly `capacity` bytes, or null.
    std::byte* take(size_t capacity) {
        std::lock_guard lock(mutex_);
        for (Slot& s : slots_)
            if (s.data && s.capacity == capacity) {
                cached_bytes_ -= capacity;
                return std::exchange(s.data, nullptr);
            }
        return nullptr;
    }
    /// Keeps `data` if there is room; false: the caller frees it.
    bool give(std::byte* data, size_t capacity) {
        if (capacity > kMaxCachedBytes) return false;
        std::lock_guard lock(mutex_);
        if (cached_bytes_ + capacity > kBudgetBytes) return false;
        for (Slot& s : slots_)
            if (!s.data) {
                s = Slot{data, capacity};
                cached_bytes_ += capacity;
                return true;
            }
        return false;
    }

private:
    struct Slot {
        std::byte* data = nullptr;
        size_t capacity = 0;
    };
    std::mutex mutex_;
    std::array<Slot, kCachedBuffers> slots_{};
    size_t cached_bytes_ = 0;  // the slots' capacities, at most kBudgetBytes
};

/// The bytes allocated for a request of n: powers of two from 4 KiB, so a freed buffer serves
/// any request of its class; n itself above the largest cached size.
inline size_t pooled_capacity(size_t n) {
    return n > BufferCache::kMaxCachedBytes ? n : std::bit_ceil(n < 4096 ? size_t{4096} : n);
}

/// Buffers start on a page (for O_DIRECT reads into them); every buffer the cache holds comes
/// from allocate_buffer and goes back with free_buffer.
inline constexpr std::align_val_t kBufferAlignment{4096};
inline std::byte* allocate_buffer(size_t capacity) {
    return static_cast<std::byte*>(::operator new(capacity, kBufferAlignment));
}
inline void free_buffer(std::byte* data) { ::operator delete(data, kBufferAlignment); }

/// The process's cache; never destroyed, so buffers dropped during exit still have it.
inline BufferCache& buffer_cache() {
    static BufferCache* cache = new BufferCache;
    return *cache;
}

}  // namespace detail

/// A buffer of size() bytes (contents undefined until written), owned like a unique_ptr.
class PooledBuffer {
public:
    PooledBuffer() = default;
    explicit PooledBuffer(size_t n) : size_(n), capacity_(detail::pooled_capacity(n)) {
        if (capacity_ <= detail::BufferCache::kMaxCachedBytes) data_ = detail::buffer_cache().take(capacity_);
        if (!data_) data_ = detail::allocate_buffer(capacity_);
    }
    PooledBuffer(PooledBuffer&& o) noexcept
        : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)), capacity_(o.capacity_) {}
    PooledBuffer& operator=(PooledBuffer&& o) noexcept {
        if (this != &o) {
            release();
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
            capacity_ = o.capacity_;
        }
        return *this;
    }
    ~PooledBuffer() { release(); }

    std::byte* data() const { return data_; }
    size_t size() const { return size_; }

private:
    void release() {
        if (data_ && !detail::buffer_cache().give(data_, capacity_)) detail::free_buffer(data_);
        data_ = nullptr;
    }

    std::byte* data_ = nullptr;
    size_t size_ = 0;
    size_t capacity_ = 0;
};

}  // namespace qcowfs
