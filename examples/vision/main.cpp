// lora-vision: LoRA beyond text. A small convolutional network is pretrained on generated
// images (which way does a bar run?), then adapted to a shifted task (the same question on
// inverted, thinner, noisier bars: the pretrained filters respond to the wrong polarity) by
// LoRA adapters on its convolutions plus a retrained head, with the convolution weights frozen.
// The adapters are merged at the end and the merged network checked against the adapted one.
//
//   lora-vision [--rank R] [--epochs N] [--threads N] [--seed S] [--in-place]
//               [--output DIR] [--min-accuracy A]
//
// --in-place builds the network from plain torch::nn::Conv2d / Linear members and adapts them
// with lora::make_adaptable (no source changes); by default the network declares
// lora::LoRAConv2d / LoRALinear layers. Both compute the same model (up to rounding).
// --min-accuracy makes the exit status 1 when the adapted accuracy on the shifted task stays
// below A, or when the merged network differs from the adapted one (what the ctest checks).

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <lora/io/peft.hpp>
#include <lora/lora.hpp>
#include <torch/torch.h>

namespace {

constexpr int64_t kSize = 16;     // images are kSize × kSize, one channel
constexpr int64_t kClasses = 4;   // horizontal, vertical, diagonal ↘, diagonal ↗

/// One generated image set: images [N, 1, 16, 16] and the bar's orientation.
struct Images {
  torch::Tensor images;
  torch::Tensor labels;
};

/// Bars of random length and position. The shifted task draws thinner bars, dark on a bright
/// background, with more noise.
Images make_images(int64_t count, bool shifted, torch::Generator& generator) {
  auto images = torch::zeros({count, 1, kSize, kSize});
  auto labels = torch::randint(kClasses, {count}, generator, torch::kLong);
  auto accessor = images.accessor<float, 4>();
  const int64_t thickness = shifted ? 1 : 2;
  for (int64_t n = 0; n < count; ++n) {
    const auto draw = [&](int64_t low, int64_t high) {
      return torch::randint(low, high, {1}, generator, torch::kLong).item<int64_t>();
    };
    const int64_t length = draw(7, 12);
    const int64_t row = draw(1, kSize - length - 1), col = draw(1, kSize - length - 1);
    const int64_t label = labels[n].item<int64_t>();
    for (int64_t i = 0; i < length; ++i) {
      for (int64_t t = 0; t < thickness; ++t) {
        int64_t r = 0, c = 0;
        switch (label) {
          case 0: r = row + length / 2 + t, c = col + i; break;      // horizontal
          case 1: r = row + i, c = col + length / 2 + t; break;      // vertical
          case 2: r = row + i, c = col + i + t; break;               // ↘
          default: r = row + i, c = col + length - 1 - i + t; break;  // ↗
        }
        if (r >= 0 && r < kSize && c >= 0 && c < kSize) accessor[n][0][r][c] = 1.0f;
      }
    }
  }
  images += (shifted ? 0.35 : 0.2) * torch::randn(images.sizes(), generator);
  if (shifted) images = 1.0 - images;
  return {images, labels};
}

/// conv → pool → conv → pool → conv → global average → linear, with the layer types as
/// template parameters: plain torch::nn layers or the library's LoRA layers.
template <typename Conv, typename Linear>
struct NetImpl : torch::nn::Module {
  NetImpl() {
    conv1 = register_module("conv1", Conv(torch::nn::Conv2dOptions(1, 16, 3).padding(1)));
    conv2 = register_module("conv2", Conv(torch::nn::Conv2dOptions(16, 32, 3).padding(1)));
    conv3 = register_module("conv3", Conv(torch::nn::Conv2dOptions(32, 32, 3).padding(1)));
    head = register_module("head", Linear(torch::nn::LinearOptions(32, kClasses)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
    h = torch::max_pool2d(torch::relu(conv2->forward(h)), 2);
    h = torch::relu(conv3->forward(h)).mean({2, 3});
    return head->forward(h);
  }
  Conv conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  Linear head{nullptr};
};

template <typename Net>
double accuracy(Net& net, const Images& data, const std::function<torch::Tensor(const torch::Tensor&)>& forward) {
  torch::NoGradGuard no_grad;
  net->eval();
  const auto predicted = forward(data.images).argmax(1);
  return predicted.eq(data.labels).to(torch::kDouble).mean().item<double>();
}

/// Mini-batch Adam over shuffled examples; `forward` runs the network (in a scope for --in-place).
template <typename Net>
void train(Net& net, const std::vector<torch::Tensor>& parameters, const Images& data, int epochs, double lr,
           torch::Generator& generator, const std::function<torch::Tensor(const torch::Tensor&)>& forward) {
  torch::optim::Adam optimizer(parameters, torch::optim::AdamOptions(lr));
  const int64_t batch = 64;
  net->train();
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const auto order = torch::randperm(data.images.size(0), generator, torch::kLong);
    for (int64_t start = 0; start + batch <= order.size(0); start += batch) {
      const auto index = order.slice(0, start, start + batch);
      const auto loss = torch::cross_entropy_loss(forward(data.images.index_select(0, index)),
                                                  data.labels.index_select(0, index));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
    }
  }
}

std::vector<torch::Tensor> trainable(const torch::nn::Module& model) {
  std::vector<torch::Tensor> parameters;
  for (const auto& parameter : model.parameters()) {
    if (parameter.requires_grad()) parameters.push_back(parameter);
  }
  return parameters;
}

struct Settings {
  int64_t rank = 4;
  int epochs = 20;
  int threads = 0;
  uint64_t seed = 0;
  bool in_place = false;
  std::string output;
  double min_accuracy = -1;
};

template <typename Conv, typename Linear>
int run(const Settings& settings) {
  using Net = torch::nn::ModuleHolder<NetImpl<Conv, Linear>>;
  torch::manual_seed(settings.seed);
  auto generator = torch::make_generator<at::CPUGeneratorImpl>(settings.seed);
  const auto pretrain = make_images(4096, false, generator), pretrain_test = make_images(1024, false, generator);
  const auto shifted = make_images(2048, true, generator), shifted_test = make_images(1024, true, generator);

  Net net;
  std::function<torch::Tensor(const torch::Tensor&)> forward = [&](const torch::Tensor& x) { return net->forward(x); };
  const auto start = std::chrono::steady_clock::now();
  for (auto& parameter : net->parameters()) parameter.requires_grad_(true);  // pretraining trains everything
  train(net, net->parameters(), pretrain, 3, 3e-3, generator, forward);
  std::cout << std::fixed << std::setprecision(3) << "pretrained: accuracy " << accuracy(net, pretrain_test, forward)
            << " on its own task, " << accuracy(net, shifted_test, forward) << " on the shifted task\n";

  // LoRA on the convolutions, the head retrained in full (modules_to_save).
  const auto config = lora::LoraConfig(lora::LoRAOptions(settings.rank).alpha(2.0 * settings.rank))
                          .target_modules({"conv1", "conv2", "conv3"})
                          .modules_to_save({"head"});
  lora::AdaptableLayers adaptable;
  if (settings.in_place) {
    adaptable = lora::make_adaptable(*net, config);
    forward = [&](const torch::Tensor& x) { return adaptable.run([&] { return net->forward(x); }); };
  }
  lora::inject(*net, config);
  const auto counts = lora::count_parameters(*net);
  std::cout << "LoRA r=" << settings.rank << " on conv1-3 + head: " << counts.trainable << " of " << counts.total
            << " parameters train (" << std::setprecision(1) << 100.0 * counts.trainable / counts.total << " %)\n"
            << std::setprecision(3);
  std::vector<torch::Tensor> frozen_before;
  for (const auto& [path, layer] : lora::lora_layers(*net)) frozen_before.push_back(layer->base_weight().clone());
  train(net, trainable(*net), shifted, settings.epochs, 3e-3, generator, forward);
  const double adapted = accuracy(net, shifted_test, forward);
  std::cout << "adapted: accuracy " << adapted << " on the shifted task\n";
  size_t index = 0;
  for (const auto& [path, layer] : lora::lora_layers(*net)) {
    if (!torch::equal(layer->base_weight(), frozen_before[index++])) {
      std::cerr << "lora-vision: the frozen weight of " << path << " changed\n";
      return 1;
    }
  }

  if (!settings.output.empty()) {
    lora::io::save_adapter(*net, settings.output);
    std::cout << "adapter saved to " << settings.output << " (PEFT format)\n";
  }

  // Merge: the convolutions hold W + s·B·A; the network computes the same without adapters.
  torch::Tensor before_merge;
  {
    torch::NoGradGuard no_grad;
    before_merge = forward(shifted_test.images);
  }
  lora::merge_and_unload(*net);
  if (settings.in_place) {
    adaptable.release();
    forward = [&](const torch::Tensor& x) { return net->forward(x); };
  }
  torch::Tensor after_merge;
  {
    torch::NoGradGuard no_grad;
    after_merge = forward(shifted_test.images);
  }
  const double merge_error = (after_merge - before_merge).abs().max().item<double>();
  const double merged = accuracy(net, shifted_test, forward);
  std::cout << std::scientific << std::setprecision(2) << "merged: max |logits - adapted| = " << merge_error << std::fixed
            << std::setprecision(3) << ", accuracy " << merged << "\n";
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << std::setprecision(1) << "took " << seconds << " s\n";

  if (settings.min_accuracy >= 0) {
    if (adapted < settings.min_accuracy) {
      std::cerr << "lora-vision: adapted accuracy " << adapted << " is below --min-accuracy " << settings.min_accuracy << "\n";
      return 1;
    }
    if (merge_error > 1e-4) {
      std::cerr << "lora-vision: the merged network differs from the adapted one by " << merge_error << "\n";
      return 1;
    }
  }
  return 0;
}

int threads_from_environment() {
  if (const char* value = std::getenv("OMP_NUM_THREADS")) return std::max(1, std::atoi(value));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace

int main(int argc, char** argv) {
  Settings settings;
  settings.threads = threads_from_environment();
  CLI::App app{"lora-vision: LoRA adapters on a convolutional network, from a generated task to a shifted one"};
  app.add_option("--rank", settings.rank, "adapter rank")->check(CLI::PositiveNumber);
  app.add_option("--epochs", settings.epochs, "epochs of adapter training on the shifted task")->check(CLI::PositiveNumber);
  app.add_option("--threads", settings.threads, "intra-op threads")->check(CLI::PositiveNumber);
  app.add_option("--seed", settings.seed, "seed of the data and of every initialisation");
  app.add_flag("--in-place", settings.in_place, "plain torch::nn layers adapted with lora::make_adaptable");
  app.add_option("--output", settings.output, "save the adapter here (PEFT folder)");
  app.add_option("--min-accuracy", settings.min_accuracy, "fail below this adapted accuracy (and on a merge mismatch)");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(settings.threads);
  try {
    return settings.in_place ? run<torch::nn::Conv2d, torch::nn::Linear>(settings)
                             : run<lora::LoRAConv2d, lora::LoRALinear<>>(settings);
  } catch (const c10::Error& error) {
    std::cerr << "lora-vision: " << error.what_without_backtrace() << "\n";
    return 1;
  }
}
