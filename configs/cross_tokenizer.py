# Logit distillation across tokenizers at CPU scale, a variant of configs/cpu_experiment.py (its teacher, batch, layer
# map and hidden-state loss): the packaged SmolLM2-135M-Instruct (49,152 tokens) -> a 16.3M-parameter Llama that reads
# GPT-2's 50,257 tokens, from random init (configs/cross_student/config.json); scripts/cpu_experiment.py runs SFT /
# logits / hidden / both, compared in bits per byte (docs/experiments.md).
#   W=$(python -c "import importlib.util as u; print(u.find_spec('whisper').submodule_search_locations[0])")/assets/gpt2.tiktoken
#   python prepare_data.py --tokenizer=$W --teacher_tokenizer=$(python -c "from kd import models; print(models.demo_tokenizer())") --name=demo-gpt2
#   python scripts/cpu_experiment.py --config=configs/cross_tokenizer.py --out=out-cross --seeds=1337,1338 --tasks=
#   python distill.py configs/cross_tokenizer.py --distill=logits --out_dir=out-cross-logits   # one run
# Sized for: a 2-core CPU, fp32 (no GPU). Measured: 96 s (SFT) to 368 s (both KD terms) per run of 100 steps.
# Batch: 8 windows x 1 micro-batch x 1 rank x <= 128 tokens = <= 1,024 tokens/step, 100 steps.
import os
exec(open(os.path.join(os.path.dirname(__file__), 'cpu_experiment.py')).read())
student = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cross_student')
student_init = 'config'  # its config.json alone: random init, seeded by seed
student_layers = None
dataset = 'demo-gpt2'
temperature = 1.0
learning_rate = 2e-3  # a small model from scratch takes a larger step than a pruned one being healed
min_lr = 2e-4
