// A downstream program: wrap a Linear, check the adapter starts as a no-op, train a step,
// merge. Exits non-zero on any failure so that ctest sees it.
#include <cstring>
#include <iostream>

#include <lora/lora.hpp>
#include <torch/optim/sgd.h>

int main() {
  if (std::strcmp(lora::version, LORA_EXPECTED_VERSION) != 0) {
    std::cerr << "lora::version is " << lora::version << " but the project says " << LORA_EXPECTED_VERSION << "\n";
    return 1;
  }
  torch::manual_seed(0);
  torch::nn::Linear base(8, 4);
  lora::LoRALinear<> layer(base, lora::LoRAOptions(2).alpha(4));
  const auto x = torch::randn({5, 8});
  if (!torch::equal(layer(x), base(x))) {
    std::cerr << "adapter is not a no-op at initialisation\n";
    return 1;
  }
  torch::optim::SGD optimizer(layer->parameters(), torch::optim::SGDOptions(0.1));
  layer(x).pow(2).sum().backward();
  optimizer.step();
  const auto adapted = layer(x).detach();
  layer->merge();
  if (!torch::allclose(base(x), adapted, 1e-5, 1e-5)) {
    std::cerr << "merged base layer does not reproduce the adapted output\n";
    return 1;
  }
  std::cout << "lora " << lora::version << " consumer: ok (" << lora::count_parameters(*layer).to_string() << ")\n";
  return 0;
}
