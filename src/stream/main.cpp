// qcowfs-stream: the command line of the stream decoder and encoder (no FUSE, no mount).
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "qcowfs/format/error.hpp"
#include "stream/decoder.hpp"
#include "stream/encoder.hpp"
#include "stream/progress.hpp"
#include "stream/sysio.hpp"

#ifndef QCOWFS_VERSION
#define QCOWFS_VERSION "unknown"
#endif

namespace {

using namespace qcowfs;
using namespace qcowfs::stream;

const char* kUsage =
    "usage: qcowfs-stream decode [options] IN OUT\n"
    "       qcowfs-stream encode [options] IN OUT\n"
    "\n"
    "decode reads a qcow2 image from IN once, front to back (- = stdin, may be a pipe), and\n"
    "writes the raw disk to OUT (- = stdout in guest order with zeros; a file or block device\n"
    "is written at guest offsets). encode reads a raw disk (file, block device, or - = stdin)\n"
    "and writes a qcow2 v3 image to OUT (- = stdout) with all metadata before the data.\n"
    "\n"
    "common options:\n"
    "  -p, --progress        show progress on stderr\n"
    "  --spill-dir DIR       directory for temporary files (default: $TMPDIR or /tmp)\n"
    "  --threads N           (de)compression threads (default: number of CPUs)\n"
    "  -v, --verbose         print what was done at the end\n"
    "decode options:\n"
    "  --sparse              skip unallocated and zero ranges (default for regular files)\n"
    "  --no-sparse           write zeros there too (default for block devices)\n"
    "  --memory SIZE         data held in memory while its table has not been read\n"
    "                        (default 256M; more goes to a temporary file in --spill-dir)\n"
    "  --backing FILE        raw or qcow2 copy of the image's backing file\n"
    "encode options:\n"
    "  -c, --compress zlib|zstd  compress clusters (in parallel)\n"
    "  --cluster-size SIZE   512 to 2M, a power of two (default 64k)\n"
    "  -h, --help            show this help\n"
    "  -V, --version         show the version\n";

[[noreturn]] void usage_error(const std::string& msg) {
    std::fprintf(stderr, "qcowfs-stream: %s\n(see qcowfs-stream --help)\n", msg.c_str());
    std::exit(2);
}

/// The output file while it is being written: a temporary name beside the final one, renamed
/// into place only when the whole image has been written, so a failed run leaves nothing behind.
char g_temp_path[4096];

void on_signal(int sig) {
    if (g_temp_path[0]) ::unlink(g_temp_path);
    ::signal(sig, SIG_DFL);
    ::raise(sig);
}

struct Output {
    int fd = -1;
    bool positioned = false;
    std::string final_path, temp_path;
};

Output open_output(const std::string& path) {
    Output o;
    if (path == "-") {
        if (::isatty(STDOUT_FILENO)) fail(EINVAL, "refusing to write a disk image to a terminal; redirect stdout");
        o.fd = STDOUT_FILENO;
        return o;
    }
    struct stat st{};
    bool exists = ::stat(path.c_str(), &st) == 0;
    if (exists && !S_ISREG(st.st_mode)) {
        // A block device is written in place; a named pipe or character device sequentially.
        o.fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
        if (o.fd < 0) fail(errno, "cannot open " + path);
        o.positioned = S_ISBLK(st.st_mode);
        return o;
    }
    // An existing OUT that is a symlink is replaced where it points, not the link itself.
    char resolved[PATH_MAX];
    o.final_path = exists && ::realpath(path.c_str(), resolved) ? std::string(resolved) : path;
    o.temp_path = o.final_path + ".qcowfs-stream-XXXXXX";
    o.fd = ::mkostemp(o.temp_path.data(), O_CLOEXEC);
    if (o.fd < 0) fail(errno, "cannot create " + o.temp_path);
    std::snprintf(g_temp_path, sizeof g_temp_path, "%s", o.temp_path.c_str());
    ::fchmod(o.fd, exists ? (st.st_mode & 07777) : 0644);
    o.positioned = true;
    return o;
}

void commit_output(Output& o) {
    if (!o.temp_path.empty()) {
        if (::rename(o.temp_path.c_str(), o.final_path.c_str()) != 0) fail(errno, "cannot rename to " + o.final_path);
        g_temp_path[0] = 0;
    }
    if (o.fd != STDOUT_FILENO && ::close(o.fd) != 0) fail(errno, "cannot close the output");
}

void abandon_output(Output& o) {
    if (!o.temp_path.empty()) ::unlink(o.temp_path.c_str());
    g_temp_path[0] = 0;
}

int open_input(const std::string& path) {
    if (path == "-") {
        if (fd_kind(STDIN_FILENO) == FdKind::other) ::fcntl(STDIN_FILENO, F_SETPIPE_SZ, 1 << 20);  // fewer reads
        return STDIN_FILENO;
    }
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(errno, "cannot open " + path);
    if (fd_kind(fd) == FdKind::other) ::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    return fd;
}

uint64_t size_arg(const std::string& opt, const std::string& v) {
    try {
        return parse_size(v);
    } catch (const std::exception&) {
        usage_error("bad size for " + opt + ": '" + v + "'");
    }
}

/// What the command line asks for.
struct Command {
    std::string name;  // decode or encode
    DecodeOptions decode;
    EncodeOptions encode;
    bool verbose = false;
    std::vector<std::string> files;  // IN and OUT
};

/// Applies option `args[i]` (taking its value from args[i + 1] when it needs one, advancing i).
/// Returns false for -h/--help. Exits with status 2 on a bad option.
bool parse_option(Command& c, const std::vector<std::string>& args, size_t& i) {
    const std::string& a = args[i];
    auto value = [&](const std::string& name) -> std::string {
        auto eq = a.find('=');
        if (a.rfind("--", 0) == 0 && eq != std::string::npos) return a.substr(eq + 1);
        if (i + 1 >= args.size()) usage_error("option " + name + " needs a value");
        return args[++i];
    };
    auto is = [&](const char* name) { return a == name || a.rfind(std::string(name) + "=", 0) == 0; };
    bool dec = c.name == "decode", enc = c.name == "encode";
    if (a == "-p" || a == "--progress") {
        c.decode.progress = c.encode.progress = true;
    } else if (a == "-v" || a == "--verbose") {
        c.verbose = true;
    } else if (a == "-h" || a == "--help") {
        return false;
    } else if (is("--spill-dir")) {
        c.decode.spill_dir = c.encode.spill_dir = value("--spill-dir");
    } else if (is("--threads")) {
        uint64_t n = size_arg("--threads", value("--threads"));
        if (n < 1 || n > 1024) usage_error("--threads must be 1..1024");
        c.decode.threads = c.encode.threads = static_cast<unsigned>(n);
    } else if (dec && (a == "--sparse" || a == "--no-sparse")) {
        c.decode.sparse = a == "--sparse";
    } else if (dec && is("--memory")) {
        c.decode.memory = size_arg("--memory", value("--memory"));
    } else if (dec && is("--backing")) {
        c.decode.backing = value("--backing");
    } else if (enc && (a == "-c" || is("--compress"))) {
        std::string t = value("-c");
        if (t != "zlib" && t != "zstd") usage_error("-c takes zlib or zstd, not '" + t + "'");
        c.encode.compression = t == "zlib" ? format::CompressionType::zlib : format::CompressionType::zstd;
    } else if (enc && is("--cluster-size")) {
        uint64_t cs = size_arg("--cluster-size", value("--cluster-size"));
        if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
            usage_error("--cluster-size must be a power of two from 512 to 2M");
        c.encode.cluster_bits = static_cast<uint32_t>(__builtin_ctzll(cs));
    } else if (a.size() > 1 && a[0] == '-') {
        usage_error("unknown option " + a + " for " + c.name);
    } else {
        c.files.push_back(a);
    }
    return true;
}

std::string decode_summary(const DecodeStats& s) {
    return "decoded " + std::to_string(s.stream_bytes) + " stream bytes into a " + std::to_string(s.virtual_size) +
           " byte disk; " + std::to_string(s.compressed_clusters) + " compressed clusters; retained at most " +
           std::to_string(s.peak_memory) + " bytes in memory and " + std::to_string(s.peak_spill) +
           " in the spill file";
}

std::string encode_summary(const EncodeStats& s) {
    return "encoded a " + std::to_string(s.virtual_size) + " byte disk into " + std::to_string(s.image_bytes) +
           " image bytes; " + std::to_string(s.data_clusters) + " data clusters, " +
           std::to_string(s.compressed_clusters) + " compressed" +
           (s.spooled_input ? "; the input was copied to a temporary file first" : "");
}

/// Decodes or encodes IN into OUT (renamed into place only on success); returns what -v prints.
std::string convert(const Command& c) {
    ::signal(SIGPIPE, SIG_IGN);  // a closed output pipe is reported as a write error
    ::signal(SIGINT, on_signal);
    ::signal(SIGTERM, on_signal);
    ::signal(SIGHUP, on_signal);

    int in = open_input(c.files[0]);
    Output out = open_output(c.files[1]);
    try {
        std::string summary = c.name == "decode" ? decode_summary(decode(in, out.fd, out.positioned, c.decode))
                                                 : encode_summary(encode(in, out.fd, c.encode));
        commit_output(out);
        return summary;
    } catch (...) {
        abandon_output(out);
        throw;
    }
}

int run(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.empty()) usage_error("missing command (decode or encode)");
    if (args[0] == "-h" || args[0] == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
    }
    if (args[0] == "-V" || args[0] == "--version") {
        std::printf("qcowfs-stream %s\n", QCOWFS_VERSION);
        return 0;
    }
    Command c;
    c.name = args[0];
    if (c.name != "decode" && c.name != "encode") usage_error("unknown command '" + c.name + "' (decode or encode)");
    for (size_t i = 1; i < args.size(); ++i) {
        if (!parse_option(c, args, i)) {
            std::fputs(kUsage, stdout);
            return 0;
        }
    }
    if (c.files.size() != 2) usage_error(c.name + " needs IN and OUT");
    if (!c.decode.backing.empty() && ::access(c.decode.backing.c_str(), R_OK) != 0)
        fail(errno, "cannot read backing file " + c.decode.backing);
    std::string summary = convert(c);
    if (c.verbose) std::fprintf(stderr, "qcowfs-stream: %s\n", summary.c_str());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    // Batches of clusters are a few MiB each and come and go all the time: keep freed ones in
    // the heap for reuse instead of unmapping them (and faulting fresh pages in) every time.
    ::mallopt(M_MMAP_THRESHOLD, 64 << 20);
    ::mallopt(M_TRIM_THRESHOLD, 256 << 20);
    try {
        return run(argc, argv);
    } catch (const std::system_error& e) {
        std::string r = reason_of(e);
        int err = errno_of(e);
        // I/O errors carry their strerror; bad streams and unsupported images say it all already.
        if (err != EIO && err != ENOTSUP) r += ": " + std::string(std::strerror(err));
        std::fprintf(stderr, "%sqcowfs-stream: %s\n", progress_line_open() ? "\n" : "", r.c_str());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%sqcowfs-stream: %s\n", progress_line_open() ? "\n" : "", e.what());
        return 1;
    }
}
