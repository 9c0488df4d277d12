// Unit tests for Scanner: real qcow2 images made by qemu-img in temporary source directories.
#include <doctest/doctest.h>

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <system_error>
#include <vector>

#include "qcowfs/fs/tree.hpp"

using qcowfs::fs::ImageInfo;
using qcowfs::fs::Node;
using qcowfs::fs::NodeKey;
using qcowfs::fs::ScanOptions;
using qcowfs::fs::Scanner;
using qcowfs::fs::Tree;

namespace {

constexpr uint64_t kMiB = 1024 * 1024;
constexpr mode_t kWriteBits = S_IWUSR | S_IWGRP | S_IWOTH;

bool have_qemu_img() {
    static const bool ok = std::system("qemu-img --version >/dev/null 2>&1") == 0;
    return ok;
}

/// Runs a shell command quietly; true on success.
bool sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0; }

/// A fresh directory under /tmp, removed (with everything in it) at scope exit.
class TempDir {
public:
    TempDir() {
        char tmpl[] = "/tmp/qcowfs_scanner_XXXXXX";
        const char* p = ::mkdtemp(tmpl);
        REQUIRE(p != nullptr);
        path_ = p;
    }
    TempDir(const TempDir&) = delete;
    TempDir& operator=(const TempDir&) = delete;
    ~TempDir() {
        sh("chmod -R u+rwx '" + path_ + "'");
        std::error_code ec;
        std::filesystem::remove_all(path_, ec);
    }
    const std::string& path() const { return path_; }
    std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

    /// Runs `qemu-img ARGS` inside this directory (so relative backing/data file names stay relative).
    void qemu_img(const std::string& args) const {
        INFO("qemu-img " << args);
        std::string command = "cd '";  // built step by step: g++ 12 warns falsely on a chain of +
        command.append(path_).append("' && qemu-img ").append(args);
        REQUIRE(sh(command));
    }
    /// Like qemu_img, for commands that may fail for reasons of the machine rather than the test.
    bool try_qemu_img(const std::string& args) const { return sh("cd '" + path_ + "' && qemu-img " + args); }
    void mkdir(const std::string& rel, mode_t mode = 0755) const {
        REQUIRE(::mkdir((*this / rel).c_str(), mode) == 0);
        REQUIRE(::chmod((*this / rel).c_str(), mode) == 0);  // not subject to the umask
    }
    void write(const std::string& rel, const std::string& bytes) const {
        std::ofstream out(*this / rel, std::ios::binary | std::ios::trunc);
        out << bytes;
        REQUIRE(out.good());
    }
    void patch(const std::string& rel, std::streamoff offset, const std::string& bytes) const {
        std::fstream f(*this / rel, std::ios::binary | std::ios::in | std::ios::out);
        f.seekp(offset);
        f << bytes;
        REQUIRE(f.good());
    }
    void symlink(const std::string& target, const std::string& rel) const {
        REQUIRE(::symlink(target.c_str(), (*this / rel).c_str()) == 0);
    }
    struct stat stat(const std::string& rel = "") const {
        struct stat st {};
        REQUIRE(::stat(rel.empty() ? path_.c_str() : (*this / rel).c_str(), &st) == 0);
        return st;
    }

private:
    std::string path_;
};

std::set<std::string> names_of(const Node& dir) {
    std::set<std::string> out;
    for (const auto& [name, key] : dir.children) out.insert(name);
    return out;
}

const Node& child(const Tree& tree, const Node& dir, const std::string& name) {
    const Node* n = tree.child(dir.key, name);
    INFO("looking up " << name);
    REQUIRE(n != nullptr);
    return *n;
}

NodeKey dir_key(const struct stat& st) { return NodeKey{NodeKey::Kind::directory, st.st_dev, st.st_ino, {}}; }
NodeKey image_key(const struct stat& st) { return NodeKey{NodeKey::Kind::image, st.st_dev, st.st_ino, {}}; }
NodeKey snapshot_key(const struct stat& st, std::string id) {
    return NodeKey{NodeKey::Kind::snapshot, st.st_dev, st.st_ino, std::move(id)};
}

bool same_time(const timespec& a, const timespec& b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; }

}  // namespace

