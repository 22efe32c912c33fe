"""Silent wrong answers a review found: each case is now right or refused, and each test fails on the code before."""
import json, os, subprocess, sys
import numpy as np
import pytest, torch
import transformers as T
from conftest import ROOT, tiny_model
from kd import data, models

def granite(scaling=8.0):
    torch.manual_seed(0)
    return T.GraniteForCausalLM(T.GraniteConfig(vocab_size=280, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4, logits_scaling=scaling))

def test_plain_head_is_checked_on_a_probe():
    """Granite divides its logits by logits_scaling: the chunked path (h @ W.T) would train on 8x the logits."""
    probe = torch.arange(1, 17)[None]
    assert not models.plain_head(granite(8.0), probe)
    assert models.plain_head(granite(1.0), probe)
    assert models.plain_head(tiny_model(), probe) and models.plain_head(tiny_model(arch='gpt2'), probe)
    model = tiny_model()
    model.model.norm.register_forward_hook(lambda m, i, o: o)  # a hook that changes nothing: still plain
    assert models.plain_head(model, probe)
    scaled, forward = tiny_model(), None  # a multiplier applied in the causal-LM forward (Falcon-H1's lm_head_multiplier)
    forward = scaled.forward
    def multiplied(**kw):
        out = forward(**kw)
        out.logits = out.logits * 0.9
        return out
    scaled.forward = multiplied
    assert not models.plain_head(scaled, probe)

def test_rope_buffers_stay_fp32_in_a_bf16_teacher():
    """Far-position logits of a bf16 teacher stay close to fp32's only when inv_freq is not cast with the weights."""
    cfg = T.LlamaConfig(vocab_size=280, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    ref = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharp attention, so that positions matter
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(16)
            layer.self_attn.k_proj.weight.mul_(16)
    X = torch.randint(0, 280, (1, 2048))
    with torch.no_grad():
        z = ref(input_ids=X).logits[0, 1024:].float()
        kept = models.cast_parameters(T.LlamaForCausalLM(cfg).eval(), torch.bfloat16)
        kept.load_state_dict(ref.state_dict())
        cast = T.LlamaForCausalLM(cfg).eval().to(torch.bfloat16)  # what distill.py did: inv_freq in bf16 too
        cast.load_state_dict(ref.state_dict())
        assert kept.model.rotary_emb.inv_freq.dtype == torch.float32 and cast.model.rotary_emb.inv_freq.dtype == torch.bfloat16
        err_kept = (kept(input_ids=X).logits[0, 1024:].float() - z).abs().mean()
        err_cast = (cast(input_ids=X).logits[0, 1024:].float() - z).abs().mean()
    assert err_kept < 0.3 * err_cast, (err_kept, err_cast)  # measured 0.0037 vs 0.028

def test_windows_cover_every_target_once(tmp_path):
    """Documents longer than block_size are read in windows: every supervised target exactly once, none across
    a document boundary, windows without a target skipped."""
    import prepare_data as P
    from conftest import write_jsonl
    recs = [{'text': 'x'}, {'text': 'a' * 9}, {'text': 'b' * 10}, {'question': 'q' * 30, 'answer': 'yes'}]
    assert P.main([write_jsonl(tmp_path / 'in.jsonl', recs), '--tokenizer=bytes', f'--out_root={tmp_path}', '--name=w',
                   '--val_fraction=0', '--max_length=0']) == 0
    split = data.load_split(str(tmp_path / 'w'), 'train')
    lengths = {int(n) for n in split['idx'][1:] - split['idx'][:-1]}
    assert lengths == {2, 10, 11, 54}  # text + eot; the chat in the fallback template (only "yes" + eot supervised)
    windows = data.block_windows(split, 4)
    X, Y, M = data.make_batch(split, windows, 4, 0, 'cpu')[:3]
    assert X.shape[1] == 4 and M.sum().item() == int(split['mask'].sum())  # every target once
    tokens = np.asarray(split['tokens'], dtype=np.int64)
    for (d, s), x, y, m in zip(windows, X, Y, M):
        a, b = split['idx'][d] + s, split['idx'][d + 1]
        n = min(4, b - a - 1)
        assert x[:n].tolist() == tokens[a:a + n].tolist() and y[:n].tolist() == tokens[a + 1:a + 1 + n].tolist()
        assert m[n:].sum() == 0 and m.sum() > 0
    chat = [s for d, s in windows if split['idx'][d + 1] - split['idx'][d] == 54]
    assert len(chat) <= 2  # of its 14 windows, those holding only prompt are skipped
    # the held-out loss counts every supervised token, whatever the block size
    model = tiny_model().eval()
    assert P.main([write_jsonl(tmp_path / 'in.jsonl', recs), '--tokenizer=bytes', f'--out_root={tmp_path}', '--name=v',
                   '--val_fraction=0.5', '--max_length=0', '--seed=3']) == 0
    import eval as ev
    short, whole = (ev.heldout(model, str(tmp_path / 'v'), 2, block, 'cpu') for block in (4, 512))
    assert short['val_tokens'] == whole['val_tokens'] == int(data.load_split(str(tmp_path / 'v'), 'val')['mask'].sum())

@pytest.mark.parametrize('reply', ['a', 'is', 'assistant', 'im_start', ' Paris.'])
def test_short_replies_are_found_after_their_header(smol_tok, reply):
    """A reply is looked for after its own role header: 'a' is not the 'a' of '<|im_start|>assistant'."""
    import prepare_data as P
    msgs = [{'role': 'user', 'content': 'What is a?'}, {'role': 'assistant', 'content': reply}]
    ids, mask, text, _, _ = P.chat_to_ids(smol_tok, msgs, False)
    assert smol_tok.decode([i for i, m in zip(ids, mask) if m]) == reply + '<|im_end|>'

def supervised_text(tok, folder):
    ids = np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16)
    mask = np.fromfile(os.path.join(folder, 'train_mask.bin'), dtype=np.uint8)
    return tok.decode(ids[mask == 1].tolist()), tok.decode(ids.tolist())

