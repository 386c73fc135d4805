// classify RUNTIME MODEL.onnx: the top class of one mid-grey image, through dyt::Model.
#include <dyt/model.hpp>

#include <algorithm>
#include <iostream>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: classify {ort,openvino} MODEL.onnx\n";
        return 2;
    }
    try {
        auto model = dyt::Model::load(dyt::parse_runtime(argv[1]), argv[2], dyt::Options{/*threads=*/1});
        const auto [channels, height, width] = model->image_shape();
        std::vector<float> image(static_cast<size_t>(channels * height * width), 0.5f);
        const dyt::Result result = model->run(image.data(), {1, channels, height, width});
        const auto best = std::max_element(result.logits.begin(), result.logits.end());
        std::cout << "class " << (best - result.logits.begin()) << " logit " << *best << '\n';
    } catch (const dyt::Error& e) {
        std::cerr << "classify: " << e.what() << '\n';
        return 1;
    }
    return 0;
}