TEST_CASE("Scanner mirrors directories and exposes only qcow2 images") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 vm1.qcow2 16T");  // only the header may be read, never 16 TiB
    d.qemu_img("create -f qcow2 disk.img 64M");   // an image without a qcow2 extension
    d.write("notes.txt", "hello, not an image\n");
    d.write("tiny", "QF");  // shorter than the magic
    d.write("zeros.bin", std::string(4096, '\0'));
    d.write("almost.qcow2", std::string("QFI\xfa", 4) + std::string(200, 'x'));  // wrong magic byte
    d.mkdir("empty");
    d.mkdir("sub");
    d.mkdir("sub/deep", 0750);
    d.write("sub/readme", "text");
    d.qemu_img("create -f qcow2 sub/deep/vm2.qcow2 1M");
    REQUIRE(::chmod((d / "vm1.qcow2").c_str(), 0644) == 0);
    REQUIRE(::chmod((d / "sub/deep/vm2.qcow2").c_str(), 0640) == 0);

    Scanner scanner(d.path(), ScanOptions{});
    std::shared_ptr<const Tree> tree = scanner.scan();
    REQUIRE(tree != nullptr);

    const Node& root = tree->root();
    CHECK(root.key == dir_key(d.stat()));
    CHECK(root.name.empty());
    CHECK(names_of(root) == std::set<std::string>{"disk.img.raw", "empty", "sub", "vm1.raw"});
    CHECK(tree->size() == 7);  // root, empty, sub, deep, vm1, disk.img, vm2

    SUBCASE("image attributes follow the host file, sizes the virtual disk") {
        const struct stat host = d.stat("vm1.qcow2");
        const Node& vm1 = child(*tree, root, "vm1.raw");
        CHECK(vm1.key == image_key(host));
        CHECK(vm1.name == "vm1.raw");
        CHECK(vm1.attr.st_mode == (S_IFREG | 0444));
        CHECK(vm1.attr.st_nlink == 1);
        CHECK(static_cast<uint64_t>(vm1.attr.st_size) == (uint64_t{16} << 40));
        CHECK(vm1.attr.st_blocks == host.st_blocks);
        CHECK(vm1.attr.st_blksize == 4096);
        CHECK(vm1.attr.st_uid == host.st_uid);
        CHECK(vm1.attr.st_gid == host.st_gid);
        CHECK(same_time(vm1.attr.st_mtim, host.st_mtim));
        CHECK(same_time(vm1.attr.st_ctim, host.st_ctim));
        CHECK(vm1.snapshot_index == -1);
        CHECK(vm1.children.empty());
        REQUIRE(vm1.image != nullptr);
        const ImageInfo& info = *vm1.image;
        CHECK(info.path == d / "vm1.qcow2");
        CHECK(info.virtual_size == (uint64_t{16} << 40));
        CHECK(info.allocated_bytes == static_cast<uint64_t>(host.st_blocks) * 512);
        CHECK(info.error.empty());
        CHECK(info.backing_path.empty());
        CHECK(info.snapshots.empty());
        CHECK(info.host_stat.st_ino == host.st_ino);

        const Node& disk = child(*tree, root, "disk.img.raw");
        CHECK(disk.key == image_key(d.stat("disk.img")));
        CHECK(static_cast<uint64_t>(disk.attr.st_size) == 64 * kMiB);
    }

    SUBCASE("directories are mirrored, even empty ones, without write bits") {
        const Node& empty = child(*tree, root, "empty");
        CHECK(empty.key == dir_key(d.stat("empty")));
        CHECK(empty.attr.st_mode == (S_IFDIR | 0555));
        CHECK(empty.attr.st_nlink == 2);
        CHECK(empty.children.empty());
        CHECK(root.attr.st_mode == (S_IFDIR | ((d.stat().st_mode & 0777) & ~kWriteBits)));

        const Node& sub = child(*tree, root, "sub");
        CHECK(names_of(sub) == std::set<std::string>{"deep"});
        const Node& deep = child(*tree, sub, "deep");
        CHECK(deep.attr.st_mode == (S_IFDIR | 0550));
        CHECK(same_time(deep.attr.st_mtim, d.stat("sub/deep").st_mtim));
        CHECK(names_of(deep) == std::set<std::string>{"vm2.raw"});
        const Node& vm2 = child(*tree, deep, "vm2.raw");
        CHECK(vm2.attr.st_mode == (S_IFREG | 0440));
        CHECK(static_cast<uint64_t>(vm2.attr.st_size) == kMiB);
        CHECK(vm2.image->path == d / "sub/deep/vm2.qcow2");
        CHECK(tree->find(vm2.key) == &vm2);
    }
}

