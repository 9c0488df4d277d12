// The write path of an Image: allocation, copy-on-write, zeroing, resize and ordered flushes.
#include "qcowfs/format/error.hpp"
#include "qcowfs/qcow2/image.hpp"

namespace qcowfs::qcow2 {

Task<void> Image::read_active(uint64_t offset, std::span<std::byte> buf) { co_await read_mapped(l1_, offset, buf); }

Task<void> Image::write(uint64_t, std::span<const std::byte>) { fail(EROFS, "writing is not implemented yet"); }
Task<void> Image::write_zeroes(uint64_t, uint64_t, bool) { fail(EROFS, "writing is not implemented yet"); }
Task<void> Image::allocate(uint64_t, uint64_t) { fail(EROFS, "writing is not implemented yet"); }
Task<void> Image::resize(uint64_t) { fail(EROFS, "writing is not implemented yet"); }
Task<void> Image::flush() { co_return; }
Task<void> Image::close() { co_return; }

}  // namespace qcowfs::qcow2
