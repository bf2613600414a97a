#!/usr/bin/env bash
# lora-sentiment on DistilBERT and RoBERTa folders (the golden tiny models of
# $LORA_SHARED_DIR/golden/families) end to end: train a LoRA adapter on SST-2 sentences, the
# adapter's PEFT keys, eval, predict, --merge (merged folder predicts as the adapter does), and
# --hf-model for a folder that ships vocab.json + merges.txt. Exits 77 (skipped) without the data.
#   sentiment_families_test.sh BINARY WORKDIR
set -euo pipefail
bin=$1
work=$2
if [ -z "${LORA_SHARED_DIR:-}" ]; then
  echo "LORA_SHARED_DIR is not set: skipping the DistilBERT/RoBERTa runs"
  exit 77
fi
families="$LORA_SHARED_DIR/golden/families"
rm -rf "$work"
mkdir -p "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }

head -n 201 "$LORA_SHARED_DIR/data/sst2/train.tsv" > "$work/train.tsv"  # header + 200 sentences
head -n 61 "$LORA_SHARED_DIR/data/sst2/dev.tsv" > "$work/dev.tsv"

# Two sentences, repeated: a random tiny model with LoRA + head must learn them (the gradients
# reach the adapters and the head through each family's forward).
{ echo -e "sentence\tlabel"
  for i in $(seq 1 40); do echo -e "the film was good \t1"; echo -e "the plot was not good \t0"; done; } > "$work/easy.tsv"
{ echo -e "sentence\tlabel"; echo -e "the film was good \t1"; echo -e "the plot was not good \t0"; } > "$work/easy-dev.tsv"

for family in distilbert roberta; do
  model="$families/$family-tiny/model"
  "$bin" train --model "$model" --train "$work/easy.tsv" --dev "$work/easy-dev.tsv" --out "$work/$family-easy" --threads 2 \
    --steps 80 --eval-every 80 --batch-size 8 --lr 1e-2 --dropout 0 > "$work/$family-easy.txt" 2>&1 \
    || { cat "$work/$family-easy.txt"; fail "$family: train on the easy task failed"; }
  grep -q "best dev accuracy 1.0000" "$work/$family-easy.txt" || fail "$family did not learn two sentences: $(cat "$work/$family-easy.txt")"

  run="$work/$family"
  "$bin" train --model "$model" --train "$work/train.tsv" --dev "$work/dev.tsv" --out "$run" --threads 2 \
    --steps 12 --eval-every 6 --batch-size 16 --lr 2e-3 --merge > "$run.txt" 2>&1 || { cat "$run.txt"; fail "$family: train failed"; }
  grep -q "($family, " "$run.txt" || fail "$family: train did not report the model type: $(head -3 "$run.txt")"
  for f in adapter/adapter_config.json adapter/adapter_model.safetensors metrics.jsonl merged/model.safetensors merged/config.json; do
    [ -f "$run/$f" ] || fail "$family: train did not write $f"
  done
  [ "$(wc -l < "$run/metrics.jsonl")" -eq 2 ] || fail "$family: metrics.jsonl should have 2 rows"
  grep -q "\"model_type\": \"$family\"" "$run/merged/config.json" || fail "$family: merged config.json is not a $family config"
  # The adapter targets the family's query/value and saves its head, under PEFT's names.
  header=$(python3 -c "import json,struct,sys; f=open(sys.argv[1],'rb'); n=struct.unpack('<Q',f.read(8))[0]; print(' '.join(sorted(k for k in json.loads(f.read(n)) if k!='__metadata__')))" "$run/adapter/adapter_model.safetensors")
  if [ "$family" = distilbert ]; then
    for key in distilbert.transformer.layer.1.attention.q_lin.lora_A.weight distilbert.transformer.layer.0.attention.v_lin.lora_B.weight pre_classifier.weight classifier.bias; do
      echo "$header" | grep -qw "base_model.model.$key" || fail "$family adapter lacks $key: $header"
    done
    [ -f "$run/merged/vocab.txt" ] || fail "$family: merged folder has no vocab.txt"
  else
    for key in roberta.encoder.layer.1.attention.self.query.lora_A.weight roberta.encoder.layer.0.attention.self.value.lora_B.weight classifier.dense.weight classifier.out_proj.bias; do
      echo "$header" | grep -qw "base_model.model.$key" || fail "$family adapter lacks $key: $header"
    done
    [ -f "$run/merged/vocab.json" ] && [ -f "$run/merged/merges.txt" ] || fail "$family: merged folder has no vocab.json + merges.txt"
  fi
  [ "$(echo "$header" | wc -w)" -eq 12 ] || fail "$family adapter should hold 12 tensors: $header"
  "$bin" eval --model "$model" --adapter "$run/adapter" --data "$work/dev.tsv" | grep -q "^examples 60$" || fail "$family: eval"
  sentences=("a charming and often affecting journey ." "unflinchingly bleak and desperate")
  with_adapter=$("$bin" predict --model "$model" --adapter "$run/adapter" "${sentences[@]}")
  merged=$("$bin" predict --model "$run/merged" "${sentences[@]}")
  [ "$(echo "$with_adapter" | wc -l)" -eq 2 ] || fail "$family: predict printed $with_adapter"
  [ "$(echo "$with_adapter" | cut -f1,3)" = "$(echo "$merged" | cut -f1,3)" ] || fail "$family: merged and adapter labels differ: $with_adapter vs $merged"
  paste <(echo "$with_adapter" | cut -f2) <(echo "$merged" | cut -f2) | awk '{ d = $1 - $2; if (d < -0.0002 || d > 0.0002) exit 1 }' \
    || fail "$family: merged and adapter probabilities differ: $with_adapter vs $merged"
