"""
Folders written whole, and checkpoints. Every folder the project writes (a dataset, a teacher cache, a checkpoint)
is filled under a temporary name, sealed (every file on disk, then a marker listing each file's size, written last)
and swapped in, so that a reader finds the old complete folder or the new one, never half of one; and a checkpoint
holds what continues a run bit for bit as data, never code: the weights (safetensors), AdamW's state and the RNG
states (tensors, read with weights_only=True), the settings and data position (JSON).
"""
import glob, hashlib, json, os, pickle, re, shutil
import torch
from configurator import ConfigError

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

def checkpoint_iter(folder):
    """(iteration, None) for a complete checkpoint, else (None, what is wrong). Complete: its manifest, written
    last, is there and every file it lists has the size it records."""
    try:
        with open(os.path.join(folder, 'manifest.json')) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None, f'{folder} has no manifest (a save that did not finish)'
    problem = verify_files(folder, manifest['files'])
    return (None, problem) if problem else (manifest['iter_num'], None)

def save_checkpoint(folder, weights, optimizer_state, scaler, iter_num, data_position, rng_states, config, history=()):
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
                   'loss_history': list(history)}, f, indent=1)
    seal(tmp, 'manifest.json', {'iter_num': iter_num})
    swap_in(tmp, folder)

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
        raise ConfigError(f"init_from='resume' but there is no complete checkpoint in {folder}" +
                          (f' ({problems[0]})' if problems else '') + "; start again with init_from='scratch'")
    it, path = max(found, key=lambda f: f[0])  # the first of equals: folder itself
    return path, it, problems

def load_checkpoint(folder, raw_model, optimizer, scaler, config, world_size, sharded=False):
    """Weights and optimizer state into this run's, if it is the same run reading the same data stream: the data
    order depends on batch_size, gradient_accumulation_steps, seed and dataset, each rank's RNG state on the number of
    ranks, and the models and the loss make the run what it is. config: this run's settings as resolved (max_iters,
    loss_chunk, dtype); the others that differ from the checkpoint's come back in state['changed'], to be said.
    sharded (fsdp): every rank reads the whole state and keeps its shard (the files must be on a shared filesystem)."""
    from safetensors.torch import load_file, load_model as load_weights
    path = os.path.join(folder, 'state.pt')
    try:  # weights_only: tensors, numbers, strings and containers are rebuilt; anything else is refused unrun
        state = torch.load(path, map_location='cpu', weights_only=True)  # (the optimizer moves it to its device)
    except pickle.UnpicklingError:
        raise ConfigError(f'{path} holds objects other than tensors and plain values, refused: reading them could '
                          "run code; resume only checkpoints distill.py wrote, or start again with init_from='scratch'")
    with open(os.path.join(folder, 'state.json')) as f:
        state.update(json.load(f))
    config = json.loads(json.dumps(config))  # (as the checkpoint holds it: tuples are lists)
    for key in ('batch_size', 'gradient_accumulation_steps', 'seed', 'dataset', 'parallel'):
        if state['config'][key] != config[key]:
            raise ConfigError(f"{key} was {state['config'][key]!r} when {folder} was written, now {config[key]!r}: "
                              f"resume with --{key}={state['config'][key]!r} (the data order depends on it), or "
                              'start a new out_dir')
    for key in ('distill', 'teacher', 'teacher_cache', 'student', 'student_init', 'student_layers', 'kd_kind'):
        if state['config'][key] != config[key]:
            raise ConfigError(f"{key} was {state['config'][key]!r} when {folder} was written, now {config[key]!r}: "
                              f"that is another run; resume with --{key}={state['config'][key]!r}, or start a new "
                              'out_dir')
    state['changed'] = [f"{k} {v!r} -> {config[k]!r}" for k, v in state['config'].items()
                        if k in config and v != config[k] and k not in ('init_from', 'stop_iter', 'peak_flops')]
    if len(state['rng_states']) != world_size:
        raise ConfigError(f"the checkpoint was written by {len(state['rng_states'])} ranks; resume with the same "
                          'number')
    try:
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(raw_model, optimizer, model_state_dict=load_file(os.path.join(folder, 'model.safetensors')),
                           optim_state_dict=state['optimizer'], options=StateDictOptions(full_state_dict=True))
        else:
            load_weights(raw_model, os.path.join(folder, 'model.safetensors'))
    except Exception as e:  # another model than the one saved (changed student, layer_map, ...)
        raise ConfigError(f"cannot load {os.path.join(folder, 'model.safetensors')} into this run's model: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    if not sharded:
        optimizer.load_state_dict(state['optimizer'])
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
