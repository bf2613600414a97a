#!/usr/bin/env bash
# lora-sentiment train on 2 processes (Gloo over 127.0.0.1, ports chosen free at run time):
# the adapter equals a single-process run on the combined batches within 1e-5; a SIGKILLed rank
# ends the other with an error within the timeout; an interrupted 2-rank run (dropout on)
# resumes to the bytes of an uninterrupted one.
#   sentiment_distributed_test.sh BINARY WORKDIR BACKBONE
set -euo pipefail
bin=$1
work=$2
backbone=$3
here=$(cd "$(dirname "$0")" && pwd)
launch="$here/../../scripts/launch.sh"
rm -rf "$work"
mkdir -p "$work"
fail() { echo "FAIL: $*" >&2; exit 1; }
[ -f "$backbone/model.safetensors" ] || fail "no backbone at $backbone (ctest runs sentiment_cli first)"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

words=(good great fine bad dull awful warm cold)
{ echo -e "sentence\tlabel"
  for i in $(seq 0 22); do
    w=${words[$((i % 8))]}
    echo -e "the film was ${w} and the plot $( [ $((i % 3)) -eq 0 ] && echo "was long " )\t$(( i % 8 < 4 ? 1 : 0 ))"
  done; } > "$work/train.tsv"
{ echo -e "sentence\tlabel"; echo -e "the story was good\t1"; echo -e "the acting was awful\t0"; echo -e "warm\t1"; } > "$work/dev.tsv"

# Same flags for 1 and 2 processes: 23 rows in batches of 5 (uneven shares: 2 + 3, last batch 3),
# no dropout anywhere (draws would differ), one evaluation at the end so the adapter is the last one.
common=(--model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 6 --eval-every 6 --batch-size 5
        --lr 2e-3 --dropout 0 --model-dropout 0 --threads 1)
"$bin" train "${common[@]}" --out "$work/single" > "$work/single.txt" 2>&1 || { cat "$work/single.txt"; fail "single-process run failed"; }
bash "$launch" 2 "$bin" train "${common[@]}" --out "$work/dual" > "$work/dual.txt" 2>&1 \
  || { cat "$work/dual.txt"; fail "2-process run failed"; }
grep -q "data parallel: 2 processes" "$work/dual.txt" || fail "rank 0 did not report the data-parallel run"
grep -q "gradient all-reduce: [0-9]* bytes per step" "$work/dual.txt" || fail "no all-reduce volume reported"
! grep -q "^\[rank 1\] .*step" "$work/dual.txt" || fail "rank 1 printed progress"
python3 - "$work/single/adapter/adapter_model.safetensors" "$work/dual/adapter/adapter_model.safetensors" \
  "$work/single/metrics.jsonl" "$work/dual/metrics.jsonl" <<'PY' || fail "the 2-process adapter differs from the single-process one"
