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
