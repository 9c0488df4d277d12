// Unit tests for exposed name mapping (raw_name, snapshot_raw_name, bitmap_raw_name) and the Tree node store.
#include <doctest/doctest.h>

#include "qcowfs/fs/tree.hpp"

using qcowfs::fs::Node;
using qcowfs::fs::NodeKey;
using qcowfs::fs::raw_name;
using qcowfs::fs::snapshot_raw_name;
using qcowfs::fs::bitmap_raw_name;
using qcowfs::fs::Tree;

TEST_CASE("raw_name strips one qcow2/qcow extension and appends .raw") {
    CHECK(raw_name("vm1.qcow2") == "vm1.raw");
    CHECK(raw_name("a.qcow") == "a.raw");
    CHECK(raw_name("disk.img") == "disk.img.raw");
    CHECK(raw_name("noext") == "noext.raw");
    CHECK(raw_name("x.qcow2.qcow2") == "x.qcow2.raw");
    CHECK(raw_name("x.qcow.qcow2") == "x.qcow.raw");
    CHECK(raw_name("x.qcow2.qcow") == "x.qcow2.raw");
    CHECK(raw_name("x.raw") == "x.raw.raw");
    // Case-sensitive, like the host file system.
    CHECK(raw_name("A.QCOW2") == "A.QCOW2.raw");
    // A name that is only the extension keeps it rather than becoming the hidden ".raw".
    CHECK(raw_name(".qcow2") == ".qcow2.raw");
    CHECK(raw_name(".qcow") == ".qcow.raw");
    CHECK(raw_name("a.qcow2x") == "a.qcow2x.raw");
}

TEST_CASE("snapshot_raw_name puts the snapshot label between the image base and .raw") {
    CHECK(snapshot_raw_name("vm1.raw", "snap1") == "vm1@snap1.raw");
    CHECK(snapshot_raw_name("a.qcow2.raw", "3") == "a.qcow2@3.raw");
    CHECK(snapshot_raw_name("disk.img.raw", "before upgrade") == "disk.img@before upgrade.raw");
    CHECK(snapshot_raw_name(raw_name("vm1.qcow2"), "s") == "vm1@s.raw");
}

TEST_CASE("bitmap_raw_name: NAME@bitmap-BITMAP.raw, nothing for a name a file cannot carry") {
    CHECK(bitmap_raw_name("vm1.raw", "daily") == "vm1@bitmap-daily.raw");
    CHECK(bitmap_raw_name("disk.img.raw", "odd name: x y") == "disk.img@bitmap-odd name: x y.raw");
    CHECK(bitmap_raw_name("vm1.raw", "a/b").empty());
    CHECK(bitmap_raw_name("vm1.raw", std::string("a\0b", 3)).empty());
    CHECK(bitmap_raw_name("vm1.raw", "").empty());
}

namespace {

Node make_node(NodeKey key, std::string name) {
    Node n;
    n.key = std::move(key);
    n.name = std::move(name);
    return n;
}

}  // namespace

TEST_CASE("Tree finds nodes by key and children by name") {
    Tree tree;
    NodeKey root{NodeKey::Kind::directory, 1, 10, {}};
    NodeKey image{NodeKey::Kind::image, 1, 11, {}};
    NodeKey snap{NodeKey::Kind::snapshot, 1, 11, "1"};
    NodeKey other_snap{NodeKey::Kind::snapshot, 1, 11, "2"};

    Node r = make_node(root, "");
    r.attr.st_mode = S_IFDIR | 0555;
    r.children.emplace("vm.raw", image);
    r.children.emplace("vm@s.raw", snap);
    r.children.emplace("dangling.raw", other_snap);  // names a key that was never added
    tree.add(std::move(r));
    tree.add(make_node(image, "vm.raw"));
    tree.add(make_node(snap, "vm@s.raw"));
    tree.set_root(root);

    CHECK(tree.size() == 3);
    CHECK(tree.root().key == root);
    CHECK(S_ISDIR(tree.root().attr.st_mode));
    REQUIRE(tree.find(image) != nullptr);
    CHECK(tree.find(image)->name == "vm.raw");
    CHECK(tree.find(snap)->name == "vm@s.raw");
    CHECK(tree.find(other_snap) == nullptr);
    CHECK(tree.find(NodeKey{NodeKey::Kind::directory, 1, 11, {}}) == nullptr);  // kind is part of the key

    REQUIRE(tree.child(root, "vm.raw") != nullptr);
    CHECK(tree.child(root, "vm.raw")->key == image);
    CHECK(tree.child(root, "vm@s.raw")->key == snap);
    CHECK(tree.child(root, "missing.raw") == nullptr);
    CHECK(tree.child(root, "dangling.raw") == nullptr);
    CHECK(tree.child(image, "vm.raw") == nullptr);  // not a directory with children
    CHECK(tree.child(NodeKey{NodeKey::Kind::directory, 9, 9, {}}, "vm.raw") == nullptr);

    // Adding a node with an existing key replaces it.
    tree.add(make_node(image, "renamed.raw"));
    CHECK(tree.size() == 3);
    CHECK(tree.find(image)->name == "renamed.raw");
}

TEST_CASE("Tree without a root node serves an empty directory") {
    Tree tree;
    CHECK(tree.size() == 0);
    CHECK(S_ISDIR(tree.root().attr.st_mode));
    CHECK(tree.root().children.empty());
    CHECK(tree.child(tree.root().key, "x") == nullptr);
}
