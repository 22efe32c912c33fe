# Logit distillation, the reference experiment: Arcee-Spark (7B Qwen2) -> Qwen2-1.5B base on 200k OpenHermes-2.5.
#   python prepare_data.py --dataset=teknium/OpenHermes-2.5 --tokenizer=Qwen/Qwen2-1.5B --name=hermes \
#       --max_examples=200000 --max_length=4096 --num_proc=16
#   torchrun --standalone --nproc_per_node=8 distill.py configs/hermes.py
# Sized for: 8 x 80 GB GPUs (bf16 autocast, fp32 master weights; 7B teacher in bf16 ~15 GB per GPU).
# Expected time: not measured here; a FLOP estimate (~240M tokens x (6 x 1.5B + 2 x 7.6B) FLOP at 30% MFU on
# 8 H100s) gives ~1.5 h. Batch: 1 document x 8 micro-batches per rank x 8 ranks = 64 documents of <= 4096
# tokens per step (DistillKit: micro-batch 1 x accumulation 8 per device); ~8,900 steps for 3 epochs.
teacher = 'arcee-ai/Arcee-Spark'
student = 'Qwen/Qwen2-1.5B'
student_init = 'pretrained'
dataset = 'hermes'
out_dir = 'out-hermes'
distill = 'logits'
kd_kind = 'fkl'
temperature = 2.0
alpha = 0.5
block_size = 4096
batch_size = 1
gradient_accumulation_steps = 64
epochs = 3.0
learning_rate = 2e-5
min_lr = 0.0
warmup_frac = 0.1
weight_decay = 0.0
grad_clip = 1.0
eval_interval = 500
eval_docs = 512
dtype = 'bfloat16'
