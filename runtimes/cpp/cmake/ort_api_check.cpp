// Run at configure time (try_run): can these headers drive this libonnxruntime?
// GetApi(N) returns null when the library is older than API version N (and says so on
// stderr, which is why the answer is one tagged line CMake picks out).
#include <onnxruntime_c_api.h>

#include <cstdio>

int main() {
    const OrtApiBase* base = OrtGetApiBase();
    const bool fits = base->GetApi(ORT_API_VERSION) != nullptr;
    std::printf("\ndyt-ort-check %d %s %d\n", ORT_API_VERSION, base->GetVersionString(), fits ? 1 : 0);
    return 0;
}
