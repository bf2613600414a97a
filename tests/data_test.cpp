#include <filesystem>
#include <fstream>
#include <set>

#include <lora/data/batcher.hpp>
#include <lora/data/tsv.hpp>
#include <lora/tokenizers/wordpiece.hpp>

#include "test_helpers.hpp"

namespace fs = std::filesystem;
using lora::data::Layout;
using lora::data::OnError;

namespace {

class DataTest : public lora::testing::TempDirTest {
 protected:
  std::string write(const std::string& name, const std::string& text) const {
    const auto file = path(name);
    std::ofstream(file, std::ios::binary) << text;
    return file;
  }
};

lora::tokenizers::WordPieceTokenizer tokenizer() {
  std::vector<std::string> vocab = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very"};
  return lora::tokenizers::WordPieceTokenizer(vocab);
}

}  // namespace

TEST_F(DataTest, ReadsGlueSst2Rows) {
  const auto file = write("train.tsv", "sentence\tlabel\nhide new secretions \t0\na good film \t1\r\n\n");
  const auto result = lora::data::read_tsv(file, Layout::kGlue);
  ASSERT_EQ(result.examples.size(), 2u);
  EXPECT_EQ(result.examples[0].text, "hide new secretions");
  EXPECT_EQ(result.examples[0].label, 0);
  EXPECT_EQ(result.examples[1].text, "a good film");
  EXPECT_EQ(result.examples[1].label, 1);
  const auto test = lora::data::read_tsv(write("test.tsv", "index\tsentence\n0\tuneasy mishmash .\n"), Layout::kGlue);
  ASSERT_EQ(test.examples.size(), 1u);
  EXPECT_EQ(test.examples[0].text, "uneasy mishmash .");
  EXPECT_EQ(test.examples[0].label, -1);
}

TEST_F(DataTest, ReadsPlainLayouts) {
  const auto a = lora::data::read_tsv(write("lt.tsv", "1\tgreat\n0\tawful \n"), Layout::kLabelText);
  EXPECT_EQ(a.examples[1].text, "awful");
  EXPECT_EQ(a.examples[1].label, 0);
  // UCI files hold a NEL (U+0085) inside a sentence: lines split on \n only.
  const auto b = lora::data::read_tsv(write("tl.tsv", "so \xc2\x85 good\t1\nmeh\t0\n"), Layout::kTextLabel);
  ASSERT_EQ(b.examples.size(), 2u);
  EXPECT_EQ(b.examples[0].text, "so \xc2\x85 good");
  const auto three = lora::data::read_tsv(write("three.tsv", "2\tneutral\n"), Layout::kLabelText, 3);
  EXPECT_EQ(three.examples[0].label, 2);
}

TEST_F(DataTest, MalformedRowsFailWithFileAndLineOrAreSkipped) {
  const auto file = write("bad.tsv", "sentence\tlabel\nfine\t1\nno tab here\nx\t1\textra\nword\tpositive\nhigh\t7\nok\t0\n");
  LORA_EXPECT_THROWS_WITH(lora::data::read_tsv(file, Layout::kGlue), file + ":3: expected one tab, found none");
  const auto skipped = lora::data::read_tsv(file, Layout::kGlue, 2, OnError::kSkip);
  ASSERT_EQ(skipped.examples.size(), 2u);
  EXPECT_EQ(skipped.skipped,
            (std::vector<std::string>{file + ":3: expected one tab, found none", file + ":4: expected one tab, found more",
                                      file + ":5: label 'positive' is not an integer",
                                      file + ":6: label 7 is outside [0, 2)"}));
  LORA_EXPECT_THROWS_WITH(lora::data::read_tsv(write("h.tsv", "text\tlabel\n"), Layout::kGlue),
                          ":1: expected the GLUE header 'sentence<TAB>label' or 'index<TAB>sentence' (got 'text\tlabel')");
  LORA_EXPECT_THROWS_WITH(lora::data::read_tsv((dir_ / "none.tsv").string(), Layout::kGlue), "cannot open '");
}

