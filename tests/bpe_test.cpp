// Byte-level BPE (RoBERTa), tokenizer.json and folder tokenizers: rules on a generated vocabulary,
// and with LORA_SHARED_DIR every golden line of RobertaTokenizer id for id.

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <lora/models/roberta.hpp>
#include <lora/tokenizers/auto.hpp>

#include "test_helpers.hpp"

namespace fs = std::filesystem;
using lora::tokenizers::ByteLevelBpeTokenizer;

namespace {

const char* shared_dir() { return std::getenv("LORA_SHARED_DIR"); }

nlohmann::json read_json(const fs::path& file) {
  std::ifstream in(file);
  return nlohmann::json::parse(in);
}

/// The byte character of `byte` (GPT-2's table), as UTF-8.
std::string byte_char(unsigned char byte) {
  std::string out;
  lora::tokenizers::detail::append_utf8(out, lora::tokenizers::detail::byte_to_char()[byte]);
  return out;
}

/// RoBERTa's layout on a small scale: <s> <pad> </s> <unk>, the 256 byte characters, the merge
/// results, <mask>.
struct TinyBpe {
  std::vector<std::string> tokens;
  std::vector<ByteLevelBpeTokenizer::Merge> merges;
  TinyBpe() {
    tokens = {"<s>", "<pad>", "</s>", "<unk>"};
    std::vector<std::string> bytes;
    for (int b = 0; b < 256; ++b) bytes.push_back(byte_char(static_cast<unsigned char>(b)));
    std::sort(bytes.begin(), bytes.end(), [](const std::string& a, const std::string& b) {
      std::vector<char32_t> x, y;
      lora::tokenizers::detail::decode_utf8(a, x);
      lora::tokenizers::detail::decode_utf8(b, y);
      return x < y;
    });
    tokens.insert(tokens.end(), bytes.begin(), bytes.end());
    const std::string G = byte_char(' ');
    merges = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {G, "w"}, {"o", "r"}, {G + "w", "or"}, {"l", "d"},
              {G + "wor", "ld"}, {"'", "s"}, {G, "1"}};
    for (const auto& [left, right] : merges) tokens.push_back(left + right);
    tokens.push_back("<mask>");
  }
  ByteLevelBpeTokenizer tokenizer(lora::tokenizers::BpeOptions options = {}) const {
    return ByteLevelBpeTokenizer(tokens, merges, options);
  }
  void write(const fs::path& folder) const {
    fs::create_directories(folder);
    nlohmann::json vocab;
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
    std::ofstream(folder / "vocab.json") << vocab.dump();
    std::ofstream merges_out(folder / "merges.txt");
    merges_out << "#version: 0.2\n";
    for (const auto& [left, right] : merges) merges_out << left << " " << right << "\n";
  }
  /// A tokenizer.json as Hugging Face's tokenizers writes it for RoBERTa.
  nlohmann::json tokenizer_json(bool merges_as_pairs) const {
    nlohmann::json vocab, added = nlohmann::json::array(), listed = nlohmann::json::array();
    for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
    for (const auto* special : {"<s>", "<pad>", "</s>", "<unk>", "<mask>"}) {
      added.push_back({{"id", vocab[special]}, {"content", special}, {"single_word", false},
                       {"lstrip", std::string(special) == "<mask>"}, {"rstrip", false}, {"normalized", false},
                       {"special", true}});
    }
    for (const auto& [left, right] : merges) {
      listed.push_back(merges_as_pairs ? nlohmann::json::array({left, right}) : nlohmann::json(left + " " + right));
    }
    return {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
            {"post_processor", {{"type", "RobertaProcessing"}, {"sep", {"</s>", 2}}, {"cls", {"<s>", 0}},
                                {"trim_offsets", true}, {"add_prefix_space", false}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", ""},
                       {"end_of_word_suffix", ""}, {"fuse_unk", false}, {"byte_fallback", false},
                       {"vocab", vocab}, {"merges", listed}}}};
  }
};