TOOL_RECORDS = [
    {'conversations': [{'from': 'human', 'value': 'Weather in Paris?'},
                       {'from': 'function_call', 'value': '{"name": "weather", "arguments": {"city": "Paris"}}'},
                       {'from': 'observation', 'value': '{"sky": "sunny"}'}, {'from': 'gpt', 'value': 'Sunny.'}]},
    {'messages': [{'role': 'user', 'content': 'Time?'},
                  {'role': 'assistant', 'content': None, 'tool_calls': [{'function': {'name': 'clock', 'arguments': '{}'}}]},
                  {'role': 'tool', 'content': '12:00'}, {'role': 'assistant', 'content': 'Noon.'}]},
]

def test_tool_turns_are_kept_and_only_the_model_is_supervised(tmp_path, smol_gguf, smol_tok, bytes_tok):
    import prepare_data as P
    from conftest import write_jsonl
    src = write_jsonl(tmp_path / 'tools.jsonl', TOOL_RECORDS)
    for name, spec, tok, end in (('smol', smol_gguf, smol_tok, '<|im_end|>'), ('bytes', 'bytes', bytes_tok, '<|endoftext|>')):
        assert P.main([src, f'--tokenizer={spec}', f'--out_root={tmp_path}', f'--name={name}', '--val_fraction=0']) == 0
        meta = json.load(open(tmp_path / name / 'meta.json'))
        assert meta['records_used'] == 2 and meta['records_skipped'] == {}
        supervised, whole = supervised_text(tok, tmp_path / name)
        for piece in ('"city": "Paris"', 'Sunny.', '"name": "clock"', 'Noon.'):  # the model's own turns
            assert piece in supervised
        for piece in ('sunny"}', '12:00', 'Weather in Paris?'):  # tool output and prompts: read, never trained on
            assert piece in whole and piece not in supervised
        assert supervised.count(end) == 4
    assert 'Tool: 12:00' in supervised_text(bytes_tok, tmp_path / 'bytes')[1]  # the fallback's header

