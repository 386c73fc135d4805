// dyt::Model on the OpenVINO C++ API (CPU plugin).
//
// Inference precision is pinned to f32: on CPUs with AVX512-BF16 or AMX the plugin
// otherwise runs in bf16 and the logits drift by ~1e-3 from every other backend.
// The performance hint is LATENCY (one stream, synchronous calls), the setting under which
// runtimes are compared.
//
// An infer request serves one call at a time, so each call takes an idle request from a pool
// (creating one when all are busy: the pool holds at most as many as calls were ever in flight
// at once) and copies the outputs out before giving it back. The plugin keeps one graph per
// stream and a request waits for its stream's graph: with one stream, concurrent calls are
// correct but run one after the other.
#include <mutex>
#include <openvino/frontend/manager.hpp>
#include <openvino/runtime/core.hpp>
#include <regex>
#include <vector>

#include "backends.hpp"

namespace dyt::detail {
namespace {

/// OpenVINO prefixes messages with "Exception from src/<file>:<line>:" once per frame.
std::string message(const ov::Exception& e) {
    static const std::regex frame("Exception from \\S+:\\d+:\\s*");
    return one_line(std::regex_replace(e.what(), frame, ""));
}

class OpenVinoModel final : public Model {
public:
    OpenVinoModel(ov::CompiledModel compiled, std::array<int64_t, 3> image_shape, bool has_masks)
        : Model(Runtime::OpenVINO, image_shape, has_masks,
                static_cast<int>(compiled.get_property(ov::inference_num_threads))),
          compiled_(std::move(compiled)) {
        idle_.push_back(compiled_.create_infer_request());
    }

protected:
    Result infer(const float* pixels, const std::array<int64_t, 4>& shape) override {
        Result result;
        try {
            Lease lease(*this);
            ov::InferRequest& request = lease.request;
            // Wraps the caller's buffer; OpenVINO reads it during infer() only.
            const ov::Shape dims(shape.begin(), shape.end());
            request.set_tensor(std::string(kInput), ov::Tensor(ov::element::f32, dims, const_cast<float*>(pixels)));
            request.infer();
            // Element types were checked at load (check_contract).
            const ov::Tensor logits = request.get_tensor(std::string(kLogits));
            const ov::Shape logits_shape = logits.get_shape();
            if (logits_shape.size() != 2) throw Error("openvino: 'logits' is not [batch, classes]");
            result.logits_shape = {int64_t(logits_shape[0]), int64_t(logits_shape[1])};
            result.logits.assign(logits.data<const float>(), logits.data<const float>() + logits.get_size());
            if (has_masks()) {
                const ov::Tensor masks = request.get_tensor(std::string(kMasks));
                const ov::Shape masks_shape = masks.get_shape();
                if (masks_shape.size() != 3) throw Error("openvino: 'token_masks' is not [batch, dispatchers, tokens]");
                result.masks_shape = {int64_t(masks_shape[0]), int64_t(masks_shape[1]), int64_t(masks_shape[2])};
                // element::boolean is stored one byte per value, 0 or 1.
                const auto* bytes = static_cast<const uint8_t*>(masks.data());
                result.masks.assign(bytes, bytes + masks.get_size());
            }
        } catch (const ov::Exception& e) {
            throw Error("openvino: " + message(e));
        }
        return result;
    }

private:
    /// An infer request that no other call holds, taken from the pool (or created when every
    /// pooled one is busy) and given back when the lease ends.
    struct Lease {
        explicit Lease(OpenVinoModel& owner) : model(owner) {
            const std::lock_guard<std::mutex> lock(model.idle_mutex_);
            if (model.idle_.empty()) {
                request = model.compiled_.create_infer_request();
            } else {
                request = std::move(model.idle_.back());
                model.idle_.pop_back();
            }
        }
        ~Lease() {
            const std::lock_guard<std::mutex> lock(model.idle_mutex_);
            model.idle_.push_back(std::move(request));
        }
        Lease(const Lease&) = delete;
        Lease& operator=(const Lease&) = delete;

        OpenVinoModel& model;
        ov::InferRequest request;
    };

    ov::CompiledModel compiled_;
    std::mutex idle_mutex_;
    std::vector<ov::InferRequest> idle_;  // requests no call holds
};

/// Reads the file with the ONNX frontend only: Core::read_model would try every frontend
/// in turn, and the TensorFlow one logs parse errors to stderr for a file that isn't ONNX.
std::shared_ptr<ov::Model> read_onnx(const std::filesystem::path& path) {
    const ov::frontend::FrontEnd::Ptr onnx = ov::frontend::FrontEndManager().load_by_framework("onnx");
    if (!onnx->supported(path.string())) throw Error("not an ONNX model: " + path.string());
    return onnx->convert(onnx->load(path.string()));
}

std::vector<Port> contract_ports(const std::vector<ov::Output<const ov::Node>>& ports) {
    std::vector<Port> out;
    for (const auto& port : ports) {
        const ov::element::Type type = port.get_element_type();
        const Element element = type == ov::element::f32       ? Element::Float32
                                : type == ov::element::boolean ? Element::Bool
                                                               : Element::Other;
        for (const auto& name : port.get_names()) out.push_back({name, element});
    }
    return out;
}

}  // namespace

std::unique_ptr<Model> load_openvino(const std::filesystem::path& path, const Options& options) {
    try {
        const std::shared_ptr<const ov::Model> model = read_onnx(path);
        const bool has_masks = check_contract(contract_ports(model->inputs()), contract_ports(model->outputs()));
        std::vector<int64_t> dims;
        for (const auto& dim : model->input(std::string(kInput)).get_partial_shape())
            dims.push_back(dim.is_static() ? dim.get_length() : -1);
        const auto image_shape = image_shape_from(dims);

        ov::AnyMap config{ov::hint::inference_precision(ov::element::f32),
                          ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
        if (options.threads > 0) {
            config.emplace(ov::inference_num_threads(options.threads));
            config.emplace(ov::hint::enable_cpu_pinning(false));
        }
        ov::CompiledModel compiled = ov::Core().compile_model(model, "CPU", config);
        return std::make_unique<OpenVinoModel>(std::move(compiled), image_shape, has_masks);
    } catch (const ov::Exception& e) {
        throw Error("openvino cannot load " + path.string() + ": " + message(e));
    }
}

}  // namespace dyt::detail
