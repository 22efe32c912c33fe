"""eval.py: lm-eval conventions, batched scoring against a one-at-a-time float64 reference, held-out metrics."""
import gzip, json, math, os, subprocess, sys
import pytest, torch
import torch.nn.functional as F
from conftest import BYTES_VOCAB, ROOT, save_tiny_model, tiny_model, write_jsonl
import eval as ev
import prepare_data
from kd import benchmarks, configurator, models

def test_encode_pair_conventions(bytes_tok, smol_tok):
    # trailing spaces of the context move to the continuation
    ctx, cont = benchmarks.encode_pair(bytes_tok, 'Answer: ', 'yes')
    assert bytes(ctx) == b'Answer:' and bytes(cont) == b' yes'
    # an empty context becomes the BOS token, or end-of-text where there is none (lm-eval >= 0.4)
    assert benchmarks.encode_pair(bytes_tok, '', 'hi') == ([256], list(b'hi'))
    assert benchmarks.encode_pair(smol_tok, '', 'hi')[0] == [smol_tok.bos_token_id] != [smol_tok.eos_token_id]
    # tokenized together: the continuation is what follows the context's own tokens
    ctx, cont = benchmarks.encode_pair(smol_tok, 'Question: 2+2=?\nAnswer:', ' four')
    whole = smol_tok('Question: 2+2=?\nAnswer: four', add_special_tokens=False)['input_ids']
    assert ctx + cont == whole and ctx == smol_tok('Question: 2+2=?\nAnswer:', add_special_tokens=False)['input_ids']
    assert smol_tok.decode(cont) == ' four'

def reference_ll(model, ctx, cont):
    """One request alone, float64 log-softmax."""
    X = torch.tensor([ctx + cont[:-1]])
    logp = F.log_softmax(model(input_ids=X).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))

def test_batched_loglikelihoods_match_one_at_a_time(bytes_tok):
    model = tiny_model(hidden=32, layers=2).eval()
    requests = [('Question: what?\nAnswer:', ' a cat'), ('Q:', ' no'), ('', 'start'), ('Long context ' * 5, ' end.'),
                ('Answer: ', 'yes'), ('Yes or no?', ' y'), ('Yes or no?', ' n')]  # (the last two: one input, ' ')
    got = benchmarks.loglikelihoods(model, bytes_tok, requests, batch_size=3, device='cpu', max_length=512)
    for (c, x), (ll, greedy) in zip(requests, got):
        ctx, cont = benchmarks.encode_pair(bytes_tok, c, x)
        assert ll == pytest.approx(reference_ll(model, ctx, cont), rel=1e-5)
        assert isinstance(greedy, bool)
    class Plain(torch.nn.Module):  # a model whose forward has no logits_to_keep (remote code): the head on every position
        def __init__(self, m):
            super().__init__()
            self.m = m
        def forward(self, input_ids):
            return self.m(input_ids=input_ids)
    rows = []
    model.register_forward_pre_hook(lambda m, a, kw: rows.append(len(kw['input_ids'])), with_kwargs=True)
    plain = benchmarks.loglikelihoods(Plain(model), bytes_tok, requests, batch_size=3, device='cpu', max_length=512)
    assert sum(rows) == len(requests) - 1  # the shared input ran once
    assert [ll for ll, _ in plain] == pytest.approx([ll for ll, _ in got], rel=1e-5) and [g for _, g in plain] == [g for _, g in got]
    # left truncation to the model's length, as lm-eval does: only the last max_length + 1 tokens count
    (ll, _), = benchmarks.loglikelihoods(model, bytes_tok, [('x' * 40, ' yz')], 1, 'cpu', max_length=10)
    ctx, cont = benchmarks.encode_pair(bytes_tok, 'x' * 40, ' yz')
    assert ll == pytest.approx(reference_ll(model, ctx[-8:], cont), rel=1e-5)

def test_acc_and_acc_norm(bytes_tok, monkeypatch):
    docs = [{'requests': [('q', ' a'), ('q', ' bbbb')], 'choices': ['a', 'bbbb'], 'gold': 1},
            {'requests': [('q', ' a'), ('q', ' bbbb')], 'choices': ['a', 'bbbb'], 'gold': 0}]
    # log-likelihoods -2 ('a', 1 char) and -3 ('bbbb', 4 chars): acc picks 'a', acc_norm picks 'bbbb' (-0.75 > -2)
    monkeypatch.setattr(benchmarks, 'loglikelihoods', lambda *a, **k: [(-2.0, False), (-3.0, False)] * 2)
    assert benchmarks.multiple_choice(None, bytes_tok, docs, 4, 'cpu', 512) == {'acc': 0.5, 'acc_norm': 0.5, 'documents': 2, 'correct_norm': '10'}
    docs[1]['gold'] = 1
    assert benchmarks.multiple_choice(None, bytes_tok, docs, 4, 'cpu', 512) == {'acc': 0.0, 'acc_norm': 1.0, 'documents': 2, 'correct_norm': '11'}