import json, struct, sys
def read(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        assert entry["dtype"] == "F32", entry
        begin, end = entry["data_offsets"]
        out[name] = struct.unpack("<%df" % ((end - begin) // 4), data[8 + n + begin:8 + n + end])
    return out
one, two = read(sys.argv[1]), read(sys.argv[2])
assert sorted(one) == sorted(two), (sorted(one), sorted(two))
worst = max(abs(a - b) for name in one for a, b in zip(one[name], two[name]))
moved = max(abs(a) for name in one if "lora_B" in name for a in one[name])
print("max |single - dual| over %d tensors: %.3g (largest lora_B entry %.3g)" % (len(one), worst, moved))
assert moved > 0, "lora_B never trained"
assert worst < 1e-5, worst
m1 = [json.loads(line) for line in open(sys.argv[3])]
m2 = [json.loads(line) for line in open(sys.argv[4])]
assert len(m1) == len(m2) == 1, (m1, m2)
for key in ("train_loss", "dev_loss", "dev_accuracy"):
    assert abs(m1[0][key] - m2[0][key]) < 1e-5, (key, m1[0][key], m2[0][key])
PY

# A rank killed with SIGKILL: the other fails within its timeout (10 s), naming the failure.
port=$(free_port)
rank0="" rank1=""
trap 'kill -KILL $rank0 $rank1 2> /dev/null || true' EXIT
long=(--model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 100000 --eval-every 5 --batch-size 5
      --threads 1 --out "$work/killed")
WORLD_SIZE=2 RANK=0 MASTER_PORT=$port LORA_DIST_TIMEOUT_S=10 "$bin" train "${long[@]}" > "$work/rank0.txt" 2>&1 &
rank0=$!
WORLD_SIZE=2 RANK=1 MASTER_PORT=$port LORA_DIST_TIMEOUT_S=10 "$bin" train "${long[@]}" > "$work/rank1.txt" 2>&1 &
rank1=$!
for _ in $(seq 1 600); do [ -s "$work/killed/metrics.jsonl" ] && break; kill -0 "$rank0" 2>/dev/null || break; sleep 0.1; done
[ -s "$work/killed/metrics.jsonl" ] || { cat "$work/rank0.txt" "$work/rank1.txt"; fail "the 2-process run made no progress"; }
kill -KILL "$rank1"
killed_at=$(date +%s.%N)
set +e
wait "$rank1" 2>/dev/null
for _ in $(seq 1 250); do kill -0 "$rank0" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$rank0" 2>/dev/null; then kill -KILL "$rank0"; fail "rank 0 still ran 25 s after rank 1 was killed"; fi
wait "$rank0"
status=$?
set -e
ended=$(python3 -c "import sys; print('%.1f' % ($(date +%s.%N) - $killed_at))")
[ "$status" -ne 0 ] || fail "rank 0 should fail when rank 1 dies (it exited with 0)"
grep -q "distributed: rank 0 of 2: .* failed" "$work/rank0.txt" || { cat "$work/rank0.txt"; fail "rank 0's error does not say what failed"; }
echo "rank 0 ended with status $status ${ended} s after rank 1 was killed: $(grep -o 'distributed: rank 0 of 2: [^(]*' "$work/rank0.txt" | head -1)"

# Interrupted at step 4 and resumed, 2 ranks with dropout on (each rank's generator is saved):
# the same adapter bytes and metrics as an uninterrupted 2-rank run.
resumable=(--model "$backbone" --train "$work/train.tsv" --dev "$work/dev.tsv" --steps 9 --eval-every 3 --batch-size 5
           --lr 2e-3 --threads 1)
bash "$launch" 2 "$bin" train "${resumable[@]}" --out "$work/whole" > "$work/whole.txt" 2>&1 || { cat "$work/whole.txt"; fail "uninterrupted 2-rank run failed"; }
set +e
bash "$launch" 2 "$bin" train "${resumable[@]}" --out "$work/split" --stop-after 4 > "$work/split.txt" 2>&1
status=$?
set -e
[ "$status" -eq 130 ] || { cat "$work/split.txt"; fail "an interrupted 2-rank run should exit with 130 (got $status)"; }
[ -f "$work/split/checkpoint/generator-1.pt" ] || fail "the checkpoint lacks rank 1's generator"
if "$bin" train "${resumable[@]}" --out "$work/split" --resume > "$work/one.txt" 2>&1; then fail "resuming 2 ranks' checkpoint on 1 should fail"; fi
grep -q "written by a run of 2 process(es)" "$work/one.txt" || { cat "$work/one.txt"; fail "no message for the rank count"; }
bash "$launch" 2 "$bin" train "${resumable[@]}" --out "$work/split" --resume > "$work/resumed.txt" 2>&1 || { cat "$work/resumed.txt"; fail "resume failed"; }
cmp -s "$work/whole/adapter/adapter_model.safetensors" "$work/split/adapter/adapter_model.safetensors" \
  || fail "the resumed 2-rank adapter differs from the uninterrupted one"
cmp -s "$work/whole/metrics.jsonl" "$work/split/metrics.jsonl" || fail "the resumed 2-rank metrics differ"
echo "sentiment_distributed: all checks passed"
