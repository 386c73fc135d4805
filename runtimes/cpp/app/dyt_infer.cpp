// dyt_infer: run an exported DyT model on a .npy batch with ONNX Runtime or OpenVINO;
// kHelp below is the usage. Any failure is one line on stderr and a non-zero exit:
// 2 for a bad command line, 1 for everything else.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "dyt/model.hpp"
#include "npy.hpp"

namespace {

constexpr const char* kHelp =
    "usage: dyt_infer --runtime {ort,openvino} --model M.onnx --input X.npy --output Y.npy\n"
    "                 [--input X2.npy --output Y2.npy ...] [--threads N] [--bench ITERS]\n"
    "\n"
    "Runs an exported DyT model on X.npy (float32 [batch,3,H,W], C order) and writes\n"
    "Y.npy (float32 logits [batch,classes]). A model exported with masks also gives\n"
    "Y.masks.npy (bool [batch,dispatchers,tokens], token 0 = CLS; True = token active);\n"
    "a model without masks removes a Y.masks.npy left by an earlier run.\n"
    "Prints the runtime and its thread count, then the top-5 classes of each image.\n"
    "--input and --output may be repeated in pairs: the model is loaded once and runs\n"
    "each input in turn (all inputs are read before anything runs); each input's top-5\n"
    "lines then follow a line naming it.\n"
    "\n"
    "  --threads N     intra-op threads, unpinned (default: the runtime's choice)\n"
    "  --bench ITERS   after each input's run, time ITERS more and print img/s\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Args {
    dyt::Runtime runtime{};
    std::string model;
    std::vector<std::string> inputs, outputs;  // in pairs: outputs[i] is inputs[i]'s
    int threads = 0;
    int bench = 0;
    bool help = false;
};

int parse_count(const std::string& flag, const std::string& text) {
    size_t used = 0;
    int value = -1;
    try {
        value = std::stoi(text, &used);
    } catch (const std::exception&) {
    }
    if (used != text.size() || value < 0) throw UsageError(flag + " takes a whole number >= 0, got '" + text + "'");
    return value;
}

Args parse_args(int argc, char** argv) {
    Args args;
    std::map<std::string, std::string> values;
    for (int i = 1; i < argc; ++i) {
        std::string flag = argv[i], value;
        if (flag == "-h" || flag == "--help") {
            args.help = true;
            return args;
        }
        const size_t eq = flag.find('=');
        if (eq != std::string::npos) {
            value = flag.substr(eq + 1);
            flag.resize(eq);
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            throw UsageError(flag + " needs a value");
        }
        static const char* known[] = {"--runtime", "--model", "--input", "--output", "--threads", "--bench"};
        if (std::find(std::begin(known), std::end(known), flag) == std::end(known))
            throw UsageError("unknown option '" + flag + "'");
        if (flag == "--input") args.inputs.push_back(value);
        else if (flag == "--output") args.outputs.push_back(value);
        else values[flag] = value;
    }
    for (const char* required : {"--runtime", "--model"})
        if (!values.count(required)) throw UsageError(std::string("missing ") + required);
    if (args.inputs.empty()) throw UsageError("missing --input");
    if (args.outputs.empty()) throw UsageError("missing --output");
    if (args.inputs.size() != args.outputs.size())
        throw UsageError("give one --output per --input (got " + std::to_string(args.inputs.size()) + " --input, " +
                         std::to_string(args.outputs.size()) + " --output)");
    try {
        args.runtime = dyt::parse_runtime(values["--runtime"]);
    } catch (const dyt::Error& e) {
        throw UsageError(e.what());
    }
    args.model = values["--model"];
    const std::string suffix = ".npy";
    for (const std::string& output : args.outputs)
        if (output.size() <= suffix.size() || output.compare(output.size() - suffix.size(), suffix.size(), suffix) != 0)
            throw UsageError("--output must end in .npy, got '" + output + "'");
    if (values.count("--threads")) args.threads = parse_count("--threads", values["--threads"]);
    if (values.count("--bench")) args.bench = parse_count("--bench", values["--bench"]);
    return args;
}

void print_top5(const dyt::Result& result) {
    const int64_t classes = result.logits_shape[1];
    for (int64_t image = 0; image < result.logits_shape[0]; ++image) {
        const float* row = result.logits.data() + image * classes;
        std::vector<int64_t> order(static_cast<size_t>(classes));
        std::iota(order.begin(), order.end(), 0);
        const auto k = std::min<int64_t>(5, classes);
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [row](int64_t a, int64_t b) { return row[a] > row[b]; });
        std::printf("image %lld:", static_cast<long long>(image));
        for (int64_t i = 0; i < k; ++i)
            std::printf("%s %lld (logit %.4f)", i ? "," : "", static_cast<long long>(order[i]), row[order[i]]);
        std::printf("\n");
    }
}

void bench(dyt::Model& model, const npy::Array& input, const std::array<int64_t, 4>& shape, int iterations) {
    // The run that produced the output was the warm-up (OpenVINO prepares kernels per shape).
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iterations; ++i) model.run(input.data.data(), shape);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("bench: %s, batch %lld, %d runs: %.3f ms/run, %.1f img/s\n",
                std::string(dyt::runtime_name(model.runtime())).c_str(), static_cast<long long>(shape[0]),
                iterations, 1e3 * seconds / iterations, shape[0] * iterations / seconds);
}

void write_result(const std::string& output, const dyt::Result& result) {
    npy::write_f32(output, {result.logits_shape.begin(), result.logits_shape.end()}, result.logits.data());
    const std::string masks_path = output.substr(0, output.size() - 4) + ".masks.npy";
    if (result.has_masks())
        npy::write_bool(masks_path, {result.masks_shape.begin(), result.masks_shape.end()}, result.masks.data());
    else  // an earlier run's masks must not pass for this model's
        std::filesystem::remove(masks_path);
}

int run(const Args& args) {
    std::vector<npy::Array> inputs;
    for (const std::string& path : args.inputs) inputs.push_back(npy::read_f32(path, 4));
    auto model = dyt::Model::load(args.runtime, args.model, dyt::Options{args.threads});
    // What the runtime reports using, so that a test can see --threads take effect.
    const std::string threads = model->threads() > 0 ? std::to_string(model->threads()) : "default";
    std::printf("runtime: %s, threads: %s\n", std::string(dyt::runtime_name(model->runtime())).c_str(),
                threads.c_str());
    for (size_t i = 0; i < inputs.size(); ++i) {
        const npy::Array& input = inputs[i];
        const std::array<int64_t, 4> shape{input.shape[0], input.shape[1], input.shape[2], input.shape[3]};
        const dyt::Result result = model->run(input.data.data(), shape);
        write_result(args.outputs[i], result);
        if (inputs.size() > 1) std::printf("%s:\n", args.inputs[i].c_str());
        print_top5(result);
        if (args.bench > 0) bench(*model, input, shape, args.bench);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Args args;
    try {
        args = parse_args(argc, argv);
    } catch (const UsageError& e) {
        std::fprintf(stderr, "dyt_infer: %s (see dyt_infer --help)\n", e.what());
        return 2;
    }
    if (args.help) {
        std::printf("%s", kHelp);
        return 0;
    }
    try {
        return run(args);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dyt_infer: error: %s\n", e.what());
    } catch (...) {
        std::fprintf(stderr, "dyt_infer: error: unexpected failure\n");
    }
    return 1;
}
