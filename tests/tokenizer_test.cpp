#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include <lora/tokenizers/wordpiece.hpp>

#include "test_helpers.hpp"

namespace fs = std::filesystem;
using lora::tokenizers::WordPieceOptions;
using lora::tokenizers::WordPieceTokenizer;

namespace {

/// A small vocabulary the tests write themselves; ids are positions.
const std::vector<std::string> kVocab = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",  // 0-4
    "the", "film", "was", "not", "bad",            // 5-9
    "un", "##believ", "##ab", "##ly", "!",         // 10-14
    ",", ".", "cafe", "naive", "'",                // 15-19
    "s", "我", "爱", "电", "影",                   // 20-24
    "Cafe", "The", "a", "##b", "?",                // 25-29
    "resume", "-", "good", "but", "boring",        // 30-34
};

WordPieceTokenizer uncased() { return WordPieceTokenizer(kVocab); }

WordPieceTokenizer cased() {
  WordPieceOptions options;
  options.lowercase = false;
  return WordPieceTokenizer(kVocab, options);
}

std::vector<std::string> strings(const WordPieceTokenizer& tokenizer, const std::string& text) {
  return tokenizer.tokenize_strings(text);
}

using Tokens = std::vector<std::string>;

}  // namespace

TEST(WordPieceTest, SplitsWordsIntoLongestMatchingPieces) {
  const auto tokenizer = uncased();
  EXPECT_EQ(strings(tokenizer, "the film was unbelievably bad!"),
            (Tokens{"the", "film", "was", "un", "##believ", "##ab", "##ly", "bad", "!"}));
}

TEST(WordPieceTest, LowercasesAndStripsAccentsWhenUncased) {
  const auto tokenizer = uncased();
  EXPECT_EQ(strings(tokenizer, "CAFÉ Naïve RÉSUMÉ"), (Tokens{"cafe", "naive", "resume"}));
  // Decomposed input (e + combining acute) gives the same.
  EXPECT_EQ(strings(tokenizer, "cafe\u0301"), Tokens{"cafe"});
  // Cased: no lowercasing, accents kept (so "Café" is unknown here).
  EXPECT_EQ(strings(cased(), "Cafe The Café"), (Tokens{"Cafe", "The", "[UNK]"}));
}

TEST(WordPieceTest, SplitsOnEveryPunctuationCharacter) {
  const auto tokenizer = uncased();
  EXPECT_EQ(strings(tokenizer, "not bad,good-but boring?!"),
            (Tokens{"not", "bad", ",", "good", "-", "but", "boring", "?", "!"}));
  EXPECT_EQ(strings(tokenizer, "the film's"), (Tokens{"the", "film", "'", "s"}));
  // ASCII symbols count as punctuation even where Unicode says "symbol": $ + < = > ^ ` | ~
  EXPECT_EQ(strings(tokenizer, "a$a+a^a`a|a~a").size(), 13u);
}

TEST(WordPieceTest, SplitsCjkIdeographsIntoSingleCharacters) {
  EXPECT_EQ(strings(uncased(), "我爱电影!"), (Tokens{"我", "爱", "电", "影", "!"}));
}

TEST(WordPieceTest, CleansControlCharactersAndNormalisesWhitespace) {
  const auto tokenizer = uncased();
  EXPECT_EQ(strings(tokenizer, std::string("the\x01 film\u200b\tbad\r\n\u00a0was") + std::string(1, '\0') + " bad"),
            (Tokens{"the", "film", "bad", "was", "bad"}));
  EXPECT_EQ(strings(tokenizer, "the\u2028film"), (Tokens{"the", "film"}));  // line separator splits words
  EXPECT_EQ(strings(tokenizer, "   \t\n  "), Tokens{});
  EXPECT_EQ(strings(tokenizer, ""), Tokens{});
}

