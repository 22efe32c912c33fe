# The seed's cross-architecture example: Llama-3.1-70B -> StableLM-2-1.6B by hidden states, across their tokenizers
# (128,256 vs 100,352 tokens: positions aligned on shared character boundaries). FSDP2: 70.6B parameters are 141 GB
# in bf16, more than one 80 GB GPU; each rank keeps 1/world of every block.
#   python prepare_data.py data.jsonl --tokenizer=stabilityai/stablelm-2-1_6b --teacher_tokenizer=meta-llama/Llama-3.1-70B --name=x70 --max_length=4096
#   torchrun --standalone --nproc_per_node=8 distill.py configs/llama70b_stablelm.py
#   SLURM, 2 nodes x 8 GPUs, one torchrun per node (data, out_dir and the models on a shared filesystem):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 bash -c 'torchrun --nnodes=2 --node_rank=$SLURM_NODEID --nproc_per_node=8
#     --master_addr=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) --master_port=29500 distill.py configs/llama70b_stablelm.py'
# Sized for 8 x 80 GB GPUs, bf16 autocast. Not run here. Per GPU by machine.memory_estimate (distill.py prints it at
# start; tests/test_memory.py holds its parts against what runs here hold and recomputes these figures): the teacher's
# 70.6B parameters in bf16 / 8 = 17.6 GB, + 5.5 GB gathered (two blocks with the prefetch, its embeddings); the student
# (1.64B + 6 projections 2,048 -> 8,192, 0.10B) in fp32 with gradients and AdamW / 8 = 3.5 GB, + 4.9 GB gathered (its
# root unit, embeddings, head and projections, with their gradients) + 2.9 GB of bf16 weight copies (autocast); its
# activations 14 GB at 4,096 tokens (HF's blocks keep an fp32 residual stream: ~3.4 MB per token in all). So: peak
# ~50.1 GB per GPU at 4,096 tokens on 8 GPUs (~39.5 GB on 16); a micro-batch of up to ~12,288 tokens fits 8 x 80 GB,
# ~15,360 on 16. Longer: activation recomputation (not built in).
# Logits across the two tokenizers (the teacher's distribution carried onto the student's tokens by their bytes):
# --distill=logits, the logit route: peak ~51.2 GB per GPU at 4,096 tokens on 8 GPUs (~40.7 GB on 16); a micro-batch
# of up to ~14,336 tokens fits 8 x 80 GB, ~17,408 on 16. Both terms (--kd_weight=0.5 --hidden_weight=0.5): peak
# ~54.4 GB at 4,096 tokens on 8 GPUs.
# Batch: 1 document x 64 micro-batches (8 per rank) x 8 ranks = 64 documents of <= 4096 tokens per step.
teacher = 'meta-llama/Llama-3.1-70B'
student = 'stabilityai/stablelm-2-1_6b'
dataset = 'x70'
out_dir = 'out-llama70b-stablelm'
parallel = 'fsdp'
distill = 'hidden'
alpha = 0.5  # loss = 0.5 CE + 0.5 H
layer_map = [(4, 13), (8, 27), (12, 40), (16, 53), (20, 67), (24, 80)]  # every 4th of the student's 24 blocks <- 80 x l / 24
hidden_loss = 'cosine'
hidden_rms_norm = True  # Llama's massive activations would dominate an unnormalised distance
block_size = 4096
batch_size = 1
gradient_accumulation_steps = 64
learning_rate = 2e-5
min_lr = 2e-6
warmup_frac = 0.05
eval_interval = 500
eval_docs = 256
dtype = 'bfloat16'