done

# A three-label model (cardiffnlp's negative/neutral/positive layout): train and eval refuse it,
# predict names its labels. Made from the tiny RoBERTa without its head (initialised on load).
three="$work/three-labels"
mkdir -p "$three" && cp "$families/roberta-tiny/model"/{vocab.json,merges.txt,tokenizer_config.json} "$three/"
python3 - "$families/roberta-tiny/model" "$three" <<'PY'
import json, struct, sys
src, dst = sys.argv[1], sys.argv[2]
config = json.load(open(src + "/config.json"))
config["id2label"] = {"0": "negative", "1": "neutral", "2": "positive"}
config["label2id"] = {"negative": 0, "neutral": 1, "positive": 2}
json.dump(config, open(dst + "/config.json", "w"), indent=2)
data = open(src + "/model.safetensors", "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
body, out, offset = data[8 + n:], {}, 0
chunks = []
for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]):
    if name.startswith("classifier."):
        continue
    begin, end = info["data_offsets"]
    chunks.append(body[begin:end])
    out[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - begin]}
    offset += end - begin
out["__metadata__"] = {"format": "pt"}
text = json.dumps(out).encode()
text += b" " * (-len(text) % 8)
open(dst + "/model.safetensors", "wb").write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
PY
if "$bin" train --model "$three" --train "$work/easy.tsv" --dev "$work/easy-dev.tsv" --out "$work/three-run" > "$work/three.txt" 2>&1; then
  fail "train accepted a three-label model"
fi
grep -q "classifies into 3 labels (0 negative, 1 neutral, 2 positive); train and eval need a binary model" "$work/three.txt" \
  || fail "three labels: $(cat "$work/three.txt")"
"$bin" predict --model "$three" "the film was good" 2>/dev/null | grep -Eq $'^(negative|neutral|positive)\t' || fail "predict on three labels"

# --hf-model for a RoBERTa folder (no vocab.txt on the hub: vocab.json + merges.txt are fetched).
hub="$work/hub/test-org/tiny-roberta/resolve/main"
mkdir -p "$hub"
cp "$families/roberta-tiny/model"/* "$hub/"
python3 "$(dirname "$0")/hub_server.py" "$work/hub" "$work/port" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do [ -s "$work/port" ] && break; sleep 0.1; done
[ -s "$work/port" ] || fail "the stand-in hub did not start"
out=$(HF_ENDPOINT="http://127.0.0.1:$(cat "$work/port")" HF_HOME="$work/hf" \
  "$bin" predict --hf-model test-org/tiny-roberta "the film was good")
echo "$out" | grep -Eq $'^(positive|negative|LABEL_[01])\t[01]\\.[0-9]{4}\tthe film was good$' || fail "predict via --hf-model: $out"
cached="$work/hf/lora/models--test-org--tiny-roberta/main"
for f in config.json vocab.json merges.txt tokenizer_config.json model.safetensors; do
  cmp -s "$hub/$f" "$cached/$f" || fail "downloaded $f differs from the served one"
done
[ ! -e "$cached/vocab.txt" ] || fail "a vocab.txt appeared from nowhere"
kill $server
echo "sentiment families: DistilBERT and RoBERTa trained, evaluated, merged and downloaded"