/// GPT-2's pre-tokenisation of `text` as UTF-8 pieces.
std::vector<std::string> pieces(const std::string& text) {
  std::vector<char32_t> cps;
  lora::tokenizers::detail::decode_utf8(text, cps);
  std::vector<std::string> out;
  lora::tokenizers::detail::gpt2_pieces(cps, 0, cps.size(), [&](size_t begin, size_t end) {
    std::string piece;
    for (size_t k = begin; k < end; ++k) lora::tokenizers::detail::append_utf8(piece, cps[k]);
    out.push_back(piece);
  });
  return out;
}

using Strings = std::vector<std::string>;

lora::tokenizers::BpeOptions with_prefix_space() {
  lora::tokenizers::BpeOptions options;
  options.add_prefix_space = true;
  return options;
}

class BpeTest : public lora::testing::TempDirTest {};

}  // namespace

TEST_F(BpeTest, PreTokenisesAsGpt2sPattern) {
  EXPECT_EQ(pieces("it's I'M can't they're"), (Strings{"it", "'s", " I", "'", "M", " can", "'t", " they", "'re"}));
  EXPECT_EQ(pieces("a   b"), (Strings{"a", "  ", " b"}));          // n spaces: n-1, then " b"
  EXPECT_EQ(pieces("tab\there"), (Strings{"tab", "\t", "here"}));  // only U+0020 joins a word
  EXPECT_EQ(pieces("end  "), (Strings{"end", "  "}));               // trailing whitespace: one piece
  EXPECT_EQ(pieces("n 1234 3.14 ?!"), (Strings{"n", " 1234", " 3", ".", "14", " ?!"}));
  EXPECT_EQ(pieces("x \xc2\xa0y"), (Strings{"x", " ", "\xc2\xa0", "y"}));  // NBSP is whitespace, not a space
  EXPECT_EQ(pieces(" 'tis"), (Strings{" '", "tis"}));
  EXPECT_EQ(pieces("Caf\xc3\xa9 na\xc3\xafve"), (Strings{"Caf\xc3\xa9", " na\xc3\xafve"}));  // letters beyond ASCII
  EXPECT_EQ(pieces("a\x1e" "b"), (Strings{"a", "\x1e", "b"}));  // U+001E: not \s in Python's regex module
  EXPECT_EQ(pieces(""), Strings{});
}

TEST_F(BpeTest, MergesByRankSplitsSpecialsAndRoundTrips) {
  const TinyBpe bpe;
  const auto tokenizer = bpe.tokenizer();
  const std::string G = byte_char(' ');
  EXPECT_EQ(tokenizer.tokenize_strings("hello world"), (Strings{"hell", "o", G + "world"}));
  EXPECT_EQ(tokenizer.tokenize_strings("hello <mask> world"), (Strings{"hell", "o", "<mask>", G + "world"}));
  EXPECT_EQ(tokenizer.tokenize_strings("hello   <mask>"), (Strings{"hell", "o", "<mask>"}));  // lstrip
  EXPECT_EQ(tokenizer.tokenize_strings("x<s>y</s>"), (Strings{"x", "<s>", "y", "</s>"}));
  EXPECT_EQ(tokenizer.tokenize_strings("<MASK>").size(), 6u);  // case-sensitive: plain text
  EXPECT_EQ(tokenizer.tokenize_strings("it's 12"), (Strings{"i", "t", "'s", G + "1", "2"}));
  const auto prefixed = bpe.tokenizer(with_prefix_space());
  EXPECT_EQ(prefixed.tokenize_strings("hello"), (Strings{G, "hell", "o"}));
  EXPECT_EQ(prefixed.tokenize_strings(" hello"), (Strings{G, "hell", "o"}));  // already starts with a space

  const auto encoding = tokenizer.encode("hello", std::string("world"));
  EXPECT_EQ(encoding.input_ids, (std::vector<int64_t>{0, tokenizer.token_to_id("hell"), tokenizer.token_to_id("o"), 2, 2,
                                                      tokenizer.token_to_id("w"), tokenizer.token_to_id("or"),
                                                      tokenizer.token_to_id("ld"), 2}));
  EXPECT_EQ(encoding.token_type_ids, std::vector<int64_t>(9, 0));
  EXPECT_EQ(tokenizer.encode("hello world hello", std::nullopt, 4).input_ids.size(), 4u);
  LORA_EXPECT_THROWS_WITH(tokenizer.encode("a", std::string("b"), 3), "max_length 3 leaves no room for the 4 special tokens");
  EXPECT_EQ(tokenizer.encode("").input_ids, (std::vector<int64_t>{0, 2}));

  // Every byte survives: decode(encode(text)) is the text, whitespace and accents included.
  for (const std::string text : {"Caf\xc3\xa9 na\xc3\xafve r\xc3\xa9sum\xc3\xa9", "  a\tb\r\nc  ", "\xf0\x9f\x98\x80 emoji",
                                 "hello <mask>"}) {
    const auto decoded = tokenizer.decode(tokenizer.encode(text).input_ids);
    if (text == "hello <mask>") {
      EXPECT_EQ(decoded, "hello");  // the mask is skipped, and it ate the space before it
    } else {
      EXPECT_EQ(decoded, text);
    }
  }
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("a<s>b").input_ids, false), "<s>a<s>b</s>");
  // Ill-formed bytes decode to U+FFFD, one per maximal ill-formed subsequence (Python's "replace").
  const auto lone = tokenizer.token_to_id(byte_char(0xC3));
  const auto e2 = tokenizer.token_to_id(byte_char(0xE2)), x82 = tokenizer.token_to_id(byte_char(0x82));
  EXPECT_EQ(tokenizer.decode({lone, tokenizer.token_to_id("a")}), "\xef\xbf\xbd" "a");
  EXPECT_EQ(tokenizer.decode({e2, x82}), "\xef\xbf\xbd");
  // Invalid UTF-8 input is read as U+FFFD, whose bytes are then encoded.
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("a\xff" "b").input_ids), "a\xef\xbf\xbd" "b");
}