TEST_CASE("Scanner keeps write bits only when writes are supported and the image is usable") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 ok.qcow2 1M");
    d.qemu_img("snapshot -c snap ok.qcow2");
    d.write("broken.qcow2", std::string("QFI\xfb", 4) + std::string(4092, '\xff'));
    d.mkdir("dir", 0775);
    for (const char* f : {"ok.qcow2", "broken.qcow2"}) REQUIRE(::chmod((d / f).c_str(), 0664) == 0);

    Scanner scanner(d.path(), ScanOptions{.exclude = "", .writes_supported = true});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    CHECK(child(*tree, root, "ok.raw").attr.st_mode == (S_IFREG | 0664));
    CHECK(child(*tree, root, "ok@snap.raw").attr.st_mode == (S_IFREG | 0444));  // snapshots are read-only
    CHECK(child(*tree, root, "broken.raw").attr.st_mode == (S_IFREG | 0444));   // cannot be opened
    CHECK(child(*tree, root, "dir").attr.st_mode == (S_IFDIR | 0775));

    Scanner read_only(d.path(), ScanOptions{});
    auto ro_tree = read_only.scan();
    CHECK(child(*ro_tree, ro_tree->root(), "ok.raw").attr.st_mode == (S_IFREG | 0444));
    CHECK(child(*ro_tree, ro_tree->root(), "dir").attr.st_mode == (S_IFDIR | 0555));
}

TEST_CASE("Scanner marks corrupt, unknown-feature and broken images read-only, with the reason") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 ok.qcow2 1M");
    d.qemu_img("create -f qcow2 corrupt.qcow2 1M");
    d.patch("corrupt.qcow2", 72 + 7, "\x02");  // incompatible feature bit 1: corrupt
    d.qemu_img("create -f qcow2 future.qcow2 1M");
    d.patch("future.qcow2", 72 + 7, "\x40");  // an incompatible feature bit nobody knows yet
    d.write("broken.qcow2", std::string("QFI\xfb", 4) + std::string(4092, '\xff'));
    for (const char* f : {"ok.qcow2", "corrupt.qcow2", "future.qcow2", "broken.qcow2"})
        REQUIRE(::chmod((d / f).c_str(), 0664) == 0);

    Scanner scanner(d.path(), ScanOptions{.exclude = "", .writes_supported = true});
    auto tree = scanner.scan();
    const Node& root = tree->root();

    const Node& ok = child(*tree, root, "ok.raw");
    CHECK(ok.image->read_only_reason.empty());
    CHECK(ok.attr.st_mode == (S_IFREG | 0664));

    // A corrupt image still reads (its size is known, no error), but is never written.
    const Node& corrupt = child(*tree, root, "corrupt.raw");
    CHECK(corrupt.image->error.empty());
    CHECK(corrupt.image->virtual_size == kMiB);
    CHECK(corrupt.image->read_only_reason == "the image is marked corrupt");
    CHECK(corrupt.attr.st_mode == (S_IFREG | 0444));

    for (const char* name : {"future.raw", "broken.raw"}) {
        INFO(name);
        const Node& n = child(*tree, root, name);
        CHECK_FALSE(n.image->error.empty());
        CHECK(n.image->read_only_reason == n.image->error);
        CHECK(n.attr.st_mode == (S_IFREG | 0444));
    }
    CHECK(child(*tree, root, "future.raw").image->read_only_reason.find("0x40") != std::string::npos);
}

