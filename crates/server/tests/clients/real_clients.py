"""Official clients against a running `vicuna serve`: the `openai` package (completions and chat,
plain and streamed) and `huggingface_hub.InferenceClient` (TGI's text generation, plain and
streamed, and its chat). Every answer must equal what the engine generates alone (greedy), which
the Rust test computes and passes in.

usage: real_clients.py BASE_URL API_KEY EXPECTED_JSON
EXPECTED_JSON: {"prompt", "max_tokens", "completion", "chat_messages", "chat_max_tokens", "chat_reply",
                "completion_tokens", "prompt_tokens"}
"""

import json
import sys

from huggingface_hub import InferenceClient
from openai import OpenAI


def check(name, got, want):
    if got != want:
        print(f"FAIL {name}:\n  got  {got!r}\n  want {want!r}")
        sys.exit(1)
    print(f"ok   {name}")


def main():
    base_url, api_key, expected = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    prompt = expected["prompt"]
    max_tokens = expected["max_tokens"]
    messages = expected["chat_messages"]

    openai = OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60)
    models = openai.models.list()
    check("openai models.list", [m.id for m in models.data], ["tiny-v32001"])

    completion = openai.completions.create(model="tiny-v32001", prompt=prompt, max_tokens=max_tokens, temperature=0)
    check("openai completions text", completion.choices[0].text, expected["completion"])
    check("openai completions usage", (completion.usage.prompt_tokens, completion.usage.completion_tokens),
          (expected["prompt_tokens"], expected["completion_tokens"]))

    stream = openai.completions.create(model="tiny-v32001", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
    check("openai completions stream", text, expected["completion"])
    check("openai completions stream usage", usage.completion_tokens, expected["completion_tokens"])

    chat = openai.chat.completions.create(model="tiny-v32001", messages=messages,
                                          max_tokens=expected["chat_max_tokens"], temperature=0)
    check("openai chat", chat.choices[0].message.content, expected["chat_reply"])
    check("openai chat role", chat.choices[0].message.role, "assistant")

    stream = openai.chat.completions.create(model="tiny-v32001", messages=messages,
                                            max_tokens=expected["chat_max_tokens"], temperature=0, stream=True)
    text, finish = "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    check("openai chat stream", text, expected["chat_reply"])
    check("openai chat stream finish_reason", finish in ("stop", "length"), True)

    # huggingface_hub posts TGI requests to the URL itself (`POST /`), and chat to /v1/chat/completions.
    hf = InferenceClient(base_url, token=api_key, timeout=60)
    out = hf.text_generation(prompt, max_new_tokens=max_tokens)
    check("huggingface_hub text_generation", out, expected["completion"])
    out = hf.text_generation(prompt, max_new_tokens=max_tokens, details=True)
    check("huggingface_hub text_generation details", (out.generated_text, out.details.generated_tokens),
          (expected["completion"], expected["completion_tokens"]))
    check("huggingface_hub details tokens", "".join(t.text for t in out.details.tokens), expected["completion"])
    pieces = list(hf.text_generation(prompt, max_new_tokens=max_tokens, stream=True))
    check("huggingface_hub text_generation stream", "".join(pieces), expected["completion"])
    events = list(hf.text_generation(prompt, max_new_tokens=max_tokens, stream=True, details=True))
    check("huggingface_hub stream details", (events[-1].generated_text, events[-1].details.generated_tokens),
          (expected["completion"], expected["completion_tokens"]))
    chat = hf.chat_completion(messages, max_tokens=expected["chat_max_tokens"], temperature=0)
    check("huggingface_hub chat_completion", chat.choices[0].message.content, expected["chat_reply"])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in
                   hf.chat_completion(messages, max_tokens=expected["chat_max_tokens"], temperature=0, stream=True))
    check("huggingface_hub chat_completion stream", text, expected["chat_reply"])
    print("all clients ok")


if __name__ == "__main__":
    main()