TEST(WordPieceTest, UnknownAndOverlongWordsBecomeUnk) {
  const auto tokenizer = uncased();
  EXPECT_EQ(strings(tokenizer, "the xyz film"), (Tokens{"the", "[UNK]", "film"}));
  EXPECT_EQ(strings(tokenizer, "unxyz"), Tokens{"[UNK]"});  // "un" matches, the rest cannot: the whole word
  EXPECT_EQ(strings(tokenizer, "ab"), (Tokens{"a", "##b"}));
  WordPieceOptions options;
  options.max_chars_per_word = 5;
  EXPECT_EQ(WordPieceTokenizer(kVocab, options).tokenize_strings("abbbbb ab"), (Tokens{"[UNK]", "a", "##b"}));
  EXPECT_EQ(strings(tokenizer, std::string(101, 'b')), Tokens{"[UNK]"});
}

TEST(WordPieceTest, KeepsSpecialTokensWrittenInTheText) {
  const auto tokenizer = uncased();
  EXPECT_EQ(tokenizer.tokenize_ids("the[SEP]film [MASK]"), (std::vector<int64_t>{5, 3, 6, 4}));
  EXPECT_EQ(strings(tokenizer, "[sep]"), (Tokens{"[UNK]", "[UNK]", "[UNK]"}));  // lower case is not special
}

TEST(WordPieceTest, InvalidUtf8IsDropped) {
  const auto tokenizer = uncased();
  EXPECT_EQ(strings(tokenizer, std::string("the \xff\xfe film \xc3") + "bad"), (Tokens{"the", "film", "bad"}));
}

