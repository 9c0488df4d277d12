// The directory view's node store and the mapping from host file names to exposed raw names.
#include "qcowfs/fs/tree.hpp"

namespace qcowfs::fs {

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
    return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace

const Node& Tree::root() const {
    // A tree without a root node only exists while it is being built; serve an empty directory
    // rather than crash a reader that got hold of it.
    static const Node empty_root = [] {
        Node n;
        n.attr.st_mode = S_IFDIR | 0555;
        n.attr.st_nlink = 2;
        return n;
    }();
    auto it = nodes_.find(root_);
    return it == nodes_.end() ? empty_root : it->second;
}

const Node* Tree::find(const NodeKey& key) const {
    auto it = nodes_.find(key);
    return it == nodes_.end() ? nullptr : &it->second;
}

const Node* Tree::child(const NodeKey& dir, std::string_view name) const {
    const Node* parent = find(dir);
    if (parent == nullptr) return nullptr;
    auto it = parent->children.find(name);
    if (it == parent->children.end()) return nullptr;
    return find(it->second);
}

void Tree::add(Node node) {
    NodeKey key = node.key;
    nodes_.insert_or_assign(std::move(key), std::move(node));
}

std::string raw_name(std::string_view file_name) {
    std::string_view base = file_name;
    for (std::string_view ext : {std::string_view(".qcow2"), std::string_view(".qcow")}) {
        // Only strip when something is left: ".qcow2" alone would otherwise become the hidden ".raw".
        if (ends_with(base, ext) && base.size() > ext.size()) {
            base.remove_suffix(ext.size());
            break;
        }
    }
    std::string out(base);
    out += ".raw";
    return out;
}

std::string snapshot_raw_name(std::string_view image_raw_name, std::string_view snapshot_label) {
    std::string_view base = image_raw_name;
    if (ends_with(base, ".raw")) base.remove_suffix(4);
    std::string out;
    out.reserve(base.size() + snapshot_label.size() + 5);
    out += base;
    out += '@';
    out += snapshot_label;
    out += ".raw";
    return out;
}

std::string bitmap_raw_name(std::string_view image_raw_name, std::string_view bitmap_name) {
    if (bitmap_name.empty() || bitmap_name.find('/') != std::string_view::npos ||
        bitmap_name.find('\0') != std::string_view::npos)
        return {};
    return snapshot_raw_name(image_raw_name, std::string("bitmap-").append(bitmap_name));
}

}  // namespace qcowfs::fs