TEST_F(BpeTest, IsSafeToShareBetweenThreads) {
  const auto tokenizer = TinyBpe().tokenizer();
  std::vector<std::string> texts;
  for (int i = 0; i < 400; ++i) texts.push_back("hello world " + std::to_string(i * 7919) + " it's <mask> x" + std::to_string(i));
  std::vector<std::vector<int64_t>> expected;
  for (const auto& text : texts) expected.push_back(TinyBpe().tokenizer().encode(text).input_ids);
  std::vector<int> mismatches(2, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = 0; i < texts.size(); ++i) mismatches[t] += tokenizer.encode(texts[i]).input_ids != expected[i];
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches, (std::vector<int>{0, 0}));
}

TEST_F(BpeTest, BadVocabulariesAreRefusedByName) {
  TinyBpe bpe;
  auto without_mask = bpe.tokens;
  without_mask.pop_back();
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer(without_mask, bpe.merges), "lacks the mask token '<mask>'");
  auto duplicated = bpe.tokens;
  duplicated[10] = duplicated[11];
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer(duplicated, bpe.merges), "has two ids");
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer::vocabulary_from_json(nlohmann::json{{"a", 0}, {"b", 2}}, "v"),
                          "token 'b' in v has id 2 outside [0, 2)");
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer::vocabulary_from_json(nlohmann::json{{"a", 0}, {"b", 0}}, "v"),
                          "id 0 is given to two tokens in v");
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer::vocabulary_from_json(nlohmann::json{{"a", "x"}}, "v"),
                          "has a non-integer id \"x\"");
  // merges.txt as RobertaTokenizer reads it: the first line is dropped, and so is a last line
  // without its newline; other lines split on whitespace.
  const auto merges = ByteLevelBpeTokenizer::merges_from_text("#version: 0.2\na b\nc  d\r\none\ne f g\nx y");
  EXPECT_EQ(merges, (std::vector<ByteLevelBpeTokenizer::Merge>{{"a", "b"}, {"c", "d"}}));
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer::from_files(path("none.json"), path("none.txt")),
                          "cannot open vocabulary");
  std::ofstream(path("bad.json")) << "{\"a\": ";
  std::ofstream(path("merges.txt")) << "#\n";
  LORA_EXPECT_THROWS_WITH(ByteLevelBpeTokenizer::from_files(path("bad.json"), path("merges.txt")), "invalid JSON in");
}

