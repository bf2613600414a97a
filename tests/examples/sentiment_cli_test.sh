#!/usr/bin/env bash
# End-to-end checks of lora-sentiment: the demo backbone (cached), train on a small TSV,
# the files it writes, predict's output format, eval, and argument errors.
#   sentiment_cli_test.sh BINARY WORKDIR
set -euo pipefail
bin=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }

# A backbone from the demo's cache (pretrained once, briefly).
"$bin" --cache "$work/cache" --pretrain-steps 200 --epochs 1 > "$work/demo.txt"
backbone=$(ls -d "$work"/cache/sentiment-demo-v4-seed0)
[ -f "$backbone/model.safetensors" ] || fail "the demo did not cache its backbone"
grep -q "held-out accuracy" "$work/demo.txt" || fail "the demo printed no accuracies"
# A second run reuses the cache.
"$bin" --cache "$work/cache" --pretrain-steps 200 --epochs 1 | grep -q "(cached)" || fail "the cache was not reused"

# Small GLUE-layout files.
{ echo -e "sentence\tlabel"
  for i in $(seq 1 40); do echo -e "the film was good \t1"; echo -e "the plot was not good \t0"; done; } > "$work/train.tsv"
{ echo -e "sentence\tlabel"; echo -e "the story was good \t1"; echo -e "the acting was not good \t0"; } > "$work/dev.tsv"

"$bin" train --model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --out "$work/run" --threads 2 \
  --steps 20 --eval-every 10 --batch-size 8 --lr 1e-3 --merge > "$work/train.txt" 2>&1 || { cat "$work/train.txt"; fail "train failed"; }
for f in adapter/adapter_config.json adapter/adapter_model.safetensors metrics.jsonl learning_curve.svg merged/model.safetensors merged/config.json merged/vocab.txt; do
  [ -f "$work/run/$f" ] || fail "train did not write $f"
done
[ "$(wc -l < "$work/run/metrics.jsonl")" -eq 2 ] || fail "metrics.jsonl should have 2 rows (steps 10 and 20)"
grep -q '"dev_accuracy"' "$work/run/metrics.jsonl" || fail "metrics.jsonl lacks dev_accuracy"
grep -q '<polyline' "$work/run/learning_curve.svg" || fail "the chart has no curve"
grep -q '"peft_type": "LORA"' "$work/run/adapter/adapter_config.json" || fail "adapter_config.json is not PEFT's"
grep -Eq '^batching buckets: [0-9.]+ padding tokens per 100 real ones' "$work/train.txt" || fail "no padding share printed"
grep -Eq '^[0-9]+ real tokens/s \([0-9]+ with padding\)' "$work/train.txt" || fail "no token rate printed"

# predict: label TAB probability TAB sentence, from arguments and from stdin; adapter and merged agree.
out=$("$bin" predict --model "$backbone" --adapter "$work/run/adapter" "the film was good" "the plot was not good")
[ "$(echo "$out" | wc -l)" -eq 2 ] || fail "predict printed $(echo "$out" | wc -l) lines for 2 sentences"
echo "$out" | grep -Eq $'^(positive|negative)\t[01]\\.[0-9]{4}\tthe film was good$' || fail "bad predict line: $out"
merged=$(echo -e "the film was good\nthe plot was not good" | "$bin" predict --model "$work/run/merged")
[ "$(echo "$merged" | cut -f1)" = "$(echo "$out" | cut -f1)" ] || fail "merged and adapter predictions differ"

# serve, JSON lines: an adapter by name, the base model, per-request errors, unloading.
base_out=$("$bin" predict --model "$backbone" "the film was good")
served=$(printf '%s\n' '{"id": 1, "text": "the film was good", "adapter": "mine"}' '{"id": 2, "text": "the film was good"}' \
  '{"id": 3, "text": "x", "adapter": "nobody"}' 'not json' '{"action": "unload", "name": "mine"}' \
  '{"id": 6, "text": "the film was good", "adapter": "mine"}' \
  | "$bin" serve --model "$backbone" --adapter "mine=$work/run/adapter" 2> "$work/serve.txt") \
  || { cat "$work/serve.txt"; fail "serve failed"; }
