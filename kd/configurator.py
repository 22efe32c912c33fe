"""
Settings and mistakes: distill.py's config file (Python, assignments only), then --key=value overrides, each checked
against the defaults at the top of distill.py; `--help` lists them with their comments. A mistake in a setting or
an input is one line (ConfigError, DataError): the config file's own line, the data file's, or the closest valid key.
"""
import argparse, ast, builtins, difflib, math, os, re, sys, traceback

class ConfigError(Exception):
    """A setting, a model, a checkpoint or a run that cannot go on: one line says what and how to fix it."""

class DataError(Exception):
    """An input file or a prepared dataset that cannot be used: one line says where and how to fix it."""

def exit_on_error(code=2):
    """The one error path of an entry point: a ConfigError or DataError raised anywhere in the run ends it with
    `error: ...` on stderr and exit status `code`, not a traceback; any other exception keeps its traceback. (os._exit:
    an excepthook cannot set the exit status; what is open is flushed first. The line goes to the process's own
    stderr: torch.distributed's hook, which calls this one, captures sys.stderr to prefix each rank's lines.)"""
    def hook(kind, value, tb):
        if not issubclass(kind, (ConfigError, DataError)):
            return sys.__excepthook__(kind, value, tb)
        sys.stdout.flush()
        print(f'error: {value}', file=sys.__stderr__, flush=True)
        os._exit(code)
    sys.excepthook = hook

class ArgumentParser(argparse.ArgumentParser):
    """The entry points' command lines: a mistake is one line, `error: ...` and exit status 2, not a usage block."""
    def error(self, message):
        print(f'error: {message} (--help lists the options)', file=sys.stderr)
        sys.exit(2)

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The entry points' --help: the description as written, every option's default (where it has one) by its help."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)

def default_comments(path):
    """key -> the inline comment of its default in the file at path (what --help prints)."""
    src = open(path).read().split('# defaults', 1)[1].split('config_keys =')[0]
    return {m[1]: m[2] for m in re.finditer(r'^(\w+) = .*?  # (.*)$', src, re.M)}

def print_help(doc, path, defaults):
    print(doc.strip() + "\n")
    comments = default_comments(path)
    for k, v in defaults.items():
        print(f'  --{k}={v!r}'.ljust(44) + f'  {comments.get(k, "")}')

def parse_config(argv, defaults, types=None):
    """nanoGPT-style: a config file, then --key=value overrides. types: the type of a key whose default is None."""
    config, types = dict(defaults), types or {}

    def setkey(key, value, where):
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            raise ConfigError(f"unknown config key '{key}' ({where}){hint}")
        old = defaults[key]
        kinds = types.get(key, type(old))  # a type, or a tuple of them
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if list in kinds and isinstance(value, tuple):
            value = list(value)
        if key == 'layer_map' and isinstance(value, (list, tuple)):
            pass  # a name or explicit pairs
        elif value is not None and (not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds)):
            example = f'like its default {old!r}' if old is not None else 'or None (its default)'
            names = ' or '.join(k.__name__ for k in kinds)
            raise ConfigError(f"{key} must be {names} {example}, got {value!r} ({where})")
        config[key] = value

    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ConfigError(f"malformed override '{arg}': write --key=value")
            key, val = arg[2:].split('=', 1)
            try:
                val = ast.literal_eval(val)
            except (SyntaxError, ValueError):
                pass  # a plain string
            setkey(key, val, 'command line')
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file '{arg}' not found")
            scope = {}
            try:
                code = builtins.compile(open(arg).read(), arg, 'exec')  # (compile is a config key)
                exec(code, {'__file__': arg}, scope)
            except SyntaxError as e:
                raise ConfigError(f'{arg}:{e.lineno}: syntax error: {e.msg}')
            except Exception as e:  # a NameError, a failed import, ...: the config file's own line
                line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg][-1:] or ['?']
                raise ConfigError(f'{arg}:{line[0]}: {type(e).__name__}: {e}')
            for key, val in scope.items():
                if not key.startswith('_') and not callable(val) and not isinstance(val, type(os)):
                    setkey(key, val, arg)
    return config

def check_config(c, choices, cuda_available):
    """The values' ranges and names, checked before anything is loaded."""
    for key, allowed in choices.items():
        if c[key] not in allowed:
            close = difflib.get_close_matches(str(c[key]), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {c[key]!r}{hint}")
    for key in ('block_size', 'batch_size', 'gradient_accumulation_steps', 'eval_interval', 'log_interval',
                'temperature', 'epochs', 'stop_iter', 'max_new_tokens', 'sample_temperature', 'top_p'):
        if c[key] is not None and c[key] <= 0:
            raise ConfigError(f'{key} must be > 0, got {c[key]}')
    for key, value in c.items():  # (inf or nan passes every comparison below, or fails them all)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f'{key} must be a finite number, got {value}')
    for key in ('temperature', 'sample_temperature'):  # (z / T: 1e-40 overflows the logits, 1e6 flattens them)
        if not 1e-2 <= c[key] <= 1e2:
            raise ConfigError(f'{key} must be in [0.01, 100], got {c[key]}')
    for key in ('alpha', 'beta', 'warmup_frac', 'on_policy', 'top_p'):
        if not 0 <= c[key] <= 1:
            raise ConfigError(f'{key} must be in [0, 1], got {c[key]}')
    for key in ('beta1', 'beta2'):  # (AdamW's)
        if not 0 <= c[key] < 1:
            raise ConfigError(f'{key} must be in [0, 1), got {c[key]}')
    if isinstance(c['loss_chunk'], str) and c['loss_chunk'] != 'auto':
        raise ConfigError(f"loss_chunk must be 'auto' or a number of positions (0: the plain path), got "
                          f"'{c['loss_chunk']}'")
    for key in ('loss_chunk', 'eval_docs', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip', 'max_iters'):
        if isinstance(c[key], (int, float)) and c[key] < 0:  # (max_iters=0 exports the student as it starts)
            raise ConfigError(f'{key} must be >= 0, got {c[key]}')
    if not re.fullmatch(r'cpu|cuda(:\d+)?', c['device']):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got '{c['device']}'")
    if 'cuda' in c['device'] and not cuda_available:
        raise ConfigError(f"device='{c['device']}' but this torch sees no CUDA device: pass --device=cpu, or install a "
                          'CUDA build of torch')
    if os.path.exists(c['out_dir']) and not os.path.isdir(c['out_dir']):
        raise ConfigError(f"out_dir '{c['out_dir']}' is a file: pass a folder (it holds ckpt/, student/ and log.jsonl)")