TEST_F(BpeTest, TokenizerJsonGivesTheSameTokenizer) {
  const TinyBpe bpe;
  const auto slow = bpe.tokenizer();
  for (const bool pairs : {false, true}) {
    std::ofstream(path("tokenizer.json")) << bpe.tokenizer_json(pairs).dump();
    const auto fast = lora::tokenizers::tokenizer_from_json_file(path("tokenizer.json"));
    EXPECT_EQ(fast->kind(), "BPE");
    for (const std::string text : {"hello world", "hello   <mask> world", "it's 12 x<s>y", " caf\xc3\xa9\t!"}) {
      EXPECT_EQ(fast->encode(text).input_ids, slow.encode(text).input_ids) << text;
    }
  }
  // Pipeline steps we do not reproduce exactly are refused by name.
  auto json = bpe.tokenizer_json(false);
  json["normalizer"] = {{"type", "NFKC"}};
  std::ofstream(path("nfkc.json")) << json.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("nfkc.json")), "normalizer 'NFKC' is not supported");
  json = bpe.tokenizer_json(false);
  json["model"]["dropout"] = 0.1;
  std::ofstream(path("dropout.json")) << json.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("dropout.json")), "BPE dropout is not supported");
  json = bpe.tokenizer_json(false);
  json["model"]["ignore_merges"] = true;
  std::ofstream(path("ignore.json")) << json.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("ignore.json")),
                          "BPE model setting 'ignore_merges' = true is not supported");
  json = bpe.tokenizer_json(false);
  json["post_processor"] = {{"type", "ByteLevel"}};  // GPT-2's: no <s> </s>, which encode() would add
  std::ofstream(path("gpt2.json")) << json.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("gpt2.json")),
                          "post_processor 'ByteLevel' is not supported with BPE");
  json = bpe.tokenizer_json(false);
  json["added_tokens"][0]["lstrip"] = "yes";
  std::ofstream(path("typed.json")) << json.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("typed.json")),
                          "'lstrip' has a value of the wrong type (got \"yes\")");
  // Files written by tokenizers before 0.9 (roberta-base's, bert-base-uncased's) have no model
  // type: the fields tell.
  json = bpe.tokenizer_json(true);
  json["model"].erase("type");
  std::ofstream(path("untyped.json")) << json.dump();
  EXPECT_EQ(lora::tokenizers::tokenizer_from_json_file(path("untyped.json"))->encode("hello world").input_ids,
            slow.encode("hello world").input_ids);
  json = bpe.tokenizer_json(false);
  json["model"]["type"] = "Unigram";
  std::ofstream(path("unigram.json")) << json.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("unigram.json")),
                          "tokenizer model 'Unigram' is not supported");

  // WordPiece: a BERT tokenizer.json equals the vocab.txt tokenizer with the same options.
  const std::vector<std::string> vocab{"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "##s", "is",
                                       "great", "!", "Great", "cafe", "caf", "##é"};
  nlohmann::json table;
  for (size_t i = 0; i < vocab.size(); ++i) table[vocab[i]] = i;
  for (const bool lowercase : {true, false}) {
    const nlohmann::json wordpiece{
        {"added_tokens", nlohmann::json::array()},
        {"normalizer", {{"type", "BertNormalizer"}, {"clean_text", true}, {"handle_chinese_chars", true},
                        {"strip_accents", nullptr}, {"lowercase", lowercase}}},
        {"pre_tokenizer", {{"type", "BertPreTokenizer"}}},
        {"post_processor",
         {{"type", "TemplateProcessing"},
          {"single", {{{"SpecialToken", {{"id", "[CLS]"}, {"type_id", 0}}}},
                      {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                      {{"SpecialToken", {{"id", "[SEP]"}, {"type_id", 0}}}}}}}},
        {"model", {{"type", "WordPiece"}, {"unk_token", "[UNK]"}, {"continuing_subword_prefix", "##"},
                   {"max_input_chars_per_word", 100}, {"vocab", table}}}};
    auto untyped = wordpiece;
    if (lowercase) untyped["model"].erase("type");  // the pre-0.9 layout, once
    std::ofstream(path("wordpiece.json")) << untyped.dump();
    const auto fast = lora::tokenizers::tokenizer_from_json_file(path("wordpiece.json"));
    lora::tokenizers::WordPieceOptions options;
    options.lowercase = lowercase;
    const lora::tokenizers::WordPieceTokenizer slow_wordpiece(vocab, options);
    EXPECT_EQ(fast->kind(), "WordPiece");
    for (const std::string text : {"The films is GREAT!", "Caf\xc3\xa9 [MASK] films"}) {
      EXPECT_EQ(fast->encode(text).input_ids, slow_wordpiece.encode(text).input_ids) << text << " lowercase " << lowercase;
    }
    // tokenizer_config.json's do_lower_case wins over the file's normalizer, as in transformers.
    const auto overridden = lora::tokenizers::tokenizer_from_json_file(path("wordpiece.json"), {{"do_lower_case", !lowercase}});
    EXPECT_EQ(overridden->tokenize_ids("Great"), std::vector<int64_t>{lowercase ? 11 : 9});
    auto extra = wordpiece;
    extra["added_tokens"] = {{{"id", 15}, {"content", "[NEW]"}, {"special", true}}};
    std::ofstream(path("extra.json")) << extra.dump();
    LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("extra.json")),
                            "added token '[NEW]' is not supported with WordPiece");
    auto shifted = wordpiece;
    shifted["post_processor"]["single"].erase(0);
    std::ofstream(path("shifted.json")) << shifted.dump();
    LORA_EXPECT_THROWS_WITH(lora::tokenizers::tokenizer_from_json_file(path("shifted.json")),
                            "post_processor template '$A [SEP]' is not supported (expected [CLS] $A [SEP])");
  }
}

