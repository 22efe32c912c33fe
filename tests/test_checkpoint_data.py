"""A checkpoint is data, checked like data: load_checkpoint refuses a checkpoint whose parts do not fit this run's model
and optimizer (AdamW's moments, its parameter groups, the scaler, the RNG states, state.json's keys, the manifest) in
one line, a ConfigError raised before anything is loaded: this run's weights and optimizer state stay as they were."""
import json, os
import pytest, torch
from kd import checkpoint
from kd.configurator import ConfigError

CONFIG = {'batch_size': 2, 'gradient_accumulation_steps': 1, 'seed': 1337, 'dataset': 'tiny', 'parallel': 'ddp',
          'distill': 'logits', 'teacher': 'teacher', 'teacher_cache': None, 'student': 'student',
          'student_init': 'pretrained', 'student_layers': None, 'kd_kind': 'fkl'}  # what load_checkpoint compares

def net(seed):
    """A module with a non-square weight (a transposed moment keeps its number of elements) and distill.py's two
    parameter groups (decayed matrices, the rest), under fused AdamW as distill.py makes it."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    params = list(module.parameters())
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': 0.1},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return module, torch.optim.AdamW(groups, lr=1e-2, fused=True)

def scaler(enabled=False):
    return torch.amp.GradScaler('cpu', enabled=enabled)

def saved(folder, sharded=False):
    """A checkpoint at iteration 2 of a net after two AdamW steps; sharded: as fsdp writes one (the weights and the
    optimizer's state gathered whole, keyed by parameter name)."""
    module, opt = net(0)
    for _ in range(2):
        module(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    weights, optimizer_state = module, opt.state_dict()
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        weights, optimizer_state = get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True))
    checkpoint.save_checkpoint(str(folder), weights, optimizer_state, scaler(), 2, 4, checkpoint.rng_states(1), CONFIG,
                               [3.0, 2.5])
    return str(folder), module, opt

def manifest(folder, change):
    path = os.path.join(folder, 'manifest.json')
    m = json.load(open(path))
    change(m)
    json.dump(m, open(path, 'w'))

def reseal(folder):
    """The manifest made to agree with the files as they are now (sizes, hashes): damage that passes it."""
    def sizes(m):
        m['files'] = {n: os.path.getsize(os.path.join(folder, n)) for n in m['files']}
        m['hashes'] = {n: checkpoint.content_hash([os.path.join(folder, n)]) for n in m.get('hashes', {})}
    manifest(folder, sizes)

def edit_state(folder, change):
    path = os.path.join(folder, 'state.pt')
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    reseal(folder)

def edit_json(folder, change):
    path = os.path.join(folder, 'state.json')
    state = json.load(open(path))
    change(state)
    json.dump(state, open(path, 'w'))
    reseal(folder)

def refused(folder, match, sharded=False, enabled=False):
    """load_checkpoint into a fresh net raises one line matching match, the net and its optimizer untouched."""
    module, opt = net(1)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    groups = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    with pytest.raises(ConfigError, match=match) as e:
        checkpoint.load_checkpoint(folder, module, opt, scaler(enabled), CONFIG, 1, sharded)
    assert '\n' not in str(e.value)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    assert not opt.state and groups == [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    return str(e.value)

@pytest.mark.parametrize('sharded', [False, True], ids=['plain', 'fsdp'])
def test_an_intact_checkpoint_loads_and_trains_on(tmp_path, sharded):
    """(What every check below must let through: the weights and AdamW's state come back whole.)"""
    folder, module, opt = saved(tmp_path / 'ckpt', sharded)
    other, other_opt = net(1)
    state = checkpoint.load_checkpoint(folder, other, other_opt, scaler(), CONFIG, 1, sharded)
    assert state['iter_num'] == 2 and state['loss_history'] == [3.0, 2.5] and state['changed'] == []
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values()))
    for p, q in zip(module.parameters(), other.parameters()):
        assert all(torch.equal(opt.state[p][k], other_opt.state[q][k]) for k in ('step', 'exp_avg', 'exp_avg_sq'))
    for m, o in ((module, opt), (other, other_opt)):
        m(torch.ones(5, 4)).square().sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), other.parameters()))

def linear(state, sharded):
    """The optimizer state of the Linear weight (3, 4): parameter 0, or under fsdp '0.weight'."""
    return state['optimizer']['state']['0.weight' if sharded else 0]

