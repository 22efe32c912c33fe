import json, os, signal, subprocess, sys, time
import numpy as np
import pytest
from conftest import ROOT, write_jsonl
from kd import models
import prepare_data as P

def run(tmp_path, inputs, *args):
    return P.main([*inputs, '--out_root', str(tmp_path / 'data'), '--name', 'x', '--val_fraction', '0', *args])

def load(tmp_path, split='train'):
    folder = tmp_path / 'data' / 'x'
    meta = json.load(open(folder / 'meta.json'))
    ids = np.fromfile(folder / f'{split}.bin', dtype=meta['dtype'])
    mask = np.fromfile(folder / f'{split}_mask.bin', dtype=np.uint8)
    idx = np.fromfile(folder / f'{split}_idx.bin', dtype=np.int64)
    return meta, [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(idx[:-1], idx[1:])]

def b(s):
    return list(s.encode())

EOT = 256  # <|endoftext|> of the bytes tokenizer

# hand-built expectations in the fallback template: 'User: ...\n\n', 'Assistant: ' + reply + <eot> + '\n'
CHAT_CASES = [
    ({'conversations': [{'from': 'system', 'value': 'Be nice'}, {'from': 'human', 'value': 'Hi'},
                        {'from': 'gpt', 'value': 'Yo'}]},
     [(b('System: Be nice\n\nUser: Hi\n\nAssistant: '), 0), (b('Yo') + [EOT], 1), (b('\n'), 0)]),
    ({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'bc'},
                   {'role': 'user', 'content': 'd'}, {'role': 'assistant', 'content': 'é'}]},
     [(b('User: a\n\nAssistant: '), 0), (b('bc') + [EOT], 1), (b('\nUser: d\n\nAssistant: '), 0),
      (b('é') + [EOT], 1), (b('\n'), 0)]),
    ({'instruction': 'Add', 'input': '1 2', 'output': '3'},
     [(b('User: Add\n\n1 2\n\nAssistant: '), 0), (b('3') + [EOT], 1), (b('\n'), 0)]),
    ({'instruction': 'Say hi', 'input': '', 'output': 'hi'},
     [(b('User: Say hi\n\nAssistant: '), 0), (b('hi') + [EOT], 1), (b('\n'), 0)]),
    ({'question': 'Why?', 'answer': 'Because.'},
     [(b('User: Why?\n\nAssistant: '), 0), (b('Because.') + [EOT], 1), (b('\n'), 0)]),
]

@pytest.mark.parametrize('record,pieces', CHAT_CASES)
def test_formats_fallback_template_mask(tmp_path, record, pieces):
    assert run(tmp_path, [write_jsonl(tmp_path / 'in.jsonl', [record])], '--tokenizer', 'bytes') == 0
    meta, docs = load(tmp_path)
    ids = [t for p, _ in pieces for t in p]
    mask = [m for p, m in pieces for _ in p]
    mask[0] = 0
    assert docs == [(ids, mask)]
    assert meta['chat_template'] == 'fallback' and meta['dtype'] == 'uint16'

def test_plain_text_fully_supervised_and_split(tmp_path):
    assert run(tmp_path, [write_jsonl(tmp_path / 'in.jsonl', [{'text': 'abcdefg'}])], '--tokenizer', 'bytes', '--max_length', '5') == 0
    _, docs = load(tmp_path)
    assert docs == [(b('abcde'), [0, 1, 1, 1, 1]), (b('fg') + [EOT], [0, 1, 1])]

def test_train_on_prompt(tmp_path):
    rec = {'question': 'Q', 'answer': 'A'}
    assert run(tmp_path, [write_jsonl(tmp_path / 'in.jsonl', [rec])], '--tokenizer', 'bytes', '--train_on_prompt') == 0
    _, [(ids, mask)] = load(tmp_path)
    assert ids == b('User: Q\n\nAssistant: A') + [EOT] + b('\n') and mask == [0] + [1] * (len(ids) - 1)

