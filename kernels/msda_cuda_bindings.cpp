// Python bindings of the CUDA multi-scale deformable attention kernels (msda_cuda.cu).
#include <torch/extension.h>

#include <vector>

namespace hf_dino_msda {
at::Tensor msda_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights);
std::vector<at::Tensor> msda_cuda_backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights, const at::Tensor& grad_output);
}  // namespace hf_dino_msda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hf_dino multi-scale deformable attention, CUDA kernels";
  m.def("forward", &hf_dino_msda::msda_cuda_forward, "MSDA forward (CUDA)");
  m.def("backward", &hf_dino_msda::msda_cuda_backward, "MSDA backward (CUDA): grad value, locations, weights");
}
