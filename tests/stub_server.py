"""A stand-in for vLLM's OpenAI-compatible server, inside the tests, over real HTTP: it answers GET /v1/models, POST
/tokenize and POST /v1/completions with prompt_logprobs in vLLM's shapes, from a model in this process, and injects
the faults a real server shows (down, 5xx, slow, truncated JSON, fewer log-probabilities than asked, another model's
name). It is for faults: scripts/check_served.py checks the client against a real vLLM server."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import torch

class Stub:
    """logprobs(ids) -> (len(ids), V) log-probabilities of the next token after each prefix; tokenize(text) -> ids.
    Faults, set between calls: fail (how many requests answer HTTP 500), slow (seconds before each answer), truncate
    (answers cut in half), cap (most log-probabilities per position), answer_as (the model named in answers),
    fail_after (requests answered before the server is gone), garbage (not HTTP at all)."""
    def __init__(self, logprobs, tokenize, name='stub/teacher', max_model_len=4096):
        self.logprobs, self.tokenize, self.name, self.max_model_len = logprobs, tokenize, name, max_model_len
        self.fail, self.slow, self.truncate, self.cap, self.answer_as = 0, 0.0, False, None, None
        self.fail_after = None  # requests past this many find the server gone (the connection closed unanswered)
        self.garbage = False  # requests answered by something that is not HTTP
        self.requests, self.positions, self.prompts = 0, 0, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, code, body):
                data = json.dumps(body).encode()
                if stub.truncate:
                    data = data[:len(data) // 2]
                self.send_response(code)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # (a client that timed out and left)
                    pass

            def do_GET(self):
                if self.path != '/v1/models':
                    return self.answer(404, {'message': 'not found'})
                self.answer(200, {'object': 'list', 'data': [{'id': stub.name, 'max_model_len': stub.max_model_len}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                stub.requests += 1
                if stub.garbage:  # (another service on the port: no HTTP at all)
                    self.wfile.write(b'SSH-2.0-OpenSSH_9.6\r\n')
                    self.close_connection = True
                    return
                if stub.fail_after is not None and stub.requests > stub.fail_after:
                    self.close_connection = True
                    return
                if stub.slow:
                    threading.Event().wait(stub.slow)
                if stub.fail:
                    stub.fail -= 1
                    return self.answer(500, {'message': 'internal server error'})
                if self.path == '/tokenize':
                    return self.answer(200, {'tokens': stub.tokenize(body['prompt']), 'count': 0})
                if self.path != '/v1/completions':
                    return self.answer(404, {'message': 'not found'})
                if body.get('model') != stub.name:
                    return self.answer(404, {'error': {'message': f"The model `{body.get('model')}` does not exist."}})
                k = body['prompt_logprobs']
                if stub.cap is not None and k > stub.cap:
                    return self.answer(400, {'error': {'message': f'Requested prompt logprobs of {k}, which is '
                                                                  f'greater than max allowed: {stub.cap}'}})
                choices = [{'index': i, 'text': '', 'prompt_logprobs': stub.score(p, k)}
                           for i, p in enumerate(body['prompt'])]
                self.answer(200, {'model': stub.answer_as or stub.name, 'choices': choices})

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}/v1'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def score(self, ids, k):
        """vLLM's prompt_logprobs: None, then per token a dict id -> {logprob, rank, decoded_token} of the top k and
        the token itself (rank counted from 1)."""
        lp = self.logprobs(ids[:-1])
        self.positions += len(ids) - 1
        self.prompts.append(ids)
        out = [None]
        for j, token in enumerate(ids[1:]):
            order = lp[j].argsort(descending=True)
            rank = {int(t): r + 1 for r, t in enumerate(order[:max(k, 0)].tolist())}
            rank.setdefault(token, int((lp[j] > lp[j, token]).sum()) + 1)
            out.append({str(t): {'logprob': float(lp[j, t]), 'rank': r, 'decoded_token': ''} for t, r in rank.items()})
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()

def model_logprobs(model, columns):
    """The log-probabilities a server of `model` answers, over its first `columns` output rows (the real tokens)."""
    @torch.no_grad()
    def logprobs(ids):
        z = model(input_ids=torch.tensor([ids])).logits[0, :, :columns].double()
        return torch.log_softmax(z, -1)
    return logprobs