SERVED="$served" PREDICTED="$(echo "$out" | head -1)" BASE="$base_out" python3 - <<'PY' || fail "serve answers: $served"
import json, os
lines = [json.loads(line) for line in os.environ["SERVED"].splitlines()]
assert len(lines) == 6, lines
label, probability, _ = os.environ["PREDICTED"].split("\t")
assert lines[0]["id"] == 1 and lines[0]["adapter"] == "mine" and lines[0]["label"] == label, lines[0]
assert f'{max(lines[0]["probabilities"]):.4f}' == probability, (lines[0], probability)
base_label, base_probability, _ = os.environ["BASE"].split("\t")
assert lines[1]["adapter"] == "" and lines[1]["label"] == base_label, lines[1]
assert f'{max(lines[1]["probabilities"]):.4f}' == base_probability, (lines[1], base_probability)
assert lines[2]["status"] == 404 and "unknown adapter 'nobody'" in lines[2]["error"] and lines[2]["id"] == 3, lines[2]
assert lines[3]["status"] == 400 and "not valid JSON" in lines[3]["error"], lines[3]
assert lines[4]["adapters"] == [], lines[4]
assert lines[5]["status"] == 404 and lines[5]["id"] == 6, lines[5]
PY

# eval
"$bin" eval --model "$backbone" --adapter "$work/run/adapter" --data "$work/dev.tsv" | grep -Eq '^accuracy [01]\.[0-9]{4}$' \
  || fail "eval printed no accuracy"

# Interrupted and resumed: the same metrics (train and dev losses after the resume point
# included) and the same adapter bytes as an uninterrupted run.
common=(--model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 30 --eval-every 10 --batch-size 8 --lr 1e-3)
"$bin" train "${common[@]}" --out "$work/whole" > /dev/null 2>&1 || fail "uninterrupted run failed"
set +e
"$bin" train "${common[@]}" --out "$work/split" --stop-after 15 > "$work/split.txt" 2>&1
status=$?
set -e
[ "$status" -eq 130 ] || fail "an interrupted run should exit with 130 (got $status)"
grep -q "interrupted at step 15" "$work/split.txt" || fail "no interruption message"
[ -f "$work/split/checkpoint/state.json" ] || fail "no checkpoint written"
"$bin" train "${common[@]}" --out "$work/split" --resume > /dev/null 2>&1 || fail "resume failed"
cmp -s "$work/whole/metrics.jsonl" "$work/split/metrics.jsonl" || fail "resumed metrics differ from the uninterrupted run"
cmp -s "$work/whole/adapter/adapter_model.safetensors" "$work/split/adapter/adapter_model.safetensors" \
  || fail "resumed adapter differs from the uninterrupted run"
[ ! -d "$work/split/checkpoint" ] || fail "a finished run should remove its checkpoint"

# SIGKILL at a random step: with --checkpoint-every the run resumes from its last complete
# checkpoint and ends with the metrics and adapter bytes of an uninterrupted run.
kill_common=(--model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 400 --eval-every 50
             --batch-size 8 --lr 1e-3 --checkpoint-every 7 --threads 2)
