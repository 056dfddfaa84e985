"""Checks an Ollama-compatible server with Ollama's official Python client
(PyPI `ollama`): its pydantic response models reject missing or mistyped
fields, so every call below doubles as a wire-format check."""

import sys

import httpx
import ollama


def main() -> None:
    host = sys.argv[1]
    client = ollama.Client(host=host)

    listed = client.list()
    names = [model.model for model in listed.models]
    assert names == ["smollm2:135m"], names
    assert listed.models[0].details.quantization_level == "Q4_1"

    version = httpx.get(f"{host}/api/version").json()
    assert isinstance(version["version"], str), version

    messages = [{"role": "user", "content": "Say hi."}]
    options = {"num_predict": 6, "temperature": 0, "seed": 1}

    whole = client.chat(model="smollm2:135m", messages=messages, options=options, stream=False)
    assert whole.done and whole.done_reason == "length", whole
    assert whole.message.role == "assistant" and whole.message.content, whole
    assert whole.eval_count == 6 and whole.prompt_eval_count > 0, whole
    assert whole.total_duration > 0 and whole.eval_duration > 0, whole

    parts = list(
        client.chat(model="smollm2:135m", messages=messages, options=options, stream=True)
    )
    assert all(not part.done for part in parts[:-1]), parts
    last = parts[-1]
    assert last.done and last.done_reason == "length" and last.eval_count == 6, last
    streamed = "".join(part.message.content for part in parts)
    assert streamed == whole.message.content, (streamed, whole.message.content)

    schema = {
        "type": "object",
        "properties": {"greeting": {"type": "string", "maxLength": 20}},
        "required": ["greeting"],
    }
    formatted = client.chat(
        model="smollm2:135m",
        messages=messages,
        format=schema,
        options={"num_predict": 40, "temperature": 0},
    )
    assert "greeting" in formatted.message.content, formatted

    try:
        client.chat(model="llama3.1", messages=messages)
        raise AssertionError("an unknown model must fail")
    except ollama.ResponseError as error:
        assert error.status_code == 404, error
        assert error.error == 'model "llama3.1" not found, try pulling it first', error.error

    # The chats above loaded the model, for Ollama's default keep_alive.
    running = client.ps()
    assert [model.model for model in running.models] == ["smollm2:135m"], running
    loaded = running.models[0]
    assert loaded.size > listed.models[0].size and loaded.expires_at is not None, loaded
    assert loaded.context_length > 0 and loaded.details.family == "llama", loaded

    unloaded = client.generate(model="smollm2:135m", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload", unloaded
    assert unloaded.response == "", unloaded
    assert client.ps().models == [], "unloaded"

    warmed = client.generate(model="smollm2:135m")
    assert warmed.done and warmed.done_reason == "load", warmed
    assert [model.name for model in client.ps().models] == ["smollm2:135m"]

    try:
        client.generate(model="llama3.1")
        raise AssertionError("loading an unknown model must fail")
    except ollama.ResponseError as error:
        assert error.status_code == 404, error
        assert error.error == "model 'llama3.1' not found", error.error

    print("fidelity ok")


if __name__ == "__main__":
    main()
