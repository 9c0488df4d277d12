// io/host: the checked path walk (symlinks, allowed directories, special files, own mount),
// QEMU's lock bytes between two opens, and access checks with another user's ids.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <filesystem>
#include <fstream>

#include "qcowfs/format/error.hpp"
#include "qcowfs/io/host.hpp"
#include "test_host_files.hpp"

using namespace qcowfs;
using qcowfs::test::host::TempDir;

namespace {

void write_text(const std::string& path, const std::string& text, mode_t mode = 0644) {
    std::ofstream(path) << text;
    ::chmod(path.c_str(), mode);
}

/// errno of what `fn` throws, 0 if nothing.
template <class Fn>
int errno_from(Fn fn) {
    try {
        fn();
    } catch (const std::system_error& e) {
        return errno_of(e);
    }
    return 0;
}

struct HostFixture {
    TempDir dir{"host"};
    asio::io_context io;
    io::HostPolicy policy;
    std::string src, out;
    HostFixture() {
        src = std::filesystem::canonical(dir.path).string() + "/src";
        out = std::filesystem::canonical(dir.path).string() + "/out";
        std::filesystem::create_directories(src);
        std::filesystem::create_directories(out);
        policy.allowed_dirs = {src};
        write_text(src + "/in.raw", "inside");
        write_text(out + "/decoy.raw", "outside");
    }
    std::unique_ptr<io::File> open(const std::string& path, io::FileRole role, bool writable = false) {
        io::HostOpen r;
        r.path = path;
        r.role = role;
        r.writable = writable;
        return io::open_host_file(io.get_executor(), policy, r);
    }
};

}  // namespace

TEST_CASE_FIXTURE(HostFixture, "backing and data files must resolve inside an allowed directory") {
    CHECK(open(src + "/in.raw", io::FileRole::backing) != nullptr);
    CHECK(errno_from([&] { open(out + "/decoy.raw", io::FileRole::backing); }) == EACCES);
    CHECK(errno_from([&] { open(src + "/../out/decoy.raw", io::FileRole::data_file); }) == EACCES);
    std::filesystem::create_symlink(out + "/decoy.raw", src + "/link");
    std::filesystem::create_directory_symlink(out, src + "/linkdir");
    CHECK(errno_from([&] { open(src + "/link", io::FileRole::backing); }) == EACCES);
    CHECK(errno_from([&] { open(src + "/linkdir/decoy.raw", io::FileRole::backing); }) == EACCES);
    // A symlink that stays inside is fine; so is everything once the directory is allowed.
    std::filesystem::create_symlink("in.raw", src + "/inner_link");
    CHECK(open(src + "/inner_link", io::FileRole::backing) != nullptr);
    policy.allowed_dirs.push_back(out);
    CHECK(open(src + "/linkdir/decoy.raw", io::FileRole::backing) != nullptr);
    policy.allowed_dirs = {"/"};
    CHECK(open(out + "/decoy.raw", io::FileRole::data_file) != nullptr);
}

TEST_CASE_FIXTURE(HostFixture, "only regular files are opened, without blocking on FIFOs") {
    REQUIRE(::mkfifo((src + "/fifo").c_str(), 0644) == 0);
    CHECK(errno_from([&] { open(src + "/fifo", io::FileRole::backing); }) == EACCES);
    CHECK(errno_from([&] { open(src + "/fifo", io::FileRole::image); }) == EACCES);
    CHECK(errno_from([&] { open(src, io::FileRole::image); }) == EACCES);
    policy.allowed_dirs = {"/"};
    CHECK(errno_from([&] { open("/dev/null", io::FileRole::backing); }) == EACCES);
}

TEST_CASE_FIXTURE(HostFixture, "symlink loops end, a final symlink is refused where the scan saw none") {
    std::filesystem::create_symlink("b", src + "/a");
    std::filesystem::create_symlink("a", src + "/b");
    CHECK(errno_from([&] { open(src + "/a", io::FileRole::backing); }) == ELOOP);
    std::filesystem::create_symlink("in.raw", src + "/now_link");
    io::HostOpen r;
    r.path = src + "/now_link";
    r.follow_final = false;
    CHECK(errno_from([&] { io::open_host_file(io.get_executor(), policy, r); }) == ESTALE);
    r.follow_final = true;
    struct stat st {};
    REQUIRE(::stat((src + "/in.raw").c_str(), &st) == 0);
    r.expect = io::FileIdentity{st.st_dev, st.st_ino};
    CHECK(io::open_host_file(io.get_executor(), policy, r) != nullptr);
    r.expect = io::FileIdentity{st.st_dev, st.st_ino + 1};
    CHECK(errno_from([&] { io::open_host_file(io.get_executor(), policy, r); }) == ESTALE);
}

