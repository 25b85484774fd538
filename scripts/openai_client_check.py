"""Drive a running `baton serve` with the official `openai` Python client.

Usage: python scripts/openai_client_check.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)

Checks completions, chat completions, streaming (with usage), logprobs, a token-id prompt and
an error status, the way users' code calls them. Exits non-zero with a message on the first
mismatch. tests/openai_client.rs starts the server and runs this script; scripts/test.sh
installs the client into a virtual environment first.
"""

import sys

import openai
from openai import OpenAI


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    base_url = sys.argv[1]
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

    models = client.models.list()
    model = models.data[0].id
    check(model, "/v1/models lists a model")

    c = client.completions.create(model=model, prompt="Hello, world", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    check(c.choices[0].finish_reason == "length", f"completion finish_reason: {c.choices[0].finish_reason}")
    check(c.usage.completion_tokens == 8, f"completion usage: {c.usage}")
    text = c.choices[0].text

    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(model=model, prompt="Hello, world", max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    check("".join(pieces) == text, "streamed completion text equals the non-streamed one")
    check(finish == "length" and usage and usage.completion_tokens == 8, f"stream end: {finish} {usage}")

    lp = client.completions.create(model=model, prompt="Hi", max_tokens=3, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True})
    check(len(lp.choices[0].logprobs.token_logprobs) == 3, "completion logprobs per token")
    check(all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs), "completion top-2 logprobs")

    ids = client.completions.create(model=model, prompt=[1, 2, 3, 4], max_tokens=2, extra_body={"return_token_ids": True})
    check(ids.model_extra.get("prompt_token_ids") == [1, 2, 3, 4], f"return_token_ids: {ids.model_extra}")

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    msg = chat.choices[0].message
    check(msg.role == "assistant" and isinstance(msg.content, str), "chat message")
    check(len(chat.choices[0].logprobs.content) == 6, "chat logprobs per token")
    check(len(chat.choices[0].logprobs.content[0].top_logprobs) == 2, "chat top logprobs")

    streamed = []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed.append(chunk.choices[0].delta.content)
    check("".join(streamed) == msg.content, "streamed chat equals the non-streamed one")

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        check(False, "an unknown model must fail")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model -> 404")
    try:
        client.completions.create(model=model, prompt="x", max_tokens=1, temperature=-3)
        check(False, "a bad temperature must fail")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "bad temperature -> 400")

    print("openai client check: all passed")


if __name__ == "__main__":
    main()