TEST_F(DataTest, EvaluationBatchesKeepTheExampleOrder) {
  std::vector<lora::data::Example> examples;
  for (int i = 0; i < 10; ++i) examples.push_back({i % 2 ? "good film" : "very very bad film", i % 2});
  lora::data::BatcherOptions options;
  options.batch_size = 4;
  lora::data::Batcher batcher(examples, tokenizer(), options);
  const auto batches = batcher.epoch();
  ASSERT_EQ(batches.size(), 3u);
  EXPECT_EQ(batches[0].indices, (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_EQ(batches[2].indices, (std::vector<int64_t>{8, 9}));
  EXPECT_TRUE(torch::equal(batches[0].labels, torch::tensor({0, 1, 0, 1})));
  EXPECT_TRUE(torch::equal(batches[0].inputs.input_ids[1], torch::tensor({2, 5, 7, 3, 0, 0})));
  EXPECT_EQ(batcher.num_batches(), 3u);
}

TEST_F(DataTest, TrainingBatchesAreShuffledBySeedAndBucketedByLength) {
  std::vector<lora::data::Example> examples;
  for (int i = 0; i < 400; ++i) {
    std::string text = "good";
    for (int k = 0; k < i % 37; ++k) text += " film";
    examples.push_back({text, i % 2});
  }
  lora::data::BatcherOptions options;
  options.batch_size = 8;
  options.shuffle = true;
  options.seed = 3;
  options.bucket_batches = 10;
  lora::data::Batcher a(examples, tokenizer(), options), b(examples, tokenizer(), options);
  const auto first = a.epoch(0), again = b.epoch(0), second = a.epoch(1);
  std::vector<int64_t> order_first, order_again, order_second;
  for (const auto& batch : first) order_first.insert(order_first.end(), batch.indices.begin(), batch.indices.end());
  for (const auto& batch : again) order_again.insert(order_again.end(), batch.indices.begin(), batch.indices.end());
  for (const auto& batch : second) order_second.insert(order_second.end(), batch.indices.begin(), batch.indices.end());
  EXPECT_EQ(order_first, order_again);
  EXPECT_NE(order_first, order_second);
  EXPECT_EQ(std::set<int64_t>(order_first.begin(), order_first.end()).size(), 400u);
  for (const auto& batch : first) {
    for (size_t r = 0; r < batch.indices.size(); ++r) {
      EXPECT_EQ(batch.labels[r].item<int64_t>(), batch.indices[r] % 2);
    }
  }
  options.bucket = false;
  lora::data::Batcher plain(examples, tokenizer(), options);
  const double bucketed = a.padding_ratio(0), unbucketed = plain.padding_ratio(0);
  EXPECT_LT(bucketed, 0.25 * unbucketed) << "bucketed " << bucketed << ", plain " << unbucketed;
  // Padded to max_length: every batch 40 wide (the longest row has 1 + 36 + 2 = 39 tokens), the
  // same rows in the same order as dynamic padding, and more padding than either.
  options.padding = lora::tokenizers::Padding::kMaxLength;
  options.max_length = 40;
  lora::data::Batcher fixed(examples, tokenizer(), options);
  const auto fixed_batches = fixed.epoch(0), plain_batches = plain.epoch(0);
  ASSERT_EQ(fixed_batches.size(), plain_batches.size());
  for (size_t i = 0; i < fixed_batches.size(); ++i) {
    EXPECT_EQ(fixed_batches[i].inputs.input_ids.size(1), 40);
    EXPECT_EQ(fixed_batches[i].indices, plain_batches[i].indices);
    const auto width = plain_batches[i].inputs.input_ids.size(1);
    EXPECT_TRUE(torch::equal(fixed_batches[i].inputs.input_ids.narrow(1, 0, width), plain_batches[i].inputs.input_ids));
  }
  EXPECT_GT(fixed.padding_ratio(0), unbucketed);
  options.batch_size = 0;
  LORA_EXPECT_THROWS_WITH(lora::data::Batcher(examples, tokenizer(), options), "batch_size must be > 0 (got 0)");
}