TEST_F(BpeTest, FoldersOpenWithTheTokenizerTheyShip) {
  const TinyBpe bpe;
  bpe.write(dir_ / "bpe");
  std::ofstream(dir_ / "bpe" / "tokenizer_config.json") << R"({"add_prefix_space": true})";
  const auto from_files = lora::tokenizers::load_tokenizer(path("bpe"));
  EXPECT_EQ(from_files->kind(), "BPE");
  EXPECT_EQ(from_files->encode("hello").input_ids, bpe.tokenizer(with_prefix_space()).encode("hello").input_ids);
  fs::create_directories(path("fast"));
  std::ofstream(path("fast/tokenizer.json")) << bpe.tokenizer_json(true).dump();
  EXPECT_EQ(lora::tokenizers::load_tokenizer(path("fast"))->encode("hello world").input_ids,
            bpe.tokenizer().encode("hello world").input_ids);
  fs::create_directories(path("cased"));
  std::ofstream(path("cased/vocab.txt")) << "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nGreat\ngreat\n";
  std::ofstream(path("cased/tokenizer_config.json")) << R"({"do_lower_case": false})";
  EXPECT_EQ(lora::tokenizers::load_tokenizer(path("cased"))->tokenize_ids("Great"), std::vector<int64_t>{5});
  // Added tokens of tokenizer_config.json (transformers >= 4.34): split out with their flags,
  // new ones appended to the vocabulary; non-special ones survive decode.
  const auto size = static_cast<int64_t>(bpe.tokens.size());
  nlohmann::json decoder;
  decoder[std::to_string(size - 1)] = {{"content", "<mask>"}, {"lstrip", true}, {"rstrip", false}, {"special", true}};
  decoder[std::to_string(size)] = {{"content", "<new>"}, {"lstrip", false}, {"rstrip", true}, {"special", false}};
  std::ofstream(dir_ / "bpe" / "tokenizer_config.json") << nlohmann::json{{"added_tokens_decoder", decoder}}.dump();
  const auto added = lora::tokenizers::load_tokenizer(path("bpe"));
  EXPECT_EQ(added->vocab_size(), size + 1);
  const auto ids = added->encode("hello <new>   world <mask>").input_ids;
  EXPECT_EQ(ids, (std::vector<int64_t>{0, added->token_to_id("hell"), added->token_to_id("o"), added->token_to_id(byte_char(' ')),
                                       size, added->token_to_id("w"), added->token_to_id("or"), added->token_to_id("ld"),
                                       size - 1, 2}));  // <new> strips the spaces after it, <mask> the one before
  EXPECT_EQ(added->decode(ids), "hello <new>world");
  decoder[std::to_string(size + 5)] = {{"content", "<far>"}};
  std::ofstream(dir_ / "bpe" / "tokenizer_config.json") << nlohmann::json{{"added_tokens_decoder", decoder}}.dump();
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::load_tokenizer(path("bpe")),
                          "added token '<far>' has id " + std::to_string(size + 5));
  fs::create_directories(path("empty"));
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::load_tokenizer(path("empty")), "has no tokenizer files");
  std::ofstream(path("cased/tokenizer_config.json")) << R"({"do_lower_case": "no"})";
  LORA_EXPECT_THROWS_WITH(lora::tokenizers::load_tokenizer(path("cased")), "'do_lower_case' in tokenizer_config.json");
}

