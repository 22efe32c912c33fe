# The SFT baseline of configs/hermes.py: identical data, schedule and batch, no teacher (distill='none').
#   torchrun --standalone --nproc_per_node=8 distill.py configs/hermes_sft.py
# Sized for: 8 x 80 GB GPUs. Expected time: less than hermes.py (no 7B teacher forward; not measured).
# Batch: 1 document x 64 micro-batches x <= 4096 tokens per step, as in hermes.py.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'hermes.py')).read())
distill = 'none'
out_dir = 'out-hermes-sft'
