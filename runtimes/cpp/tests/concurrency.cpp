// dyt_concurrency: one dyt::Model called from several threads at once must answer every call
// as it answers that call alone. Driven by tests/test_concurrency.py; usage below.
//
// Call i runs a batch of 1 + i % 5 images from POOL.npy, chosen by i, so sizes, images and
// active-token counts differ from call to call. Every batch is first run alone, one after
// the other; then CALLERS threads, released together, run them all (thread t takes calls t,
// t + CALLERS, ...). Prints one line of counts for the test to judge; exits 1 on any error.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "dyt/model.hpp"
#include "npy.hpp"

namespace {

constexpr const char* kUsage = "usage: dyt_concurrency {ort,openvino} MODEL.onnx POOL.npy CALLERS CALLS_PER_CALLER";

struct Batch {
    std::vector<float> pixels;
    std::array<int64_t, 4> shape;
};

std::vector<Batch> make_batches(const npy::Array& pool, int count) {
    const int64_t images = pool.shape[0];
    const size_t image_size = static_cast<size_t>(pool.shape[1] * pool.shape[2] * pool.shape[3]);
    std::vector<Batch> batches;
    for (int i = 0; i < count; ++i) {
        Batch batch{{}, {1 + i % 5, pool.shape[1], pool.shape[2], pool.shape[3]}};
        for (int64_t j = 0; j < batch.shape[0]; ++j) {
            const float* image = pool.data.data() + ((i * 13 + j * 29) % images) * image_size;
            batch.pixels.insert(batch.pixels.end(), image, image + image_size);
        }
        batches.push_back(std::move(batch));
    }
    return batches;
}

int run(dyt::Runtime runtime, const std::string& model_path, const std::string& pool_path, int callers, int calls) {
    const npy::Array pool = npy::read_f32(pool_path, 4);
    const std::vector<Batch> batches = make_batches(pool, callers * calls);
    const auto model = dyt::Model::load(runtime, model_path);

    std::vector<dyt::Result> alone;
    for (const Batch& batch : batches) alone.push_back(model->run(batch.pixels.data(), batch.shape));

    std::vector<dyt::Result> together(batches.size());
    std::atomic<int> waiting{callers};
    std::mutex error_mutex;
    std::string error;
    std::vector<std::thread> threads;
    for (int t = 0; t < callers; ++t) {
        threads.emplace_back([&, t] {
            for (--waiting; waiting > 0;) std::this_thread::yield();  // start together
            try {
                for (size_t i = t; i < batches.size(); i += callers)
                    together[i] = model->run(batches[i].pixels.data(), batches[i].shape);
            } catch (const std::exception& e) {
                const std::lock_guard<std::mutex> lock(error_mutex);
                if (error.empty()) error = e.what();
            }
        });
    }
    for (auto& thread : threads) thread.join();
    if (!error.empty()) throw dyt::Error("a concurrent call failed: " + error);

    size_t same_logits = 0, same_masks = 0;
    double worst = 0;  // max |diff| / max |logit| of the call alone, over all calls
    std::set<long> active_totals;
    for (size_t i = 0; i < batches.size(); ++i) {
        const dyt::Result& a = alone[i];
        const dyt::Result& b = together[i];
        const bool same_shape = a.logits_shape == b.logits_shape;
        same_logits += same_shape && std::memcmp(a.logits.data(), b.logits.data(), a.logits.size() * sizeof(float)) == 0;
        same_masks += a.masks_shape == b.masks_shape && a.masks == b.masks;
        active_totals.insert(std::count(a.masks.begin(), a.masks.end(), uint8_t{1}));
        if (!same_shape) {
            worst = INFINITY;
            continue;
        }
        float largest = 0, diff = 0;
        for (size_t k = 0; k < a.logits.size(); ++k) {
            largest = std::max(largest, std::fabs(a.logits[k]));
            diff = std::max(diff, std::fabs(a.logits[k] - b.logits[k]));
        }
        worst = std::max(worst, double(diff) / largest);
    }
    std::printf("calls %zu, callers %d, distinct active-token totals %zu, identical logits %zu, identical masks %zu, "
                "max rel diff %g\n",
                batches.size(), callers, active_totals.size(), same_logits, same_masks, worst);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        if (argc != 6) throw dyt::Error(kUsage);
        const int callers = std::stoi(argv[4]), calls = std::stoi(argv[5]);
        if (callers < 1 || calls < 1) throw dyt::Error(kUsage);
        return run(dyt::parse_runtime(argv[1]), argv[2], argv[3], callers, calls);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "dyt_concurrency: error: %s\n", e.what());
    }
    return 1;
}
