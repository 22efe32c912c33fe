"""
The GPU check: a few minutes on one GPU (an H100 or H200) that say how fast distill.py's step runs there and that
it computes what the CPU computes.

    python prepare_data.py && python prepare_data.py --demo_chat && python scripts/gpu_check.py
    python scripts/gpu_check.py --random --tokenizer=FOLDER   # without the packaged teacher (seeded weights of its
                                                              # shapes; its tokenizer saved in FOLDER)

Models: the quick start's, the packaged SmolLM2-135M-Instruct teacher and its 10-block copy as the student (--random:
the same shapes, seeded random weights; speed and memory are the same). Each case computes its first step's loss on
the CPU in fp32 and on the GPU in bf16 autocast (the teacher's weights in bf16, as distill.py runs it) from the same
weights and rows: a relative difference above --tolerance is a mismatch. Then --steps timed steps on the GPU
(forward, backward, AdamW at learning rate 0): tokens/s, MFU against the card's dense bf16 peak, peak memory.
  logits     logit KD, distill.py's defaults (CE + forward KL at T = 2, alpha 0.5), --batch_size x 512 of data/demo
  packed     the same windows packed into rows (pack_rows)
  on-policy  --batch_size demo-chat prompts, replies of up to --max_new_tokens written on the GPU by kd/decode.py,
             JSD(0.5) at T = 1, the CPU scoring the GPU's rows; and the sampler's tokens/s against HF generate
  trl        TRL's DistillationTrainer compute_loss step on the logits case's rows (if trl is installed; as
             scripts/compare_trl.py does on the CPU; its loss is the mean divergence, beside ours)
Prints one table and exits 1 on any mismatch.
"""
import argparse, contextlib, copy, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
import distill
from kd import decode
from kd.chunked import auto_chunk
from kd.data import block_windows, load_split, make_batch, pack_rows
from kd.machine import flops_per_token, measure_matmul_flops
from kd.models import (cast_parameters, demo_tokenizer, load_model, output_rows, special_ids,
                       student_from_teacher_layers, load_tokenizer)
from kd.sampling import prompt_lengths, sample_rows, stop_tokens
from kd.teacher import Teacher

p = argparse.ArgumentParser()
p.add_argument('--device', default='cuda')
p.add_argument('--random', action='store_true', help='seeded random weights of the quick-start shapes')
p.add_argument('--tokenizer', help="the data's tokenizer (default: the one data/demo-chat names), e.g. a folder "
               'saved with save_pretrained where the packaged teacher is not installed')
p.add_argument('--batch_size', type=int, default=8)
p.add_argument('--block_size', type=int, default=512)
p.add_argument('--max_new_tokens', type=int, default=256)
p.add_argument('--steps', type=int, default=10)
p.add_argument('--tolerance', type=float, default=0.02, help="relative difference of a loss allowed (bf16's rounding)")
args = p.parse_args()
device = torch.device(args.device)
cuda = device.type == 'cuda'
sync = torch.cuda.synchronize if cuda else lambda: None
PEAKS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12}  # dense bf16, the datasheets

def teacher_model():
    if not args.random:
        return load_model(demo_tokenizer()).eval()
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