TEST_CASE("Scanner marks backing files of other images read-only, by host identity") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.mkdir("sub");
    d.qemu_img("create -f qcow2 base.qcow2 4M");
    d.qemu_img("create -f qcow2 -b ../base.qcow2 -F qcow2 sub/mid.qcow2");  // relative, other directory
    d.qemu_img("create -f qcow2 -b mid.qcow2 -F qcow2 sub/top.qcow2");
    d.qemu_img("create -f qcow2 lone.qcow2 4M");
    d.qemu_img("create -f qcow2 target.qcow2 4M");
    d.symlink("target.qcow2", "alias.img");  // a name the scanner shows too, same file
    d.qemu_img("create -f qcow2 -b alias.img -F qcow2 via_alias.qcow2");
    for (const char* f : {"base.qcow2", "sub/mid.qcow2", "sub/top.qcow2", "lone.qcow2", "target.qcow2",
                          "via_alias.qcow2"})
        REQUIRE(::chmod((d / f).c_str(), 0644) == 0);

    Scanner scanner(d.path(), ScanOptions{.exclude = "", .writes_supported = true});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    const Node& sub = child(*tree, root, "sub");

    auto writable = [](const Node& n) { return (n.attr.st_mode & kWriteBits) != 0; };
    const Node& base = child(*tree, root, "base.raw");
    const Node& mid = child(*tree, sub, "mid.raw");
    const Node& top = child(*tree, sub, "top.raw");
    CHECK_FALSE(writable(base));
    CHECK(base.image->read_only_reason == "it is the backing file of " + (d / "sub/mid.qcow2"));
    CHECK_FALSE(writable(mid));  // backs top, and is itself an overlay
    CHECK(mid.image->read_only_reason == "it is the backing file of " + (d / "sub/top.qcow2"));
    CHECK(writable(top));
    CHECK(top.image->read_only_reason.empty());
    CHECK(writable(child(*tree, root, "lone.raw")));
    CHECK(writable(child(*tree, root, "via_alias.raw")));
    // The backing file is named through a symlink: the file behind it is what is protected,
    // under both of its names.
    CHECK_FALSE(writable(child(*tree, root, "target.raw")));
    CHECK_FALSE(writable(child(*tree, root, "alias.img.raw")));
    CHECK_FALSE(child(*tree, root, "target.raw").image->read_only_reason.empty());

    // Decided again on every scan: once the overlay is gone, its backing file is writable again.
    REQUIRE(::unlink((d / "sub/top.qcow2").c_str()) == 0);
    auto again = scanner.scan();
    const Node& mid2 = child(*again, child(*again, again->root(), "sub"), "mid.raw");
    CHECK(writable(mid2));
    CHECK(mid2.image->read_only_reason.empty());
    CHECK_FALSE(writable(child(*again, again->root(), "base.raw")));
    // The earlier tree is unchanged (the reason lives on a copy, not on the cached parse).
    CHECK_FALSE(writable(mid));
    CHECK_FALSE(mid.image->read_only_reason.empty());
}

TEST_CASE("Scanner without writes (-o ro) exposes no write bits at all") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.mkdir("dir", 0777);
    d.qemu_img("create -f qcow2 dir/vm.qcow2 1M");
    d.qemu_img("create -f qcow2 vm.qcow2 1M");
    d.qemu_img("snapshot -c snap vm.qcow2");
    for (const char* f : {"vm.qcow2", "dir/vm.qcow2"}) REQUIRE(::chmod((d / f).c_str(), 0666) == 0);

    Scanner rw(d.path(), ScanOptions{.exclude = "", .writes_supported = true});
    auto rw_tree = rw.scan();
    CHECK(child(*rw_tree, rw_tree->root(), "vm.raw").attr.st_mode == (S_IFREG | 0666));
    CHECK(child(*rw_tree, child(*rw_tree, rw_tree->root(), "dir"), "vm.raw").attr.st_mode == (S_IFREG | 0666));

    Scanner ro(d.path(), ScanOptions{.exclude = "", .writes_supported = false});
    auto tree = ro.scan();
    const Node& root = tree->root();
    CHECK((root.attr.st_mode & kWriteBits) == 0);
    const Node& dir = child(*tree, root, "dir");
    CHECK(dir.attr.st_mode == (S_IFDIR | 0555));
    CHECK(child(*tree, dir, "vm.raw").attr.st_mode == (S_IFREG | 0444));
    CHECK(child(*tree, root, "vm.raw").attr.st_mode == (S_IFREG | 0444));
    CHECK(child(*tree, root, "vm@snap.raw").attr.st_mode == (S_IFREG | 0444));
}

