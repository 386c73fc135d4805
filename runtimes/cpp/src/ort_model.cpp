// dyt::Model on the ONNX Runtime C++ API.
//
// The headers may be older than the library they run against (the C API is backward
// compatible), never newer: CMake checks that at configure time, and the API is initialised
// by hand (ORT_API_MANUAL_INIT) so that a too-old library swapped in at run time is an
// Error here instead of a null-pointer crash in a static initialiser.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include "backends.hpp"

namespace dyt::detail {
namespace {

Ort::Env& environment() {
    static const bool initialised = [] {
        const OrtApiBase* base = OrtGetApiBase();
        const OrtApi* api = base->GetApi(ORT_API_VERSION);
        if (api == nullptr)
            throw Error("libonnxruntime " + std::string(base->GetVersionString()) +
                        " is older than the headers dyt::model was built with (API version " +
                        std::to_string(ORT_API_VERSION) + ")");
        Ort::InitApi(api);
        return true;
    }();
    (void)initialised;
    // One environment per process, as ONNX Runtime wants; warnings and errors only.
    static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "dyt");
    return env;
}

class OrtModel final : public Model {
public:
    OrtModel(Ort::Session session, std::array<int64_t, 3> image_shape, bool has_masks)
        : Model(Runtime::OnnxRuntime, image_shape, has_masks), session_(std::move(session)) {
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

std::vector<std::string> names(const Ort::Session& session, bool inputs) {
    Ort::AllocatorWithDefaultOptions allocator;
    const size_t count = inputs ? session.GetInputCount() : session.GetOutputCount();
    std::vector<std::string> out;
    for (size_t i = 0; i < count; ++i)
        out.emplace_back((inputs ? session.GetInputNameAllocated(i, allocator)
                                 : session.GetOutputNameAllocated(i, allocator)).get());
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
        const bool has_masks = check_contract(names(session, true), names(session, false));
        // The shape info is a view into the type info: keep both alive.
        const Ort::TypeInfo input_type = session.GetInputTypeInfo(0);
        const auto input = input_type.GetTensorTypeAndShapeInfo();
        if (input.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
            throw Error("model input '" + std::string(kInput) + "' is not float32 (exported with fp16 I/O?)");
        const auto image_shape = image_shape_from(input.GetShape());
        return std::make_unique<OrtModel>(std::move(session), image_shape, has_masks);
    } catch (const Ort::Exception& e) {
        throw Error("onnxruntime cannot load " + path.string() + ": " + one_line(e.what()));
    }
}

}  // namespace dyt::detail
