// InodeTable: lookups create inodes and forget frees them; nothing else creates any.
#include <doctest/doctest.h>
#include <fuse_lowlevel.h>

#include "qcowfs/fs/filesystem.hpp"

using namespace qcowfs::fs;

namespace {
NodeKey image(uint64_t ino, std::string snap = {}) {
    return NodeKey{snap.empty() ? NodeKey::Kind::image : NodeKey::Kind::snapshot, 1, ino, std::move(snap)};
}
}  // namespace

TEST_CASE("inodes exist only while the kernel holds lookups") {
    InodeTable table(NodeKey{NodeKey::Kind::directory, 1, 2, {}});
    CHECK(table.size() == 1);  // the root
    struct stat st{};
    st.st_size = 42;

    // Listing a directory or refreshing attributes must not create inodes no forget would free.
    CHECK(table.find(image(10)) == 0);
    table.update(image(10), st);
    CHECK(table.size() == 1);

    uint64_t a = table.ref(image(10), st);
    uint64_t b = table.ref(image(10), st);
    uint64_t snap = table.ref(image(10, "1"), st);
    CHECK(a == b);
    CHECK(a != snap);
    CHECK(a != FUSE_ROOT_ID);
    CHECK(table.find(image(10)) == a);

    NodeKey key;
    struct stat got{};
    REQUIRE(table.get(a, key, got));
    CHECK(key == image(10));
    CHECK(got.st_ino == a);
    CHECK(got.st_size == 42);

    table.forget(a, 1);
    CHECK(table.find(image(10)) == a);  // one lookup left
    table.forget(a, 1);
    CHECK(table.find(image(10)) == 0);
    CHECK_FALSE(table.get(a, key, got));
    table.forget(snap, 5);  // more than held: gone, no underflow
    CHECK(table.size() == 1);
    table.forget(FUSE_ROOT_ID, 100);  // the root is never forgotten
    CHECK(table.size() == 1);
}