MOMENTS = {  # fused AdamW writes numel(param) elements into what it is given: wrong weights, or corrupted memory
    'transposed exp_avg': (lambda s: s.update(exp_avg=s['exp_avg'].t().contiguous()), r'exp_avg .* is \(4, 3\)'),
    'one-element exp_avg': (lambda s: s.update(exp_avg=torch.zeros(1)), r'exp_avg .* is \(1,\) torch.float32'),
    'seven-element exp_avg_sq': (lambda s: s.update(exp_avg_sq=torch.zeros(7)), r'exp_avg_sq .* is \(7,\)'),
    'integer exp_avg': (lambda s: s.update(exp_avg=s['exp_avg'].long()), r'exp_avg .* torch.int64'),
    'step a vector': (lambda s: s.update(step=torch.tensor([2.0, 2.0])), r'step .* is \(2,\)'),
    'step a number': (lambda s: s.update(step=2), r'step .* is int'),
    'no step': (lambda s: s.pop('step'), r"holds \['exp_avg', 'exp_avg_sq'\]"),
}

@pytest.mark.parametrize('sharded', [False, True], ids=['plain', 'fsdp'])
@pytest.mark.parametrize('case', MOMENTS)
def test_optimizer_moments_that_do_not_fit_their_parameter_are_refused(tmp_path, case, sharded):
    """Before: each loaded without a word (weights_only lets any tensor through); the first fused step then trained
    wrong weights (transposed: exit 0, weights 4e4 off), segfaulted (1 element) or aborted on heap corruption (7)."""
    folder = saved(tmp_path / 'ckpt', sharded)[0]
    change, match = MOMENTS[case]
    edit_state(folder, lambda state: change(linear(state, sharded)))
    assert 'state.pt' in refused(folder, match, sharded)

def merge_groups(o):
    o['param_groups'] = [{**o['param_groups'][0], 'params': o['param_groups'][0]['params'] +
                          o['param_groups'][1]['params']}]

def move_one(o):
    o['param_groups'][1]['params'].insert(0, o['param_groups'][0]['params'].pop())

def foreign_state(o):
    o['state'][99 if 0 in o['state'] else 'x.weight'] = next(iter(o['state'].values()))

GROUPS = {
    'one group': (merge_groups, 'has 1 parameter groups, this optimizer 2'),
    'a parameter moved': (move_one, "parameter group 0 lists 0 parameters, this optimizer's 1"),
    'state of no parameter': (foreign_state, r"state for (99|'x.weight'), a parameter in no group"),
}

@pytest.mark.parametrize('sharded', [False, True], ids=['plain', 'fsdp'])
@pytest.mark.parametrize('case', GROUPS)
def test_parameter_groups_unlike_this_optimizers_are_refused(tmp_path, case, sharded):
    """Before: a ValueError traceback from optimizer.load_state_dict (after the weights were loaded), or the foreign
    state kept without a word."""
    folder = saved(tmp_path / 'ckpt', sharded)[0]
    change, match = GROUPS[case]
    edit_state(folder, lambda state: change(state['optimizer']))
    refused(folder, match, sharded)

def test_a_float32_checkpoint_resumes_under_float16_with_a_fresh_scaler(tmp_path):
    """Before: RuntimeError 'The source state dict is empty' (a disabled scaler saves {}) after the weights loaded."""
    folder = saved(tmp_path / 'ckpt')[0]
    module, opt = net(1)
    s = scaler(enabled=True)
    checkpoint.load_checkpoint(folder, module, opt, s, CONFIG, 1)
    assert s.state_dict() == scaler(enabled=True).state_dict()

def test_a_scaler_state_of_the_wrong_kind_is_refused(tmp_path):
    folder = saved(tmp_path / 'ckpt')[0]
    edit_state(folder, lambda state: state.update(scaler={**scaler(True).state_dict(), 'scale': 'big'}))
    refused(folder, "state.pt: the loss scaler's state", enabled=True)

RNG = {
    'short cpu state': lambda r: r.update(cpu=r['cpu'][:10]),
    'float cpu state': lambda r: r.update(cpu=r['cpu'].float()),
    'cuda state a list': lambda r: r.update(cuda=[1, 2]),
    'no cuda key': lambda r: r.pop('cuda'),
}

@pytest.mark.parametrize('case', RNG)
def test_rng_states_of_the_wrong_kind_are_refused(tmp_path, case):
    """Before: loaded, then a RuntimeError or TypeError traceback from set_rng_state in distill.py, weights loaded."""
    folder = saved(tmp_path / 'ckpt')[0]
    edit_state(folder, lambda state: RNG[case](state['rng_states'][0]))
    refused(folder, r"state.pt: rank 0's RNG state")

def test_keys_in_state_json_do_not_override_state_pt(tmp_path):
    """Before: an 'optimizer' key in state.json replaced AdamW's state (here: emptied it) without a word."""
    folder = saved(tmp_path / 'ckpt')[0]
    groups = torch.load(os.path.join(folder, 'state.pt'), weights_only=True)['optimizer']['param_groups']
    edit_json(folder, lambda s: s.update(optimizer={'state': {}, 'param_groups': groups}))
    refused(folder, r"state.json: holds \['optimizer'\], which distill.py does not write there")

