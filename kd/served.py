"""
A teacher served by another process over HTTP (distill.py's teacher='http://HOST:PORT/v1'): vLLM's OpenAI-compatible
completions API, as scripts/serve_teacher.sh starts it. Each window goes as token ids with prompt_logprobs=k and one
generated token; the server answers, at every position, the log-probabilities (T = 1) of its k most likely next tokens
and of the token that came. They come back as a TopK (kd/data.py) whose tail is the mass outside the k, 1 - sum, which
the loss keeps as one bucket (distill.py's kd_divergence; docs/served.md derives what that costs). kd_kind='pg' asks
for the token that came alone. Requests go out several at a time, each with several windows; a connection error, a
timeout, a 5xx or a broken answer is tried again after 1, 2, 4, ... s (teacher_retries times), then the run stops with
one line; it resumes from its last checkpoint once the server is back.
"""
import difflib
import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
import torch
from kd.configurator import ConfigError
from kd.data import TopK
from kd.models import encode
from kd.teacher import NoTeacher, TeacherOut

TAIL_FLOOR = 1e-6  # the mass outside the top k, 1 - sum of k fp32 probabilities, is not resolved below about this
PROBE = 'Hello world! The teacher\'s tokenizer, checked: 3.14159, naïve café, 数学, def f(x):\n\treturn x ** 2\n'

def is_served(teacher):
    """A server's URL, or several teachers {route: URL}."""
    url = lambda t: isinstance(t, str) and t.startswith(('http://', 'https://'))
    return url(teacher) or isinstance(teacher, dict)

def check_pg(kd_kind, sampler):
    """kd_kind='pg' takes D on tokens drawn from q: every row must be the student's (a document without a prompt keeps
    the data's row, kd/sampling.py). Else one line."""
    if kd_kind == 'pg' and sampler and sampler.with_prompt < 1:
        raise ConfigError(f"kd_kind='pg' takes the divergence on the student's own tokens, and {1 - sampler.with_prompt:.0%} "
                          "of the training documents have no prompt (plain text: their rows stay the data's): prepare "
                          "prompt/reply data only, or use kd_kind='rkl' with a teacher that gives its distribution")

def routed_urls(teacher, meta, data_dir):
    """teacher as ServedTeacher takes it: a URL (for every document), or {route: URL} in the order of the data's routes
    (meta.json's, from prepare_data.py --route), each route with its teacher. Else one line."""
    routes = meta.get('routes')
    if isinstance(teacher, str):  # (one teacher for every route)
        return teacher
    if not routes:
        raise ConfigError(f'several teachers need data whose records name theirs: prepare {data_dir} with '
                          'prepare_data.py --route=FIELD, or set one teacher')
    teacher = {str(name): url for name, url in teacher.items()}  # (the data's names are strings: 1 is '1')
    for name in teacher:
        if name not in routes:
            close = difflib.get_close_matches(str(name), routes, n=1)
            raise ConfigError(f"teacher names '{name}', a route no document of {data_dir} has (its routes: "
                              f"{', '.join(routes)})" + (f"; did you mean '{close[0]}'?" if close else ''))
    missing = [r for r in routes if r not in teacher]
    if missing:
        raise ConfigError(f"the documents of route {', '.join(map(repr, missing))} in {data_dir} have no teacher: add "
                          'them to teacher (each route its server)')
    return {r: teacher[r] for r in routes}

class ServerError(ConfigError):
    """The teacher's server cannot be used (down, another model, malformed answers): one line, the run stops."""

