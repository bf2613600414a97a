#!/usr/bin/env bash
# Starts N ranks of a command on this machine, as `torchrun --standalone --nproc-per-node N` does:
# each gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free port
# unless MASTER_PORT is set), and OMP_NUM_THREADS = cores / N unless set. Rank 0's output is
# shown as it is; the others' is prefixed with "[rank R]". Ctrl-C (SIGINT) and SIGTERM are
# passed on to every rank (lora-sentiment then checkpoints and stops at an agreed step). When a
# rank fails, the others get LORA_DIST_TIMEOUT_S (default 300, exported to the ranks) seconds
# plus 30 to fail on their own before they are killed. The exit status is the first failing
# rank's, or 0. Needs bash 5.1 or later (wait -n -p).
#   bash scripts/launch.sh N COMMAND [ARGS...]
#   bash scripts/launch.sh 2 build/examples/lora-sentiment train --model DIR --data DIR --out DIR
set -uo pipefail
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  echo "launch.sh: needs bash 5.1 or later (this is $BASH_VERSION)" >&2
  exit 2
fi
[ $# -ge 2 ] && [[ $1 =~ ^[1-9][0-9]*$ ]] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
world=$1
shift
export WORLD_SIZE=$world MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export LORA_DIST_TIMEOUT_S=${LORA_DIST_TIMEOUT_S:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / world > 0 ? $(nproc) / world : 1 ))}

pids=()
for rank in $(seq 0 $((world - 1))); do
  if [ "$rank" -eq 0 ]; then
    RANK=0 LOCAL_RANK=0 "$@" &
  else
    RANK=$rank LOCAL_RANK=$rank "$@" > >(sed -u "s/^/[rank $rank] /") 2> >(sed -u "s/^/[rank $rank] /" >&2) &
  fi
  pids+=($!)
done
signalled=""
trap 'signalled=1; kill -INT "${pids[@]}" 2> /dev/null' INT
trap 'signalled=1; kill -TERM "${pids[@]}" 2> /dev/null' TERM

status=0
running=("${pids[@]}")
timer=""
while [ ${#running[@]} -gt 0 ]; do
  finished=""
  wait -n -p finished "${running[@]}" $timer
  code=$?
  if [ -z "$finished" ]; then
    [ -n "$signalled" ] && continue  # a trapped signal interrupted the wait: the ranks have it
    echo "launch.sh: wait failed (status $code)" >&2
    [ "$status" -ne 0 ] || status=1
    kill -KILL "${running[@]}" 2> /dev/null
    break
  fi
  if [ "$finished" = "$timer" ]; then
    kill -KILL "${running[@]}" 2> /dev/null
    echo "launch.sh: killed the ranks still running $((LORA_DIST_TIMEOUT_S + 30)) s after the first failure" >&2
    break
  fi
  for i in "${!pids[@]}"; do [ "${pids[$i]}" = "$finished" ] && rank=$i; done
  running=($(for pid in "${running[@]}"; do [ "$pid" != "$finished" ] && echo "$pid"; done))
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$code
    echo "launch.sh: rank $rank exited with status $code" >&2
    sleep $((LORA_DIST_TIMEOUT_S + 30)) &
    timer=$!
  fi
done
[ -n "$timer" ] && kill "$timer" 2> /dev/null
wait 2> /dev/null
exit $status
