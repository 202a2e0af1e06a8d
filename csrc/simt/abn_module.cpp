// InPlace-ABN's CUDA entry points (abn_cuda::*_cuda of csrc/inplace_abn_*.cu, declared in
// csrc/inplace_abn.h) compiled for the CPU emulator of simt_emu.h and bound to Python, so that the tests
// run the CUDA launchers and kernels themselves on CPU tensors (tests/ops/test_inplace_abn_simt.py).
// Built on demand by ifbf_fast/utils/simt_emu.py, never into ifbf_fast._C (setup.py compiles csrc/*.cpp
// only). The arguments are those the entry points receive from csrc/inplace_abn.cpp, already checked
// there; `act` is the ifbf::Act value (0 leaky_relu, 1 elu, 2 identity).
#include <torch/extension.h>

#include "../inplace_abn.h"
#include "../inplace_abn_kernels.cuh"
#include "simt_emu.h"

namespace {

using at::Tensor;
using ifbf::Act;
using ifbf::Opt;
namespace cu = ifbf::abn_cuda;

pybind11::tuple dims(const dim3& d) { return pybind11::make_tuple(d.x, d.y, d.z); }

// Kernels that check the emulator itself (tests/ops/test_inplace_abn_simt.py): what it must compute and
// what it must refuse.

// Per block: a grid-stride sum over x, reduced by warp shuffles, then across warps through shared memory.
__global__ void selftest_block_sum(const float* x, int n, float* out) {
  __shared__ float part[32];
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) t += part[w];
    out[blockIdx.x] = t;
  }
}

// Lanes at or past `live` return before a full-warp shuffle: undefined on a GPU, refused here.
__global__ void selftest_partial_warp(int live, float* out) {
  if (int(threadIdx.x % 32) >= live) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
}