"$bin" train "${kill_common[@]}" --out "$work/unkilled" > /dev/null 2>&1 || fail "uninterrupted run (for the kill test) failed"
target=$(( RANDOM % 300 + 7 ))
"$bin" train "${kill_common[@]}" --out "$work/killed" > "$work/killed.txt" 2>&1 &
pid=$!
reached() { [ -f "$work/killed/checkpoint/state.json" ] && \
  [ "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$work/killed/checkpoint/state.json" 2>/dev/null || echo 0)" -ge "$target" ]; }
for _ in $(seq 1 3000); do reached && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.01; done
kill -0 "$pid" 2>/dev/null || fail "the run ended before it could be killed (target step $target)"
kill -KILL "$pid"
set +e
wait "$pid"
status=$?
set -e
[ "$status" -eq 137 ] || fail "SIGKILL should end the run with 137 (got $status)"
killed_at=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$work/killed/checkpoint/state.json")
"$bin" train "${kill_common[@]}" --out "$work/killed" --resume > "$work/resumed.txt" 2>&1 \
  || { cat "$work/resumed.txt"; fail "resume after SIGKILL (checkpoint of step $killed_at) failed"; }
grep -q "resuming at step $killed_at of 400" "$work/resumed.txt" || fail "resume did not start at step $killed_at"
cmp -s "$work/unkilled/adapter/adapter_model.safetensors" "$work/killed/adapter/adapter_model.safetensors" \
  || fail "the adapter after SIGKILL at step >= $target and resume differs from the uninterrupted run's"
cmp -s "$work/unkilled/metrics.jsonl" "$work/killed/metrics.jsonl" || fail "metrics after SIGKILL and resume differ"
echo "killed after the checkpoint of step $killed_at (target $target), resumed: adapter identical"

# Non-finite losses: the run stops naming the step, or skips such steps when asked.
if "$bin" train --model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 6 --batch-size 8 \
    --lr 1e30 --out "$work/nan" > "$work/nan.txt" 2>&1; then
  fail "a run with a non-finite loss should fail"
fi
grep -Eq "train: step [0-9]+ has a non-finite (loss|gradient)" "$work/nan.txt" || fail "non-finite: $(cat "$work/nan.txt")"
"$bin" train --model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 6 --batch-size 8 \
  --lr 1e30 --out "$work/nan-skip" --skip-nonfinite > "$work/nan-skip.txt" 2>&1 || fail "--skip-nonfinite run failed"
grep -Eq "^[1-5] step\(s\) skipped for a non-finite loss or gradient" "$work/nan-skip.txt" \
  || fail "--skip-nonfinite: $(cat "$work/nan-skip.txt")"
grep -q '"step": 6' "$work/nan-skip/metrics.jsonl" || fail "--skip-nonfinite: the last (skipped) step was not evaluated"

# Ctrl-C: a real SIGINT stops after the current step with a checkpoint.
"$bin" train --model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 100000 --batch-size 8 \
  --out "$work/ctrlc" > "$work/ctrlc.txt" 2>&1 &
pid=$!
for _ in $(seq 1 100); do grep -q "mode lora" "$work/ctrlc.txt" 2>/dev/null && break; sleep 0.1; done
sleep 1
kill -INT "$pid"
set +e
wait "$pid"
status=$?
set -e
[ "$status" -eq 130 ] || fail "Ctrl-C should end the run with 130 (got $status)"
[ -f "$work/ctrlc/checkpoint/state.json" ] || fail "Ctrl-C left no checkpoint"

# Errors name the problem.
expect_error() {
  local pattern=$1; shift
  local output
  if output=$("$bin" "$@" 2>&1); then fail "expected failure for: $*"; fi
  echo "$output" | grep -q -- "$pattern" || fail "for '$*' expected '$pattern', got: $output"
}
expect_error "model folder '$work/missing' does not exist" eval --model "$work/missing" --data "$work/dev.tsv"
expect_error "give --model DIR or --hf-model NAME" train --out "$work/x"
expect_error "give --data DIR, or both --train FILE and --dev FILE" train --model "$backbone" --out "$work/x"
expect_error "--lr" train --model "$backbone" --data "$work" --out "$work/x" --lr -1
expect_error "--mode" train --model "$backbone" --data "$work" --out "$work/x" --mode half
expect_error "was trained on base model" predict --model "$work/run/merged" --adapter "$work/run/adapter" "x"
expect_error "read_tsv: cannot open" eval --model "$backbone" --data "$work/none.tsv"
expect_error "--resume: no checkpoint in" train "${common[@]}" --out "$work/nothing" --resume
printf '[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n' > "$work/small-vocab.txt"
mkdir -p "$work/mismatch" && cp "$backbone"/config.json "$backbone"/model.safetensors "$work/mismatch/" \
  && cp "$work/small-vocab.txt" "$work/mismatch/vocab.txt"
expect_error "the WordPiece tokenizer of '$work/mismatch' has 5 tokens but the model's vocab_size is" predict --model "$work/mismatch" "x"
# --hf-model: download from a local stand-in hub (HF_ENDPOINT), resuming a partial file.
hub="$work/hub/test-org/tiny-bert/resolve/main"
mkdir -p "$hub"
cp "$backbone"/config.json "$backbone"/vocab.txt "$backbone"/model.safetensors "$hub/"
python3 "$(dirname "$0")/hub_server.py" "$work/hub" "$work/port" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do [ -s "$work/port" ] && break; sleep 0.1; done
[ -s "$work/port" ] || fail "the stand-in hub did not start"
cached="$work/hf/lora/models--test-org--tiny-bert/main"
mkdir -p "$cached"
size=$(stat -c %s "$hub/model.safetensors")
head -c $((size / 2)) "$hub/model.safetensors" > "$cached/model.safetensors.incomplete"  # an interrupted download
out=$(HF_ENDPOINT="http://127.0.0.1:$(cat "$work/port")" HF_HOME="$work/hf" \
  "$bin" predict --hf-model test-org/tiny-bert "the film was good")
echo "$out" | grep -Eq $'^(positive|negative)\t[01]\\.[0-9]{4}\tthe film was good$' || fail "predict via --hf-model: $out"
for f in config.json vocab.txt model.safetensors; do
  cmp -s "$hub/$f" "$cached/$f" || fail "downloaded $f differs from the served one"
done
[ ! -e "$cached/model.safetensors.incomplete" ] || fail "the partial file was left behind"
export HF_ENDPOINT="http://127.0.0.1:$(cat "$work/port")" HF_HOME="$work/hf"
expect_error "HTTP 404" predict --hf-model test-org/missing "x"
expect_error "give --model DIR or --hf-model NAME (one of them)" predict --model "$backbone" --hf-model test-org/tiny-bert "x"
kill $server
echo "sentiment CLI: all checks passed"