def test_force_format(tmp_path):
    rec = {'question': 'Q', 'answer': 'A', 'text': 'T'}
    assert run(tmp_path, [write_jsonl(tmp_path / 'in.jsonl', [rec])], '--tokenizer', 'bytes', '--format', 'text') == 0
    assert load(tmp_path)[1] == [(b('T') + [EOT], [0, 1])]

def test_chat_template_mask(tmp_path, smol_tok, smol_gguf):
    """SmolLM2's ChatML template: replies and their <|im_end|> supervised, headers, prompt and the newline not."""
    rec = {'messages': [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'},
                        {'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'See you'}]}
    assert run(tmp_path, [write_jsonl(tmp_path / 'in.jsonl', [rec])], '--tokenizer', smol_gguf) == 0
    meta, [(ids, mask)] = load(tmp_path)
    enc = lambda s: smol_tok(s, add_special_tokens=False)['input_ids']
    system = '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
    pieces = [(enc(system + '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n'), 0),
              (enc('Hello!') + [2], 1), (enc('\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n'), 0),
              (enc('See you') + [2], 1), (enc('\n'), 0)]
    assert ids == [t for p, _ in pieces for t in p]
    assert mask == [m for p, m in pieces for _ in p]
    assert meta['chat_template'] == 'tokenizer' and meta['eos_id'] == 2 and meta['vocab_size'] == 49152
    assert smol_tok.decode(ids).endswith('<|im_end|>\n')  # no empty generation prompt appended

def test_uint32_for_large_vocab(tmp_path, monkeypatch):
    monkeypatch.setattr(P, 'vocab_size', lambda tok: 70000)
    assert run(tmp_path, [write_jsonl(tmp_path / 'in.jsonl', [{'text': 'hi'}])], '--tokenizer', 'bytes') == 0
    meta, docs = load(tmp_path)
    assert meta['dtype'] == 'uint32' and docs == [(b('hi') + [EOT], [0, 1, 1])]
    assert os.path.getsize(tmp_path / 'data' / 'x' / 'train.bin') == 4 * 3

def test_meta_and_skips(tmp_path, bytes_tok):
    recs = [{'text': 'hello'}, {'foo': 1}, {'messages': []}, {'messages': [{'role': 'user', 'content': 'x'}]},
            {'conversations': [{'from': 'alien', 'value': 'x'}]}, {'question': 'q', 'answer': 'a'}, [1, 2]]
    path = write_jsonl(tmp_path / 'in.jsonl', recs)
    assert P.main([path, '--out_root', str(tmp_path / 'data'), '--name', 'x', '--tokenizer', 'bytes',
                   '--val_fraction', '0.5', '--seed', '3']) == 0
    meta = json.load(open(tmp_path / 'data' / 'x' / 'meta.json'))
    assert meta['records_read'] == 7 and meta['records_used'] == 2
    assert meta['records_skipped'] == {'unknown_shape': 3, 'empty': 1, 'no_assistant_turn': 1}
    assert meta['splits']['train']['documents'] == 1 and meta['splits']['val']['documents'] == 1
    tokens = sum(s['tokens'] for s in meta['splits'].values())
    assert tokens == len(b('hello')) + 1 + len(b('User: q\n\nAssistant: a')) + 2
    assert meta['vocab_fingerprint'] == models.vocab_fingerprint(bytes_tok) and meta['vocab_size'] == 259
    assert meta['eos_id'] == EOT and meta['tokenizer'] == 'bytes' and '--seed 3' in meta['command']

def test_max_examples_and_seed(tmp_path):
    path = write_jsonl(tmp_path / 'in.jsonl', [{'text': f'record {i}'} for i in range(50)])
    run(tmp_path, [path], '--tokenizer', 'bytes', '--max_examples', '10', '--seed', '1')
    first = load(tmp_path)[1]
    run(tmp_path, [path], '--tokenizer', 'bytes', '--max_examples', '10', '--seed', '1')
    assert len(first) == 10 and load(tmp_path)[1] == first
    run(tmp_path, [path], '--tokenizer', 'bytes', '--max_examples', '10', '--seed', '2')
    assert load(tmp_path)[1] != first

def test_multiprocess_equals_single(tmp_path):
    recs = [{'conversations': [{'from': 'human', 'value': f'q{i}'}, {'from': 'gpt', 'value': f'answer {i}'}]} for i in range(2500)]
    path = write_jsonl(tmp_path / 'in.jsonl', recs)
    run(tmp_path, [path], '--tokenizer', 'bytes', '--num_proc', '1')
    single = load(tmp_path)[1]
    run(tmp_path, [path], '--tokenizer', 'bytes', '--num_proc', '2')
    assert load(tmp_path)[1] == single and len(single) == 2500

def test_json_array_input(tmp_path):
    path = tmp_path / 'in.json'
    path.write_text(json.dumps([{'text': 'a'}, {'text': 'b'}]))
    assert run(tmp_path, [str(path)], '--tokenizer', 'bytes') == 0
    assert [d[0] for d in load(tmp_path)[1]] == [b('a') + [EOT], b('b') + [EOT]]

def test_malformed_json_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / 'bad.jsonl', [{'text': 'ok'}, '{"text": "broken"', {'text': 'ok'}])
    assert run(tmp_path, [path], '--tokenizer', 'bytes') == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {path}:2: malformed JSON') and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / 'data')

def test_everything_skipped_is_an_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / 'in.jsonl', [{'foo': 1}, {'messages': [{'role': 'user', 'content': 'x'}]}])
    assert run(tmp_path, [path], '--tokenizer', 'bytes') == 1
    assert 'every one of the 2 records was skipped' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'data' / 'x')

