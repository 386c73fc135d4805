// The runtime-independent half of dyt::Model: choosing a runtime, checking the graph
// against the exporter's contract, and checking every batch before a runtime sees it,
// so that bad input is a one-line dyt::Error rather than whatever the runtime does.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <iterator>
#include <optional>
#include <sstream>
#include <system_error>
#include <utility>

#include "backends.hpp"

namespace dyt {
namespace {

using detail::Element;
using detail::Port;

std::string join(const std::vector<Port>& ports) {
    std::string out;
    for (const auto& port : ports) out += (out.empty() ? "" : ", ") + port.name;
    return out.empty() ? "none" : out;
}

const Port* find_port(const std::vector<Port>& ports, std::string_view name) {
    const auto it = std::find_if(ports.begin(), ports.end(), [name](const Port& port) { return port.name == name; });
    return it == ports.end() ? nullptr : &*it;
}

/// Result holds float32 logits and one byte per mask value: anything else would need a
/// conversion the Python backends do not make either.
void require_type(const Port& port, Element type) {
    if (port.type != type)
        throw Error("'" + port.name + "' is not " +
                    (type == Element::Bool ? "bool" : "float32 (exported with fp16 I/O?)") +
                    ": dyt::Model takes float32 images and gives float32 logits and bool masks");
}

std::string format_shape(const int64_t* dims, size_t rank) {
    std::ostringstream out;
    out << '[';
    for (size_t i = 0; i < rank; ++i) {
        out << (i ? "," : "");
        if (dims[i] < 0) out << '?'; else out << dims[i];
    }
    out << ']';
    return out.str();
}

/// What is wrong with the external-data files the model names: the first that does not
/// exist, else the first shorter than the tensors it must hold (a copy cut short). A model
/// whose weights sit in a separate file (`dyt-export --external-data`) that did not travel
/// with it, or travelled cut short, makes both runtimes fail with a message about some
/// tensor or offset. Reads the raw protobuf: each external tensor holds the entries
/// {1: key, 2: value}, i.e. the bytes 0A <n> key 12 <varint length> value, one right after
/// the other in the order location, offset, length (a raw weight would hold them only by
/// chance; an offset or length entry that does not follow its tensor's previous entry, such
/// as a metadata key, is not read as one).
std::optional<std::string> external_data_problem(const std::filesystem::path& path) {
    std::ifstream file(path, std::ios::binary);
    const std::string bytes{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
    struct Entry { size_t at, end; std::string key, value; };
    std::vector<Entry> entries;
    for (const std::string name : {"location", "offset", "length"}) {
        const std::string key = std::string("\x0a", 1) + char(name.size()) + name + "\x12";
        for (size_t at = bytes.find(key); at != std::string::npos; at = bytes.find(key, at + 1)) {
            size_t pos = at + key.size(), length = 0;
            for (int shift = 0; pos < bytes.size() && shift < 35; shift += 7) {
                const auto byte = static_cast<unsigned char>(bytes[pos++]);
                length |= size_t(byte & 0x7F) << shift;
                if (!(byte & 0x80)) break;
            }
            if (length > 0 && pos + length <= bytes.size())
                entries.push_back({at, pos + length, name, bytes.substr(pos, length)});
        }
    }
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.at < b.at; });
    const auto number = [](const std::string& text) -> std::optional<uintmax_t> {
        const auto digit = [](unsigned char c) { return std::isdigit(c) != 0; };
        if (text.empty() || text.size() > 19 || !std::all_of(text.begin(), text.end(), digit)) return std::nullopt;
        return std::stoull(text);
    };
    std::vector<std::pair<std::filesystem::path, uintmax_t>> ends;  // file, end of its last tensor
    uintmax_t offset = 0;
    size_t previous_end = 0;  // where the current tensor's last entry ended (0: no tensor)
    for (const auto& entry : entries) {
        // The next entry's wrapper (tag 6A and a 1-3 byte length) sits between two entries.
        const bool chained = previous_end != 0 && entry.at >= previous_end && entry.at - previous_end <= 4;
        if (entry.key != "location" && !chained) continue;
        previous_end = entry.end;
        if (entry.key == "location") {
            const std::filesystem::path data = path.parent_path() / entry.value;
            std::error_code ec;
            if (!std::filesystem::is_regular_file(data, ec))
                return "its weights are kept in " + data.string() + ", which is missing (copy the model and that file together)";
            if (ends.empty() || ends.back().first != data) ends.emplace_back(data, 0);
            offset = 0;
        } else if (entry.key == "offset") {
            offset = number(entry.value).value_or(0);
        } else if (const auto length = number(entry.value)) {
            ends.back().second = std::max(ends.back().second, offset + *length);
        }
    }
    for (const auto& [data, end] : ends) {
        std::error_code ec;
        const uintmax_t size = std::filesystem::file_size(data, ec);
        if (!ec && size < end)
            return "its weights file " + data.string() + " is cut short (" + std::to_string(size) +
                   " bytes where the model needs " + std::to_string(end) + "; copy it again)";
    }
    return std::nullopt;
}

std::unique_ptr<Model> load_with(Runtime runtime, const std::filesystem::path& path, const Options& options) {
#ifdef DYT_WITH_ONNXRUNTIME
    if (runtime == Runtime::OnnxRuntime) return detail::load_onnxruntime(path, options);
#endif
#ifdef DYT_WITH_OPENVINO
    if (runtime == Runtime::OpenVINO) return detail::load_openvino(path, options);
#endif
    throw Error("unreachable: runtime not built in");
}

}  // namespace

