"""parallel='fsdp' (FSDP2 on CPU with gloo, 2 ranks, tiny models): the same run as DDP and as one process, logit,
hidden-state and mixed losses; resume; the export; two nodes on loopback."""
import os, re, signal, socket, subprocess, sys, time
import pytest, torch
from transformers import AutoModelForCausalLM
from conftest import ROOT
from kd.checkpoint import checkpoint_iter
from test_distill import assert_same_run, command, run, train_log, weights, work  # noqa: F401 (the fixture)

COMMON = ('--batch_size=1', '--gradient_accumulation_steps=4', '--max_iters=3', '--eval_interval=2', '--eval_docs=3')

@pytest.mark.parametrize('mode', [(), ('--distill=hidden',), ('--ce_weight=0.5', '--kd_weight=0.5', '--hidden_weight=1.0', '--loss_chunk=0')],
                         ids=['logits', 'hidden', 'mixed'])
def test_fsdp_equals_ddp_equals_one_process(work, mode):
    name = mode[0].split('=')[0].strip('-') if mode else 'logits'
    one, ddp, fsdp = (work / f'{name}_{x}' for x in ('one', 'ddp', 'fsdp'))
    run(work, one, *COMMON, *mode)
    lines = [run(work, out, *COMMON, *mode, *extra, nproc=2).stdout for out, extra in ((ddp, ()), (fsdp, ('--parallel=fsdp',)))]
    teacher_mb = [float(re.search(r'memory per rank \(estimate\):.*teacher parameters ([\d.]+) MB', x)[1]) for x in lines]
    assert teacher_mb[1] == pytest.approx(teacher_mb[0] / 2, rel=0.02)  # the start-up line: each rank holds half the teacher
    assert_same_run(one, fsdp)
    assert_same_run(ddp, fsdp)
    wa, wb = weights(one), weights(fsdp)  # the gathered checkpoint: every weight, tied ones under both names
    assert set(wa) <= set(wb) and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa)
    val = lambda out: [r['val_ce'] for r in map(__import__('json').loads, open(out / 'log.jsonl')) if 'val_ce' in r]
    assert len(val(one)) == 3 and val(one) == pytest.approx(val(fsdp), rel=1e-6)  # (eval_docs=3: rank 1 has one fewer)
    # the export: a plain HF folder, the same model as the one process's
    x = torch.arange(5, 40)[None]
    a, b = (AutoModelForCausalLM.from_pretrained(out / 'student').eval() for out in (one, fsdp))
    with torch.no_grad():
        assert torch.allclose(a(x).logits, b(x).logits, rtol=0, atol=1e-4)
    # and it can fail: another learning rate is another run
    if not mode:
        run(work, work / 'fsdp_lr', *COMMON, '--parallel=fsdp', '--learning_rate=2e-2', nproc=2)
        assert train_log(work / 'fsdp_lr')[-1]['loss'] != pytest.approx(train_log(fsdp)[-1]['loss'], rel=1e-6)

def test_fsdp_resume_after_a_kill_is_bit_identical(work):
    """Every process of a 2-rank run SIGKILLed once a checkpoint is complete, mid-run; then resumed: the weights
    and the training log are the uninterrupted run's, bit for bit."""
    common = ('--batch_size=1', '--gradient_accumulation_steps=2', '--max_iters=6', '--eval_interval=2', '--parallel=fsdp')
    run(work, work / 'fs_straight', *common, nproc=2)
    log = open(work / 'fs_killed.log', 'w')
    proc = subprocess.Popen(command(work, work / 'fs_split', *common, nproc=2), env=dict(os.environ, OMP_NUM_THREADS='1'),
                            cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # (its own group)
    while proc.poll() is None and checkpoint_iter(work / 'fs_split' / 'ckpt')[0] is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (work / 'fs_split' / 'student').exists()  # (killed before the end)
    run(work, work / 'fs_split', *common, '--init_from=resume', nproc=2)
    ws, wr = weights(work / 'fs_straight'), weights(work / 'fs_split')
    assert all(torch.equal(ws[k], wr[k]) for k in ws)
    assert [r['loss'] for r in train_log(work / 'fs_straight')] == [r['loss'] for r in train_log(work / 'fs_split')]
    out = run(work, work / 'fs_split', *common[:-1], '--max_iters=8', '--init_from=resume', nproc=2, check=False)
    assert out.returncode and "parallel was 'fsdp'" in out.stderr  # (a ddp run cannot take an fsdp checkpoint; torchrun exits 1)

def test_two_nodes_on_loopback_equal_one_node(work):
    """torchrun --nnodes=2 (node_rank 0 and 1, one rank each, rendezvous on 127.0.0.1) == --standalone with 2 ranks."""
    run(work, work / 'node1', *COMMON, '--parallel=fsdp', nproc=2)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    args = [os.path.join(ROOT, 'distill.py'), f'--data_root={work / "data"}', '--dataset=tiny', f'--out_dir={work / "node2"}',
            f'--teacher={work / "teacher"}', f'--student={work / "student"}', '--device=cpu', '--dtype=float32',
            '--block_size=48', '--learning_rate=1e-2', '--warmup_frac=0.0', '--temperature=2.0', '--alpha=0.5',
            '--peak_flops=1e12', *COMMON, '--parallel=fsdp']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    logs = [open(work / f'node{i}.log', 'w+') for i in (0, 1)]  # (files, not pipes: a full pipe would block a node)
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={i}', '--nproc_per_node=1',
                               '--master_addr=127.0.0.1', f'--master_port={port}', *args], env=env, cwd=work,
                              stdout=log, stderr=subprocess.STDOUT, text=True) for i, log in zip((0, 1), logs)]
    for p in nodes:
        p.wait(timeout=300)
    assert all(p.returncode == 0 for p in nodes), [open(log.name).read()[-2000:] for log in logs]
    assert_same_run(work / 'node1', work / 'node2', tol=0)