TEST_CASE("Scanner exposes internal snapshots as NAME@SNAP.raw") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 s.qcow2 1M");
    d.qemu_img("snapshot -c snap1 s.qcow2");
    d.qemu_img("resize s.qcow2 2M");
    d.qemu_img("snapshot -c before s.qcow2");
    // Duplicate names and a name with '/' fall back to the snapshot IDs.
    d.qemu_img("create -f qcow2 d.qcow2 1M");
    d.qemu_img("snapshot -c dup d.qcow2");
    d.qemu_img("snapshot -c dup d.qcow2");
    d.qemu_img("snapshot -c a/b d.qcow2");
    d.qemu_img("snapshot -c fine d.qcow2");

    Scanner scanner(d.path(), ScanOptions{});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    CHECK(names_of(root) ==
          std::set<std::string>{"s.raw", "s@snap1.raw", "s@before.raw", "d.raw", "d@1.raw", "d@2.raw",
                                "d@3.raw", "d@fine.raw"});

    const struct stat host = d.stat("s.qcow2");
    const Node& s = child(*tree, root, "s.raw");
    CHECK(static_cast<uint64_t>(s.attr.st_size) == 2 * kMiB);
    REQUIRE(s.image->snapshots.size() == 2);
    CHECK(s.image->snapshots[0].id == "1");
    CHECK(s.image->snapshots[0].name == "snap1");
    CHECK(s.image->snapshots[0].disk_size == kMiB);
    CHECK(s.image->snapshots[1].disk_size == 2 * kMiB);

    const Node& snap1 = child(*tree, root, "s@snap1.raw");
    CHECK(snap1.key == snapshot_key(host, "1"));
    CHECK(snap1.image == s.image);  // the same parse serves image and snapshot nodes
    CHECK(snap1.snapshot_index == 0);
    CHECK(static_cast<uint64_t>(snap1.attr.st_size) == kMiB);
    CHECK(snap1.attr.st_blocks == 0);
    CHECK(snap1.attr.st_nlink == 1);
    CHECK(snap1.attr.st_mode == (S_IFREG | ((host.st_mode & 0777) & ~kWriteBits)));
    CHECK(snap1.attr.st_uid == host.st_uid);
    CHECK(same_time(snap1.attr.st_mtim, host.st_mtim));

    const Node& before = child(*tree, root, "s@before.raw");
    CHECK(before.key == snapshot_key(host, "2"));
    CHECK(before.snapshot_index == 1);
    CHECK(static_cast<uint64_t>(before.attr.st_size) == 2 * kMiB);

    const struct stat dhost = d.stat("d.qcow2");
    CHECK(child(*tree, root, "d@1.raw").key == snapshot_key(dhost, "1"));
    CHECK(child(*tree, root, "d@2.raw").key == snapshot_key(dhost, "2"));
    const Node& slash = child(*tree, root, "d@3.raw");
    CHECK(slash.image->snapshots[static_cast<size_t>(slash.snapshot_index)].name == "a/b");
    CHECK(child(*tree, root, "d@fine.raw").key == snapshot_key(dhost, "4"));
}

TEST_CASE("Scanner lists images it cannot open, with the reason") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    // qemu-img's LUKS key-derivation benchmark sometimes fails ("Unable to get accurate CPU usage"): retry.
    bool luks = false;
    for (int attempt = 0; attempt < 10 && !luks; ++attempt)
        luks = d.try_qemu_img("create -f qcow2 --object secret,id=sec0,data=abc "
                              "-o encrypt.format=luks,encrypt.key-secret=sec0 e.qcow2 1M");
    if (!luks) {
        WARN_MESSAGE(false, "qemu-img could not make a LUKS image here; checking the legacy AES one only");
        d.qemu_img("create -f qcow2 --object secret,id=sec0,data=abc -o encrypt.format=aes,encrypt.key-secret=sec0 "
                   "e.qcow2 1M");
    }
    d.qemu_img("create -f qcow2 --object secret,id=sec0,data=abc -o encrypt.format=aes,encrypt.key-secret=sec0 "
               "aes.qcow2 2M");
    d.write("broken.qcow2", std::string("QFI\xfb", 4) + std::string(4092, '\xff'));
    d.qemu_img("create -f qcow2 future.qcow2 1M");
    d.patch("future.qcow2", 72 + 7, "\x40");  // an incompatible feature bit nobody knows yet
    d.qemu_img("create -f qcow2 cut.qcow2 1M");
    REQUIRE(::truncate((d / "cut.qcow2").c_str(), 50) == 0);  // header cut short

    Scanner scanner(d.path(), ScanOptions{});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    CHECK(names_of(root) == std::set<std::string>{"e.raw", "aes.raw", "broken.raw", "future.raw", "cut.raw"});

    for (const auto& expected : {std::pair{"e.raw", kMiB}, std::pair{"aes.raw", 2 * kMiB}}) {
        const auto& [name, size] = expected;
        INFO(expected.first);  // clang 14 cannot capture a structured binding (INFO does)
        const Node& e = child(*tree, root, name);
        CHECK(e.image->error == "encryption is not supported");
        CHECK(e.image->virtual_size == size);
        CHECK(static_cast<uint64_t>(e.attr.st_size) == size);
        CHECK((e.attr.st_mode & kWriteBits) == 0);
    }

    for (const char* name : {"broken.raw", "future.raw", "cut.raw"}) {
        INFO(name);
        const Node& n = child(*tree, root, name);
        REQUIRE(n.image != nullptr);
        CHECK_FALSE(n.image->error.empty());
        CHECK(n.image->error.find("Input/output error") == std::string::npos);  // no strerror suffix
        CHECK(n.image->virtual_size == 0);
        CHECK(n.attr.st_size == 0);
        CHECK(n.image->snapshots.empty());
        CHECK(n.attr.st_mode == (S_IFREG | ((d.stat(n.image->path.substr(d.path().size() + 1)).st_mode & 0777) &
                                            ~kWriteBits)));
    }
}

