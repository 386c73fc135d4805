#include "npy.hpp"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <regex>
#include <stdexcept>
#include <string>

namespace npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& why) {
    throw std::runtime_error(path.string() + ": " + why);
}

/// The value text of `'key': value` in the header dict, or "" when absent.
std::string field(const std::string& header, const std::string& key) {
    const std::regex pattern("'" + key + "'\\s*:\\s*('[^']*'|True|False|\\([^)]*\\))");
    std::smatch match;
    return std::regex_search(header, match, pattern) ? match[1].str() : std::string();
}

/// "(2, 3, 32, 32)" -> {2, 3, 32, 32}; "(5,)" -> {5}.
std::vector<int64_t> parse_shape(const std::filesystem::path& path, const std::string& tuple) {
    std::vector<int64_t> shape;
    std::string item;
    for (char c : tuple.substr(1, tuple.size() - 2) + ",") {
        if (c == ' ') continue;
        if (c != ',') { item += c; continue; }
        if (item.empty()) continue;  // the trailing comma of a 1-tuple
        if (item.size() > 12 || item.find_first_not_of("0123456789") != std::string::npos)
            fail(path, "malformed shape " + tuple);
        shape.push_back(std::stoll(item));
        item.clear();
    }
    return shape;
}

std::string shape_text(const std::vector<int64_t>& shape) {
    std::string out = "(";
    for (int64_t dim : shape) out += std::to_string(dim) + ", ";
    if (shape.size() > 1) out.resize(out.size() - 2);  // keep "(n, " -> "(n,)" for 1-D
    else if (shape.size() == 1) out.pop_back();
    return out + ")";
}

void write(const std::filesystem::path& path, const char* descr, const std::vector<int64_t>& shape,
           const void* data, size_t item_size) {
    std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " +
                         shape_text(shape) + ", }";
    // Version 1.0: magic, 2 version bytes, 2-byte header length; data aligned to 64 bytes.
    const size_t unpadded = kMagicSize + 4 + header.size() + 1;
    header.append((64 - unpadded % 64) % 64, ' ');
    header += '\n';
    size_t count = 1;
    for (int64_t dim : shape) count *= static_cast<size_t>(dim);
    std::ofstream out(path, std::ios::binary);
    if (!out) fail(path, "cannot open for writing");
    const unsigned char lengths[4] = {1, 0, static_cast<unsigned char>(header.size() & 0xff),
                                      static_cast<unsigned char>(header.size() >> 8)};
    out.write(kMagic, kMagicSize);
    out.write(reinterpret_cast<const char*>(lengths), 4);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(count * item_size));
    if (!out.flush()) fail(path, "write failed");
}

}  // namespace

Array read_f32(const std::filesystem::path& path, size_t rank) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(path, "cannot open (missing or unreadable)");
    char preamble[kMagicSize + 2];
    if (!in.read(preamble, sizeof preamble) || std::memcmp(preamble, kMagic, kMagicSize) != 0)
        fail(path, "not a .npy file");
    const int major = static_cast<unsigned char>(preamble[kMagicSize]);
    if (major < 1 || major > 3) fail(path, "unsupported .npy version " + std::to_string(major));
    unsigned char length_bytes[4] = {};
    const size_t length_size = major == 1 ? 2 : 4;
    if (!in.read(reinterpret_cast<char*>(length_bytes), static_cast<std::streamsize>(length_size)))
        fail(path, "truncated header");
    uint32_t length = 0;
    for (size_t i = length_size; i-- > 0;) length = (length << 8) | length_bytes[i];
    if (length > 65536) fail(path, "header too long");
    std::string header(length, '\0');
    if (!in.read(header.data(), length)) fail(path, "truncated header");

    const std::string descr = field(header, "descr");
    if (descr != "'<f4'")
        fail(path, "dtype " + (descr.empty() ? std::string("?") : descr) + " is not little-endian float32 ('<f4'); convert with arr.astype(np.float32)");
    const std::string order = field(header, "fortran_order");
    if (order == "True") fail(path, "Fortran-order arrays are not supported; save np.ascontiguousarray(arr)");
    if (order != "False") fail(path, "header has no fortran_order");
    const std::string tuple = field(header, "shape");
    if (tuple.empty()) fail(path, "header has no shape");
    Array array;
    array.shape = parse_shape(path, tuple);
    if (array.shape.size() != rank)
        fail(path, "expected " + std::to_string(rank) + " dimensions, got shape " + tuple);

    size_t count = 1;
    for (int64_t dim : array.shape) {
        if (dim != 0 && count > SIZE_MAX / sizeof(float) / static_cast<size_t>(dim)) fail(path, "shape " + tuple + " is too large");
        count *= static_cast<size_t>(dim);
    }
    const auto data_start = in.tellg();
    in.seekg(0, std::ios::end);
    const auto data_bytes = static_cast<size_t>(in.tellg() - data_start);
    if (data_bytes != count * sizeof(float))
        fail(path, "holds " + std::to_string(data_bytes) + " data bytes, shape " + tuple + " needs " +
                       std::to_string(count * sizeof(float)));
    in.seekg(data_start);
    array.data.resize(count);
    if (!in.read(reinterpret_cast<char*>(array.data.data()), static_cast<std::streamsize>(data_bytes)))
        fail(path, "read failed");
    return array;
}

void write_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape, const float* data) {
    write(path, "<f4", shape, data, sizeof(float));
}

void write_bool(const std::filesystem::path& path, const std::vector<int64_t>& shape, const uint8_t* data) {
    write(path, "|b1", shape, data, 1);
}

}  // namespace npy
