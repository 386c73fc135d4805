// dyt::Model on the ONNX Runtime C++ API.
//
// The headers may be older than the library they run against (the C API is backward
// compatible), never newer: CMake checks that at configure time. There is no run-time
// counterpart to check: libonnxruntime versions its symbols per release (1.32.0 defines
// VERS_1.32.0 and no other), so the dynamic loader refuses any other release, older or
// newer, before main() runs.
#include <onnxruntime_cxx_api.h>

#include "backends.hpp"

namespace dyt::detail {
namespace {

Ort::Env& environment() {
    // One environment per process, as ONNX Runtime wants; warnings and errors only.
    static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "dyt");
    return env;
}

class OrtModel final : public Model {
public:
    OrtModel(Ort::Session session, std::array<int64_t, 3> image_shape, bool has_masks, int threads)
        : Model(Runtime::OnnxRuntime, image_shape, has_masks, threads), session_(std::move(session)) {
        output_names_.push_back(kLogits.data());
        if (has_masks) output_names_.push_back(kMasks.data());
    }

protected:
    Result infer(const float* pixels, const std::array<int64_t, 4>& shape) override {
        const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        const size_t count = static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]);
        // ONNX Runtime takes a non-const pointer but does not write to inputs.
        Ort::Value input = Ort::Value::CreateTensor<float>(memory, const_cast<float*>(pixels), count,
                                                           shape.data(), shape.size());
        const char* input_name = kInput.data();
        std::vector<Ort::Value> outputs;
        try {
            outputs = session_.Run(Ort::RunOptions{nullptr}, &input_name, &input, 1,
                                   output_names_.data(), output_names_.size());
        } catch (const Ort::Exception& e) {
            throw Error("onnxruntime: " + one_line(e.what()));
        }
        // Element types were checked at load (check_contract).
        Result result;
        const auto logits_shape = outputs[0].GetTensorTypeAndShapeInfo().GetShape();
        if (logits_shape.size() != 2) throw Error("onnxruntime: 'logits' is not [batch, classes]");
        result.logits_shape = {logits_shape[0], logits_shape[1]};
        const float* logits = outputs[0].GetTensorData<float>();
        result.logits.assign(logits, logits + logits_shape[0] * logits_shape[1]);
        if (has_masks()) {
            const auto masks_shape = outputs[1].GetTensorTypeAndShapeInfo().GetShape();
            if (masks_shape.size() != 3) throw Error("onnxruntime: 'token_masks' is not [batch, dispatchers, tokens]");
            result.masks_shape = {masks_shape[0], masks_shape[1], masks_shape[2]};
            const bool* masks = outputs[1].GetTensorData<bool>();
            result.masks.assign(masks, masks + masks_shape[0] * masks_shape[1] * masks_shape[2]);
        }
        return result;
    }

private:
    Ort::Session session_;
    std::vector<const char*> output_names_;
};

Element element(const Ort::TypeInfo& type) {
    if (type.GetONNXType() != ONNX_TYPE_TENSOR) return Element::Other;
    switch (type.GetTensorTypeAndShapeInfo().GetElementType()) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return Element::Float32;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return Element::Bool;
        default: return Element::Other;
    }
}

std::vector<Port> contract_ports(const Ort::Session& session, bool inputs) {
    Ort::AllocatorWithDefaultOptions allocator;
    const size_t count = inputs ? session.GetInputCount() : session.GetOutputCount();
    std::vector<Port> out;
    for (size_t i = 0; i < count; ++i) {
        const auto name = inputs ? session.GetInputNameAllocated(i, allocator)
                                 : session.GetOutputNameAllocated(i, allocator);
        out.push_back({name.get(), element(inputs ? session.GetInputTypeInfo(i) : session.GetOutputTypeInfo(i))});
    }
    return out;
}

}  // namespace

std::unique_ptr<Model> load_onnxruntime(const std::filesystem::path& path, const Options& options) {
    Ort::Env& env = environment();
    try {
        Ort::SessionOptions session_options;
        if (options.threads > 0) {
            session_options.SetIntraOpNumThreads(options.threads);
            session_options.SetInterOpNumThreads(1);
        }
        Ort::Session session(env, path.c_str(), session_options);
        const bool has_masks = check_contract(contract_ports(session, true), contract_ports(session, false));
        const auto image_shape = image_shape_from(session.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape());
        // ONNX Runtime has no getter for its thread-pool size: report the value set (0: its default).
        return std::make_unique<OrtModel>(std::move(session), image_shape, has_masks, options.threads);
    } catch (const Ort::Exception& e) {
        throw Error("onnxruntime cannot load " + path.string() + ": " + one_line(e.what()));
    }
}

}  // namespace dyt::detail
