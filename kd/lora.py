"""
LoRA students (Hu et al. 2021): the chosen linear layers of the student gain a trained low-rank update,

    y = W x + b + (alpha / r) B A dropout(x),    A (r x d_in) random, B (d_out x r) zero,

so the student starts as it was, and everything else is frozen: AdamW holds moments for A and B alone. The frozen
matrices are stored in the compute dtype, where autocast would cast them at every use anyway: the same products, half
the memory. The adapters keep their layer's parameter names beside them (<path>.weight, <path>.lora_A.weight,
<path>.lora_B.weight), so a merged state dict is the plain model's, and PEFT's adapter file is a renaming.
"""
import difflib, hashlib, json, math, os, re
import torch
import torch.nn as nn
import torch.nn.functional as F
from kd.configurator import ConfigError

ADAPTER = 'adapter_model.safetensors'

class LoRALinear(nn.Module):
    """A frozen nn.Linear's weight and bias, under their own names, plus a trained update (alpha / r) B A."""
    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=linear.weight.device)
        self.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=linear.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # (nn.Linear's own init, as PEFT's)
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.dropout = alpha / rank, nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

def check_lora(rank, alpha, dropout, targets, fsdp, student_init):
    """The LoRA settings, refused in one line where they cannot train."""
    if not rank:
        return
    if not (isinstance(rank, int) and rank > 0):
        raise ConfigError(f'lora_rank must be a positive integer (or 0: no adapters), got {rank!r}')
    if not alpha > 0 or not 0 <= dropout < 1:
        raise ConfigError(f'lora_alpha must be > 0 and lora_dropout in [0, 1), got {alpha!r} and {dropout!r}')
    if not (isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"lora_targets must be a list of linear layers' names, e.g. ['q_proj', 'v_proj'], got "
                          f'{targets!r}')
    if student_init == 'config':
        raise ConfigError("lora_rank > 0 trains adapters on a frozen base: student_init='config' would freeze random "
                          "weights; use 'pretrained' or 'teacher_layers'")
    if fsdp:
        raise ConfigError("lora_rank > 0 under parallel='fsdp' is refused: FSDP2 shards parameters of one dtype and "
                          "the frozen base is stored in another than the adapters; use parallel='ddp' (each rank "
                          'holds the frozen base, the adapters are small)')

def add_lora(model, rank, alpha, dropout, targets, compute_dtype):
    """Adapters on the linear layers named in targets (the last component of their path, e.g. 'q_proj'), every other
    parameter frozen, the frozen linear layers' weights and biases stored in the compute dtype. In place; returns the
    line that says what was done. A target the model lacks: ConfigError naming the closest it has. The output head
    takes none: the chunked loss reads its weight directly."""
    head = model.get_output_embeddings()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    names = sorted({n.rsplit('.', 1)[-1] for n in linears})
    if not names:
        raise ConfigError(f'lora_rank > 0: the student ({type(model).__name__}) has no nn.Linear layer below its head '
                          "to take an adapter (GPT-2's Conv1D layers are not nn.Linear)")
    for t in targets:
        if t not in names:
            close = difflib.get_close_matches(t, names, 1)
            raise ConfigError(f"lora_targets: the student has no linear layer named '{t}'"
                              + (f"; did you mean '{close[0]}'?" if close else '') + f' (it has {", ".join(names)})')
    for p in model.parameters():
        p.requires_grad_(False)
    paths = [n for n in linears if n.rsplit('.', 1)[-1] in targets]
    for path in paths:
        parent, _, child = path.rpartition('.')
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(path), rank, alpha, dropout))
    tied = head.weight is model.get_input_embeddings().weight  # (then an embedding: looked up, not multiplied)
    for m in model.modules():
        if isinstance(m, (nn.Linear, LoRALinear)) and not (m is head and tied):
            for name in ('weight', 'bias'):
                p = getattr(m, name)
                if p is not None and not p.requires_grad:
                    p.data = p.data.to(compute_dtype)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trained
    return (f'LoRA: rank {rank}, alpha {alpha:g}, on {len(paths)} linear layers ({", ".join(targets)}): {trained:,} '
            f'trained parameters, {frozen:,} frozen (their linear weights in {str(compute_dtype)[len("torch."):]})')

def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

def base_state(model, base=None):
    """The plain model's state dict in fp32, the adapters gone. base: the student's state dict as it was loaded (fp32),
    whose tensors replace the frozen copies stored in the compute dtype; None: the model's own."""
    return {k: (v if base is None else base[k]).float() for k, v in model.state_dict().items()
            if '.lora_A.' not in k and '.lora_B.' not in k}

def merged_state(model, base=None):
    """base_state with each adapted weight merged: W + (alpha / r) B A."""
    state = base_state(model, base)
    for path, m in adapters(model).items():  # (not +=: .float() of an fp32 tensor is that tensor, the model's own)
        delta = m.scale * (m.lora_B.weight.float() @ m.lora_A.weight.float())
        state[f'{path}.weight'] = state[f'{path}.weight'] + delta
    return state