def test_the_manifests_iteration_must_be_state_jsons(tmp_path):
    """Before: never compared (distill.py resumed at the manifest's iteration with the other's history)."""
    folder = saved(tmp_path / 'ckpt')[0]
    manifest(folder, lambda m: m.update(iter_num=7))
    refused(folder, 'state.json is of iteration 2, its manifest of 7')

def test_a_manifest_listing_no_files_is_no_checkpoint(tmp_path):
    """Before: {'files': {}} made any folder a complete checkpoint."""
    folder = saved(tmp_path / 'ckpt')[0]
    manifest(folder, lambda m: m.update(files={}))
    it, problem = checkpoint.checkpoint_iter(folder)
    assert it is None and 'manifest.json lists no model.safetensors' in problem
    with pytest.raises(ConfigError, match="no complete checkpoint in .*lists no model.safetensors"):
        checkpoint.find_checkpoint(folder)
    refused(folder, 'lists no model.safetensors')

GARBAGE = {
    'a list': [1, 2],
    'no files': {'iter_num': 2},
    'files a list': {'iter_num': 2, 'files': ['state.pt']},
    'a size a string': {'iter_num': 2, 'files': {'model.safetensors': '1', 'state.pt': 1, 'state.json': 1}},
    'iter_num a string': {'iter_num': '2', 'files': {}},
    'hashes a list': {'iter_num': 2, 'files': {}, 'hashes': []},
}

@pytest.mark.parametrize('case', GARBAGE)
def test_a_malformed_manifest_is_no_checkpoint(tmp_path, case):
    """Before: KeyError, TypeError or AttributeError from checkpoint_iter (find_checkpoint, every save)."""
    folder = saved(tmp_path / 'ckpt')[0]
    json.dump(GARBAGE[case], open(os.path.join(folder, 'manifest.json'), 'w'))
    it, problem = checkpoint.checkpoint_iter(folder)
    assert it is None and 'manifest.json is not a checkpoint manifest' in problem
    with pytest.raises(ConfigError, match='no complete checkpoint in .*is not a checkpoint manifest'):
        checkpoint.find_checkpoint(folder)

def garble(folder):
    """state.json overwritten with garbage of its own length: its size, the manifest's check, still holds."""
    path = os.path.join(folder, 'state.json')
    size = os.path.getsize(path)
    open(path, 'wb').write(b'\xff' * size)

def test_state_json_damaged_at_its_size_is_refused(tmp_path):
    """Before: a JSONDecodeError (UnicodeDecodeError) traceback. Now its hash in the manifest says so first (and
    find_checkpoint falls back to another complete checkpoint); without one (a manifest from before hashes, or
    resealed), the parse does."""
    folder = saved(tmp_path / 'ckpt')[0]
    garble(folder)
    refused(folder, r'state.json')
    manifest(folder, lambda m: m.pop('hashes', None))
    refused(folder, r"state.json is not JSON \(.*\); not a checkpoint as distill.py writes it")

@pytest.mark.parametrize('key', ['iter_num', 'data_position', 'config', 'loss_history'])
def test_a_key_missing_from_state_json_is_refused(tmp_path, key):
    """Before: a KeyError traceback (config), or loaded, for distill.py to fail on later (loss_history)."""
    folder = saved(tmp_path / 'ckpt')[0]
    edit_json(folder, lambda s: s.pop(key))
    refused(folder, f'state.json: {key} is missing')

MISTYPED = {
    'iter_num': ('2', "iter_num is '2', not an int"),
    'data_position': (None, 'data_position is None, not an int'),
    'config': ([], 'config is \\[\\], not a dict'),
    'loss_history': ('3.0', "loss_history is '3.0', not a list of numbers"),
    'loss_history ': (['3.0'], r"loss_history is \['3.0'\], not a list of numbers"),
}

@pytest.mark.parametrize('key', MISTYPED)
def test_a_mistyped_key_of_state_json_is_refused(tmp_path, key):
    """Before: a TypeError traceback (config), or loaded, for distill.py to fail on later."""
    folder = saved(tmp_path / 'ckpt')[0]
    value, match = MISTYPED[key]
    edit_json(folder, lambda s: s.update({key.strip(): value}))
    refused(folder, 'state.json: ' + match)

def test_a_setting_missing_from_state_jsons_config_is_refused(tmp_path):
    """Before: a KeyError traceback."""
    folder = saved(tmp_path / 'ckpt')[0]
    edit_json(folder, lambda s: s['config'].pop('seed'))
    refused(folder, "state.json: config has no 'seed'")