TEST_CASE("Scanner resolves name clashes deterministically") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 a.qcow 1M");
    d.qemu_img("create -f qcow2 a.qcow2 2M");
    d.qemu_img("snapshot -c x a.qcow2");
    // Three files that all map to x.raw.
    d.qemu_img("create -f qcow2 x.qcow2 1M");
    d.qemu_img("snapshot -c z x.qcow2");
    d.qemu_img("create -f qcow2 x.qcow 1M");
    d.qemu_img("create -f qcow2 x 1M");
    d.qemu_img("snapshot -c y x");
    // b.qcow2's snapshot "s" is b@s.raw, which b@s.qcow2 would also be; "b.qcow2" sorts first.
    d.qemu_img("create -f qcow2 b.qcow2 1M");
    d.qemu_img("snapshot -c s b.qcow2");
    d.qemu_img("create -f qcow2 b@s.qcow2 3M");
    // An image and a directory competing for c.raw: "c.qcow2" sorts before "c.raw".
    d.qemu_img("create -f qcow2 c.qcow2 1M");
    d.mkdir("c.raw");
    // Exposed names the kernel could not look up (over 255 bytes) are left out.
    std::string long_host(251, 'l');  // + ".img": 255 bytes, exposed would be 259
    long_host += ".img";
    std::string create = "create -f qcow2 ";  // appended, not a chain of +: g++ 12 warns falsely
    create.append(long_host).append(" 1M");
    d.qemu_img(create);
    d.qemu_img("create -f qcow2 v.qcow2 1M");
    d.qemu_img("snapshot -c " + std::string(250, 's') + " v.qcow2");  // v@sss...s.raw: 256 bytes
    d.qemu_img("snapshot -c " + std::string(249, 's') + " v.qcow2");  // 255 bytes: fits

    Scanner scanner(d.path(), ScanOptions{});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    CHECK(names_of(root) == std::set<std::string>{"a.qcow.raw", "a.raw", "a@x.raw", "b.raw", "b@s.raw", "c.raw",
                                                  "v.raw", "v@" + std::string(249, 's') + ".raw", "x.raw",
                                                  "x.qcow.raw", "x@y.raw", "x.qcow2.raw", "x.qcow2@z.raw"});
    // The .qcow2 file keeps the short name; the .qcow one keeps its full name.
    CHECK(child(*tree, root, "a.raw").key == image_key(d.stat("a.qcow2")));
    CHECK(child(*tree, root, "a.qcow.raw").key == image_key(d.stat("a.qcow")));
    CHECK(child(*tree, root, "a@x.raw").key == snapshot_key(d.stat("a.qcow2"), "1"));
    // A file without a qcow extension has no other name: it keeps x.raw.
    CHECK(child(*tree, root, "x.raw").key == image_key(d.stat("x")));
    CHECK(child(*tree, root, "x@y.raw").key == snapshot_key(d.stat("x"), "1"));
    CHECK(child(*tree, root, "x.qcow.raw").key == image_key(d.stat("x.qcow")));
    CHECK(child(*tree, root, "x.qcow2.raw").key == image_key(d.stat("x.qcow2")));
    CHECK(child(*tree, root, "x.qcow2@z.raw").key == snapshot_key(d.stat("x.qcow2"), "1"));
    CHECK(child(*tree, root, "b@s.raw").key == snapshot_key(d.stat("b.qcow2"), "1"));
    CHECK(child(*tree, root, "c.raw").key == image_key(d.stat("c.qcow2")));
    CHECK(tree->find(image_key(d.stat("b@s.qcow2"))) == nullptr);
    CHECK(tree->find(dir_key(d.stat("c.raw"))) == nullptr);
}

TEST_CASE("Scanner follows symlinks to files but not to directories") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.mkdir("sub");
    d.qemu_img("create -f qcow2 sub/vm.qcow2 1M");
    d.write("notes.txt", "text");
    d.symlink("sub/vm.qcow2", "link.qcow2");
    d.symlink("sub", "dirlink");
    d.symlink("nowhere.qcow2", "dangling.qcow2");
    d.symlink("notes.txt", "notes.qcow2");
    d.symlink(d.path(), "sub/loop");  // would recurse forever if followed

    Scanner scanner(d.path(), ScanOptions{});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    CHECK(names_of(root) == std::set<std::string>{"link.raw", "sub"});
    const Node& sub = child(*tree, root, "sub");
    CHECK(names_of(sub) == std::set<std::string>{"vm.raw"});
    // One host file, one identity: the link is another name of the same node.
    const Node& link = child(*tree, root, "link.raw");
    CHECK(link.key == image_key(d.stat("sub/vm.qcow2")));
    CHECK(&link == &child(*tree, sub, "vm.raw"));
    CHECK(static_cast<uint64_t>(link.attr.st_size) == kMiB);
}