def base_fingerprint(model):
    """The frozen tensors in a few numbers each (name, shape, dtype, float64 sums): a resume compares them, since the
    checkpoint holds the adapters alone and the base is rebuilt from where the run started."""
    rows = [(n, list(p.shape), str(p.dtype), f'{p.sum(dtype=torch.float64).item():.10g}',
             f'{p.abs().sum(dtype=torch.float64).item():.10g}')
            for n, p in model.named_parameters() if not p.requires_grad]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

def trained_state(module):
    """What a checkpoint holds of a run with adapters: the parameters that train (the frozen ones are read again from
    where the run started)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

def save_adapter(model, folder, base, settings):
    """The adapters alone in PEFT's format: adapter_model.safetensors (keys base_model.model.<path>.lora_A.weight and
    .lora_B.weight, fp32) and adapter_config.json, which names the base they apply to (base) and settings
    (rank, alpha, dropout, targets)."""
    from safetensors.torch import save_file
    rank, alpha, dropout, targets = settings
    os.makedirs(folder, exist_ok=True)
    save_file({f'base_model.model.{path}.lora_{ab}.weight': getattr(m, f'lora_{ab}').weight.detach().float().cpu()
               .contiguous() for path, m in adapters(model).items() for ab in 'AB'}, os.path.join(folder, ADAPTER))
    config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base, 'r': rank,
              'lora_alpha': alpha, 'lora_dropout': dropout, 'target_modules': sorted(targets), 'bias': 'none',
              'fan_in_fan_out': False, 'modules_to_save': None, 'inference_mode': True}
    with open(os.path.join(folder, 'adapter_config.json'), 'w') as f:
        json.dump(config, f, indent=1)

def export_lora(model, out_dir, tokenizer, settings, export_student, base=None, loaded=None):
    """A LoRA run's export: the adapters in out_dir/adapter (PEFT's format) and, where the base is no model folder or
    hub id (base None: a student cut from the teacher; or a .gguf file), that base in out_dir/base in fp32. loaded: the
    student's weights as loaded (a pretrained student), onto which the merge goes. Returns the merged state dict,
    which the run exports as out_dir/student."""
    if base is None or base.endswith('.gguf'):
        base = os.path.abspath(os.path.join(out_dir, 'base'))
        export_student(model, base, base_state(model, loaded), tokenizer)
    elif os.path.isdir(base):
        base = os.path.abspath(base)
    folder = os.path.join(out_dir, 'adapter')
    save_adapter(model, folder, base, settings)
    if tokenizer is not None and hasattr(tokenizer, 'save_pretrained'):
        tokenizer.save_pretrained(folder)
    print(f'exported the adapters to {folder} (PEFT, base {base})')
    return merged_state(model, loaded)

def is_adapter(folder):
    return os.path.isfile(os.path.join(folder, 'adapter_config.json'))

def load_adapter(folder, load_model):
    """A PEFT LoRA adapter folder as its base (load_model(base_model_name_or_path), a relative path also read from the
    folder) with W + s B A merged into each adapted linear layer, s = alpha / r (alpha / sqrt(r) with use_rslora). The
    adapted layers are read off the file's keys; what plain LoRA does not cover is refused in one line."""
    from safetensors.torch import load_file
    config = json.load(open(os.path.join(folder, 'adapter_config.json')))
    other = [k for k in ('use_dora', 'rank_pattern', 'alpha_pattern', 'modules_to_save', 'fan_in_fan_out')
             if config.get(k)]
    if config.get('peft_type') != 'LORA' or config.get('bias', 'none') != 'none' or other:
        raise ConfigError(f"{folder}: only plain LoRA adapters are read (peft_type LORA, bias 'none'"
                          + (f', none of {", ".join(other)}' if other else '') + ')')
    base, r, alpha = config['base_model_name_or_path'], config['r'], config['lora_alpha']
    here = os.path.join(folder, base)
    model = load_model(here if not os.path.isabs(base) and os.path.exists(here) else base)
    scale = alpha / math.sqrt(r) if config.get('use_rslora') else alpha / r
    weights, modules = load_file(os.path.join(folder, ADAPTER)), dict(model.named_modules())
    for key in weights:
        path = re.fullmatch(r'base_model\.model\.(.+)\.lora_([AB])\.weight', key)
        m = path and modules.get(path[1])
        A, B = (weights.get(f'base_model.model.{path[1]}.lora_{ab}.weight') for ab in 'AB') if path else (None, None)
        if not (isinstance(m, nn.Linear) and A is not None and B is not None and A.shape == (r, m.in_features)
                and B.shape == (m.out_features, r)):
            raise ConfigError(f'{folder}: {key} does not fit its base {base} (a LoRA A (r x d_in) and B (d_out x r) '
                              f'of rank {r} on one of its linear layers)')
        if path[2] == 'A':
            with torch.no_grad():
                m.weight.copy_(m.weight.float() + scale * (B.float() @ A.float()))
    return model.requires_grad_(False).eval()