def test_request_file_and_plain_jsonl(tmp_path):
    lines = [{'request_type': 'loglikelihood', 'doc_id': d, 'label': 1, 'doc': {'query': 'Q', 'choices': ['x', 'y'], 'gold': 1},
              'request': {'context': f'Q{d}', 'continuation': c}} for d in (0, 1) for c in (' x', ' y')]
    lines.append({'request_type': 'loglikelihood', 'doc_id': 1_000_000, 'label': 1, 'doc': {},
                  'request': {'context': 'Answer:', 'continuation': ' x'}})  # unconditional: skipped
    path = tmp_path / 'r.jsonl.gz'
    with gzip.open(path, 'wt') as f:
        f.write('\n'.join(json.dumps(l) for l in lines))
    docs = benchmarks.load_documents(str(path))
    assert len(docs) == 2 and docs[1] == {'requests': [('Q1', ' x'), ('Q1', ' y')], 'choices': ['x', 'y'], 'gold': 1}
    plain = write_jsonl(tmp_path / 'p.jsonl', [{'query': f'Q{i}:', 'choices': ['no', 'yes'], 'gold': i % 2} for i in range(3)])
    docs = benchmarks.load_documents(plain, num_fewshot=2)
    assert docs[0]['requests'][1] == ('Q1: yes\n\nQ2: no\n\nQ0:', ' yes') and docs[0]['gold'] == 0

