"""A teacher that sees more than the student (prepare_data.py --teacher_context, kd/cross.py's with_context): the
teacher's rows are the context then the student's tokens, paired on the tokens they end with alike."""
import json
import pytest, torch
from conftest import tiny_work
from test_distill import run, train_log
import prepare_data
from kd import data

RECORDS = [{'question': f'what is {i} plus {i}?', 'answer': f'{2 * i}, I think.', 'hint': f'the answer is {2 * i}'}
           for i in range(40)] + [{'text': f'plain text number {i} ' * 3, 'hint': 'a story'} for i in range(10)] + \
          [{'question': f'and {i} times {i}?', 'answer': f'{i * i}.'} for i in range(10)]  # (no hint: the same rows)

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    d = tiny_work(tmp_path_factory.mktemp('context'), RECORDS)
    for name, extra in (('plain', []), ('context', ['--teacher_context=hint'])):
        assert prepare_data.main([str(d / 'in.jsonl'), '--tokenizer', 'bytes', '--out_root', str(d / 'data'),
                                  '--name', name, '--val_fraction', '0.1', *extra]) == 0
    return d

def test_the_teacher_reads_the_context_then_the_same_tokens(work):
    """Every pair (s, t) predicts the same token (XT[t + 1] = Y[s]); every supervised target of a record is paired;
    the teacher's row ends with the student's tokens after its context (a chat record's system message)."""
    meta = json.load(open(work / 'data' / 'context' / 'meta.json'))
    assert meta['teacher_context'] == 'hint' and meta['splits']['train']['aligned_supervised_fraction'] == 1.0
    split = data.load_split(str(work / 'data' / 'context'), 'train')
    windows = data.block_windows(split, 256)
    b = data.make_batch(split, windows[:16], 256, 256, 'cpu', meta['teacher_eos_id'])
    XT, al = b.align.XT, b.align
    inner = al.t < torch.zeros(len(XT), dtype=torch.long).scatter_reduce(0, al.b, al.t, 'amax')[al.b]  # (a row's
    assert inner.sum() > 100 and torch.equal(XT[al.b[inner], al.t[inner] + 1], b.Y[al.b, al.s][inner])  # last: no next)
    assert torch.equal(torch.zeros_like(b.M).index_put_((al.b, al.s), torch.ones_like(al.s)), b.M)  # (all paired)
    text = lambda ids: bytes(int(i) for i in ids if i < 256).decode()
    hinted = [i for i in range(16) if 'the answer is' in text(XT[i]) or 'a story' in text(XT[i])]
    assert hinted and all(text(XT[i]).endswith(text(b.X[i][b.X[i] != 256])) for i in range(16))
    plain = [i for i in range(16) if i not in hinted]
    assert all(torch.equal(XT[i, :b.X.shape[1]][b.M[i].bool()], b.X[i][b.M[i].bool()]) for i in plain)

def test_a_run_with_a_teacher_context(work):
    """Where no record has a context, the run trains as on the plain data, loss for loss; with contexts the teacher's
    divergence differs; what a context cannot serve is refused in one line."""
    common = ('--max_iters=3', '--batch_size=2', '--gradient_accumulation_steps=2', '--eval_interval=3')
    run(work, work / 'out-plain', '--dataset=plain', *common)
    with_hints = run(work, work / 'out-context', '--dataset=context', *common)
    assert "the teacher reads each record's 'hint'" in with_hints.stdout
    empty = [{k: v for k, v in r.items() if k != 'hint'} | {'hint': ''} for r in RECORDS]  # (empty: none)
    (work / 'empty.jsonl').write_text('\n'.join(json.dumps(r) for r in empty) + '\n')
    assert prepare_data.main([str(work / 'empty.jsonl'), '--tokenizer', 'bytes', '--out_root', str(work / 'data'),
                              '--name', 'empty', '--val_fraction', '0.1', '--teacher_context=hint']) == 0
    run(work, work / 'out-empty', '--dataset=empty', *common)
    plain, empty_log = train_log(work / 'out-plain'), train_log(work / 'out-empty')
    assert [r['loss'] for r in plain] == pytest.approx([r['loss'] for r in empty_log], rel=1e-6)
    assert [r['kd'] for r in train_log(work / 'out-context')] != pytest.approx([r['kd'] for r in plain], rel=1e-3)
    bad = run(work, work / 'out-bad', '--dataset=context', '--on_policy=0.5', *common, check=False)
    assert bad.returncode == 2 and "'hint' to read" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

def test_a_served_teacher_reads_the_context_too(work, bytes_tok):
    """The served teacher scores the teacher's rows (context and all) at the positions paired with the student's
    targets: the same losses as the teacher in process read as its top k."""
    import transformers
    from conftest import BYTES_VOCAB
    from stub_server import Stub, model_logprobs
    from kd.models import encode
    teacher = transformers.AutoModelForCausalLM.from_pretrained(work / 'teacher').eval()
    stub = Stub(model_logprobs(teacher, BYTES_VOCAB), lambda text: [int(i) for i in encode(bytes_tok, text)[0]])
    common = ('--dataset=context', '--max_iters=2', '--batch_size=2', '--gradient_accumulation_steps=2',
              '--eval_interval=2', '--temperature=1', '--teacher_topk=8')
    try:
        run(work, work / 'out-served', *common, f'--teacher={stub.url}')
        run(work, work / 'out-local8', *common)
    finally:
        stub.close()
    assert any(b'the answer is' in bytes(i for i in p if i < 256) for p in stub.prompts)
    served, local = train_log(work / 'out-served'), train_log(work / 'out-local8')
    assert [r['loss'] for r in served] == pytest.approx([r['loss'] for r in local], rel=1e-5)

def test_a_conversation_cut_in_its_middle_drops_its_context(tmp_path):
    """--max_length cuts a long conversation in its middle: the teacher's rendering (with its system message) would be
    cut elsewhere, so such a record's teacher reads the student's row (counted), and no pair is wrong."""
    long_chat = {'messages': [{'role': 'user', 'content': 'q ' * 40}, {'role': 'assistant', 'content': 'first done.'},
                              {'role': 'user', 'content': 'again'}, {'role': 'assistant', 'content': 'second done.'}],
                 'hint': 'secret'}
    (tmp_path / 'in.jsonl').write_text('\n'.join(json.dumps(r) for r in [long_chat] * 4 + RECORDS[:4]) + '\n')
    assert prepare_data.main([str(tmp_path / 'in.jsonl'), '--tokenizer', 'bytes', '--out_root', str(tmp_path),
                              '--name', 'cut', '--teacher_context=hint', '--max_length=60', '--val_fraction=0']) == 0
    meta = json.load(open(tmp_path / 'cut' / 'meta.json'))
    assert meta['records_context_dropped'] == 4 and meta['splits']['train']['aligned_supervised_fraction'] == 1.0
    split = data.load_split(str(tmp_path / 'cut'), 'train')
    b = data.make_batch(split, data.block_windows(split, 64)[:8], 64, 256, 'cpu', meta['teacher_eos_id'])
    al = b.align
    inner = al.t < torch.zeros(len(b.X), dtype=torch.long).scatter_reduce(0, al.b, al.t, 'amax')[al.b]
    assert torch.equal(b.align.XT[al.b[inner], al.t[inner] + 1], b.Y[al.b, al.s][inner])