def setup(student, teacher, on, bf16, divergence, weights, vocab):
    """(the trainable student, the teacher's function, its autocast) on a device, as distill.py builds them."""
    s, t = copy.deepcopy(student).to(on).train(), copy.deepcopy(teacher).to(on).requires_grad_(False)
    if bf16:
        cast_parameters(t, torch.bfloat16)
    dtype = 'bfloat16' if bf16 else 'float32'
    model = distill.Trainable(s, vocab, weights, divergence, auto_chunk(output_rows(s), dtype))
    ctx = torch.autocast(on.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
    return model, Teacher(t, vocab, 'head'), ctx

def to(x, on):
    """A batch (nested named tuples of tensors) on a device."""
    if torch.is_tensor(x):
        return x.to(on)
    return type(x)(*(to(v, on) for v in x)) if isinstance(x, tuple) else x

def first_loss(student, teacher, batch, on, bf16, divergence, weights, vocab):
    model, teacher_fn, ctx = setup(student, teacher, on, bf16, divergence, weights, vocab)
    batch = to(batch, on)
    with torch.no_grad(), ctx:
        return model(batch, teacher_fn(batch), batch.M.sum().item(), n_labeled=batch.labeled().sum().item()).loss.item()

def timed(student, teacher, batch, divergence, weights, vocab, resample=None):
    """--steps steps on the GPU after one warm-up: (s a step, sampling s a step, peak bytes)."""
    model, teacher_fn, ctx = setup(student, teacher, device, True, divergence, weights, vocab)
    optimizer = distill.configure_optimizer(model, 0.0, 0.0, (0.9, 0.999))
    batch = to(batch, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, sampling = [], []
    for i in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        b = batch
        if resample:
            with ctx:
                b = resample(model.model, i)
        sync()
        t1 = time.perf_counter()
        with ctx:
            out = model(b, teacher_fn(b), b.M.sum().item(), n_labeled=b.labeled().sum().item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
            sampling.append(t1 - t0)
    return sum(times) / len(times), sum(sampling) / len(sampling), torch.cuda.max_memory_allocated() if cuda else 0

def row(name, cpu, gpu, step_s, sample_s, peak, tokens, flops):
    rel = abs(gpu - cpu) / max(abs(cpu), 1e-12)
    mfu = flops * tokens / step_s / peak_flops
    flag = ' MISMATCH' if rel > args.tolerance else ''
    print(f'{name:10s} loss cpu fp32 {cpu:.4f} gpu bf16 {gpu:.4f} ({rel:.2%}{flag})'
          f'  {step_s * 1000:7.1f} ms a step ({sample_s * 1000:.1f} sampling)  {tokens / step_s:9,.0f} tokens/s  '
          f'MFU {mfu:.1%}  peak {peak / 2 ** 30:.2f} GiB', flush=True)
    return rel <= args.tolerance

name = torch.cuda.get_device_name(device) if cuda else 'cpu'
peak_flops = next((v for k, v in PEAKS.items() if k in name), None) or measure_matmul_flops(device, torch.bfloat16)
source = 'datasheet' if any(k in name for k in PEAKS) else 'measured'
print(f'{name}: bf16 peak {peak_flops / 1e12:.0f} TFLOP/s ({source})'
      f', torch {torch.__version__}, {"random" if args.random else "packaged"} weights')
teacher = teacher_model()
student = student_from_teacher_layers(teacher, list(range(0, 30, 3)))
meta = json.load(open('data/demo/meta.json'))
vocab, pad = meta['vocab_size'], meta['pad_id']
split = load_split('data/demo', 'train')
windows = block_windows(split, args.block_size)[:args.batch_size]
batch = make_batch(split, windows, args.block_size, pad, 'cpu')
fkl, jsd = distill.Divergence('fkl', 2.0), distill.Divergence('jsd', 1.0, 0.5)
flops = lambda b: sum(flops_per_token(m, b.X.shape[1], m is student) for m in (student, teacher))
ok = []

for case, b in (('logits', batch), ('packed', pack_rows(batch, args.block_size, pad))):
    cpu = first_loss(student, teacher, b, torch.device('cpu'), False, fkl, (0.5, 0.5, 0.0), vocab)
    gpu = first_loss(student, teacher, b, device, True, fkl, (0.5, 0.5, 0.0), vocab)
    step_s, _, peak = timed(student, teacher, b, fkl, (0.5, 0.5, 0.0), vocab)
    ok.append(row(case, cpu, gpu, step_s, 0.0, peak, b.X.numel(), flops(b)))

chat = load_split('data/demo-chat', 'train')
chat_meta = json.load(open('data/demo-chat/meta.json'))
lengths = prompt_lengths(chat)
tokenizer = args.tokenizer or chat_meta['tokenizer']
stops = stop_tokens(chat, lengths, chat_meta['eos_id'], special_ids(load_tokenizer(tokenizer)), 'demo-chat')
docs = [d for d in range(len(lengths)) if 1 < lengths[d] <= 64][:args.batch_size]
block = 64 + args.max_new_tokens
chat_batch = make_batch(chat, [(d, 0) for d in docs], block, pad, 'cpu')
settings = (args.max_new_tokens, 1.0, 1.0, stops)
resample = lambda model, i: sample_rows(model, to(chat_batch, device), chat, docs, list(range(len(docs))), lengths,
                                        block, settings, i, pad, vocab)[0]
gpu_model, _, ctx = setup(student, teacher, device, True, jsd, (0.0, 1.0, 0.0), vocab)
with ctx:
    rows = to(resample(gpu_model.model, 0), 'cpu')
cpu = first_loss(student, teacher, rows, torch.device('cpu'), False, jsd, (0.0, 1.0, 0.0), vocab)
gpu = first_loss(student, teacher, rows, device, True, jsd, (0.0, 1.0, 0.0), vocab)
step_s, sample_s, peak = timed(student, teacher, chat_batch, jsd, (0.0, 1.0, 0.0), vocab, resample)
ok.append(row('on-policy', cpu, gpu, step_s, sample_s, peak, rows.X.numel(), flops(rows)))

# the sampler against HF generate: the same prompts, every row writing all --max_new_tokens (no stop token)
prompts = [torch.tensor(chat['tokens'][chat['idx'][d]:chat['idx'][d] + lengths[d]].tolist()) for d in docs]
gpu_student = copy.deepcopy(student).to(device).eval()
width = max(map(len, prompts))
P = torch.stack([torch.cat([torch.zeros(width - len(q), dtype=torch.long), q]) for q in prompts]).to(device)
A = torch.stack([torch.arange(width) >= width - len(q) for q in prompts]).long().to(device)
from transformers import GenerationConfig
gpu_student.generation_config = GenerationConfig()
config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                          eos_token_id=None, pad_token_id=0)
rates = {'decode': [], 'generate': []}
for r in range(3):
    for tool in rates:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            sync()
            t0 = time.perf_counter()
            if tool == 'decode':
                decode.generate(gpu_student, prompts, [args.max_new_tokens] * len(prompts), 1.0, 1.0, [], r, vocab,
                                device)
            else:
                gpu_student.generate(input_ids=P, attention_mask=A, generation_config=config)
            sync()
        if r:
            rates[tool].append(len(prompts) * args.max_new_tokens / (time.perf_counter() - t0))
a, g = (max(rates[t]) for t in ('decode', 'generate'))
print(f'sampling {len(prompts)} x {args.max_new_tokens} tokens: kd/decode.py {a:,.0f} tokens/s, HF generate '
      f'{g:,.0f} tokens/s ({a / g:.2f}x)')

try:
    import trl  # noqa: F401
except ImportError:
    print('trl: not installed (pip install trl), not compared')
else:
    import tempfile
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer
    from kd.models import model_tokenizer
    s, t = copy.deepcopy(student).to(device).train(), copy.deepcopy(teacher).to(device).eval().requires_grad_(False)
    trainer = DistillationTrainer(
        model=s, teacher_model=t, train_dataset=Dataset.from_dict({'prompt': ['hi'] * args.batch_size}),
        args=DistillationConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
                                gradient_checkpointing=False, bf16=True, use_cpu=not cuda, beta=0.0, temperature=2.0,
                                learning_rate=0.0,
                                report_to=[], max_completion_length=args.block_size),
        processing_class=model_tokenizer(tokenizer))
    trainer.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
    b = to(batch, device)
    rows = torch.cat([b.X, b.Y[:, -1:]], 1)
    inputs = {'prompt_ids': rows[:, :1], 'prompt_mask': torch.ones_like(rows[:, :1]), 'completion_ids': rows[:, 1:],
              'completion_mask': b.M}
    torch.cuda.reset_peak_memory_stats() if cuda else None
    times = []
    for i in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16):
            loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=b.M.sum())
        trainer.accelerator.backward(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = sum(times[1:]) / args.steps
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    print(f'{"trl":10s} its mean forward KL {loss.item():.4f} (no CE)  {step_s * 1000:7.1f} ms a step  '
          f'{b.X.numel() / step_s:9,.0f} tokens/s  MFU {flops(batch) * b.X.numel() / step_s / peak_flops:.1%}  '
          f'peak {peak / 2 ** 30:.2f} GiB')

if not all(ok):
    sys.exit(f'error: a loss on {name} differs from the CPU fp32 one by more than {args.tolerance:.0%}')
print('all losses agree with the CPU fp32 ones within', f'{args.tolerance:.0%}')