@pytest.mark.parametrize('content,message', [
    ('{"text": "hello"}\n', ':1: unknown document shape'),
    ('{"query": "q", "choices": ["a"], "gold": 0}\n{"query": \n', ':2: malformed JSON'),
    ('\n', ': no documents'),
])
def test_bad_documents(tmp_path, content, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text(content)
    with pytest.raises(configurator.DataError, match=message):
        benchmarks.load_documents(str(path))

def test_packaged_arc_easy_documents():
    docs = benchmarks.load_documents(benchmarks.task_path('arc_easy'))
    assert len(docs) == 570 and all(len(d['requests']) == len(d['choices']) for d in docs)
    assert docs[0]['requests'][0] == ('Question: Which technology was developed most recently?\nAnswer:', ' cellular telephone')
    assert len(benchmarks.load_documents(benchmarks.task_path('arc_easy:5'))) == 570

@pytest.fixture(scope='module')
def evalwork(tmp_path_factory):
    d = tmp_path_factory.mktemp('eval')
    write_jsonl(d / 'in.jsonl', [{'question': f'what is {i}?', 'answer': f'{i} it is'} for i in range(40)])
    assert prepare_data.main([str(d / 'in.jsonl'), '--tokenizer', 'bytes', '--out_root', str(d / 'data'), '--name', 'e',
                              '--val_fraction', '0.25']) == 0
    save_tiny_model(d / 'model', hidden=32, layers=2)
    save_tiny_model(d / 'other', hidden=16, layers=1, heads=2, seed=5)
    return d

def test_heldout_loss_and_teacher_agreement(evalwork):
    model = tiny_model(hidden=32, layers=2).eval()  # the same weights as evalwork/model
    other = tiny_model(hidden=16, layers=1, heads=2, seed=5).eval()
    data = str(evalwork / 'data' / 'e')
    got = ev.heldout(model, data, batch_size=3, block_size=512, device='cpu', teacher=other)
    # brute force, one document at a time, float64, supervised targets only
    from kd.data import load_split
    split = load_split(data, 'val')
    ce = kl = agree = n = 0.0
    for d in range(len(split['idx']) - 1):
        tokens = split['tokens'][split['idx'][d]:split['idx'][d + 1]].astype('int64')
        mask = split['mask'][split['idx'][d]:split['idx'][d + 1]]
        X = torch.tensor(tokens[:-1])[None]
        ls, lt = (F.log_softmax(m(input_ids=X).logits[0].double()[:, :BYTES_VOCAB], -1) for m in (model, other))
        lfull = F.log_softmax(model(input_ids=X).logits[0].double(), -1)
        for i in range(len(tokens) - 1):
            if mask[i + 1]:
                ce -= lfull[i, tokens[i + 1]].item()
                kl += (lt[i].exp() * (lt[i] - ls[i])).sum().item()
                agree += ls[i].argmax().item() == lt[i].argmax().item()
                n += 1
    assert got['val_tokens'] == n and got['val_loss'] == pytest.approx(ce / n, rel=1e-5)
    assert got['val_ppl'] == pytest.approx(math.exp(ce / n), rel=1e-5)
    assert got['kl_to_teacher'] == pytest.approx(kl / n, rel=1e-4) and got['top1_agreement'] == pytest.approx(agree / n)
    same = ev.heldout(model, data, 3, 512, 'cpu', teacher=model)
    assert abs(same['kl_to_teacher']) < 1e-6 and same['top1_agreement'] == 1.0

def test_cli_table_json_and_errors(evalwork, tmp_path):
    plain = write_jsonl(tmp_path / 'mc.jsonl', [{'query': f'Is {i} even?', 'choices': ['no', 'yes'], 'gold': int(i % 2 == 0)} for i in range(6)])
    out = tmp_path / 'res.json'
    cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), str(evalwork / 'model'), str(evalwork / 'other'), '--tokenizer=bytes',
           f'--teacher={evalwork / "model"}', f'--data={evalwork / "data" / "e"}', f'--tasks={plain}', '--prompts', 'Hi',
           '--max_new_tokens=4', f'--output={out}']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.load(open(out))
    rows = res['results']
    assert set(rows) == {str(evalwork / 'model'), str(evalwork / 'other')}
    assert rows[str(evalwork / 'model')]['top1_agreement'] == 1.0 and rows[str(evalwork / 'other')]['top1_agreement'] < 1.0
    assert res['settings']['tasks'] == plain and f'{plain}/acc_norm' in rows[str(evalwork / 'other')]
    assert 'top1_agreement' in proc.stdout.splitlines()[1] and len(rows[str(evalwork / 'model')]['samples']['Hi']) > 0
    assert f"dtype: {res['settings']['dtype_used']} (" in proc.stdout  # 'auto', resolved as distill.py does, and said
    # a model without a tokenizer, without --tokenizer: one clear line
    proc = subprocess.run(cmd[:3] + [f'--tasks={plain}', f'--output={tmp_path / "x.json"}'], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: model '{evalwork / 'model'}' has no tokenizer: pass --tokenizer")
    assert not os.path.exists(tmp_path / 'x.json')

def test_a_teacher_of_another_tokenizer_is_refused(evalwork, smol_tok, tmp_path, capsys):
    """--tokenizer stands in for models that ship none; a teacher that ships another tokenizer than the data's is
    refused before anything is scored (it was scored: KL and agreement over mismatched token ids)."""
    save_tiny_model(tmp_path / 'smol', vocab=49152, hidden=16, layers=1, heads=2)
    smol_tok.save_pretrained(tmp_path / 'smol')
    capsys.readouterr()
    out = tmp_path / 'r.json'
    assert ev.main([str(evalwork / 'model'), f'--teacher={tmp_path / "smol"}', '--tokenizer=bytes',
                    f'--data={evalwork / "data" / "e"}', f'--output={out}']) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: the tokenizer of '{tmp_path / 'smol'}' differs from the one")
    assert not out.exists()

@pytest.mark.parametrize('option,message', [('--batch_size=0', '--batch_size must be >= 1, got 0'),
                                            ('--limit=-1', '--limit must be >= 1, got -1'),
                                            ('--num_fewshot=-2', '--num_fewshot must be >= 0, got -2')])
def test_out_of_range_options(tmp_path, capsys, option, message):
    assert ev.main(['no-such-model', option, f'--output={tmp_path / "r.json"}']) == 1
    assert capsys.readouterr().err.strip() == f'error: {message}'
    assert not os.path.exists(tmp_path / 'r.json')

@pytest.mark.parametrize('which', ['bytes', 'smol'])
def test_token_bytes_add_up_to_the_text(which, bytes_tok, smol_tok):
    """Each token's byte length (models.token_bytes) summed over any text's tokens is the text's UTF-8 length
    (multi-byte characters split across tokens, runs of spaces and newlines, non-Latin scripts); special tokens 0."""
    tok = bytes_tok if which == 'bytes' else smol_tok
    nbytes = models.token_bytes(tok, models.vocab_size(tok) + 3)
    assert nbytes[-3:].tolist() == [0, 0, 0] and all(nbytes[i] == 0 for i in models.special_ids(tok))
    for text in ['Hello, world!', 'def f(x):\n    return x  # é\n\n\n', 'naïve café — 東京 🙂🙂', '  a\tb\r\nc  ']:
        ids = models.encode(tok, text)[0]
        assert nbytes[ids].sum() == len(text.encode()), text

def test_bits_per_byte_is_ce_over_the_texts_bytes(evalwork, bytes_tok):
    """val_bpb = the supervised targets' CE in bits / the bytes of text they stand for (brute force: every byte
    token stands for one byte, the end-of-text token for none)."""
    model = tiny_model(hidden=32, layers=2).eval()
    data = str(evalwork / 'data' / 'e')
    got = ev.heldout(model, data, 3, 512, 'cpu', tok=bytes_tok)
    from kd.data import load_split
    split = load_split(data, 'val')
    ce = size = 0.0
    for d in range(len(split['idx']) - 1):
        tokens = split['tokens'][split['idx'][d]:split['idx'][d + 1]].astype('int64')
        mask = split['mask'][split['idx'][d]:split['idx'][d + 1]]
        logp = F.log_softmax(model(input_ids=torch.tensor(tokens[:-1])[None]).logits[0].double(), -1)
        for i in range(len(tokens) - 1):
            if mask[i + 1]:
                ce -= logp[i, tokens[i + 1]].item()
                size += tokens[i + 1] < 256
    assert 0 < size < got['val_tokens'] and got['val_bytes'] == size
    assert got['val_bpb'] == pytest.approx(ce / math.log(2) / size, rel=1e-5)
