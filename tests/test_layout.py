"""The house: entry points on top, single-purpose libraries beneath, no import climbing back up; an entry point
imports no other entry point, except that the benchmarks and eval.py use distill.py's loss."""
import ast, glob, os
from conftest import ROOT

FLOORS = {'configurator': 0, 'checkpoint': 1, 'models': 1, 'data': 2, 'machine': 2, 'benchmarks': 2, 'sampling': 3}  # libraries
LOSS = {'ChunkedHeadLoss', 'KD_KINDS', 'TeacherOut', 'Trainable', 'auto_chunk', 'chunk_loss', 'configure_optimizer',
        'kd_divergence', 'loss_sums', 'to_student_vocab'}
USES_THE_LOSS = {'eval.py', 'bench.py', 'scripts/bench_cache.py', 'scripts/compare_trl.py'}

def local_imports(path):
    """{module of this repository: the names taken from it (None: the module itself)}."""
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, '*.py'))}
    found = {}
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault(a.name, set()).add(None)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.setdefault(node.module, set()).update(a.name for a in node.names)
    return {m: names for m, names in found.items() if m in local}

def test_libraries_import_only_lower_floors():
    for lib, floor in FLOORS.items():
        for module in local_imports(f'{lib}.py'):
            assert FLOORS.get(module, 99) < floor, f'{lib}.py (floor {floor}) imports {module}'

def test_entry_points_are_not_libraries():
    entries = sorted({os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, '*.py'))
                      + glob.glob(os.path.join(ROOT, 'scripts', '*.py'))} - {f'{lib}.py' for lib in FLOORS})
    assert {'distill.py', 'prepare_data.py', 'eval.py', 'cache_teacher.py', 'bench.py'} <= set(entries)
    for entry in entries:
        for module, names in local_imports(entry).items():
            if module in FLOORS:
                continue
            assert module == 'distill' and entry in USES_THE_LOSS, f'{entry} imports the entry point {module}.py'
            used = names - {None}
            if None in names:  # `import distill`: the attributes it reads
                tree = ast.parse(open(os.path.join(ROOT, entry)).read())
                used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == 'distill'}
            assert used <= LOSS, f'{entry} takes {sorted(used - LOSS)} from distill.py, which is not the loss'