def check_served(teacher, teacher_topk, weights, kd_kind, temperature, sampling, student_init, cache, cross, vocab=None,
                 requests=(8, 300.0, 5)):
    """What a served teacher, or one read as its top k (teacher_topk), can give: log-probabilities (served: at T = 1)
    of k tokens, no hidden states, no blocks to copy, one tokenizer; kd_kind='pg' needs the sampled token's alone, on
    the student's own samples of q (sampling: on_policy, sample_temperature, top_p). Else one line."""
    served, logits = is_served(teacher), weights[1] > 0
    if kd_kind == 'pg' and logits:
        if not served:
            raise ConfigError("kd_kind='pg' is for a teacher that gives only sampled tokens' log-probabilities (a "
                              "served one, teacher='http://HOST:PORT/v1'): with the whole distribution, 'rkl' is exact")
        if tuple(sampling) != (1, 1, 1) or temperature != 1:
            raise ConfigError("kd_kind='pg' estimates reverse KL from tokens drawn from q itself: set on_policy=1, "
                              f'sample_temperature=1, top_p=1 and temperature=1 (got {sampling[0]:g}, {sampling[1]:g}, '
                              f'{sampling[2]:g} and {temperature:g})')
    if teacher_topk is not None and (not isinstance(teacher_topk, int) or teacher_topk < 1):
        raise ConfigError(f'teacher_topk must be a positive integer (the tokens read a position), got {teacher_topk!r}')
    if teacher_topk is not None and vocab is not None and teacher_topk > vocab:
        raise ConfigError(f'teacher_topk={teacher_topk} is more than the vocabulary ({vocab} tokens): at most {vocab} '
                          '(every token: unset it)')
    if teacher_topk is not None and (cache or cross):
        raise ConfigError('teacher_topk reads a teacher in this process or a served one, ' + (
            'not a cache (its k is cache_teacher.py --k): unset teacher_topk' if cache else
            'not one of another tokenizer (its tokens are carried onto the student\'s whole): unset teacher_topk'))
    if not served:
        return
    if cache is not None:
        raise ConfigError('teacher_cache and a served teacher: the run reads one teacher; unset teacher_cache, or set '
                          'teacher=None to train from the cache')
    if requests[0] < 1 or requests[1] <= 0 or requests[2] < 0:
        raise ConfigError(f'teacher_requests must be >= 1, teacher_timeout > 0 and teacher_retries >= 0, got '
                          f'{requests[0]}, {requests[1]} and {requests[2]}')
    if isinstance(teacher, dict) and not all(is_served(t) and isinstance(t, str) for t in teacher.values()):
        raise ConfigError('several teachers are served ones, each a URL (scripts/serve_teacher.sh): a teacher in this '
                          f'process holds its weights in the training process, which serving avoids; got {teacher}')
    if weights[2] > 0 or student_init == 'teacher_layers' or cross:
        what = 'hidden-state distillation' if weights[2] > 0 else "student_init='teacher_layers'" \
            if student_init == 'teacher_layers' else 'distillation across tokenizers'
        raise ConfigError(f'a served teacher gives its top-k log-probabilities, not what {what} needs: use a teacher '
                          'in this process (an HF folder, hub id or .gguf file)')
    if temperature != 1 and logits:
        raise ConfigError(f'a served teacher gives log-probabilities at T = 1 and the mass outside its top k cannot be '
                          f're-tempered: set temperature=1 (got {temperature:g}), or use a teacher in this process')