def test_a_template_error_skips_one_record(tmp_path, smol_tok):
    """A template that refuses a record ('roles must alternate', no tool role, ...) skips and counts it."""
    import prepare_data as P
    from conftest import write_jsonl
    folder = tmp_path / 'tok'
    smol_tok.save_pretrained(folder)
    config = json.load(open(folder / 'tokenizer_config.json'))
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    if 'chat_template' in config:
        config['chat_template'] = template
        json.dump(config, open(folder / 'tokenizer_config.json', 'w'))
    if os.path.exists(folder / 'chat_template.jinja'):
        open(folder / 'chat_template.jinja', 'w').write(template)
    assert models.load_tokenizer(str(folder)).chat_template == template
    src = write_jsonl(tmp_path / 'in.jsonl', TOOL_RECORDS + [{'question': 'q?', 'answer': 'a.'}])
    assert P.main([src, f'--tokenizer={folder}', f'--out_root={tmp_path}', '--name=x', '--val_fraction=0']) == 0
    meta = json.load(open(tmp_path / 'x' / 'meta.json'))
    assert meta['records_used'] == 1 and meta['records_skipped'] == {'template_error': 2}

def test_demo_skips_the_conversation_stored_as_a_string():
    import prepare_data as P
    records = P.demo_records()
    chats = [r['messages'] for r in records if 'messages' in r]
    assert sum(isinstance(c, str) for c in chats) == 1  # skipped later as unknown_shape, and counted
    assert not any(isinstance(c, list) and len(c) > 20 and all(len(m['content']) == 1 for m in c) for c in chats)

