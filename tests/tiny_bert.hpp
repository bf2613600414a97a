#pragma once

// A small BERT-shaped encoder for injector tests, natively (with adaptable projections) and as a
// TorchScript twin built from the same weights. Inputs are already-embedded [batch, seq, hidden]
// float tensors; module names follow Hugging Face's BERT.

#include <cmath>
#include <sstream>
#include <string>

#include <lora/lora.hpp>
#include <torch/script.h>
#include <torch/torch.h>

namespace lora::testing {

constexpr int64_t kHidden = 16;
constexpr int64_t kHeads = 2;
constexpr int64_t kIntermediate = 32;
constexpr int64_t kLabels = 2;
constexpr double kLayerNormEps = 1e-12;

using Projection = lora::LoRALinear<>;

inline Projection projection(int64_t in, int64_t out) { return Projection(torch::nn::LinearOptions(in, out)); }

struct SelfAttentionImpl : torch::nn::Module {
  SelfAttentionImpl() {
    query = register_module("query", projection(kHidden, kHidden));
    key = register_module("key", projection(kHidden, kHidden));
    value = register_module("value", projection(kHidden, kHidden));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    const auto batch = h.size(0), seq = h.size(1), head = kHidden / kHeads;
    auto split = [&](const torch::Tensor& t) { return t.view({batch, seq, kHeads, head}).transpose(1, 2); };
    const auto q = split(query(h)), k = split(key(h)), v = split(value(h));
    const auto probs = torch::softmax(q.matmul(k.transpose(-1, -2)) / std::sqrt(static_cast<double>(head)), -1);
    return probs.matmul(v).transpose(1, 2).reshape({batch, seq, kHidden});
  }
  Projection query{nullptr}, key{nullptr}, value{nullptr};
};
TORCH_MODULE(SelfAttention);

/// `dense` then LayerNorm(· + residual): BERT's attention.output and output blocks.
struct DenseNormImpl : torch::nn::Module {
  DenseNormImpl(int64_t in, int64_t out) {
    dense = register_module("dense", projection(in, out));
    LayerNorm = register_module(
        "LayerNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({out}).eps(kLayerNormEps)));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual) { return LayerNorm(dense(x) + residual); }
  Projection dense{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
};
TORCH_MODULE(DenseNorm);

struct AttentionImpl : torch::nn::Module {
  AttentionImpl() {
    self = register_module("self", SelfAttention());
    output = register_module("output", DenseNorm(kHidden, kHidden));
  }
  torch::Tensor forward(const torch::Tensor& h) { return output(self(h), h); }
  SelfAttention self{nullptr};
  DenseNorm output{nullptr};
};
TORCH_MODULE(Attention);

struct IntermediateImpl : torch::nn::Module {
  IntermediateImpl() { dense = register_module("dense", projection(kHidden, kIntermediate)); }
  torch::Tensor forward(const torch::Tensor& h) { return torch::gelu(dense(h)); }
  Projection dense{nullptr};
};
TORCH_MODULE(Intermediate);

struct LayerImpl : torch::nn::Module {
  LayerImpl() {
    attention = register_module("attention", Attention());
    intermediate = register_module("intermediate", Intermediate());
    output = register_module("output", DenseNorm(kIntermediate, kHidden));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    const auto a = attention(h);
    return output(intermediate(a), a);
  }
  Attention attention{nullptr};
  Intermediate intermediate{nullptr};
  DenseNorm output{nullptr};
};
TORCH_MODULE(Layer);

struct EncoderImpl : torch::nn::Module {
  explicit EncoderImpl(int64_t layers) {
    layer = register_module("layer", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; ++i) layer->push_back(Layer());
  }
  torch::Tensor forward(torch::Tensor h) {
    for (const auto& module : *layer) h = module->as<LayerImpl>()->forward(h);
    return h;
  }
  torch::nn::ModuleList layer{nullptr};
};
TORCH_MODULE(Encoder);

struct PoolerImpl : torch::nn::Module {
  PoolerImpl() { dense = register_module("dense", projection(kHidden, kHidden)); }
  torch::Tensor forward(const torch::Tensor& h) { return torch::tanh(dense(h.select(1, 0))); }
  Projection dense{nullptr};
};
TORCH_MODULE(Pooler);

/// encoder.layer.{i}.attention.self.{query,key,value}, ….attention.output.dense, ….intermediate.dense,
/// ….output.dense, pooler.dense, classifier: every Linear is adaptable.
struct TinyBertImpl : torch::nn::Module {
  explicit TinyBertImpl(int64_t layers = 2) {
    encoder = register_module("encoder", Encoder(layers));
    pooler = register_module("pooler", Pooler());
    classifier = register_module("classifier", projection(kHidden, kLabels));
  }
  torch::Tensor forward(const torch::Tensor& x) { return classifier(pooler(encoder(x))); }
  Encoder encoder{nullptr};
  Pooler pooler{nullptr};
  Projection classifier{nullptr};
};
TORCH_MODULE(TinyBert);

/// The configuration most tests use: rank 4 on query and value, the classifier saved.
inline lora::LoraConfig query_value_config() {
  return lora::LoraConfig(lora::LoRAOptions(4).alpha(8)).target_modules({"query", "value"}).modules_to_save({"classifier"});
}

/// A learnable task for TinyBert: does the first token's feature 0 exceed the second token's
/// feature 1? (The pooled first token must attend to the second: the adapted projections matter.)
inline std::pair<torch::Tensor, torch::Tensor> comparison_batch(int64_t size = 32) {
  auto x = torch::randn({size, 6, kHidden});
  auto y = (x.select(1, 0).select(1, 0) > x.select(1, 1).select(1, 1)).to(torch::kLong);
  return {x, y};
}

// ---- the TorchScript twin -----------------------------------------------------------------

namespace detail {

/// A scripted module with the `training` flag traced modules have (so train()/eval() work).
inline torch::jit::Module module_of_type(const std::string& type) {
  torch::jit::Module module(type);
  module.register_attribute("training", c10::BoolType::get(), true);
  return module;
}

inline torch::jit::Module scripted(const std::string& type, const std::string& source) {
  torch::jit::Module module(type);
  module.define(source);
  return module;
}

inline void add_parameters(torch::jit::Module& module, const torch::OrderedDict<std::string, torch::Tensor>& state,
                           const std::string& path, std::initializer_list<const char*> names) {
  for (const auto* name : names) {
    const auto* value = state.find(path + "." + name);
    TORCH_INTERNAL_ASSERT(value != nullptr, "twin: no tensor ", path, ".", name);
    module.register_parameter(name, value->detach().clone(), /*is_buffer=*/false);
  }
}

inline torch::jit::Module linear(const torch::OrderedDict<std::string, torch::Tensor>& state, const std::string& path) {
  auto module = module_of_type("Linear");
  add_parameters(module, state, path, {"weight", "bias"});
  module.define("def forward(self, x):\n    return torch.linear(x, self.weight, self.bias)\n");
  return module;
}

inline torch::jit::Module layer_norm(const torch::OrderedDict<std::string, torch::Tensor>& state,
                                     const std::string& path) {
  auto module = module_of_type("LayerNorm");
  add_parameters(module, state, path, {"weight", "bias"});
  std::ostringstream source;
  source << "def forward(self, x):\n    return torch.layer_norm(x, [" << kHidden
         << "], self.weight, self.bias, " << kLayerNormEps << ")\n";
  module.define(source.str());
  return module;
}

inline torch::jit::Module dense_norm(const torch::OrderedDict<std::string, torch::Tensor>& state,
                                     const std::string& path) {
  auto module = module_of_type("DenseNorm");
  module.register_module("dense", linear(state, path + ".dense"));
  module.register_module("LayerNorm", layer_norm(state, path + ".LayerNorm"));
  module.define(
      "def forward(self, x, residual):\n    return self.LayerNorm.forward(self.dense.forward(x) + residual)\n");
  return module;
}

}  // namespace detail

/// A TorchScript module with TinyBert's structure, names and (copied) weights, saved and
/// reloaded so that it is what `torch::jit::load` gives.
inline torch::jit::Module scripted_twin(TinyBert& native, int64_t layers = 2) {
  const auto state = lora::base_state_dict(*native);
  using detail::dense_norm;
  using detail::linear;
  using detail::module_of_type;
  using detail::scripted;
  auto encoder = module_of_type("Encoder");
  auto layer_list = module_of_type("LayerList");
  std::ostringstream encoder_source;
  encoder_source << "def forward(self, h):\n";
  for (int64_t i = 0; i < layers; ++i) {
    const auto path = "encoder.layer." + std::to_string(i);
    auto self = module_of_type("SelfAttention");
    for (const auto* name : {"query", "key", "value"}) {
      self.register_module(name, linear(state, path + ".attention.self." + name));
    }
    std::ostringstream self_source;
    const int64_t head = kHidden / kHeads;
    self_source << "def forward(self, h):\n"
                << "    b = h.size(0)\n    s = h.size(1)\n"
                << "    q = self.query.forward(h).view(b, s, " << kHeads << ", " << head << ").transpose(1, 2)\n"
                << "    k = self.key.forward(h).view(b, s, " << kHeads << ", " << head << ").transpose(1, 2)\n"
                << "    v = self.value.forward(h).view(b, s, " << kHeads << ", " << head << ").transpose(1, 2)\n"
                << "    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / " << std::sqrt(double(head))
                << ", -1)\n"
                << "    return torch.matmul(p, v).transpose(1, 2).reshape(b, s, " << kHidden << ")\n";
    self.define(self_source.str());
    auto attention = module_of_type("Attention");
    attention.register_module("self", self);
    attention.register_module("output", dense_norm(state, path + ".attention.output"));
    attention.define("def forward(self, h):\n    return self.output.forward(self.self.forward(h), h)\n");
    auto intermediate = module_of_type("Intermediate");
    intermediate.register_module("dense", linear(state, path + ".intermediate.dense"));
    intermediate.define("def forward(self, h):\n    return torch.gelu(self.dense.forward(h))\n");
    auto block = module_of_type("Layer");
    block.register_module("attention", attention);
    block.register_module("intermediate", intermediate);
    block.register_module("output", dense_norm(state, path + ".output"));
    block.define(
        "def forward(self, h):\n    a = self.attention.forward(h)\n"
        "    return self.output.forward(self.intermediate.forward(a), a)\n");
    layer_list.register_module(std::to_string(i), block);
    encoder_source << "    h = getattr(self.layer, \"" << i << "\").forward(h)\n";
  }
  encoder_source << "    return h\n";
  encoder.register_module("layer", layer_list);
  encoder.define(encoder_source.str());
  auto pooler = module_of_type("Pooler");
  pooler.register_module("dense", linear(state, "pooler.dense"));
  pooler.define("def forward(self, h):\n    return torch.tanh(self.dense.forward(h.select(1, 0)))\n");
  auto model = module_of_type("TinyBert");
  model.register_module("encoder", encoder);
  model.register_module("pooler", pooler);
  model.register_module("classifier", linear(state, "classifier"));
  model.define(
      "def forward(self, x):\n"
      "    return self.classifier.forward(self.pooler.forward(self.encoder.forward(x)))\n");
  std::stringstream bytes;
  model.save(bytes);
  return torch::jit::load(bytes);
}

}  // namespace lora::testing
