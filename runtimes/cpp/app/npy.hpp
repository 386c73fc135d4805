// The little of the .npy format (NumPy format versions 1.0-3.0) that dyt_infer needs:
// reading C-order little-endian float32 arrays, writing float32 and bool arrays.
// Anything else is refused with a one-line std::runtime_error rather than misread.
// Data are copied byte for byte, so the host must be little-endian (x86-64, AArch64).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace npy {

struct Array {
    std::vector<int64_t> shape;
    std::vector<float> data;
};

/// Reads a float32 ('<f4'), C-order array of exactly `rank` dimensions.
Array read_f32(const std::filesystem::path& path, size_t rank);
void write_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape, const float* data);
/// Bytes 0/1 written as NumPy bool ('|b1').
void write_bool(const std::filesystem::path& path, const std::vector<int64_t>& shape, const uint8_t* data);

}  // namespace npy