TEST_CASE_FIXTURE(HostFixture, "nothing at or below the own mount point is opened, by path or by device") {
    std::filesystem::create_directories(src + "/mnt");
    write_text(src + "/mnt/x.raw", "x");
    policy.own_mount = src + "/mnt";
    CHECK(errno_from([&] { open(src + "/mnt/x.raw", io::FileRole::backing); }) == EACCES);
    std::filesystem::create_symlink(src + "/mnt", src + "/to_mnt");
    CHECK(errno_from([&] { open(src + "/to_mnt/x.raw", io::FileRole::backing); }) == EACCES);
    policy.own_mount.clear();
    struct stat st {};
    REQUIRE(::stat(src.c_str(), &st) == 0);
    policy.own_dev = st.st_dev;  // as if the whole directory were the mount
    CHECK(errno_from([&] { open(src + "/in.raw", io::FileRole::backing); }) == EACCES);
}

TEST_CASE_FIXTURE(HostFixture, "QEMU's lock bytes: readers share, a writer excludes other writers and readers' write") {
    auto a = open(src + "/in.raw", io::FileRole::image, true);
    auto b = open(src + "/in.raw", io::FileRole::image, true);  // a second open: another OFD
    CHECK(a->lock_mode() == io::LockMode::read);
    CHECK(b->lock_mode() == io::LockMode::read);
    // b reads and does not share write: a cannot start writing.
    CHECK(errno_from([&] { a->set_lock(io::LockMode::write); }) == EBUSY);
    CHECK(a->lock_mode() == io::LockMode::read);
    b.reset();
    a->set_lock(io::LockMode::write);
    CHECK(a->lock_mode() == io::LockMode::write);
    // While a writes, nobody else may even read (a does not share write, b's read needs that).
    CHECK(errno_from([&] { open(src + "/in.raw", io::FileRole::image); }) == EBUSY);
    a->set_lock(io::LockMode::read);
    CHECK(open(src + "/in.raw", io::FileRole::image) != nullptr);
    // Without locking (force_share) nothing is taken or checked.
    a->set_lock(io::LockMode::write);
    policy.locking = false;
    CHECK(open(src + "/in.raw", io::FileRole::image) != nullptr);
}

TEST_CASE_FIXTURE(HostFixture, "access checks take the user's ids: search permission on the way, read and write") {
    if (::geteuid() != 0) return;  // only root can take another user's ids
    const uid_t nobody = 65534;
    const gid_t nogroup = 65534;
    ::chmod(dir.path.c_str(), 0755);
    ::chmod(src.c_str(), 0755);
    write_text(src + "/pub.raw", "p", 0644);
    write_text(src + "/priv.raw", "q", 0600);
    std::filesystem::create_directories(src + "/closed");
    ::chmod((src + "/closed").c_str(), 0700);
    write_text(src + "/closed/pub.raw", "c", 0644);
    auto file_of = [&](const std::string& p, io::FileRole role) {
        struct stat st {};
        REQUIRE(::stat(p.c_str(), &st) == 0);
        return io::HostFile{p, role, true, io::FileIdentity{st.st_dev, st.st_ino}};
    };
    io::Credentials user{nobody, nogroup, {}};
    CHECK(io::needs_access_check(user));
    CHECK_NOTHROW(io::check_user_access(policy, user, {file_of(src + "/pub.raw", io::FileRole::image)}, false));
    CHECK(errno_from([&] {
              io::check_user_access(policy, user, {file_of(src + "/pub.raw", io::FileRole::image)}, true);
          }) == EACCES);
    CHECK(errno_from([&] {
              io::check_user_access(policy, user, {file_of(src + "/priv.raw", io::FileRole::backing)}, false);
          }) == EACCES);
    CHECK(errno_from([&] {
              io::check_user_access(policy, user, {file_of(src + "/closed/pub.raw", io::FileRole::image)}, false);
          }) == EACCES);
    // A backing file is only read, even for a writer; the wrong file at the path is refused.
    ::chmod((src + "/pub.raw").c_str(), 0666);
    CHECK_NOTHROW(io::check_user_access(policy, user,
                                        {file_of(src + "/pub.raw", io::FileRole::image),
                                         file_of(src + "/in.raw", io::FileRole::backing)},
                                        true));
    // Another file at an image's path, or none: the image moved since the scan (ESTALE, the
    // caller looks again); the wrong file at a backing file's path is a refusal.
    io::HostFile moved = file_of(src + "/pub.raw", io::FileRole::image);
    moved.identity.ino += 1;
    CHECK(errno_from([&] { io::check_user_access(policy, user, {moved}, false); }) == ESTALE);
    io::HostFile gone = file_of(src + "/pub.raw", io::FileRole::image);
    gone.path = src + "/not-there.raw";
    CHECK(errno_from([&] { io::check_user_access(policy, user, {gone}, false); }) == ESTALE);
    io::HostFile other_backing = file_of(src + "/pub.raw", io::FileRole::backing);
    other_backing.identity.ino += 1;
    CHECK(errno_from([&] { io::check_user_access(policy, user, {other_backing}, false); }) == EACCES);
    // The thread has its own ids back: root reads the private file again.
    CHECK(open(src + "/priv.raw", io::FileRole::image) != nullptr);
    CHECK_FALSE(io::needs_access_check(io::Credentials{0, 0, {}}));
}