Runtime parse_runtime(std::string_view name) {
    if (name == "ort" || name == "onnxruntime") return Runtime::OnnxRuntime;
    if (name == "openvino") return Runtime::OpenVINO;
    throw Error("unknown runtime '" + std::string(name) + "': choose ort or openvino");
}

std::string_view runtime_name(Runtime runtime) {
    return runtime == Runtime::OnnxRuntime ? "onnxruntime" : "openvino";
}

bool runtime_built_in(Runtime runtime) {
#ifdef DYT_WITH_ONNXRUNTIME
    if (runtime == Runtime::OnnxRuntime) return true;
#endif
#ifdef DYT_WITH_OPENVINO
    if (runtime == Runtime::OpenVINO) return true;
#endif
    return false;
}

std::unique_ptr<Model> Model::load(Runtime runtime, const std::filesystem::path& path,
                                   const Options& options) {
    if (!runtime_built_in(runtime))
        throw Error("this build of dyt::model has no " + std::string(runtime_name(runtime)) +
                    " (configure with -DDYT_WITH_" +
                    (runtime == Runtime::OnnxRuntime ? "ONNXRUNTIME" : "OPENVINO") + "=ON)");
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
        throw Error("model file not found: " + path.string());
    if (options.threads < 0) throw Error("threads must be >= 0, got " + std::to_string(options.threads));
    try {
        return load_with(runtime, path, options);
    } catch (const Error&) {
        // Only a failed load pays for reading the file a second time.
        if (const auto problem = external_data_problem(path))
            throw Error(std::string(runtime_name(runtime)) + " cannot load " + path.string() + ": " + *problem);
        throw;
    }
}

Result Model::run(const float* pixels, const std::array<int64_t, 4>& shape) {
    const auto& want = image_shape_;
    bool fits = shape[0] >= 1;
    for (size_t i = 0; i < 3; ++i) fits = fits && (want[i] < 0 ? shape[i + 1] >= 1 : shape[i + 1] == want[i]);
    if (!fits) {
        const int64_t expected[4] = {-1, want[0], want[1], want[2]};
        throw Error("input shape " + format_shape(shape.data(), 4) + " does not fit the model, which takes " +
                    format_shape(expected, 4) + " (batch >= 1)");
    }
    const int64_t count = shape[0] * shape[1] * shape[2] * shape[3];
    if (!std::all_of(pixels, pixels + count, [](float v) { return std::isfinite(v); }))
        throw Error("input holds NaN or infinite values");
    return infer(pixels, shape);
}

namespace detail {

bool check_contract(const std::vector<Port>& inputs, const std::vector<Port>& outputs) {
    const Port* logits = find_port(outputs, kLogits);
    if (inputs.size() != 1 || inputs[0].name != kInput || logits == nullptr)
        throw Error("not a DyT export: expected input '" + std::string(kInput) + "' and output '" +
                    std::string(kLogits) + "', found inputs (" + join(inputs) + ") and outputs (" +
                    join(outputs) + ")");
    require_type(inputs[0], Element::Float32);
    require_type(*logits, Element::Float32);
    const Port* masks = find_port(outputs, kMasks);
    if (masks != nullptr) require_type(*masks, Element::Bool);
    return masks != nullptr;
}

std::array<int64_t, 3> image_shape_from(const std::vector<int64_t>& dims) {
    if (dims.size() != 4 || dims[1] == 0 || dims[2] == 0 || dims[3] == 0)
        throw Error("not a DyT export: input '" + std::string(kInput) + "' has shape " +
                    format_shape(dims.data(), dims.size()) + ", expected [batch,3,H,W]");
    return {dims[1], dims[2], dims[3]};
}

std::string one_line(std::string_view message) {
    std::string out;
    for (char c : message) {
        if (c == '\n' || c == '\r') {
            if (!out.empty() && out.back() != ' ') out += ' ';
        } else {
            out += c;
        }
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out;
}

}  // namespace detail
}  // namespace dyt