class Server:
    """One endpoint, url (its model named after '#' where the server serves several): checked at start for the model's
    name, its context length (block_size + 1 tokens a window) and its tokenizer, which must be the data's (a probe
    text's ids). Its requests are tried again on a connection error, a timeout, a 5xx or a broken answer."""
    def __init__(self, url, tokenizer, k, block_size, timeout=300.0, retries=5):
        self.url, _, self.name = url.partition('#')
        self.url, self.root = self.url.rstrip('/'), self.url.rstrip('/').removesuffix('/v1')
        self.k, self.timeout = k, timeout
        self.backoff = [2 ** i for i in range(retries)]  # seconds before each try again
        self.received = []  # each answer's size in bytes (list.append is safe across threads)
        models = self.call('GET', self.url + '/models')
        cards = {m.get('id'): m for m in models.get('data', []) if isinstance(m, dict)} if isinstance(models, dict) \
            else {}
        if not self.name:
            if len(cards) != 1:
                raise ServerError(f'the teacher server at {self.url} serves {len(cards)} models '
                                  f"({', '.join(map(str, cards)) or 'none'}): name one, teacher='{self.url}#NAME'")
            self.name = next(iter(cards))
        if self.name not in cards:
            raise ServerError(f"the teacher server at {self.url} serves {', '.join(map(str, cards))}, not "
                              f"'{self.name}': name one of them after '#'")
        length = cards[self.name].get('max_model_len')
        self.length = length if isinstance(length, int) else None
        if isinstance(length, int) and length < block_size + 1:
            raise ServerError(f'the teacher server at {self.url} reads at most {length} tokens, a window here is '
                              f'{block_size + 1}: start it with --max-model-len {block_size + 1} or more, or set '
                              f'block_size<={length - 1}')
        ids = self.call('POST', self.root + '/tokenize', {'model': self.name, 'prompt': PROBE,
                                                          'add_special_tokens': False}).get('tokens')
        if ids != [int(i) for i in encode(tokenizer, PROBE)[0]]:
            raise ServerError(f"the teacher server's model '{self.name}' tokenizes differently from the data "
                              "(a probe text's ids differ): serve a model of the data's tokenizer, or prepare the "
                              'data with the served model\'s tokenizer')

    def call(self, method, url, body=None):
        """One request, tried again on a connection error, a timeout, a 5xx or a broken answer; its JSON."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(len(self.backoff) + 1):
            try:
                request = urllib.request.Request(url, data, {'Content-Type': 'application/json'}, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                self.received.append(len(raw))
                return json.loads(raw)
            except urllib.error.HTTPError as e:
                said = answer_text(e)
                if e.code < 500:  # (the server refused what was asked: trying again changes nothing)
                    raise ServerError(f'the teacher server at {url} refused the request (HTTP {e.code}: {said})'
                                      + hint(said, self.k)) from None
                last = f'HTTP {e.code}: {said}'
            except (urllib.error.URLError, socket.timeout, OSError, http.client.HTTPException, json.JSONDecodeError) as e:
                last = f'{type(e).__name__}: {getattr(e, "reason", e)}'
            if attempt < len(self.backoff):
                time.sleep(self.backoff[attempt])
        raise ServerError(f'the teacher server at {url} gave no usable answer in {len(self.backoff) + 1} tries over '
                          f'{sum(self.backoff)} s (last: {last}): start it again (scripts/serve_teacher.sh), then '
                          'continue from the last checkpoint with --init_from=resume')

    def score(self, prompts):
        """prompt_logprobs of each prompt (token id lists): one list per prompt, entry j the answer at token j."""
        longest = max(map(len, prompts))
        if self.length is not None and longest > self.length:  # (a teacher's rows with a context are longer)
            raise ServerError(f'the teacher server at {self.url} reads at most {self.length} tokens, a window here is '
                              f'{longest}: start it with --max-model-len {longest} or more')
        body = {'model': self.name, 'prompt': prompts, 'max_tokens': 1, 'temperature': 0, 'prompt_logprobs': self.k}
        for attempt in range(2):  # (a well-formed JSON of the wrong shape is tried once more, then one line)
            answer = self.call('POST', self.url + '/completions', body)
            if isinstance(answer, dict) and answer.get('model') not in (None, self.name):
                raise ServerError(f"the teacher server at {self.url} answered for model '{answer.get('model')}', not "
                                  f"'{self.name}': another server is on that port")
            try:
                choices = sorted(answer['choices'], key=lambda c: c['index'])
                out = [c['prompt_logprobs'] for c in choices]
                if len(out) == len(prompts) and all(len(o) == len(p) for o, p in zip(out, prompts)):
                    return out
                why = f'{len(out)} answers of lengths {[len(o) for o in out][:4]} for {len(prompts)} prompts'
            except (KeyError, TypeError) as e:
                why = f'no {e}' if isinstance(e, KeyError) else str(e)
        raise ServerError(f'the teacher server at {self.url} answered malformed data ({why}): is it a vLLM '
                          'OpenAI-compatible server (scripts/serve_teacher.sh)?')

    def __str__(self):
        return f"{self.url} ('{self.name}')"

class ServedTeacher(NoTeacher):
    """The teacher at url, read as TopK of width k (k = 0: the token that came alone, for kd_kind='pg'); or several,
    url a dict {route: url} in the order of the data's routes (prepare_data.py --route; routed_urls): each window
    goes to its document's (Batch.route). At most `requests` requests in flight, each with several windows."""
    def __init__(self, url, tokenizer, vocab, k, block_size, requests=8, timeout=300.0, retries=5):
        urls = [url] if isinstance(url, str) else list(url.values())
        self.servers = [Server(u, tokenizer, k, block_size, timeout, retries) for u in urls]
        self.vocab, self.k, self.requests = vocab, k, requests
        self.routes = None if isinstance(url, str) else list(url)
        self.seconds = [0.0, 0.0]  # waiting for the answers (the server's work, the wire, JSON); reading them here
        self.pool = ThreadPoolExecutor(requests)

    @property
    def received(self):
        return [n for server in self.servers for n in server.received]

    @torch.no_grad()
    def __call__(self, batch):
        """The TopK at every position of the batch (zeros where no target is supervised). Each window (a packed row
        holds several, their positions restarting at 0) goes as its tokens up to its last supervised target, then
        that target: the answer at token j + 1 is the distribution at position j."""
        X, Y, M = batch.X.cpu(), batch.Y.cpu(), batch.M.cpu()
        route = None if self.routes is None else batch.route.cpu()
        windows = []  # (row, first position, last supervised position)
        for r in range(len(X)):
            bounds = [0] if batch.pos is None else (batch.pos[r] == 0).nonzero().flatten().tolist()
            bounds.append(X.shape[1])
            for a, e in zip(bounds, bounds[1:]):
                supervised = M[r, a:e].nonzero()
                if len(supervised):
                    windows.append((r, a, a + supervised[-1].item()))
        prompts = [X[r, a:j + 1].tolist() + [Y[r, j].item()] for r, a, j in windows]
        server = [0 if route is None else int(route[r, a]) for r, a, _ in windows]  # (each window's teacher)
        per = max(1, math.ceil(len(prompts) / self.requests))  # (at most `requests` in flight, each a batch)
        jobs = [(s, [i for i in range(len(prompts)) if server[i] == s]) for s in range(len(self.servers))]
        jobs = [(s, part[c:c + per]) for s, part in jobs for c in range(0, len(part), per)]
        t0 = time.time()
        answers = [None] * len(prompts)
        for (s, part), got in zip(jobs, self.pool.map(lambda job: self.servers[job[0]].score(
                [prompts[i] for i in job[1]]), jobs)):
            for i, answer in zip(part, got):
                answers[i] = answer
        t1 = time.time()
        width = max(self.k, 1)
        ids = torch.zeros(*M.shape, width, dtype=torch.long)
        logp = torch.zeros(*M.shape, width, dtype=torch.float32)
        tail = torch.zeros(M.shape, dtype=torch.float64)
        for (r, a, j), prompt, answer, s in zip(windows, prompts, answers, server):
            for i in range(a, j + 1):
                got = self.read(answer[i - a + 1], prompt[i - a + 1], self.servers[s])
                ids[r, i], logp[r, i] = torch.tensor([g[0] for g in got]), torch.tensor([g[1] for g in got])
                tail[r, i] = math.log(max(1 - sum(math.exp(g[1]) for g in got), TAIL_FLOOR))
        to = lambda t: t.to(batch.X.device)
        self.seconds[0], self.seconds[1] = self.seconds[0] + t1 - t0, self.seconds[1] + time.time() - t1
        return TeacherOut(logits=TopK(to(ids), to(logp), to(tail.float()), to(torch.zeros(*M.shape, 0))))

    def read(self, entry, token, server):
        """[(id, log-probability)] of one position: its top k by rank (k = 0: the token that came)."""
        try:
            got = [(int(i), float(v['logprob']), v.get('rank')) for i, v in entry.items()]
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ServerError(f'the teacher server at {server.url} answered malformed data (a position reads '
                              f'{str(entry)[:80]}): is it a vLLM OpenAI-compatible server?') from None
        if self.k == 0:
            got = [g for g in got if g[0] == token]
        else:
            got = sorted((g for g in got if g[2] is None or g[2] <= self.k), key=lambda g: -g[1])[:self.k]
        if len(got) < max(self.k, 1):
            raise ServerError(f'the teacher server at {server.url} gave {len(got)} log-probabilities at a position '
                              f'where teacher_topk={self.k} asked for {max(self.k, 1)}: start it with --max-logprobs '
                              f'{self.k} or more, or lower teacher_topk')
        if any(not 0 <= g[0] < self.vocab or not g[1] <= 1e-4 for g in got):
            raise ServerError(f'the teacher server at {server.url} answered token {max(g[0] for g in got)} or a '
                              f'log-probability above 0 for a vocabulary of {self.vocab}: it serves another tokenizer')
        return [g[:2] for g in got]

    def __str__(self):
        what = 'the log-probability of each token that came' if self.k == 0 else f'top-{self.k} at T = 1'
        where = ', '.join(map(str, self.servers)) if self.routes is None else \
            ', '.join(f'{name}: {server}' for name, server in zip(self.routes, self.servers))
        return f'served by {where}; {what}, {self.requests} requests at a time'

def answer_text(error):
    """What a server that refused a request said (vLLM: {"error": {"message": ...}} or {"message": ...})."""
    try:
        text = error.read().decode(errors='replace')
        answer = json.loads(text)
        return str(answer.get('message') or answer.get('error', {}).get('message') or text)[:300]
    except Exception:
        return str(getattr(error, 'reason', error))[:300]

def hint(message, k):
    if 'logprobs' in message.lower():
        return f': start it with --max-logprobs {k} or more, or lower teacher_topk'
    return ''