TEST_CASE("Scanner resolves backing files and counts external data files") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.mkdir("sub");
    d.qemu_img("create -f qcow2 base.qcow2 4M");
    d.qemu_img("create -f qcow2 -b base.qcow2 -F qcow2 child.qcow2");
    d.qemu_img("create -f qcow2 -b ../base.qcow2 -F qcow2 sub/child.qcow2");
    d.qemu_img("create -f qcow2 -b '" + (d / "base.qcow2") + "' -F qcow2 abs.qcow2");
    d.qemu_img("create -f qcow2 -o data_file=x.data x.qcow2 1M");
    d.qemu_img("create -f qcow2 -o data_file=y.data y.qcow2 1M");
    REQUIRE(::unlink((d / "y.data").c_str()) == 0);

    Scanner scanner(d.path(), ScanOptions{});
    auto tree = scanner.scan();
    const Node& root = tree->root();
    CHECK(names_of(root) == std::set<std::string>{"base.raw", "child.raw", "abs.raw", "x.raw", "y.raw", "sub"});

    const Node& base = child(*tree, root, "base.raw");
    CHECK(base.image->backing_path.empty());
    const Node& ch = child(*tree, root, "child.raw");
    CHECK(ch.image->backing_path == d / "base.qcow2");
    CHECK(static_cast<uint64_t>(ch.attr.st_size) == 4 * kMiB);  // size inherited from the backing file
    CHECK(child(*tree, child(*tree, root, "sub"), "child.raw").image->backing_path == d / "sub/../base.qcow2");
    CHECK(child(*tree, root, "abs.raw").image->backing_path == d / "base.qcow2");

    const Node& x = child(*tree, root, "x.raw");
    CHECK(x.image->error.empty());
    const uint64_t x_alloc = static_cast<uint64_t>(d.stat("x.qcow2").st_blocks + d.stat("x.data").st_blocks) * 512;
    CHECK(x.image->allocated_bytes == x_alloc);
    CHECK(static_cast<uint64_t>(x.attr.st_blocks) == x_alloc / 512);

    const Node& y = child(*tree, root, "y.raw");
    CHECK(y.image->error == "external data file y.data not found");
    CHECK((y.attr.st_mode & kWriteBits) == 0);

    // The data file is not part of the image's own stat: its appearance is noticed anyway.
    d.write("y.data", std::string(4096, 'y'));
    auto again = scanner.scan();
    CHECK(child(*again, again->root(), "y.raw").image->error.empty());
}

TEST_CASE("Scanner probes an image with an external data file again at every scan") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 -o data_file=x.data x.qcow2 1M");
    d.qemu_img("create -f qcow2 nodata.qcow2 1M");
    d.patch("nodata.qcow2", 72 + 7, "\x04");  // the data file bit, but no data file named

    Scanner scanner(d.path(), ScanOptions{});
    auto t1 = scanner.scan();
    CHECK(child(*t1, t1->root(), "nodata.raw").image->error ==
          "the external data file bit is set but the image names no data file");
    // Only the data file changes: the image's own stat does not, yet its blocks are counted anew.
    d.write("x.data", std::string(256 * 1024, 'x'));
    auto t2 = scanner.scan();
    const uint64_t blocks = static_cast<uint64_t>(d.stat("x.qcow2").st_blocks + d.stat("x.data").st_blocks) * 512;
    CHECK(child(*t2, t2->root(), "x.raw").image->allocated_bytes == blocks);
    // An image whose problem is its own (no data file named) is not probed again.
    CHECK(child(*t2, t2->root(), "nodata.raw").image == child(*t1, t1->root(), "nodata.raw").image);
}

