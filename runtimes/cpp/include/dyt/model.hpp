// dyt::Model: run an exported DyT model (see dyt_export.export_onnx) from C++.
//
// One interface, two implementations: ONNX Runtime and OpenVINO, picked at run time by
// `Runtime`. The I/O contract is the exporter's: input `pixel_values` float32 [B,3,H,W],
// output `logits` float32 [B,classes] and, when exported with masks, `token_masks` bool
// [B,dispatchers,tokens]. Every failure (missing file, not a DyT export, wrong input shape,
// a runtime error) is thrown as dyt::Error with a one-line message.
//
// run() may be called on the same Model from several threads at once: ONNX Runtime's Run is
// thread-safe, and the OpenVINO implementation gives each call in flight its own infer
// request. With OpenVINO's one stream (the LATENCY hint) such calls take turns on the graph;
// with ONNX Runtime they share the session's intra-op threads.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace dyt {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

enum class Runtime { OnnxRuntime, OpenVINO };

/// "ort" / "onnxruntime" and "openvino"; anything else throws Error naming the choices.
Runtime parse_runtime(std::string_view name);
std::string_view runtime_name(Runtime runtime);
/// Whether this build of the library carries that runtime (CMake options DYT_WITH_*).
bool runtime_built_in(Runtime runtime);

struct Options {
    /// Intra-op threads; 0 keeps the runtime's default. Set explicitly, threads are not pinned.
    int threads = 0;
};

struct Result {
    std::vector<float> logits;           ///< row-major [batch, classes]
    std::array<int64_t, 2> logits_shape{};
    /// Empty when the model was exported without masks; else row-major
    /// [batch, dispatchers, tokens], 1 = token active (CLS included, always 1).
    std::vector<uint8_t> masks;
    std::array<int64_t, 3> masks_shape{};

    bool has_masks() const { return masks_shape[0] > 0; }
};

class Model {
public:
    /// Loads and compiles `path` for the CPU. Inference precision is float32 on both
    /// runtimes (OpenVINO would otherwise pick bf16 on CPUs that have it).
    static std::unique_ptr<Model> load(Runtime runtime, const std::filesystem::path& path,
                                       const Options& options = {});
    virtual ~Model() = default;

    /// Runs a batch of images, row-major float32 [shape[0], 3, H, W]. Throws Error when the
    /// shape does not fit the model or a value is NaN or infinite.
    Result run(const float* pixels, const std::array<int64_t, 4>& shape);

    /// Image shape the model takes: {channels, height, width}; -1 where the model leaves a
    /// dimension free.
    const std::array<int64_t, 3>& image_shape() const { return image_shape_; }
    /// Whether the model outputs `token_masks`.
    bool has_masks() const { return has_masks_; }
    Runtime runtime() const { return runtime_; }
    /// Intra-op threads in effect: as OpenVINO reports them after compiling (its default
    /// filled in, a request above the core count capped); for ONNX Runtime, which has no
    /// getter, Options::threads as set in the session options (0: its default).
    int threads() const { return threads_; }

protected:
    Model(Runtime runtime, std::array<int64_t, 3> image_shape, bool has_masks, int threads)
        : runtime_(runtime), image_shape_(image_shape), has_masks_(has_masks), threads_(threads) {}
    /// The runtime's part: inputs already checked.
    virtual Result infer(const float* pixels, const std::array<int64_t, 4>& shape) = 0;

private:
    Runtime runtime_;
    std::array<int64_t, 3> image_shape_;
    bool has_masks_;
    int threads_;
};

}  // namespace dyt
