# A 7B student in LoRA adapters on one 80 GB GPU: Qwen2-7B-Instruct, rank 64 on the 7 projections of its 28 blocks,
# from Qwen2-72B-Instruct served by vLLM on other GPUs (its top 20 tokens a position), WebInstruct as configs/webinstruct.py.
#   scripts/serve_teacher.sh Qwen/Qwen2-72B-Instruct 8000 &     # on the teacher's GPUs; then, once it answers:
#   python distill.py configs/qwen7b_lora.py
# Sized for: one 80 GB GPU, bf16. Time: not measured. Memory, distill.py's estimate (printed at start; kd/machine.py):
# 161,480,704 trained parameters; parameters 17.0 GB (the frozen base's matrices in bf16), gradients 0.65 GB,
# AdamW 1.29 GB, activations 29.1 GB: peak ~50.2 GB at 4,096 tokens a micro-batch, ~30 GB of the GPU to spare.
# Full fine-tuning (lora_rank=0) needs parameters 30.5 GB + gradients 30.5 GB + AdamW 60.9 GB before activations:
# peak ~170 GB, three such GPUs' worth (parallel='fsdp' over them, not one).
# Batch: 1 x 4,096 tokens x 32 micro-batches x 1 GPU = 131,072 tokens/step.
teacher = 'http://localhost:8000/v1'
teacher_topk = 20
student = 'Qwen/Qwen2-7B-Instruct'
lora_rank = 64
lora_alpha = 128.0
dataset = 'webinstruct'
out_dir = 'out-qwen7b-lora'
distill = 'logits'
temperature = 1.0
alpha = 0.5
block_size = 4096
batch_size = 1
gradient_accumulation_steps = 32
epochs = 1.0
learning_rate = 1e-4
min_lr = 1e-5
warmup_frac = 0.03
eval_interval = 500
eval_docs = 256
dtype = 'bfloat16'