TEST_CASE("Scanner reuses unchanged parses and reflects changes on the next scan") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.qemu_img("create -f qcow2 vm.qcow2 1M");
    d.qemu_img("create -f qcow2 other.qcow2 1M");
    d.qemu_img("create -f qcow2 gone.qcow2 1M");
    d.write("later.qcow2", "not yet an image");

    Scanner scanner(d.path(), ScanOptions{});
    auto t1 = scanner.scan();
    CHECK(names_of(t1->root()) == std::set<std::string>{"vm.raw", "other.raw", "gone.raw"});
    auto t2 = scanner.scan();
    CHECK(t2 != t1);
    CHECK(child(*t2, t2->root(), "vm.raw").image == child(*t1, t1->root(), "vm.raw").image);
    CHECK(child(*t2, t2->root(), "other.raw").image == child(*t1, t1->root(), "other.raw").image);

    d.qemu_img("resize other.qcow2 2M");
    REQUIRE(::unlink((d / "gone.qcow2").c_str()) == 0);
    d.qemu_img("create -f qcow2 new.qcow2 3M");
    REQUIRE(::unlink((d / "later.qcow2").c_str()) == 0);
    d.qemu_img("create -f qcow2 later.qcow2 5M");
    d.mkdir("newdir");

    auto t3 = scanner.scan();
    const Node& root = t3->root();
    CHECK(names_of(root) == std::set<std::string>{"vm.raw", "other.raw", "new.raw", "later.raw", "newdir"});
    CHECK(child(*t3, root, "vm.raw").image == child(*t1, t1->root(), "vm.raw").image);
    const Node& other = child(*t3, root, "other.raw");
    CHECK(other.image != child(*t1, t1->root(), "other.raw").image);
    CHECK(static_cast<uint64_t>(other.attr.st_size) == 2 * kMiB);
    CHECK(static_cast<uint64_t>(child(*t3, root, "new.raw").attr.st_size) == 3 * kMiB);
    CHECK(static_cast<uint64_t>(child(*t3, root, "later.raw").attr.st_size) == 5 * kMiB);
    // Earlier trees are immutable snapshots: they still show what they showed.
    CHECK(names_of(t1->root()) == std::set<std::string>{"vm.raw", "other.raw", "gone.raw"});

    // A metadata-only change (mtime) is enough to re-read; a rename updates the recorded path.
    REQUIRE(sh("touch -m -d '2001-02-03 04:05:06' '" + (d / "vm.qcow2") + "'"));
    REQUIRE(::rename((d / "other.qcow2").c_str(), (d / "renamed.qcow2").c_str()) == 0);
    auto t4 = scanner.scan();
    const Node& vm = child(*t4, t4->root(), "vm.raw");
    CHECK(vm.image != child(*t3, root, "vm.raw").image);
    CHECK(vm.attr.st_mtim.tv_sec == d.stat("vm.qcow2").st_mtim.tv_sec);
    const Node& renamed = child(*t4, t4->root(), "renamed.raw");
    CHECK(renamed.key == other.key);  // identity survives the rename
    CHECK(renamed.image->path == d / "renamed.qcow2");
}

TEST_CASE("Scanner skips the excluded path and unreadable entries, fails only for SOURCE_DIR") {
    REQUIRE_MESSAGE(have_qemu_img(), "qemu-img is needed to build test images");
    TempDir d;
    d.mkdir("mnt");
    d.qemu_img("create -f qcow2 mnt/inside.qcow2 1M");
    d.qemu_img("create -f qcow2 vm.qcow2 1M");
    d.mkdir("locked", 0000);
    d.qemu_img("create -f qcow2 secret.qcow2 1M");
    REQUIRE(::chmod((d / "secret.qcow2").c_str(), 0000) == 0);

    Scanner scanner(d.path(), ScanOptions{.exclude = d / "mnt/", .writes_supported = false});
    auto tree = scanner.scan();
    std::set<std::string> names = names_of(tree->root());
    CHECK(names.count("mnt") == 0);
    CHECK(names.count("vm.raw") == 1);
    if (::geteuid() != 0) {
        CHECK(names.count("locked") == 0);
        CHECK(names.count("secret.raw") == 0);
    } else {
        MESSAGE("running as root: permission bits do not make entries unreadable");
    }

    // The mount point is only excluded when it is that exact path.
    Scanner all(d.path() + "/", ScanOptions{});
    CHECK(names_of(all.scan()->root()).count("mnt") == 1);

    Scanner missing(d / "does-not-exist", ScanOptions{});
    CHECK_THROWS_AS(missing.scan(), std::system_error);
    Scanner not_dir(d / "vm.qcow2", ScanOptions{});
    CHECK_THROWS_AS(not_dir.scan(), std::system_error);
    if (::geteuid() != 0) {
        Scanner locked(d / "locked", ScanOptions{});
        CHECK_THROWS_AS(locked.scan(), std::system_error);
    }
}