def gpt2_byte(c):
    """The byte a character of the byte-level BPE alphabet stands for (GPT-2's published table)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return ord(c) if ord(c) in printable else others[ord(c) - 256]

def test_byte_ends_of_a_tokenizer_that_trims_its_offsets(bytes_tok):
    """A byte-level BPE with trim_offsets reports 'ĊĠĠĠ' as ending after the newline; the ends come from the tokens
    themselves, so cross-tokenizer pairs really end at the same byte."""
    from tokenizers import Tokenizer, models as bpe, trainers, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    import prepare_data as P
    backend = Tokenizer(bpe.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["def f(x):\n    return x\n\nclass A:\n    def g(self):\n        return 1\n"] * 50,
                                trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                    special_tokens=['<|endoftext|>'], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token='<|endoftext|>')
    text = "def f(x):\n    return 'é'\n<|endoftext|>"
    ids, starts, ends = models.encode(tok, text)
    pieces = [t.encode() if t == '<|endoftext|>' else bytes(gpt2_byte(c) for c in t) for t in tok.convert_ids_to_tokens(ids)]
    assert 'ĊĠĠĠ' in tok.convert_ids_to_tokens(ids)
    assert ends.tolist() == np.cumsum([len(p) for p in pieces]).tolist() and ends[-1] == len(text.encode())
    assert [text.encode()[:e].decode(errors='ignore')[s:] for s, e in zip(starts, ends)][:3] == ['def', ' f', '(']
    s_ids, _, s_ends = models.encode(bytes_tok, text)
    for i, j in P.align_positions(s_ends, ends):  # equal text before both tokens' ends
        assert bytes_tok.decode_bytes(s_ids[:i + 1]) == b''.join(pieces[:j + 1])

def bos_tokenizer(folder):
    """A small byte-level BPE that, like Llama's, puts <s> before every sequence it encodes."""
    from tokenizers import Tokenizer, models as bpe, trainers, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(bpe.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(['the cat sat on the mat'] * 20, trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=['<s>', '</s>'], show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<s>', eos_token='</s>')
    tok.save_pretrained(folder)
    return str(folder)

def test_bos_follows_each_tokenizers_convention(tmp_path):
    import prepare_data as P
    from conftest import write_jsonl
    src = write_jsonl(tmp_path / 'in.jsonl', [{'text': 'the cat sat'}])
    spec = bos_tokenizer(tmp_path / 'tok')
    assert P.main([src, f'--tokenizer={spec}', f'--out_root={tmp_path}', '--name=b', '--val_fraction=0']) == 0
    meta = json.load(open(tmp_path / 'b' / 'meta.json'))
    ids = np.fromfile(tmp_path / 'b' / 'train.bin', dtype=np.uint16).tolist()
    mask = np.fromfile(tmp_path / 'b' / 'train_mask.bin', dtype=np.uint8).tolist()
    assert meta['bos_id'] == 0 and ids[0] == 0 and ids.count(0) == 1 and mask[:2] == [0, 1]  # 'the' is now a target
    # across tokenizers: a bytes student (no BOS) and this teacher, which gets its own BOS before the same text
    assert P.main([src, '--tokenizer=bytes', f'--teacher_tokenizer={spec}', f'--out_root={tmp_path}', '--name=x',
                   '--val_fraction=0']) == 0
    meta = json.load(open(tmp_path / 'x' / 'meta.json'))
    teacher = np.fromfile(tmp_path / 'x' / 'train_teacher.bin', dtype=np.uint16).tolist()
    student = np.fromfile(tmp_path / 'x' / 'train.bin', dtype=np.uint16).tolist()
    assert meta['bos_id'] is None and meta['teacher_bos_id'] == 0 and teacher[0] == 0 and student[0] == ord('t')

def window_targets(split, windows, B, bos):
    """Check a batch of windows against its documents, brute force: every row at most B positions, a later window
    led by BOS where the dataset has one, each supervised target the document's token with exactly the document's
    tokens before it in the row. Returns {document: [positions of its targets the rows supervise]}."""
    b = data.make_batch(split, windows, B, 1, 'cpu')
    seen = {}
    for i, (d, s) in enumerate(windows.tolist()):
        doc = np.asarray(split['tokens'][split['idx'][d]:split['idx'][d + 1]]).tolist()
        lead = int(s > 0 and bos is not None)
        assert b.X.shape[1] <= B and (b.X[i, 0].item() == bos) == bool(lead)
        for p in b.M[i].nonzero().flatten().tolist():
            j = s + p + 1 - lead  # the document position of this target
            assert b.Y[i, p].item() == doc[j] and b.X[i, lead:p + 1].tolist() == doc[j - (p + 1 - lead):j]
            seen.setdefault(d, []).append(j)
    return seen

def test_later_windows_begin_with_bos(tmp_path, bytes_tok):
    """A tokenizer that puts BOS before every sequence gets it before every window of a long document, not only the
    first (B - 1 new targets a later window); each supervised target is still trained on once, and across tokenizers
    each side's row begins with its own BOS (or none) and the pairs still join equal text."""
    import prepare_data as P
    from conftest import write_jsonl
    src = write_jsonl(tmp_path / 'in.jsonl', [{'instruction': f'cat {i}', 'output': 'the cat sat on the mat ' * (2 + i)}
                                              for i in range(4)])
    spec = bos_tokenizer(tmp_path / 'tok')
    for name, args in (('b', [f'--tokenizer={spec}']), ('xb', ['--tokenizer=bytes', f'--teacher_tokenizer={spec}']),
                       ('bx', [f'--tokenizer={spec}', '--teacher_tokenizer=bytes'])):
        assert P.main([src, *args, f'--out_root={tmp_path}', f'--name={name}', '--val_fraction=0']) == 0
    split = data.load_split(str(tmp_path / 'b'), 'train')
    assert json.load(open(tmp_path / 'b' / 'meta.json'))['bos_id'] == 0
    for B in (4, 7):
        windows = data.block_windows(split, B)
        assert (windows[:, 1] > 0).sum() >= 4
        seen = window_targets(split, windows, B, 0)
        for d in range(len(split['idx']) - 1):
            mask = np.asarray(split['mask'][split['idx'][d]:split['idx'][d + 1]])
            assert sorted(seen[d]) == (np.flatnonzero(mask[1:]) + 1).tolist()  # each target once
    tok = models.load_tokenizer(spec)
    text = lambda t, ids: (bytes_tok.decode_bytes([i for i in ids if i < 256]) if t is bytes_tok else
                           tok.decode([i for i in ids if i != 0]).encode())
    for name, student, teacher in (('xb', bytes_tok, tok), ('bx', tok, bytes_tok)):
        split = data.load_split(str(tmp_path / name), 'train')
        windows = data.block_windows(split, 16)
        later = windows[windows[:, 1] > 0]
        b = data.make_batch(split, later, 16, 1, 'cpu', teacher_pad_id=1)
        assert len(later) >= 4 and len(b.align.b) > 0
        meta = json.load(open(tmp_path / name / 'meta.json'))
        bos, tbos = meta['bos_id'], meta['teacher_bos_id']
        assert all((row[0].item() == 0) == (bos == 0) for row in b.X)
        assert (b.align.XT[:, 0] == 0).any() == (tbos == 0)
        for i, si, ti in zip(*(x.tolist() for x in b.align[1:])):
            s_text, t_text = text(student, b.X[i, :si + 1].tolist()), text(teacher, b.align.XT[i, :ti + 1].tolist())
            assert max(s_text, t_text, key=len).endswith(min(s_text, t_text, key=len)) and s_text and t_text

def test_a_cache_on_a_bos_dataset_reads_bos_led_windows(tmp_path):
    """cache_teacher.py scores the windows training reads (later ones led by BOS); a cache written before they were
    is refused in one line."""
    import prepare_data as P
    from conftest import write_jsonl
    src = write_jsonl(tmp_path / 'in.jsonl', [{'text': 'the cat sat on the mat ' * (2 + i)} for i in range(6)])
    assert P.main([src, f'--tokenizer={bos_tokenizer(tmp_path / "tok")}', f'--out_root={tmp_path}', '--name=b',
                   '--val_fraction=0']) == 0
    tiny_model(vocab=270, hidden=32, layers=2).save_pretrained(tmp_path / 'teacher')  # (the tokenizer's 270)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'cache_teacher.py'), f'--teacher={tmp_path / "teacher"}',
                           f'--dataset={tmp_path / "b"}', '--device=cpu', '--dtype=float32', '--block_size=6', '--k=270',
                           '--samples=0', '--splits=train', '--name=full'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    split, folder = data.load_split(str(tmp_path / 'b'), 'train'), str(tmp_path / 'b' / 'full')
    data.attach_topk(split, 'train', folder, str(tmp_path / 'b'), 6, 1.0)
    windows = data.block_windows(split, 6)
    b = data.make_batch(split, windows, 6, 1, 'cpu')
    assert (b.X[windows[:, 1] > 0, 0] == 0).all() and (windows[:, 1] > 0).sum() >= 6
    keep = b.M.bool()
    with torch.no_grad():
        logp = torch.log_softmax(models.load_model(str(tmp_path / 'teacher'))(input_ids=b.X).logits[keep], -1)
    cached = torch.full_like(logp, -float('inf')).scatter_(-1, b.topk.ids[keep], b.topk.logp[keep])
    assert torch.allclose(cached, logp, atol=2e-3)  # (fp16 values)
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    del meta['bos_windows']
    json.dump(meta, open(os.path.join(folder, 'meta.json'), 'w'))
    with pytest.raises(data.ConfigError, match='written before later windows began with BOS'):
        data.attach_topk(data.load_split(str(tmp_path / 'b'), 'train'), 'train', folder, str(tmp_path / 'b'), 6, 1.0)

def test_a_scaled_head_trains_on_the_plain_path_and_the_checkpoint_says_so(tmp_path):
    """Granite end to end: the run notes the fallback, and the checkpoint records what ran (loss_chunk=0, the
    computed max_iters), not what was asked."""
    import prepare_data as P
    from conftest import write_jsonl
    assert P.main([write_jsonl(tmp_path / 'in.jsonl', [{'text': f'record {i} ' * 5} for i in range(20)]), '--tokenizer=bytes',
                   f'--out_root={tmp_path / "data"}', '--name=g', '--val_fraction=0.1']) == 0
    granite().save_pretrained(tmp_path / 'granite')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'distill.py'), f'--data_root={tmp_path / "data"}', '--dataset=g',
                           f'--student={tmp_path / "granite"}', '--distill=none', f'--out_dir={tmp_path / "out"}', '--device=cpu',
                           '--batch_size=2', '--gradient_accumulation_steps=1', '--block_size=32', '--epochs=0.2',
                           '--eval_interval=1', '--peak_flops=1e12'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: a model's logits are not its final hidden states times its head" in proc.stdout
    config = json.load(open(tmp_path / 'out' / 'ckpt' / 'state.json'))['config']
    assert config['loss_chunk'] == 0 and config['epochs'] == 0.2 and config['max_iters'] > 0  # computed from epochs
    assert f"{config['max_iters']} iterations of 2 x 1 windows" in proc.stdout
