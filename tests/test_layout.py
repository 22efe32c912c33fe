"""The house: entry points on top (and in scripts/), single-purpose libraries beneath in kd/, no import climbing back
up; an entry point imports no other entry point, except that the benchmarks and eval.py use distill.py's loss."""
import ast, glob, os
from conftest import ROOT

FLOORS = {'configurator': 0, 'checkpoint': 1, 'guards': 1, 'lora': 1, 'models': 1, 'data': 2, 'chunked': 2, 'machine': 2,
          'benchmarks': 2, 'decode': 2,
          'sampling': 3, 'teacher': 3, 'cross': 4, 'cache': 4, 'served': 4}  # libraries
LOSS = {'DIVERGENCES', 'Divergence', 'KD_KINDS', 'LayerMap', 'Trainable', 'configure_optimizer', 'kd_divergence',
        'loss_sums', 'make_layer_pairs'}
USES_THE_LOSS = {'eval.py', 'scripts/bench.py', 'scripts/bench_cache.py', 'scripts/compare_trl.py', 'scripts/gpu_check.py',
                 'scripts/topk_error.py'}

def local_imports(path):
    """{module of this repository (a library by its name in kd/): the names taken from it (None: the module)}."""
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, '*.py'))}
    local |= set(FLOORS)
    found = {}
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.setdefault(a.name.removeprefix('kd.'), set()).add(None)
        elif isinstance(node, ast.ImportFrom) and node.module == 'kd':  # from kd import data, models
            for a in node.names:
                found.setdefault(a.name, set()).add(None)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.setdefault(node.module.removeprefix('kd.'), set()).update(a.name for a in node.names)
    return {m: names for m, names in found.items() if m in local}

def test_the_top_level_is_what_the_user_asked_for():
    """distill.py, prepare_data.py and eval.py on top; the libraries in kd/, the other entry points in scripts/."""
    top = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '*.py'))}
    assert top == {'distill.py', 'prepare_data.py', 'eval.py'}, top
    assert {f'{lib}.py' for lib in FLOORS} <= {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'kd', '*.py'))}

def test_libraries_import_only_lower_floors():
    for lib, floor in FLOORS.items():
        for module in local_imports(os.path.join('kd', f'{lib}.py')):
            assert FLOORS.get(module, 99) < floor, f'{lib}.py (floor {floor}) imports {module}'

def test_entry_points_are_not_libraries():
    entries = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, '*.py'))
                     + glob.glob(os.path.join(ROOT, 'scripts', '*.py')))
    assert {'distill.py', 'prepare_data.py', 'eval.py', 'scripts/cache_teacher.py', 'scripts/bench.py'} <= set(entries)
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
