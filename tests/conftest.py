"""Shared fixtures: tokenizers that need no download and tiny HF causal LMs built from a config."""
import json, os, sys
import pytest, torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd import models  # noqa: E402

BYTES_VOCAB = 256 + len(models.BYTES_SPECIALS)  # 259 real tokens

@pytest.fixture(scope='session')
def bytes_tok():
    return models.load_tokenizer('bytes')

@pytest.fixture(scope='session')
def smol_gguf():
    return models.demo_tokenizer()

@pytest.fixture(scope='session')
def smol_tok(smol_gguf):
    return models.load_tokenizer(smol_gguf)

@pytest.fixture(scope='session')
def gpt2_tok():
    """GPT-2's tokenizer (r50k ranks, packaged with openai-whisper): another byte-level BPE than SmolLM2's."""
    return models.load_tokenizer(os.path.join(models.package_dir('whisper'), 'assets', 'gpt2.tiktoken'))

def online(model, teacher, sharded=False):
    """The in-process teacher distill.py makes for the loss of Trainable `model`: it reads what that loss needs (None:
    no teacher, SFT; sharded: under FSDP2)."""
    from kd.teacher import NoTeacher, ShardedTeacher, Teacher
    if teacher is None:
        return NoTeacher()
    logits = None if model.w_kd == 0 else 'head' if model.chunk else 'full'
    return (ShardedTeacher if sharded else Teacher)(teacher, getattr(model.compared, 'stop', None), logits, model.proj.teacher_layers())

def tiny_model(arch='llama', vocab=BYTES_VOCAB, hidden=32, layers=2, heads=4, seed=0):
    """A randomly initialised causal LM small enough for CPU tests (fp32)."""
    import transformers as T
    torch.manual_seed(seed)
    if arch == 'gpt2':
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                           bos_token_id=256, eos_token_id=256)
    elif arch == 'qwen2':
        cfg = T.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512)
    else:
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512)
    return T.AutoModelForCausalLM.from_config(cfg).float()

def save_tiny_model(path, **kw):
    model = tiny_model(**kw)
    model.save_pretrained(path)
    return str(path)

def write_jsonl(path, records):
    with open(path, 'w') as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
    return str(path)

def tiny_work(d, records, gpt2=False):
    """A folder for distill.py runs: records prepared as data/tiny (bytes, 10% validation), a confident teacher whose
    output rows are padded past the 259 real tokens, a llama student (and a GPT-2 one, which has dropout)."""
    import prepare_data
    write_jsonl(d / 'in.jsonl', records)
    assert prepare_data.main([str(d / 'in.jsonl'), '--tokenizer', 'bytes', '--out_root', str(d / 'data'),
                              '--name', 'tiny', '--val_fraction', '0.1']) == 0
    teacher = tiny_model(vocab=300, hidden=32, layers=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a confident teacher, far from the student: KD terms well above round-off
    teacher.save_pretrained(d / 'teacher')
    save_tiny_model(d / 'student', vocab=280, hidden=16, layers=2, heads=2, seed=1)
    if gpt2:
        save_tiny_model(d / 'gpt2', arch='gpt2', vocab=BYTES_VOCAB, hidden=16, layers=2, heads=2, seed=2)
    return d