def test_missing_datasets_library(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)
    assert P.main(['--dataset', 'org/name', '--tokenizer', 'bytes', '--out_root', str(tmp_path)]) == 1
    assert 'pip install datasets' in capsys.readouterr().err

def test_interrupted_run_leaves_nothing_complete(tmp_path):
    """Kill prepare_data.py mid-tokenization: no data/<name>/ appears; an earlier complete output survives."""
    path = write_jsonl(tmp_path / 'in.jsonl', [{'text': 'word ' * 200}] * 40000)
    out = tmp_path / 'data'
    cmd = [sys.executable, os.path.join(ROOT, 'prepare_data.py'), path, '--tokenizer', 'bytes', '--out_root', str(out),
           '--name', 'x', '--num_proc', '1']
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    assert proc.poll() is None, 'finished too fast to interrupt'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out / 'x')

def test_atomic_replace_keeps_old_output_until_done(tmp_path):
    path = write_jsonl(tmp_path / 'in.jsonl', [{'text': 'old'}])
    run(tmp_path, [path], '--tokenizer', 'bytes')
    write_jsonl(tmp_path / 'in.jsonl', [{'text': 'new'}])
    run(tmp_path, [path], '--tokenizer', 'bytes')
    assert load(tmp_path)[1] == [(b('new') + [EOT], [0, 1, 1, 1])]
    assert sorted(os.listdir(tmp_path / 'data')) == ['x']

def test_demo_dataset(tmp_path, smol_tok):
    assert P.main(['--demo', '--out_root', str(tmp_path / 'data')]) == 0
    folder = tmp_path / 'data' / 'demo'
    meta = json.load(open(folder / 'meta.json'))
    assert meta['vocab_fingerprint'] == models.vocab_fingerprint(smol_tok) and meta['records_skipped'] == {'unknown_shape': 1}  # a chat stored as a string
    assert meta['splits']['val']['documents'] > 0 and meta['splits']['train']['supervised_tokens'] > 1_000_000
    ids = np.fromfile(folder / 'train.bin', dtype=np.uint16)
    mask = np.fromfile(folder / 'train_mask.bin', dtype=np.uint8)
    idx = np.fromfile(folder / 'train_idx.bin', dtype=np.int64)
    assert idx[-1] == len(ids) == len(mask) and (mask[idx[:-1]] == 0).all()
    chats = [(ids[a:c], mask[a:c]) for a, c in zip(idx[:-1], idx[1:]) if ids[a] == 1]  # starts with <|im_start|>
    assert chats and all(m[-1] == 0 and t[-2] == 2 and m[-2] == 1 for t, m in chats)  # ... reply<|im_end|>\n

