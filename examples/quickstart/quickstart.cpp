// quickstart: adapt a frozen "pretrained" layer to a new task with LoRA, then merge.
//
// The pretrained layer W0 solved an old task. The new task's true weight is W0 + ΔW* with a
// rank-4 change ΔW*. A rank-8 adapter learns the change while W0 stays frozen; merging then
// folds it into W0 so inference costs nothing extra.
//
//   lora-quickstart [--steps N] [--threads N]
#include <chrono>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <string>
#include <thread>

#include <lora/lora.hpp>
#include <torch/torch.h>

namespace {

int threads_from_environment() {
  if (const char* value = std::getenv("OMP_NUM_THREADS")) return std::max(1, std::atoi(value));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 400;
  int threads = threads_from_environment();
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--steps" || arg == "--threads") && i + 1 < argc) {
      const int value = std::atoi(argv[++i]);
      if (value <= 0) {
        std::cerr << "lora-quickstart: " << arg << " must be a positive integer (got '" << argv[i] << "')\n";
        return 2;
      }
      (arg == "--steps" ? steps : threads) = value;
    } else {
      std::cerr << "usage: lora-quickstart [--steps N] [--threads N]\n";
      return arg == "--help" || arg == "-h" ? 0 : 2;
    }
  }
  // LibTorch uses half the hardware threads by default; use them all (or OMP_NUM_THREADS).
  torch::set_num_threads(threads);
  torch::manual_seed(0);

  const int64_t in = 512, out = 512;
  torch::nn::Linear pretrained(in, out);
  const auto true_change = 0.05 * torch::randn({out, 4}).mm(torch::randn({4, in}));
  auto target = [&](const torch::Tensor& x) {
    torch::NoGradGuard no_grad;
    return pretrained(x) + x.mm(true_change.t());
  };

  lora::LoRALinear<> layer(pretrained, lora::LoRAOptions(8).alpha(16));
  std::cout << "lora " << lora::version << " quickstart: " << in << "x" << out << " layer, rank 8, " << threads
            << " threads\n"
            << *layer << "\n"
            << lora::count_parameters(*layer).to_string() << "\n\n";

  const auto probe = torch::randn({1024, in});
  const auto probe_target = target(probe);
  auto probe_loss = [&] {
    torch::NoGradGuard no_grad;
    return torch::mse_loss(layer(probe), probe_target).item<double>();
  };
  const double initial = probe_loss();

  torch::optim::AdamW optimizer(layer->parameters(), torch::optim::AdamWOptions(3e-3).weight_decay(0.0));
  const auto start = std::chrono::steady_clock::now();
  for (int step = 1; step <= steps; ++step) {
    const auto x = torch::randn({256, in});
    optimizer.zero_grad();
    const auto loss = torch::mse_loss(layer(x), target(x));
    loss.backward();
    optimizer.step();
    if (step == 1 || step % 100 == 0 || step == steps) {
      std::cout << "step " << std::setw(4) << step << "  train loss " << std::scientific << std::setprecision(3)
                << loss.item<double>() << std::defaultfloat << "\n";
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double final_loss = probe_loss();

  const auto adapted = layer(probe).detach();
  layer->merge({}, /*safe_merge=*/true);
  const double merge_error = (pretrained(probe) - adapted).abs().max().item<double>();

  std::cout << std::setprecision(4) << "\nheld-out loss: " << initial << " before, " << final_loss << " after ("
            << std::fixed << std::setprecision(0) << initial / std::max(final_loss, 1e-30) << "x lower) in "
            << std::setprecision(2) << seconds << " s\n"
            << "merged layer reproduces the adapted output to " << std::scientific << merge_error << "\n";
  const bool ok = final_loss < 0.01 * initial && merge_error < 1e-4;
  std::cout << (ok ? "ok: the adapter learned the change and merged cleanly\n" : "FAILED\n");
  return ok ? 0 : 1;
}