// A race: each thread writes its slot and reads its neighbour's without a barrier between; what it reads
// depends on which of the two ran first, so the schedules disagree.
__global__ void selftest_race(float seq, float* out) {
  __shared__ float slot[64];
  slot[threadIdx.x] = seq * 1000.f + float(threadIdx.x);  // a stale slot holds the previous call's seq
  out[threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
  __syncthreads();
}

// One 16-byte load (the kernels' vload) from p.
__global__ void selftest_vector_load(const float* p, float* out) {
  using V = ifbf::cuda::Vec<float, 4>;
  const V v = ifbf::cuda::vload(reinterpret_cast<const V*>(p));
  out[0] = v.v[0] + v.v[1] + v.v[2] + v.v[3];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "InPlace-ABN's CUDA launchers and kernels run by the CPU emulator (csrc/simt/simt_emu.h)";
  m.def("statistics", [](const Tensor& x) { return cu::statistics_cuda(x); });
  m.def("train_statistics", [](const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& invstd_saved,
                               const Tensor& running_mean, const Tensor& running_var, const Opt& num_batches_tracked,
                               double momentum, double eps) {
    ifbf::TrainStats st{mean, invstd, invstd_saved, running_mean, running_var, num_batches_tracked.value_or(Tensor()),
                        momentum, eps};
    cu::train_statistics_cuda(x, st);
  });
  m.def("eval_statistics", [](const Tensor& running_mean, const Tensor& running_var, double eps, Tensor mean,
                              Tensor invstd, Tensor invstd_saved) {
    cu::eval_statistics_cuda(running_mean, running_var, eps, mean, invstd, invstd_saved);
  });
  m.def("forward", [](const Tensor& x, const Tensor& mean, const Tensor& invstd, const Opt& weight, const Opt& bias,
                      double eps, int act, double slope, Tensor y) {
    cu::forward_cuda(x, mean, invstd, weight, bias, eps, Act(act), slope, y);
  });
  m.def("backward_reduce", [](const Tensor& y, const Tensor& dy, const Opt& weight, const Opt& bias, double eps,
                              int act, double slope) {
    return cu::backward_reduce_cuda(y, dy, weight, bias, eps, Act(act), slope);
  });
  m.def("backward_reduce_params", [](const Tensor& y, const Tensor& dy, const Opt& weight, const Opt& bias, double eps,
                                     int act, double slope, bool training, Tensor dweight, Tensor dbias,
                                     Tensor mean_dz, Tensor mean_dz_xhat) {
    cu::backward_reduce_params_cuda(y, dy, weight, bias, eps, Act(act), slope, training, dweight, dbias, mean_dz,
                                    mean_dz_xhat);
  });
  m.def("backward_dx", [](const Tensor& y, const Tensor& dy, const Tensor& invstd, const Opt& weight, const Opt& bias,
                          const Opt& mean_dz, const Opt& mean_dz_xhat, double eps, int act, double slope, Tensor dx) {
    cu::backward_dx_cuda(y, dy, invstd, weight, bias, mean_dz, mean_dz_xhat, eps, Act(act), slope, dx);
  });
  m.def("running_update", [](const Tensor& mean, const Tensor& var, const Tensor& count, const Tensor& running_mean,
                             const Tensor& running_var, const Opt& num_batches_tracked, double momentum) {
    cu::running_update_cuda(mean, var, count, running_mean, running_var, num_batches_tracked.value_or(Tensor()),
                            momentum);
  });
  m.def("selftest_block_sum", [](const Tensor& x, int blocks, int threads) {
    auto out = at::full({blocks}, std::nanf(""), x.options());
    simt::launch(&selftest_block_sum, dim3(blocks), dim3(threads), x.const_data_ptr<float>(), int(x.numel()),
                 out.data_ptr<float>());
    return out;
  });
  m.def("selftest_partial_warp", [](int live) {
    auto out = at::zeros({32}, at::kFloat);
    simt::launch(&selftest_partial_warp, dim3(1), dim3(32), live, out.data_ptr<float>());
    return out;
  });
  m.def("selftest_race", [](int threads, int seq) {
    TORCH_CHECK_VALUE(threads >= 1 && threads <= 64, "selftest_race: 1 to 64 threads; got ", threads);
    auto out = at::zeros({threads}, at::kFloat);
    simt::launch(&selftest_race, dim3(1), dim3(threads), float(seq), out.data_ptr<float>());
    return out;
  });
  m.def("set_schedule", [](int mode, uint64_t seed) {
    TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "set_schedule: mode 0 (ascending), 1 (descending) or 2 (shuffled); got ",
                      mode);
    simt::schedule() = {mode, seed};
  }, "the order of blocks, and of threads between barriers: 0 ascending, 1 descending, 2 shuffled by seed");
  m.def("selftest_vector_load", [](const Tensor& buf, int64_t offset) {
    auto out = at::zeros({1}, at::kFloat);
    simt::launch(&selftest_vector_load, dim3(1), dim3(1), buf.const_data_ptr<float>() + offset, out.data_ptr<float>());
    return out;
  });
  m.def("set_sms", [](int n) {
    TORCH_CHECK_VALUE(n >= 1, "set_sms: the multiprocessor count must be >= 1; got ", n);
    simt::sms() = n;
  }, "the multiprocessor count the launchers plan for (default 132, an H200's)");
  m.def("reset", [] { simt::stats() = simt::Stats{}; }, "forget the launches recorded so far");
  m.def("launches", [] {
    pybind11::list out;
    for (const auto& r : simt::stats().records) out.append(pybind11::make_tuple(dims(r.grid), dims(r.block)));
    return out;
  }, "(grid, block) of every launch since the last reset");
  m.def("counts", [] {
    const auto& s = simt::stats();
    return pybind11::dict(pybind11::arg("launches") = s.launches, pybind11::arg("blocks") = s.blocks,
                          pybind11::arg("threads") = s.threads, pybind11::arg("switches") = s.switches,
                          pybind11::arg("vector_bytes") = s.vector_bytes, pybind11::arg("narrow_bytes") = s.narrow_bytes,
                          pybind11::arg("scalar_bytes") = s.scalar_bytes);
  }, "launches, blocks, threads, fiber switches, and the bytes of vload/vstore by width and of sload/sstore, "
     "since the last reset");
}
