# Hidden-state distillation variant of configs/hermes.py ("Hermes-Hidden-States"): the same data, schedule and
# batch; the student's blocks pulled towards the teacher's through trained projections (1536 -> 3584) instead
# of matching the teacher's logits.
#   torchrun --standalone --nproc_per_node=8 distill.py configs/hermes_hidden.py
# Sized for: 8 x 80 GB GPUs, bf16 autocast. Expected time: about that of hermes.py (not measured here).
# Batch: 1 document x 8 micro-batches per rank x 8 ranks = 64 documents of <= 4096 tokens per step.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'hermes.py')).read())
distill = 'hidden'
alpha = 0.5  # loss = 0.5 CE + 0.5 H
layer_map = 'uniform'  # student block l <-> teacher block round(l * 28 / 28): Qwen2-1.5B and the 7B both have 28
hidden_loss = 'cosine'  # scale-free, as in DistilBERT
hidden_rms_norm = True
proj_init = 'xavier'
out_dir = 'out-hermes-hidden'
