# Logit distillation into Qwen2-1.5B-Instruct on 250k WebInstruct-Sub question/answer pairs
# (published: 52.34% -> 55.52%). The teacher shares Qwen2's tokenizer.
#   python prepare_data.py --dataset=TIGER-Lab/WebInstruct-verified --tokenizer=Qwen/Qwen2-1.5B-Instruct \
#       --name=webinstruct --max_examples=250000 --max_length=4096 --num_proc=16
#   torchrun --standalone --nproc_per_node=8 distill.py configs/webinstruct.py
# Sized for: 8 x 80 GB GPUs, bf16 autocast. Expected time: not measured; FLOP estimate ~2 h for 3 epochs.
# Batch: 1 document x 64 micro-batches (8 per rank) x 8 ranks = 64 documents of <= 4096 tokens per step.
teacher = 'arcee-ai/Arcee-Spark'
student = 'Qwen/Qwen2-1.5B-Instruct'
dataset = 'webinstruct'
out_dir = 'out-webinstruct'
distill = 'logits'
temperature = 2.0
alpha = 0.5
block_size = 4096
batch_size = 1
gradient_accumulation_steps = 64
epochs = 3.0
learning_rate = 2e-5
min_lr = 0.0
warmup_frac = 0.1
eval_interval = 500
eval_docs = 512
dtype = 'bfloat16'
