"""Official clients against a running `vicuna serve`: the `openai` package (completions and chat,
plain and streamed, with logprobs and n) and `huggingface_hub.InferenceClient` (TGI's text
generation, plain and streamed, with top_n_tokens, and its chat). Every answer must equal what the
engine generates alone (greedy), which the Rust test computes and passes in.

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

    # Log-probabilities as the client parses them: the greedy token is the argmax, so it is in its
    # own top list with the same value, and heads it.
    completion = openai.completions.create(model="tiny-v32001", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           logprobs=5)
    lp = completion.choices[0].logprobs
    check("openai completions logprobs lengths",
          {len(lp.tokens), len(lp.token_logprobs), len(lp.top_logprobs), len(lp.text_offset)} == {len(lp.tokens)},
          True)
    check("openai completions logprobs: chosen token is its list's best",
          all(top[tok] == logprob == max(top.values())
              for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)), True)
    check("openai completions logprobs text", completion.choices[0].text, expected["completion"])
    stream = openai.completions.create(model="tiny-v32001", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       logprobs=5, stream=True)
    streamed = [x for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for x in chunk.choices[0].logprobs.token_logprobs]
    check("openai completions stream logprobs", streamed, lp.token_logprobs)

    chat = openai.chat.completions.create(model="tiny-v32001", messages=messages,
                                          max_tokens=expected["chat_max_tokens"], temperature=0,
                                          logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    check("openai chat logprobs: chosen token heads its list",
          all(len(e.top_logprobs) == 5 and e.top_logprobs[0].token == e.token
              and e.top_logprobs[0].logprob == e.logprob for e in content), True)
    check("openai chat logprobs bytes", all(e.bytes == list(e.token.encode()) for e in content
                                            if not e.token.startswith("bytes:")), True)
    stream = openai.chat.completions.create(model="tiny-v32001", messages=messages,
                                            max_tokens=expected["chat_max_tokens"], temperature=0,
                                            logprobs=True, top_logprobs=5, stream=True)
    streamed = [e.logprob for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    check("openai chat stream logprobs", streamed, [e.logprob for e in content])

    # n = 3, seeded: three choices, and the same three again.
    def three():
        out = openai.completions.create(model="tiny-v32001", prompt=prompt, max_tokens=max_tokens, n=3, seed=42,
                                        temperature=1.0)
        return [(c.index, c.text) for c in out.choices]
    first = three()
    check("openai completions n=3", [i for i, _ in first], [0, 1, 2])
    check("openai completions n=3 seeded", three(), first)
    chat = openai.chat.completions.create(model="tiny-v32001", messages=messages, max_tokens=8, n=3, seed=42)
    check("openai chat n=3", [c.index for c in chat.choices], [0, 1, 2])

    # Structured output: with a JSON schema the reply parses and fits it, whatever the model.
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 10}, "kind": {"enum": ["cat", "dog"]},
                             "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "maxItems": 3}}}

    def fits(text):
        value = json.loads(text)
        return (set(value) == {"name", "kind", "tags"} and isinstance(value["name"], str)
                and len(value["name"]) <= 10 and value["kind"] in ("cat", "dog") and len(value["tags"]) <= 3
                and all(isinstance(t, int) and 0 <= t <= 9 for t in value["tags"]))
    for seed in range(3):
        chat = openai.chat.completions.create(
            model="tiny-v32001", messages=messages, max_tokens=200, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}})
        check(f"openai chat response_format json_schema (seed {seed})", fits(chat.choices[0].message.content), True)

    # huggingface_hub posts TGI requests to the URL itself (`POST /`), and chat to /v1/chat/completions.
    hf = InferenceClient(base_url, token=api_key, timeout=60)
    out = hf.text_generation(prompt, max_new_tokens=max_tokens)
    check("huggingface_hub text_generation", out, expected["completion"])
    out = hf.text_generation(prompt, max_new_tokens=max_tokens, details=True)
    check("huggingface_hub text_generation details", (out.generated_text, out.details.generated_tokens),
          (expected["completion"], expected["completion_tokens"]))
    check("huggingface_hub details tokens", "".join(t.text for t in out.details.tokens), expected["completion"])
    out = hf.text_generation(prompt, max_new_tokens=max_tokens, details=True, top_n_tokens=3,
                             decoder_input_details=True)
    check("huggingface_hub top_n_tokens", [len(top) for top in out.details.top_tokens],
          [3] * len(out.details.tokens))
    # huggingface_hub leaves the nested lists of `top_tokens` as plain dicts.
    check("huggingface_hub top_n_tokens: greedy token first",
          all(top[0]["id"] == t.id for t, top in zip(out.details.tokens, out.details.top_tokens)), True)
    check("huggingface_hub prefill", (len(out.details.prefill), out.details.prefill[0].logprob),
          (expected["prompt_tokens"], None))
    out = hf.text_generation(prompt, max_new_tokens=200, details=True, top_n_tokens=3,
                             grammar={"type": "json", "value": schema})
    check("huggingface_hub grammar json", (fits(out.generated_text), len(out.details.top_tokens[0])), (True, 3))
    out = hf.text_generation(prompt, max_new_tokens=max_tokens, details=True, best_of=2, do_sample=True)
    check("huggingface_hub best_of", len(out.details.best_of_sequences), 1)
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
