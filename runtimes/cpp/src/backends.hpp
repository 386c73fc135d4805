// What the two runtime implementations share; not part of the public interface.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dyt/model.hpp"

namespace dyt::detail {

// The exporter's I/O contract (dyt_export.export.export_onnx).
inline constexpr std::string_view kInput = "pixel_values";
inline constexpr std::string_view kLogits = "logits";
inline constexpr std::string_view kMasks = "token_masks";

std::unique_ptr<Model> load_onnxruntime(const std::filesystem::path& path, const Options& options);
std::unique_ptr<Model> load_openvino(const std::filesystem::path& path, const Options& options);

/// A tensor's element type, as far as the contract cares.
enum class Element { Float32, Bool, Other };
/// A graph input or output: one of its names and its element type (a runtime that gives a
/// tensor several names lists one Port per name).
struct Port {
    std::string name;
    Element type;
};

/// Checks a loaded graph against the contract (names, and float32 input, float32 logits,
/// bool masks) before anything runs, so both runtimes refuse the same graphs with the same
/// message; returns whether it outputs masks.
bool check_contract(const std::vector<Port>& inputs, const std::vector<Port>& outputs);
/// {C, H, W} from the input's [batch, C, H, W] dims (-1 = free), or Error.
std::array<int64_t, 3> image_shape_from(const std::vector<int64_t>& input_dims);
/// Runtime messages can span lines (OpenVINO's carry a trace): keep them to one line.
std::string one_line(std::string_view message);

}  // namespace dyt::detail
