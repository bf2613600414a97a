#pragma once

// The built-in task: generated movie-review sentences whose sentiment needs more than keywords
// (negation: "not bad" is positive; contrast: "good but boring" is negative), and the same
// generator's unlabelled text as a pretraining corpus.

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <lora/data/tsv.hpp>

namespace sentiment {

struct Lexicon {
  std::vector<std::string> positive = {"good",    "great",  "excellent", "wonderful", "brilliant", "delightful",
                                       "charming", "moving", "clever",    "enjoyable", "superb",    "gripping"};
  std::vector<std::string> negative = {"bad",    "awful", "terrible", "boring",  "dull",  "weak",
                                       "tedious", "clumsy", "bland",   "painful", "messy", "lifeless"};
  std::vector<std::string> nouns = {"film",   "movie", "plot",  "story",    "acting", "script",
                                    "ending", "cast",  "music", "dialogue", "pacing", "direction"};
  std::vector<std::string> determiners = {"the", "this", "its"};
  std::vector<std::string> verbs = {"was", "is", "feels", "seemed"};
  std::vector<std::string> intensifiers = {"very", "really", "quite", "truly"};
  std::vector<std::string> negators = {"not", "never", "hardly"};
  std::vector<std::string> openers = {"honestly", "overall", "frankly", "sadly", "luckily"};
  /// What reviewers add after the verdict; pretraining text pairs each review with one of the
  /// matching kind, so that word meaning (and what negation does to it) shows in the context.
  std::vector<std::string> praise = {"i loved it", "highly recommended", "a must see", "worth every minute"};
  std::vector<std::string> scorn = {"i hated it", "a waste of time", "avoid it", "never again"};

  /// Every word the generator can write, for the vocabulary.
  std::vector<std::string> words() const {
    std::vector<std::string> all;
    for (const auto* list : {&positive, &negative, &nouns, &determiners, &verbs, &intensifiers, &negators, &openers}) {
      all.insert(all.end(), list->begin(), list->end());
    }
    for (const auto* extra : {"but", "and", "yet", ",", ".", "i", "loved", "hated", "it", "highly", "recommended",
                              "a", "must", "see", "worth", "every", "minute", "waste", "of", "time", "avoid",
                              "again"}) {
      if (std::find(all.begin(), all.end(), extra) == all.end()) all.push_back(extra);
    }
    return all;
  }
};

/// Generates labelled sentences; the seed fixes them.
class Generator {
 public:
  explicit Generator(uint64_t seed) : rng_(seed) {}

  /// One sentence and its label (1 positive, 0 negative).
  lora::data::Example example() {
    const int kind = static_cast<int>(pick(8));  // half plain, a quarter negated, a quarter contrast
    int polarity = 0;
    std::string text;
    if (kind < 4) {  // plain clause
      text = clause(polarity);
    } else if (kind < 6) {  // negated clause
      text = clause(polarity, /*negate=*/true);
    } else {  // contrast: the clause after "but" / "yet" decides
      int first = 0;
      const auto a = clause(first);
      int second = 0;
      std::string b;
      do {
        b = clause(second);
      } while (second == first);  // a real contrast
      text = a + (pick(2) ? " , but " : " , yet ") + b;
      polarity = second;
    }
    if (pick(4) == 0) text = one(lexicon_.openers) + " , " + text;
    return {text + " .", polarity > 0 ? 1 : 0};
  }

  /// Pretraining text: a review followed by a remark that agrees with its sentiment.
  std::string document() {
    const auto review = example();
    return review.text + " " + one(review.label ? lexicon_.praise : lexicon_.scorn) + " .";
  }

  std::vector<lora::data::Example> examples(size_t count) {
    std::vector<lora::data::Example> out;
    out.reserve(count);
    for (size_t i = 0; i < count; ++i) out.push_back(example());
    return out;
  }

  const Lexicon& lexicon() const { return lexicon_; }

 private:
  uint64_t pick(uint64_t n) { return rng_() % n; }
  const std::string& one(const std::vector<std::string>& list) { return list[pick(list.size())]; }

  /// "the plot was (not) (very) dull"; `polarity` receives +1 / -1 after negation.
  std::string clause(int& polarity, bool negate = false) {
    const bool positive = pick(2) == 0;
    std::string text = one(lexicon_.determiners) + " " + one(lexicon_.nouns) + " " + one(lexicon_.verbs);
    if (negate) text += " " + one(lexicon_.negators);
    if (pick(3) == 0) text += " " + one(lexicon_.intensifiers);
    text += " " + one(positive ? lexicon_.positive : lexicon_.negative);
    polarity = (positive ? 1 : -1) * (negate ? -1 : 1);
    return text;
  }

  std::mt19937_64 rng_;
  Lexicon lexicon_;
};

/// [PAD] [UNK] [CLS] [SEP] [MASK], then the lexicon's words.
inline std::vector<std::string> demo_vocabulary() {
  std::vector<std::string> vocab = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  const auto words = Lexicon().words();
  vocab.insert(vocab.end(), words.begin(), words.end());
  return vocab;
}

}  // namespace sentiment
