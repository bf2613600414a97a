// Every public header in one translation unit: compiled by clang in ctest (headers_clang) so
// that nothing GCC accepts as an extension (lambdas capturing structured bindings, ...) slips in.
#include <lora/data/batcher.hpp>
#include <lora/data/tsv.hpp>
#ifdef USE_C10D_GLOO  // lora::distributed: ctest passes the definition when it is built
#include <lora/distributed.hpp>
#endif
#include <lora/io/hotswap.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/peft_jit.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/jit.hpp>
#include <lora/lora.hpp>
#include <lora/models/auto.hpp>
#include <lora/models/bert_torchscript.hpp>
#include <lora/tokenizers/auto.hpp>

int main() { return 0; }