def test_fortunes(tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'fortunes'
    folder.mkdir()
    (folder / 'science').write_text('E = mc^2\n\t-- Einstein\n%\n' + 'x' * 30 + '\n%\nshort\n%\n')
    (folder / 'science.dat').write_bytes(b'\0\1')  # fortune's index: not text
    (folder / 'ascii-art').write_text('/\\_/\\\n%\n')  # pictures: left out
    records = P.fortune_records(str(folder), chars=40)
    assert records == [{'text': 'E = mc^2\n\t-- Einstein', 'source': 'fortunes'},  # joined up to ~chars, then a new one
                       {'text': 'x' * 30 + '\n\nshort', 'source': 'fortunes'}]
    monkeypatch.setattr(P, 'demo_records', lambda: [{'text': 'a scene ' * 50}] * 20)
    monkeypatch.setattr(P, 'FORTUNES', str(folder))
    assert P.main(['--fortunes', '--tokenizer', 'bytes', '--out_root', str(tmp_path / 'data')]) == 0
    meta = json.load(open(tmp_path / 'data' / 'demo-fortunes' / 'meta.json'))
    assert meta['records_read'] == 20 + 1 and meta['records_used'] == 21  # the demo's records + the fortunes' (chars=2000: one)
    monkeypatch.setattr(P, 'FORTUNES', str(tmp_path / 'none'))
    assert P.main(['--fortunes', '--out_root', str(tmp_path / 'data2')]) == 1
    assert "has none: apt-get install fortunes" in capsys.readouterr().err and not (tmp_path / 'data2').exists()

@pytest.mark.parametrize('option,message', [
    (('--val_fraction', '1.5'), '--val_fraction must be in [0, 1), got 1.5'),
    (('--max_examples', '-3'), '--max_examples must be >= 1, got -3'),
    (('--max_length', '-1'), '--max_length must be >= 0 (0: no limit), got -1'),
    (('--num_proc', '0'), '--num_proc must be >= 1, got 0'),
    (('--fortunes',), '--demo, --demo_chat and --fortunes prepare the packaged data: drop them, or the input files and --dataset'),
])
def test_out_of_range_options(tmp_path, capsys, option, message):
    path = write_jsonl(tmp_path / 'in.jsonl', [{'text': 'a'}, {'text': 'b'}])
    assert run(tmp_path, [path], '--tokenizer', 'bytes', *option) == 1
    assert capsys.readouterr().err.strip() == f'error: {message}'
    assert not os.path.exists(tmp_path / 'data')

def test_gguf_conversion_cache_is_keyed_by_content(tmp_path):
    """Two copies of one file (another clone, another venv) share a conversion; a changed byte does not."""
    data = os.urandom(3 * 2 ** 20)
    paths = [tmp_path / d / 'm.gguf' for d in ('a', 'b', 'c', 'd')]
    for p, content in zip(paths, (data, data, data[:-1] + bytes([data[-1] ^ 1]), data[:2 ** 20] + bytes([data[2 ** 20] ^ 1]) + data[2 ** 20 + 1:])):
        p.parent.mkdir()
        p.write_bytes(content)
    a, b, changed_end, changed_middle = map(models.cache_dir, map(str, paths))
    assert a == b != changed_end
    assert changed_middle == a  # (the middle is not read: size, first and last MiB)
