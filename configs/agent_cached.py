# configs/agent.py from a teacher cache: the 7B teacher runs once (cache_teacher.py), the 1.5B student then trains its
# 3 epochs from the stored top-16 + 16 draws from the tail, with no teacher in memory and no teacher forward per step.
#   python prepare_data.py path/to/agent_data.jsonl --tokenizer=Qwen/Qwen2.5-7B-Instruct --name=agent --max_length=8192
#   torchrun --standalone --nproc_per_node=8 scripts/cache_teacher.py --teacher=Qwen/Qwen2.5-7B-Instruct --dataset=data/agent \
#       --block_size=8192 --k=16 --samples=16 --temperatures=2 --batch_size=1    # writes data/agent/teacher_k16_b8192
#   torchrun --standalone --nproc_per_node=8 distill.py configs/agent_cached.py
# Disk: Qwen's 151,936 tokens need int32 ids, so a supervised target costs (16 + 16) x (4 + 2) + 4 = 196 bytes (one
# stored temperature). The dataset's meta.json gives the supervised targets ('supervised_tokens'); at 1,000 per trace
# (an assumed average: read yours) 450k traces hold 450M targets = 88 GB for train, read sequentially-ish once per
# epoch (memmaps: only a batch's rows are read). Teacher FLOPs: one forward over the data instead of one per epoch
# (3x fewer), and no 15 GB of bf16 teacher weights on each GPU during training.
# Sized for: 8 x 80 GB GPUs, bf16 autocast. Expected time: not measured.
# Batch: 1 document x 64 micro-batches (8 per rank) x 8 ranks = 64 documents of <= 8192 tokens per step.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'agent.py')).read())  # the same student, data, schedule and batch
teacher = None  # not loaded: the cache stands in for it
teacher_cache = 'teacher_k16_b8192'  # inside data/agent; its meta.json names the teacher it was written from
out_dir = 'out-agent-cached'
