# An agent-tuned 7B teacher -> a 1.5B student on local agent data (e.g. 450k ShareGPT-style tool-use traces).
#   python prepare_data.py path/to/agent_data.jsonl --tokenizer=Qwen/Qwen2.5-7B-Instruct --name=agent --max_length=8192
#   torchrun --standalone --nproc_per_node=8 distill.py configs/agent.py
# Sized for: 8 x 80 GB GPUs, bf16 autocast; 8192-token traces make the full logits large (8192 x 152k x 4 B
# = 5 GB per tensor), hence micro-batch 1. Expected time: not measured; FLOP estimate ~6 h for 3 epochs of 450k.
# Batch: 1 document x 64 micro-batches (8 per rank) x 8 ranks = 64 documents of <= 8192 tokens per step.
teacher = 'Qwen/Qwen2.5-7B-Instruct'  # replace with your agent-tuned 7B (same tokenizer as the student)
student = 'Qwen/Qwen2.5-1.5B-Instruct'
dataset = 'agent'
out_dir = 'out-agent'
distill = 'logits'
temperature = 2.0
alpha = 0.5
block_size = 8192
batch_size = 1
gradient_accumulation_steps = 64
epochs = 3.0
learning_rate = 2e-5
min_lr = 0.0
warmup_frac = 0.1
eval_interval = 500
eval_docs = 256
dtype = 'bfloat16'