TEST(WordPieceTest, EncodesSentencesAndPairsWithTruncation) {
  const auto tokenizer = uncased();
  auto single = tokenizer.encode("the film");
  EXPECT_EQ(single.input_ids, (std::vector<int64_t>{2, 5, 6, 3}));
  EXPECT_EQ(single.token_type_ids, (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_EQ(single.attention_mask, (std::vector<int64_t>{1, 1, 1, 1}));
  auto pair = tokenizer.encode("the film", std::string("was bad"));
  EXPECT_EQ(pair.input_ids, (std::vector<int64_t>{2, 5, 6, 3, 7, 9, 3}));
  EXPECT_EQ(pair.token_type_ids, (std::vector<int64_t>{0, 0, 0, 0, 1, 1, 1}));
  // longest_first: trim the longer side one token at a time, the second on ties.
  EXPECT_EQ(tokenizer.encode("the film was bad", std::string("not bad"), 7).input_ids,
            (std::vector<int64_t>{2, 5, 6, 3, 8, 9, 3}));
  EXPECT_EQ(tokenizer.encode("the film", std::string("not bad"), 6).input_ids,
            (std::vector<int64_t>{2, 5, 6, 3, 8, 3}));
  EXPECT_EQ(tokenizer.encode("the film was bad", std::nullopt, 4).input_ids, (std::vector<int64_t>{2, 5, 6, 3}));
  EXPECT_EQ(tokenizer.encode("the film was bad", std::nullopt, 0).input_ids.size(), 6u);
  LORA_EXPECT_THROWS_WITH(tokenizer.encode("a", std::string("b"), 2), "max_length 2 leaves no room for the 3 special tokens");
}

TEST(WordPieceTest, NothingIsTruncatedUnlessAsked) {
  // transformers' tokenizer(text) does not truncate by default; neither do encode and encode_batch.
  const auto tokenizer = uncased();
  std::string text;
  for (int i = 0; i < 600; ++i) text += i ? " film" : "film";
  EXPECT_EQ(tokenizer.encode(text).input_ids.size(), 602u);
  EXPECT_EQ(tokenizer.encode_batch({text, "bad"}).input_ids.size(1), 602);
  EXPECT_EQ(tokenizer.encode(text, std::nullopt, 512).input_ids.size(), 512u);
  LORA_EXPECT_THROWS_WITH(tokenizer.encode_batch({"bad"}, 0, lora::tokenizers::Padding::kMaxLength),
                          "padding to max_length needs max_length > 0 (got 0)");
}

TEST(WordPieceTest, PadsBatchesDynamicallyOrToAFixedLength) {
  const auto tokenizer = uncased();
  const auto batch = tokenizer.encode_batch({"the film was bad", "bad"});
  EXPECT_EQ(batch.input_ids.sizes(), (std::vector<int64_t>{2, 6}));
  EXPECT_TRUE(torch::equal(batch.input_ids, torch::tensor({{2, 5, 6, 7, 9, 3}, {2, 9, 3, 0, 0, 0}})));
  EXPECT_TRUE(torch::equal(batch.attention_mask, torch::tensor({{1, 1, 1, 1, 1, 1}, {1, 1, 1, 0, 0, 0}})));
  EXPECT_EQ(batch.token_type_ids.sum().item<int64_t>(), 0);
  const auto fixed = tokenizer.encode_batch({"bad"}, 8, lora::tokenizers::Padding::kMaxLength);
  EXPECT_EQ(fixed.input_ids.sizes(), (std::vector<int64_t>{1, 8}));
  LORA_EXPECT_THROWS_WITH(tokenizer.pad({}), "cannot pad an empty batch");
}

TEST(WordPieceTest, DecodesIdsBackToText) {
  const auto tokenizer = uncased();
  const auto ids = tokenizer.encode("The film was unbelievably bad, not good!").input_ids;
  EXPECT_EQ(tokenizer.decode(ids), "the film was unbelievably bad, not good!");
  EXPECT_EQ(tokenizer.decode(ids, /*skip_special_tokens=*/false), "[CLS] the film was unbelievably bad, not good! [SEP]");
  LORA_EXPECT_THROWS_WITH(tokenizer.decode({99}), "id 99 is outside the vocabulary (size 35)");
}

TEST(WordPieceTest, VocabularyErrors) {
  const auto dir = fs::temp_directory_path() / ("lora-vocab-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  LORA_EXPECT_THROWS_WITH(WordPieceTokenizer::from_file((dir / "missing.txt").string()), "cannot open vocabulary");
  std::ofstream(dir / "empty.txt");
  LORA_EXPECT_THROWS_WITH(WordPieceTokenizer::from_file((dir / "empty.txt").string()), "is empty");
  std::ofstream(dir / "twice.txt") << "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nfilm\nthe\n";
  LORA_EXPECT_THROWS_WITH(WordPieceTokenizer::from_file((dir / "twice.txt").string()),
                          "token 'the' appears twice in ");
  LORA_EXPECT_THROWS_WITH(WordPieceTokenizer::from_file((dir / "twice.txt").string()), "(lines 6 and 8)");
  std::ofstream(dir / "nospecial.txt") << "[PAD]\n[UNK]\nthe\r\n";
  LORA_EXPECT_THROWS_WITH(WordPieceTokenizer::from_file((dir / "nospecial.txt").string()),
                          "lacks the special token(s) [CLS] [SEP] [MASK]");
  fs::remove_all(dir);
}

TEST(WordPieceTest, MatchesBertTokenizerOnGoldenText) {
  const char* shared = std::getenv("LORA_SHARED_DIR");
  if (shared == nullptr) GTEST_SKIP() << "LORA_SHARED_DIR is not set: skipping the BertTokenizer parity test";
  const auto root = fs::path(shared);
  const auto tokenizer = WordPieceTokenizer::from_file((root / "data" / "vocab" / "bert-base-uncased.txt").string());
  for (const auto* name : {"sst2_dev_uncased.json", "tricky_uncased.json"}) {
    std::ifstream in(root / "golden" / "tokenize" / name);
    const auto golden = nlohmann::json::parse(in);
    size_t mismatches = 0;
    for (const auto& item : golden["items"]) {
      const auto text = item["text"].get<std::string>();
      const auto expected = item["input_ids"].get<std::vector<int64_t>>();
      const auto ids = tokenizer.encode(text, std::nullopt, 0).input_ids;
      if (ids != expected && ++mismatches <= 5) {
        ADD_FAILURE() << name << ": '" << text << "'\n  ours:  " << ::testing::PrintToString(tokenizer.tokenize_strings(text))
                      << "\n  BERT:  " << ::testing::PrintToString(item["tokens"].get<std::vector<std::string>>());
      }
    }
    EXPECT_EQ(mismatches, 0u) << name << ": " << golden["items"].size() << " lines";
    std::cout << "[golden] " << name << ": " << golden["items"].size() - mismatches << " of " << golden["items"].size()
              << " lines match BertTokenizer id for id\n";
  }
}
