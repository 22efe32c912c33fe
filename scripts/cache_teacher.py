"""
Run the teacher once over a prepared dataset and store its next-token distribution at every supervised target,
sparsely: logit distillation then reads it from disk (distill.py teacher_cache=...), with no teacher in memory and
no teacher forward in any epoch or ablation.

    python scripts/cache_teacher.py --teacher=teacher.gguf --dataset=data/demo --block_size=128 --k=16 --samples=32
    torchrun --standalone --nproc_per_node=8 scripts/cache_teacher.py --teacher=... --dataset=...   # each rank its share

Per split (train, val), in <dataset>/<name> (default teacher_k<k>_b<block_size>), one row per supervised target,
in the split's order (document, then position), the teacher reading distill.py's windows of block_size tokens:
    {split}_ids.bin   (rows, k + m) uint16 (int32 above 65,536 tokens): its k most likely next tokens, most likely
                      first, then m = --samples tokens drawn (with replacement) from the others, the tail, in proportion
                      to p^(1/T) at the highest stored T
    {split}_logp.bin  (rows, k + m) float16 (--values=float32: exact): their log-probabilities at T = 1
    {split}_tail.bin  (rows, n_T) float32: for each of --temperatures, log sum over the tail of p^(1/T)
From these distill.py forms, at its temperature T, the teacher's probability of every stored token exactly (the k
tokens are the same at every T), and an unbiased estimate of the divergence's sum over the tail from the drawn tokens
(each weighted by 1 / (m x its chance of being drawn)), so the loss from the cache equals the full one in expectation,
values and gradients. meta.json is written last (the teacher, the data's fingerprint, k, m, the temperatures,
block_size, the files' sizes), then the folder is swapped in whole: a killed run leaves the old cache or none, never
half of one; the next run starts over. The draws are seeded per window: any number of ranks writes the same bytes.
"""
import contextlib, os, sys, time, zlib
import numpy as np
import torch
import torch.distributed as dist
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (the repository's root)
from kd.checkpoint import remove_stale, seal, swap_in
from kd.configurator import ArgumentParser, ConfigError, HelpFormatter, exit_on_error
from kd.data import cache_rows, check_dataset, data_hash, foreign, load_split, make_batch, top_k, window_bos
from kd.machine import choose_dtype, init_distributed
from kd.models import cast_parameters, check_vocabularies, load_model, load_tokenizer, model_tokenizer
from kd.served import ServedTeacher, is_served

def write_split(teacher, split, folder, name, args, rank, world, ctx, device, pad_id, vocab):
    """This rank's share of a split's rows, written into the (pre-sized) files in folder."""
    windows, _, first, counts = cache_rows(split, args.block_size)
    rows = int(counts.sum())
    if not rows:
        return
    share = np.array_split(np.arange(len(windows)), world)[rank]  # a contiguous run of windows: a contiguous run of rows
    width = args.k + args.samples
    out = [np.memmap(os.path.join(folder, f'{name}_{f}.bin'), dtype=dt, mode='r+', shape=shape) for f, dt, shape in
           (('ids', args.ids_dtype, (rows, width)), ('logp', args.values, (rows, width)), ('tail', np.float32, (rows, len(args.temperatures))))]
    g = torch.Generator(device)
    t0 = last = time.time()
    done = tokens = 0
    for a in range(0, len(share), args.batch_size):
        w = share[a:a + args.batch_size]
        b = make_batch(split, windows[w], args.block_size, pad_id, device)
        r0, r = int(first[w[0]]), 0
        if isinstance(teacher, ServedTeacher):  # its top k at T = 1 and the rest's mass, nothing drawn
            t, keep = teacher(b).logits, b.M.bool()
            for array, values in zip(out, (t.ids[keep], t.logp[keep], t.tail[keep][:, None])):
                array[r0:r0 + len(values)] = values.cpu().numpy().astype(array.dtype)
        else:
            with torch.no_grad(), ctx:
                logits = teacher(input_ids=b.X).logits[b.M.bool()][:, :vocab]
            for i in w:  # a window's draws depend on its seed alone
                g.manual_seed(zlib.crc32(f'{args.seed} {name} {i}'.encode()))
                for c in range(r, r + int(counts[i]), 256):  # fp32 log-probabilities, fp64 draws, a slice at a time
                    ids, logp, tail = top_k(logits[c:min(c + 256, r + int(counts[i]))], args.k, args.temperatures,
                                            args.samples, g)
                    for array, values in zip(out, (ids, logp, tail)):
                        array[r0 + c:r0 + c + len(values)] = values.cpu().numpy().astype(array.dtype)
                r += int(counts[i])
        done, tokens = done + len(w), tokens + b.X.numel()
        if rank == 0 and (time.time() - last > 10 or a + args.batch_size >= len(share)):
            last, rate = time.time(), tokens / (time.time() - t0)
            print(f'{name}: {done:,}/{len(share):,} windows of rank 0, {rate:,.0f} tokens/s'
                  + (f', eta {(len(share) - done) * (time.time() - t0) / done:,.0f} s' if done < len(share) else ''), flush=True)
    for array in out:
        array.flush()

def main(argv=None):
    p = ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument('--teacher', required=True, help="HF hub id, local folder or .gguf file (the one distill.py would load), or "
                   "a server's URL, http://HOST:PORT/v1 (kd/served.py: its top k at T = 1, nothing drawn)")
    p.add_argument('--dataset', default='data/demo', help='a folder written by prepare_data.py')
    p.add_argument('--block_size', type=int, default=512, help="distill.py's block_size: the windows the teacher reads")
    p.add_argument('--k', type=int, default=16, help='most likely tokens kept per position')
    p.add_argument('--samples', type=int, default=None, help='tokens drawn from the rest per position (0 only when --k is the vocabulary; default 32, a server: 0)')
    p.add_argument('--seed', type=int, default=0, help="the draws' seed")
    p.add_argument('--temperatures', default=None, help='comma-separated: the distillation temperatures the cache serves (default 1,2; a server: 1)')
    p.add_argument('--values', default='float16', choices=['float16', 'float32'], help='the log-probabilities\' dtype (2 or 4 bytes each)')
    p.add_argument('--batch_size', type=int, default=8, help='windows per teacher forward')
    p.add_argument('--name', help='the cache folder inside the dataset (default teacher_k<k>_b<block_size>)')
    p.add_argument('--splits', default='train,val', help='comma-separated splits to cache')
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'], help="the teacher's compute dtype, chosen as distill.py does")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda, cuda:1, ...')
    args = p.parse_args(argv)
    ddp, rank, _, world, args.device = init_distributed(args.device)
    served = is_served(args.teacher)
    if served and (args.samples or args.temperatures not in (None, '1')):
        raise ConfigError('a served teacher gives its top k at T = 1 alone, nothing to draw the rest from: leave out '
                          '--samples and --temperatures (a cache of it serves temperature=1; the rest is one bucket)')
    args.samples = (0 if served else 32) if args.samples is None else args.samples
    try:
        args.temperatures = [float(t) for t in (args.temperatures or ('1' if served else '1,2')).split(',')]
    except ValueError:
        args.temperatures = [0.0]
    if args.k < 1 or args.block_size < 1 or args.batch_size < 1 or args.samples < 0 or min(args.temperatures) <= 0:
        raise ConfigError('--k, --block_size and --batch_size must be positive integers, --samples >= 0, '
                          '--temperatures positive numbers (e.g. 1,2)')
    meta = check_dataset(args.dataset)
    vocab = meta['vocab_size']
    name = f'teacher_k{args.k}_b{args.block_size}' if args.name is None else args.name
    folder = os.path.join(args.dataset, name)
    one_name = name not in ('', '.', '..') and os.sep not in name and (os.altsep or os.sep) not in name
    there = one_name and foreign(folder, 'teacher cache')  # a new cache replaces an old one whole, nothing else
    for bad, message in (  # (all before the teacher is read: minutes for a large one)
            (not one_name, f'--name must be one folder name inside --dataset, got {name!r}'),
            (name in meta['files'] or name == 'meta.json',
             f"--name={name} is one of the dataset's own files: pass another --name"),
            (there, f'{folder} is {there}, not a teacher cache cache_teacher.py wrote: pass another --name, or remove '
                    'it yourself'),
            ('teacher_tokenizer' in meta, f'{args.dataset} pairs two tokenizers: a cache holds the teacher\'s '
                                          "distribution at the student's targets in one shared vocabulary (not built "
                                          'across tokenizers: distill the teacher online)'),
            (args.k > vocab, f'--k={args.k} is more than the vocabulary ({vocab} tokens)'),
            (args.k < vocab and not args.samples and not served, f'--samples=0 with --k={args.k} of {vocab} tokens leaves the tail '
                                                  f'unrepresented: pass --samples=32 (or --k={vocab})'),
            (args.k == vocab and args.samples, f'--samples={args.samples} with --k={vocab}, the whole vocabulary: '
                                               'there is no tail to draw from; pass --samples=0'),
            (any(s not in meta['splits'] for s in args.splits.split(',')),
             f"--splits: {args.dataset} has the splits {', '.join(meta['splits'])}")):
        if bad:
            raise ConfigError(message)
    args.ids_dtype = 'uint16' if vocab <= 2 ** 16 else 'int32'
    splits = args.splits.split(',')
    if ddp and rank:
        dist.barrier()  # rank 0 converts a .gguf once
    if served:  # (its tokenizer checked against the data's; it computes in its own dtype)
        teacher = ServedTeacher(args.teacher, load_tokenizer(meta['tokenizer']), vocab, args.k, args.block_size)
        dtype, why, ctx = 'its own', 'served', contextlib.nullcontext()
    else:
        teacher = load_model(args.teacher)
    if ddp and not rank:
        dist.barrier()
    if not served:
        check_vocabularies(meta, args.dataset, None, None, teacher, model_tokenizer(args.teacher))
        dtype, why, _ = choose_dtype(args.dtype, args.device)
        ptdtype = getattr(torch, dtype)
        cast_parameters(teacher.to(args.device).eval().requires_grad_(False), torch.float32 if dtype == 'float16' else ptdtype)
        ctx = torch.autocast(args.device.split(':')[0], ptdtype) if dtype != 'float32' else contextlib.nullcontext()
    data = {s: load_split(args.dataset, s) for s in splits}
    rows = {s: int(np.asarray(data[s]['mask']).sum()) for s in splits}  # (every supervised target lies in a window)
    tmp = None
    if rank == 0:
        remove_stale(folder)
        tmp = f'{folder}.tmp{os.getpid()}'
        os.makedirs(tmp)
        for s in splits:  # sized once: every rank writes its rows in place
            width = args.k + args.samples
            for f, itemsize, width in (('ids', np.dtype(args.ids_dtype).itemsize, width), ('logp', np.dtype(args.values).itemsize, width), ('tail', 4, len(args.temperatures))):
                with open(os.path.join(tmp, f'{s}_{f}.bin'), 'wb') as fh:
                    fh.truncate(rows[s] * width * itemsize)
        print(f'teacher {args.teacher} in {dtype} ({why}); top-{args.k} of {vocab:,} tokens + {args.samples} drawn from the tail, temperatures '
              f"{', '.join(f'{t:g}' for t in args.temperatures)}, windows of {args.block_size}; "
              + ', '.join(f'{s}: {rows[s]:,} rows' for s in splits) + f'; {world} rank(s)', flush=True)
    if ddp:
        box = [tmp]
        dist.broadcast_object_list(box)
        tmp = box[0]
    t0 = time.time()
    for s in splits:
        write_split(teacher, data[s], tmp, s, args, rank, world, ctx, args.device, meta['pad_id'], vocab)
    if ddp:
        dist.barrier()
    if rank == 0:
        entry = (np.dtype(args.values).itemsize + np.dtype(args.ids_dtype).itemsize) * (args.k + args.samples) + 4 * len(args.temperatures)
        seal(tmp, 'meta.json', {
            'teacher': args.teacher, 'teacher_vocab_fingerprint': meta['vocab_fingerprint'], 'k': args.k, 'samples': args.samples,
            'sample_temperature': max(args.temperatures), 'seed': args.seed, 'temperatures': args.temperatures,
            'block_size': args.block_size, 'bos_windows': window_bos(data[splits[0]], args.block_size) is not None, 'dtype': dtype, 'ids_dtype': args.ids_dtype, 'values_dtype': args.values,
            'bytes_per_row': entry, 'splits': {s: {'rows': rows[s], 'data_hash': data_hash(args.dataset, s)} for s in splits},
            'command': 'python ' + ' '.join(sys.argv)})
        swap_in(tmp, folder)
        print(f'wrote {folder}: {sum(rows.values()):,} rows of {entry} bytes in {time.time() - t0:,.0f} s')
    if ddp:
        dist.destroy_process_group()
    return 0

if __name__ == '__main__':
    exit_on_error()  # a ConfigError or DataError: one line `error: ...` on stderr, exit status 2
    sys.exit(main())
