"""
Folders written whole, and checkpoints. Every folder the project writes (a dataset, a teacher cache, a checkpoint)
is filled under a temporary name, sealed (every file on disk, then a marker listing each file's size, written last)
and swapped in, so that a reader finds the old complete folder or the new one, never half of one; and a checkpoint
holds what continues a run bit for bit as data, never code: the weights (safetensors), AdamW's state and the RNG
states (tensors, read with weights_only=True), the settings and data position (JSON).
"""
import glob, hashlib, json, os, pickle, re, shutil
import torch
from kd.configurator import ConfigError

# -----------------------------------------------------------------------------
# folders written whole

def remove_stale(out):
    """The temporary folders of earlier runs for out that were killed (their process is gone)."""
    for path in glob.glob(glob.escape(out) + '.tmp*'):
        try:
            os.kill(int(re.match(r'\.tmp(\d+)', path[len(out):])[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (TypeError, ValueError, PermissionError):
            pass  # not one of ours, or another user's live process

def seal(tmp, marker, content):
    """Mark the folder tmp complete: every file in it reaches the disk, then marker, a JSON file of content plus
    'files' (each file's size), is written last. A reader takes the folder only when every file it lists has its
    size."""
    files = {}
    for name in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, name), 'rb') as f:
            os.fsync(f.fileno())  # on disk before the marker says so (a power cut, not only a kill)
        files[name] = os.path.getsize(os.path.join(tmp, name))
    with open(os.path.join(tmp, marker + '.part'), 'w') as f:
        json.dump({**content, 'files': files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(tmp, marker + '.part'), os.path.join(tmp, marker))

def exchange(a, b):
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # AT_FDCWD, RENAME_EXCHANGE
    except (OSError, AttributeError):
        return False

def swap_in(tmp, folder):
    """folder <- tmp (a sealed folder), so that folder is at every instant the old complete one or the new one: the
    two are exchanged atomically, then the old one, now at tmp, is deleted. Where the OS has no exchange the old
    one is first renamed to tmp.old, which leaves folder missing for a moment (a kill then leaves both beside it)."""
    if not os.path.exists(folder):
        os.replace(tmp, folder)
        return
    if not exchange(tmp, folder):
        os.replace(folder, tmp + '.old')
        os.replace(tmp, folder)
        tmp += '.old'
    shutil.rmtree(tmp)

def verify_files(folder, files):
    """None when every file exists with the byte size recorded for it (None: any size), else what is wrong."""
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f'{path} is missing'
        if size is not None and os.path.getsize(path) != size:
            return (f'{path} has {os.path.getsize(path):,} bytes, not the {size:,} it was written with (truncated or '
                    'changed)')
    return None

def content_hash(paths):
    """A fingerprint of the files' bytes (blake2b, 16 hex digits): equal files, equal hash, wherever they lie."""
    h = hashlib.blake2b(digest_size=8)
    for path in paths:
        with open(path, 'rb') as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_FILES = ('model.safetensors', 'state.pt', 'state.json')

def checkpoint_iter(folder):
    """(iteration, None) for a complete checkpoint, else (None, what is wrong). Complete: its manifest, written
    last, is there, lists the checkpoint's files, and every file it lists has the size it records and the content
    hash where it records one (state.json: small, and its damage can keep its size)."""
    path = os.path.join(folder, 'manifest.json')
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None, f'{folder} has no manifest (a save that did not finish)'
    files, it, hashes = (manifest.get(k) if isinstance(manifest, dict) else None
                         for k in ('files', 'iter_num', 'hashes'))
    hashes = {} if hashes is None else hashes  # (a manifest written before they were)
    if not (isinstance(files, dict) and all(type(n) is int for n in files.values()) and type(it) is int and it >= 0
            and isinstance(hashes, dict) and set(hashes) <= set(CHECKPOINT_FILES)):
        return None, f'{path} is not a checkpoint manifest (iter_num, an int; files, their sizes)'
    missing = [name for name in CHECKPOINT_FILES if name not in files]
    if missing:
        return None, f'{path} lists no {missing[0]}'
    problem = verify_files(folder, files)
    if problem:
        return None, problem
    damaged = [name for name, h in hashes.items() if content_hash([os.path.join(folder, name)]) != h]
    if damaged:
        return None, f'{os.path.join(folder, damaged[0])} is not as it was written (its content hash differs)'
    return it, None

def save_checkpoint(folder, weights, optimizer_state, scaler, iter_num, data_position, rng_states, config, history=(),
                    val_history=()):
    """Weights (a model, or under fsdp its gathered state dict) as safetensors, the optimizer's and scaler's state and
    every rank's RNG state as a torch file of tensors (state.pt), the run's settings, position and recent training
    losses as JSON (state.json), written into folder.tmp, sealed and
    swapped in (seal, swap_in). A kill at any instant leaves at least one complete checkpoint among folder,
    folder.tmp and folder.tmp.old, and find_checkpoint picks the newest; the next save tidies up."""
    from safetensors.torch import save_file, save_model
    tmp = folder + '.tmp'
    done = checkpoint_iter(tmp)[0]
    if done is not None and done > (checkpoint_iter(folder)[0] or 0):
        swap_in(tmp, folder)  # a kill came between a complete save and its swap: finish that swap first
    for leftover in (tmp, tmp + '.old'):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)
    os.makedirs(tmp)
    (save_model if isinstance(weights, torch.nn.Module) else save_file)(weights, os.path.join(tmp, 'model.safetensors'))
    torch.save({'optimizer': optimizer_state, 'scaler': scaler.state_dict(), 'rng_states': rng_states},
               os.path.join(tmp, 'state.pt'))  # tensors in plain containers: read back with weights_only=True
    with open(os.path.join(tmp, 'state.json'), 'w') as f:
        json.dump({'iter_num': iter_num, 'data_position': data_position, 'config': config,
                   'loss_history': list(history), 'val_history': list(val_history)}, f, indent=1)
    hashes = {'state.json': content_hash([os.path.join(tmp, 'state.json')])}  # (state.pt: too big to hash cheaply)
    seal(tmp, 'manifest.json', {'iter_num': iter_num, 'hashes': hashes})
    swap_in(tmp, folder)
    shutil.rmtree(os.path.join(os.path.dirname(folder), 'earlier'), ignore_errors=True)  # (set_aside's: no longer kept)

def set_aside(out_dir):
    """A run from scratch in out_dir: the earlier run's complete checkpoint (and its log) goes to out_dir/earlier,
    where it stays until the new run has a checkpoint of its own (then save_checkpoint removes it), so that a run that
    fails first leaves the earlier one whole. Half-written saves beside no complete checkpoint are a failed run's
    and go; so does an older out_dir/earlier when a newer complete checkpoint takes its place. The move is made in
    out_dir/earlier.new, which a later call finishes if a kill cut it short. Returns whether out_dir/earlier exists."""
    earlier, new = os.path.join(out_dir, 'earlier'), os.path.join(out_dir, 'earlier.new')
    names = [n for n in ('ckpt', 'ckpt.tmp', 'ckpt.tmp.old') if os.path.isdir(os.path.join(out_dir, n))]
    if os.path.isdir(new) or any(checkpoint_iter(os.path.join(out_dir, n))[0] is not None for n in names):
        os.makedirs(new, exist_ok=True)
        for name in names + ['log.jsonl']:
            if os.path.exists(os.path.join(out_dir, name)):
                os.replace(os.path.join(out_dir, name), os.path.join(new, name))
        shutil.rmtree(earlier, ignore_errors=True)
        os.replace(new, earlier)
    for name in names:  # (none complete: a run killed before its first save finished)
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return os.path.isdir(earlier)

def find_checkpoint(folder):
    """The newest complete checkpoint among folder and what an interrupted save left (folder.tmp, folder.tmp.old):
    (its path, its iteration, what was wrong with the others)."""
    found, problems = [], []
    for path in (folder, folder + '.tmp', folder + '.tmp.old'):
        if os.path.isdir(path):
            it, problem = checkpoint_iter(path)
            if it is None:
                problems.append(problem)
            else:
                found.append((it, path))
    if not found:
        earlier = os.path.join(os.path.dirname(folder), 'earlier')  # (set_aside's)
        raise ConfigError(f"init_from='resume' but there is no complete checkpoint in {folder}" +
                          (f' ({problems[0]})' if problems else '') + "; start again with init_from='scratch'" +
                          (f' (an earlier run\'s is in {earlier}: move its ckpt back to resume that run)'
                           if os.path.isdir(earlier) else ''))
    it, path = max(found, key=lambda f: f[0])  # the first of equals: folder itself
    return path, it, problems

STATE_JSON = {'iter_num': int, 'data_position': int, 'config': dict, 'loss_history': list, 'val_history': list}
OPTIONAL = ('val_history',)  # (a checkpoint written before it was)
KINDS = {int: 'an int >= 0', dict: 'a dict', list: 'a list of numbers'}
SAME_DATA = ('batch_size', 'gradient_accumulation_steps', 'seed', 'dataset', 'parallel')  # the data order
SAME_RUN = ('distill', 'teacher', 'teacher_cache', 'student', 'student_init', 'student_layers', 'kd_kind')
LORA = ('lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets')  # (compared when adapters were on either side)

def state_json_problem(meta):
    """What keeps state.json's content from being what save_checkpoint writes, or None: its keys, of their types
    (another key, such as state.pt's 'optimizer', would replace that file's), and the settings compared on resuming."""
    if not isinstance(meta, dict):
        return f'holds a {type(meta).__name__}, not a dict'
    for key, kind in STATE_JSON.items():
        if key not in meta:
            if key in OPTIONAL:
                continue
            return f'{key} is missing'
        value = meta[key]
        if type(value) is not kind or (kind is int and value < 0) or (
                kind is list and not all(type(x) in (int, float) for x in value)):
            return f'{key} is {value!r:.40}, not {KINDS[kind]}'
    extra = [key for key in meta if key not in STATE_JSON]
    if extra:
        return f'holds {extra}, which distill.py does not write there'
    missing = [key for key in SAME_DATA + SAME_RUN if key not in meta['config']]
    return f'config has no {missing[0]!r}' if missing else None

def describe(x):
    return f'{tuple(x.shape)} {x.dtype}' if torch.is_tensor(x) else type(x).__name__

def optimizer_problem(saved, optimizer, named=None):
    """What keeps saved, AdamW's state dict (sharded: a full one keyed by parameter name; named maps this model's
    names to its parameters), from fitting optimizer, or None: checked before loading because fused AdamW writes
    a parameter's number of elements into whatever moment tensor it is given (a transposed one trains wrong
    weights, a smaller one corrupts memory), and optimizer.load_state_dict checks none of it."""
    if not (isinstance(saved, dict) and isinstance(saved.get('state'), dict)
            and isinstance(saved.get('param_groups'), list)):
        return 'the optimizer state is not a dict of state and param_groups'
    groups = optimizer.param_groups
    if len(saved['param_groups']) != len(groups):
        return f"the optimizer state has {len(saved['param_groups'])} parameter groups, this optimizer {len(groups)}"
    names = None if named is None else {p: name for name, p in named.items()}
    params = {}  # a key of the saved state: (this optimizer's parameter, the saved group, which replaces its own)
    for i, (g, group) in enumerate(zip(saved['param_groups'], groups)):
        keys = g.get('params') if isinstance(g, dict) else None
        if not (isinstance(keys, list) and all(isinstance(k, int if names is None else str) for k in keys)):
            return f"the optimizer state's parameter group {i} has no list of parameters"
        mine = group['params'] if names is None else [names.get(p) for p in group['params']]
        if len(keys) != len(mine):
            return (f"the optimizer state's parameter group {i} lists {len(keys)} parameters, "
                    f"this optimizer's {len(mine)}")
        if names is not None and set(keys) != set(mine):
            return (f"the optimizer state's parameter group {i} lists {sorted(set(keys) - set(mine))[:3]}, not "
                    "this optimizer's")
        # torch pairs saved parameters with this optimizer's by position; the sharded path, by name
        params.update(zip(keys if names is None else mine, ((p, g) for p in group['params'])))
    if len(params) != sum(len(group['params']) for group in groups):
        return 'the optimizer state lists a parameter twice'
    for key, s in saved['state'].items():
        if key not in params:
            return f'the optimizer state has state for {key!r}, a parameter in no group'
        p, g = params[key]
        expected = ['exp_avg', 'exp_avg_sq', *(['max_exp_avg_sq'] if g.get('amsgrad') else []), 'step']
        if not isinstance(s, dict) or sorted(map(str, s)) != sorted(expected):
            return (f"parameter {key!r}'s optimizer state holds "
                    f"{sorted(map(str, s)) if isinstance(s, dict) else type(s).__name__}, not {sorted(expected)}")
        if not (torch.is_tensor(s['step']) and s['step'].dim() == 0 and s['step'].is_floating_point()):
            return f"step of parameter {key!r} is {describe(s['step'])}, not a float scalar tensor"
        for name in expected[:-1]:
            if not (torch.is_tensor(s[name]) and s[name].is_floating_point() and s[name].shape == p.shape):
                return f'{name} of parameter {key!r} is {describe(s[name])}, its parameter {describe(p)}'
    return None

def scaler_problem(saved, scaler):
    """What keeps saved from fitting scaler, or None. ({}: a run without loss scaling, and a disabled scaler
    loads nothing.)"""
    if not isinstance(saved, dict):
        return "the loss scaler's state is not a dict"
    fresh = scaler.state_dict()
    if saved and scaler.is_enabled() and (set(saved) != set(fresh) or
                                          not all(type(v) in (int, float) for v in saved.values())):
        return f"the loss scaler's state is {saved!r:.80}, not numbers for {sorted(fresh)}"
    return None

def rng_problem(states):
    """What keeps states from being every rank's RNG states as rng_states writes them (set_rng_state would fail on
    them, after the weights were loaded), or None."""
    def byte_state(t, size=None):
        return torch.is_tensor(t) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == (size or t.numel())
    if not isinstance(states, list):
        return 'rng_states is not a list (one per rank)'
    cpu = torch.get_rng_state().numel()
    cuda = lambda: torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else None  # (set only there)
    for rank, s in enumerate(states):
        if not (isinstance(s, dict) and set(s) == {'cpu', 'cuda'} and byte_state(s['cpu'], cpu)
                and (s['cuda'] is None or byte_state(s['cuda'], cuda()))):
            return f"rank {rank}'s RNG state is not a CPU generator's ({cpu} bytes) and a CUDA one's (or None)"
    return None

def load_checkpoint(folder, raw_model, optimizer, scaler, config, world_size, sharded=False):
    """Weights and optimizer state into this run's, if it is the same run reading the same data stream: the data
    order depends on batch_size, gradient_accumulation_steps, seed and dataset, each rank's RNG state on the number of
    ranks, and the models and the loss make the run what it is. config: this run's settings as resolved (max_iters,
    loss_chunk, dtype); the others that differ from the checkpoint's come back in state['changed'], to be said.
    sharded (fsdp): every rank reads the whole state and keeps its shard (the files must be on a shared filesystem).
    A checkpoint is data: every part of it is checked against this run before anything is loaded, and one that does
    not fit is refused in one line (ConfigError), this run's model and optimizer as they were (every rank reads the
    same files, so every rank refuses alike)."""
    from safetensors.torch import load_file, load_model as load_weights
    it, problem = checkpoint_iter(folder)  # (find_checkpoint took it as complete; a caller may not have asked)
    if problem:
        raise ConfigError(f"{problem}; start again with init_from='scratch'")
    path, json_path = os.path.join(folder, 'state.pt'), os.path.join(folder, 'state.json')
    refused = lambda what: ConfigError(f'{what}; not a checkpoint as distill.py writes it (damaged or edited): start '
                                       "again with init_from='scratch'")
    try:  # weights_only: tensors, numbers, strings and containers are rebuilt; anything else is refused unrun
        state = torch.load(path, map_location='cpu', weights_only=True)  # (the optimizer moves it to its device)
    except pickle.UnpicklingError:
        raise ConfigError(f'{path} holds objects other than tensors and plain values, refused: reading them could '
                          "run code; resume only checkpoints distill.py wrote, or start again with init_from='scratch'")
    if not isinstance(state, dict) or set(state) != {'optimizer', 'scaler', 'rng_states'}:
        raise refused(f"{path} holds {list(state) if isinstance(state, dict) else type(state).__name__}, not "
                      'optimizer, scaler and rng_states')
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except ValueError as e:  # (UnicodeDecodeError too)
        raise refused(f'{json_path} is not JSON ({e})')
    problem = state_json_problem(meta)
    if problem:
        raise refused(f'{json_path}: {problem}')
    if meta['iter_num'] != it:
        raise refused(f"{json_path} is of iteration {meta['iter_num']}, its manifest of {it}")
    state.update(meta)
    config = json.loads(json.dumps(config))  # (as the checkpoint holds it: tuples are lists)
    for key in SAME_DATA:
        if state['config'][key] != config[key]:
            raise ConfigError(f"{key} was {state['config'][key]!r} when {folder} was written, now {config[key]!r}: "
                              f"resume with --{key}={state['config'][key]!r} (the data order depends on it), or "
                              'start a new out_dir')
    saved = state['config'].get('data_fingerprint')  # (each split's arrays; a checkpoint written before: not compared)
    if saved is not None and saved != config.get('data_fingerprint'):
        raise ConfigError(f"the data of dataset {config['dataset']!r} changed since {folder} was written (prepared "
                          'anew under the same name?): resume on the data it was written with, or start a new out_dir')
    for key in SAME_RUN:
        if state['config'][key] != config[key]:
            raise ConfigError(f"{key} was {state['config'][key]!r} when {folder} was written, now {config[key]!r}: "
                              f"that is another run; resume with --{key}={state['config'][key]!r}, or start a new "
                              'out_dir')
    lora = lambda c: [c[k] for k in LORA] if c.get('lora_rank') else None  # (a checkpoint without them: no adapters)
    if lora(state['config']) != lora(config):
        raise ConfigError(f"{', '.join(LORA)} were {lora(state['config']) or 'off'} when {folder} was written, now "
                          f"{lora(config) or 'off'}: that is another run; resume with the same, or start a new out_dir")
    if lora(config) and state['config'].get('base_fingerprint') != config.get('base_fingerprint'):
        raise ConfigError(f"the student's frozen weights are not those {folder}'s adapters trained on (its files "
                          'changed since?): resume with the same student, or start a new out_dir')
    state['changed'] = [f"{k} {v!r} -> {config[k]!r}" for k, v in state['config'].items()
                        if k in config and v != config[k] and k not in ('init_from', 'stop_iter', 'peak_flops', 'base_fingerprint', *LORA)]
    problem = rng_problem(state['rng_states'])
    if problem:
        raise refused(f'{path}: {problem}')
    if len(state['rng_states']) != world_size:
        raise ConfigError(f"the checkpoint was written by {len(state['rng_states'])} ranks; resume with the same "
                          'number')
    problem = scaler_problem(state['scaler'], scaler) or optimizer_problem(
        state['optimizer'], optimizer, dict(raw_model.named_parameters()) if sharded else None)
    if problem:
        raise refused(f'{path}: {problem}')
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(raw_model, optimizer, model_state_dict=load_file(os.path.join(folder, 'model.safetensors')),
                           optim_state_dict=state['optimizer'], options=StateDictOptions(full_state_dict=True))
        else:  # (with adapters the checkpoint holds what trains alone: the frozen base is as the run built it)
            missing, unexpected = load_weights(raw_model, os.path.join(folder, 'model.safetensors'), strict=False)
            frozen = {n for n, p in raw_model.named_parameters(remove_duplicate=False) if not p.requires_grad}
            if unexpected or set(missing) - frozen:
                raise ValueError(f'missing {sorted(set(missing) - frozen)[:3]}, unexpected {sorted(unexpected)[:3]}')
    except Exception as e:  # another model than the one saved (changed student, layer_map, ...)
        raise ConfigError(f"cannot load {os.path.join(folder, 'model.safetensors')} into this run's model: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    if not sharded:
        optimizer.load_state_dict(state['optimizer'])
    if state['scaler']:  # ({}: saved without loss scaling; under float16 now, the scaler starts afresh)
        scaler.load_state_dict(state['scaler'])
    return state

def trim_log(path, iter_num):
    """After a resume from iteration iter_num, the log holds what came before it: lines of the lost iterations
    (and a line a kill cut short) go."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        before = isinstance(r, dict) and r.get('iter', iter_num) < iter_num
        if before or (isinstance(r, dict) and r.get('iter') == iter_num and 'val_ce' in r):
            keep.append(line)
    with open(path + '.tmp', 'w') as f:
        f.writelines(keep)
    os.replace(path + '.tmp', path)

def rng_state():
    return {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}

def rng_states(world_size):
    """Every rank's RNG state, on every rank (one process: its own)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states

def set_rng_state(state):
    torch.set_rng_state(state['cpu'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])

# -----------------------------------------------------------------------------
# resuming a run

def resume(out_dir, raw_model, optimizer, scaler, config, resolved, world_size, rank, sharded=False, say=print):
    """init_from='resume': the weights, AdamW's moments and this rank's RNG state of the newest complete checkpoint in
    out_dir/ckpt (refused for another run or another data stream: load_checkpoint), the log trimmed to it. Returns
    (iteration, training losses, validation CEs: [] where the validation windows changed, as not comparable)."""
    path, iter_num, problems = find_checkpoint(os.path.join(out_dir, 'ckpt'))
    state = load_checkpoint(path, raw_model, optimizer, scaler, resolved, world_size, sharded)
    set_rng_state(state['rng_states'][rank])
    for group, decay in zip(optimizer.param_groups, (config['weight_decay'], 0.0)):  # (the saved groups' settings
        group.update(weight_decay=decay, betas=(config['beta1'], config['beta2']))  # came back: a changed one is said)
    for problem in problems:  # e.g. a truncated file, or the leftovers of a killed save
        say(f'note: {problem}; resuming from {path} (iteration {iter_num})')
    if state['changed']:
        say(f"note: resuming with settings changed since the checkpoint: {', '.join(state['changed'])}")
    if rank == 0:
        trim_log(os.path.join(out_dir, 'log.jsonl'), iter_num)
    same_windows = all(state['config'].get(k) == config[k] for k in ('eval_docs', 'block_size'))
    return iter_num, state['loss_history'], state.get('val_history', []) if same_windows else []