// ---- against RobertaTokenizer (transformers 4.39), ../shared/golden/families/tokenize -----------

TEST(BpeGolden, EveryLineMatchesRobertaTokenizer) {
  if (shared_dir() == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the RobertaTokenizer comparison";
  const fs::path golden = fs::path(shared_dir()) / "golden" / "families";
  const auto tokenizer = lora::tokenizers::load_tokenizer((golden / "roberta-tiny" / "model").string());
  const auto& bpe = dynamic_cast<const ByteLevelBpeTokenizer&>(*tokenizer);
  // The same vocabulary through tokenizer.json, as the fast tokenizer would save it.
  nlohmann::json vocab = read_json(golden / "bpe" / "vocab.json");
  nlohmann::json merges = nlohmann::json::array();
  {
    std::ifstream in(golden / "bpe" / "merges.txt", std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), {});
    for (const auto& [left, right] : ByteLevelBpeTokenizer::merges_from_text(text)) merges.push_back(left + " " + right);
  }
  nlohmann::json added = nlohmann::json::array();
  for (const auto* special : {"<s>", "<pad>", "</s>", "<unk>", "<mask>"}) {
    added.push_back({{"id", vocab[special]}, {"content", special}, {"lstrip", std::string(special) == "<mask>"},
                     {"special", true}});
  }
  const auto json_file = fs::temp_directory_path() / ("lora-bpe-golden-" + std::to_string(::getpid()) + ".json");
  std::ofstream(json_file) << nlohmann::json{
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", {{"type", "RobertaProcessing"}, {"sep", {"</s>", 2}}, {"cls", {"<s>", 0}}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}}.dump();
  const auto from_json = lora::tokenizers::tokenizer_from_json_file(json_file.string());
  fs::remove(json_file);
  size_t lines = 0;
  for (const auto* name : {"tricky", "sst2_dev", "specials"}) {
    const auto expected = read_json(golden / "tokenize" / (std::string(name) + "_roberta.json"));
    const auto& not_equal = expected["decode_roundtrip"]["lines_not_equal"];
    std::vector<lora::tokenizers::Encoding> encodings;
    for (size_t i = 0; i < expected["items"].size(); ++i) {
      const auto& item = expected["items"][i];
      const auto text = item["text"].get<std::string>();
      const auto ids = bpe.encode(text).input_ids;
      EXPECT_EQ(ids, item["input_ids"].get<std::vector<int64_t>>()) << name << " line " << i << ": " << text;
      EXPECT_EQ(from_json->encode(text).input_ids, ids) << name << " line " << i << " via tokenizer.json";
      Strings tokens;
      for (const auto id : ids) tokens.push_back(bpe.id_to_token(id));
      EXPECT_EQ(tokens, item["tokens"].get<Strings>()) << name << " line " << i;
      const bool listed = std::find(not_equal.begin(), not_equal.end(), i) != not_equal.end();
      EXPECT_EQ(bpe.decode(ids) == text, !listed) << name << " line " << i << " decodes to '" << bpe.decode(ids) << "'";
      encodings.push_back(bpe.encode(text));
      ++lines;
    }
    const auto batch = bpe.pad(encodings);
    EXPECT_TRUE(torch::equal(batch.input_ids, lora::testing::json_tensor(expected["batch"]["input_ids"], torch::kLong))) << name;
    EXPECT_TRUE(torch::equal(batch.attention_mask, lora::testing::json_tensor(expected["batch"]["attention_mask"], torch::kLong))) << name;
    EXPECT_TRUE(torch::equal(lora::models::roberta_position_ids(batch.input_ids, bpe.pad_id()),
                             lora::testing::json_tensor(expected["batch"]["position_ids"], torch::kLong)))
        << name;
  }
  std::cout << "[golden] RobertaTokenizer: " << lines << " lines id for id (vocab.json + merges.txt and tokenizer.json)\n";
}
