"""The completion server: OpenAI's client and llama.cpp's /infill against a server on loopback.

The served model is the shipped one (GPTBigCode, 6 layers) with its
tokenizer; greedy results are compared with `sj.generate` / `sj.infill` on
the same model, token for token. A StarCoder2 model with a windowed (ring)
cache and a tokenizer with <file_sep> checks /infill's repository context
and prefix reuse on a ring.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

import starcoder_jax as sj
from starcoder_jax.inference.fim import build_prompt, encode_literal, infill, infill_stop_ids
from starcoder_jax.model.pretrained import DEFAULT_MODEL, resolve_model_dir
from starcoder_jax.serve.engine import Engine, Request
from starcoder_jax.serve.server import Server
from starcoder_jax.tokenizer import load_tokenizer

PROMPTS = ["def fib(n):", "import os\n", "class Stack:\n    def __init__(self):", "for i in range(10):",
           "x = [1, 2, 3]\n", "# sort a list\n", "def add(a, b):\n    return", "while True:\n"]


@pytest.fixture(scope="module")
def shipped():
    path = resolve_model_dir(DEFAULT_MODEL)
    return sj.load_pretrained(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def served(shipped):
    model, tokenizer = shipped
    engine = Engine(model, tokenizer, slots=8, max_seq_len=256, max_queue=64)
    engine.warmup()
    server = Server(engine, tokenizer, model_name="tiny", port=0, max_body=64 << 10)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server, path, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _greedy(model, tokenizer, prompt, n, **kw):
    return sj.generate(model, [prompt], tokenizer=tokenizer, max_new_tokens=n, **kw)[0]


def test_openai_client_plain_streamed_fim_n_stop_and_logprobs(served, client, shipped):
    model, tokenizer = shipped
    # plain, greedy: sj.generate's text and finish reason
    want = _greedy(model, tokenizer, "def fib(n):", 24)
    got = client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    n_prompt = len(tokenizer.encode("def fib(n):"))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (n_prompt, 24)
    assert got.object == "text_completion" and got.model == "tiny"
    # streamed: the same text in pieces, the finish reason on the last, then the usage
    chunks = list(client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # FIM through `suffix`: sj.infill's middle
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    middle = infill(model, tokenizer, prefix, suffix, max_new_tokens=16)
    got = client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=16, temperature=0)
    assert got.choices[0].text == middle
    # n > 1 with a seed: n choices, reproducible
    kw = dict(model="tiny", prompt=["a = 1", "b = 2"], max_tokens=8, temperature=0.9, n=3, seed=11)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices[:3]}) > 1  # the choices draw apart
    # a stop string ends the text before it
    cut = want.text.find("\n", 3)
    stop = want.text[cut:cut + 2]
    got = client.completions.create(model="tiny", prompt="def fib(n):", max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == want.text[:want.text.find(stop)] and got.choices[0].finish_reason == "stop"
    # logprobs: each token, its logprob and its alternatives
    got = client.completions.create(model="tiny", prompt="import os\n", max_tokens=6, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert "".join(lp.tokens) == got.choices[0].text and len(lp.token_logprobs) == 6
    assert all(len(t) == 2 and max(t.values()) <= 0 for t in lp.top_logprobs)
    assert all(abs(max(t.values()) - v) < 1e-4 for t, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_through_the_server_equals_generate_alone_and_beside_seven_others(served, client, shipped):
    model, tokenizer = shipped
    want = [_greedy(model, tokenizer, p, 20).text for p in PROMPTS]
    alone = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0)
    assert alone.choices[0].text == want[2]
    got = [None] * len(PROMPTS)

    def one(i):
        got[i] = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=20,
                                           temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def test_prefix_reuse_extends_a_slots_cached_prompt_and_keeps_the_tokens(served, client, shipped):
    model, tokenizer = shipped
    base = "def parse(line):\n    parts = line.split(',')\n    "
    client.completions.create(model="tiny", prompt=base, max_tokens=4, temperature=0)
    typed = base + "return"  # the editor typed on
    got = client.completions.create(model="tiny", prompt=typed, max_tokens=12, temperature=0)
    assert got.usage.prompt_tokens_details.cached_tokens >= len(tokenizer.encode(base)) - 2
    assert got.choices[0].text == _greedy(model, tokenizer, typed, 12).text


def test_infill_as_llama_cpp_clients_send_it(served, shipped):
    model, tokenizer = shipped
    body = {"input_prefix": "def mean(xs):\n    ", "input_suffix": "\n    return total / len(xs)\n",
            "input_extra": [{"filename": "util.py", "text": "def total(xs):\n    return sum(xs)\n"}],
            "n_predict": 16, "temperature": 0, "stream": False, "cache_prompt": True}
    status, _, text = _post(served, "/infill", body)
    assert status == 200
    got = json.loads(text)
    # no <file_sep> in this vocabulary: the extra text goes before the FIM prompt
    ids = encode_literal(tokenizer, body["input_extra"][0]["text"]) + build_prompt(
        tokenizer, body["input_prefix"], body["input_suffix"])
    want = sj.generate(model, [ids], tokenizer=tokenizer, max_new_tokens=16,
                       stop_ids=infill_stop_ids(tokenizer))[0]
    assert got["content"] == want.text and got["tokens_evaluated"] == len(ids)
    assert got["stop"] is True and got["stop_type"] == ("limit" if want.finish_reason == "length" else "eos")
    assert got["tokens_predicted"] == len(got["tokens"]) > 0
    # streamed: data lines of content, the last with stop true
    status, headers, text = _post(served, "/infill", dict(body, stream=True))
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == want.text
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]


def _collect(request) -> list[int]:
    ids = []
    while True:
        event = request.events.get(timeout=120)
        ids += event.ids
        if event.finished:
            return ids


def _starcoder2_with_file_sep(tmp_path_factory):
    from builders import STARCODER_SPECIAL_TOKENS, make_tokenizer

    from starcoder_jax.config import StarCoderConfig
    from starcoder_jax.model.modules import init_model
    path = make_tokenizer(str(tmp_path_factory.mktemp("sc2_tok")), 512,
                          specials=[*STARCODER_SPECIAL_TOKENS, "<file_sep>", "<repo_name>"])
    tokenizer = load_tokenizer(path)
    config = StarCoderConfig(model_type="starcoder2", vocab_size=512, n_positions=128, n_embd=64, n_layer=2,
                             n_head=4, n_kv_head=2, sliding_window=16)
    return init_model(config), tokenizer


@pytest.mark.slow
def test_starcoder2_infill_with_repository_context_and_ring_prefix_reuse(tmp_path_factory):
    model, tokenizer = _starcoder2_with_file_sep(tmp_path_factory)
    engine = Engine(model, tokenizer, slots=2, max_seq_len=96)
    server = Server(engine, tokenizer, model_name="sc2", port=0)
    server.start()
    try:
        body = {"input_prefix": "def f(x):\n    ", "input_suffix": "\n", "n_predict": 24, "temperature": 0,
                "input_extra": [{"filename": "a.py", "text": "x = 1\n"}, {"filename": "b.py", "text": "y = 2\n"}]}
        status, _, text = _post(server, "/infill", body)
        got = json.loads(text)
        sep = tokenizer.token_id("<file_sep>")
        ids = ([sep] + encode_literal(tokenizer, "a.py\nx = 1\n") + [sep] + encode_literal(tokenizer, "b.py\ny = 2\n")
               + [sep] + build_prompt(tokenizer, "def f(x):\n    ", "\n"))
        assert status == 200 and got["tokens_evaluated"] == len(ids)
        want = sj.generate(model, [ids], tokenizer=tokenizer, max_new_tokens=24, stop_ids=infill_stop_ids(tokenizer))
        assert got["tokens"] == [t for t in want[0].ids if t not in infill_stop_ids(tokenizer)]
        # past the window of 16, in a ring: a prompt that extends the slot's cached ids reuses them
        long = list(range(20, 60))
        out = _collect(engine.submit(Request(long, max_tokens=6)))
        typed = long + out[:5] + [7, 8, 9]
        second = engine.submit(Request(typed, max_tokens=8))
        ids2 = _collect(second)
        assert second.cached_tokens == len(long) + 5
        assert ids2 == sj.generate(model, [typed], max_new_tokens=8, ignore_eos=True)[0].ids
    finally:
        server.stop()


def test_bad_input_gets_4xx_with_an_openai_error_and_the_server_keeps_serving(served):
    cases = [
        (b"{not json", 400, None),
        ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        ({"prompt": "x", "max_tokens": 300}, 400, "max_tokens"),  # 256 positions
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
        ({"prompt": "x", "echo": True}, 400, "echo"),
        ({"prompt": ""}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
        ([1, 2], 400, None),
    ]
    for body, status, param in cases:
        got, _, text = _post(served, "/v1/completions", body)
        err = json.loads(text)["error"]
        assert (got, err["param"]) == (status, param), (body, text)
        assert err["message"] and err["type"]
    got, _, text = _post(served, "/v1/completions", {"prompt": "x" * (70 << 10)})  # over max_body (64 KiB)
    assert got == 413 and "at most" in json.loads(text)["error"]["message"]
    got, _, _ = _post(served, "/infill", {"input_prefix": 3})
    assert got == 400
    got, _, _ = _post(served, "/v1/chat/nothing", {"prompt": "x"})
    assert got == 404
    # still serving
    got, _, text = _post(served, "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
    assert got == 200 and json.loads(text)["choices"][0]["finish_reason"] == "length"
    with urllib.request.urlopen(served.url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.slow
def test_a_full_queue_gets_429_with_retry_after(shipped):
    model, tokenizer = shipped
    engine = Engine(model, tokenizer, slots=1, max_seq_len=256, max_queue=1)
    server = Server(engine, tokenizer, model_name="tiny", port=0)
    server.start()
    try:
        running = [engine.submit(Request([1, 2, 3], max_tokens=200))]
        assert _wait(lambda: engine.busy_slots() == 1)
        running.append(engine.submit(Request([1, 2, 3], max_tokens=200)))  # waits: the queue is full
        status, headers, text = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 429 and headers["Retry-After"] == "1"
        assert json.loads(text)["error"]["type"] == "rate_limit_error"
        for r in running:
            r.cancel()
    finally:
        server.stop()


def _cancelled(server):
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith('starcoder_jax_requests_total{reason="cancelled"}'):
            return int(float(line.split()[-1]))
    return 0


def _wait(predicate, seconds=60):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_disconnects_cancels_its_request_and_frees_the_slot(served, shipped):
    # prompts whose greedy completion runs all 230 tokens (no eos): only a cancel ends them early
    model, tokenizer = shipped
    long = [p for p in PROMPTS if _greedy(model, tokenizer, p, 230).finish_reason == "length"][:2]
    assert len(long) == 2
    before = _cancelled(served)
    body = json.dumps({"prompt": long[0], "max_tokens": 230, "temperature": 0, "stream": True}).encode()
    conn = http.client.HTTPConnection(served.host, served.port, timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first chunk's size line: tokens are flowing
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert _wait(lambda: _cancelled(served) == before + 1)
    assert _wait(lambda: served.engine.busy_slots() == 0)
    # not streamed: the server notices the closed socket while the request runs
    raw = socket.create_connection((served.host, served.port))
    body = json.dumps({"prompt": long[1], "max_tokens": 230, "temperature": 0}).encode()
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert _wait(lambda: served.engine.busy_slots() == 1, 30)
    raw.close()
    assert _wait(lambda: _cancelled(served) == before + 2)
    assert _wait(lambda: served.engine.busy_slots() == 0)


def test_no_compilation_after_warmup_within_the_buckets(served, client):
    counts = served.engine.compilations()
    assert set(counts) == {"fresh", "extend", "step1", "step2", "step4", "step8"}
    assert all(n >= 1 for name, n in counts.items() if name.startswith("step"))  # warm-up compiled each
    for prompt, kw in [("x = 1", {}), ("def g():\n    pass", dict(temperature=0.7, top_p=0.9, seed=3)),
                       ("import re", dict(temperature=1.2, n=2, stop=["\n\n"], logprobs=1))]:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=5, **kw)
    assert served.engine.compilations() == counts


@pytest.mark.slow
def test_thirty_two_concurrent_clients_all_get_complete_answers(served, client):
    results, errors = {}, []

    def one(i):
        try:
            kw = dict(model="tiny", prompt=PROMPTS[i % 8] + f" # {i}", max_tokens=8 + i % 9, temperature=0.5,
                      seed=i)
            if i % 2:
                chunks = list(client.completions.create(stream=True, **kw))
                results[i] = ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason)
            else:
                c = client.completions.create(**kw)
                results[i] = (c.choices[0].text, c.choices[0].finish_reason)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(repr(err))

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == [] and sorted(results) == list(range(32))
    assert all(reason in ("stop", "length") for _, reason in results.values())
    assert time.monotonic() - start < 300


@pytest.mark.slow
def test_sigterm_lets_the_live_request_finish_then_exits(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "starcoder_jax.cli", "serve", "--port", "0", "--slots", "2",
                             "--max-seq-len", "256"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = None
        for line in proc.stderr:
            if line.startswith("serving "):
                url = line.split(" at ")[1].split(" ")[0]
                break
        assert url is not None
        host, port = url[len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        body = json.dumps({"prompt": "def f(x):", "max_tokens": 120, "temperature": 0, "stream": True})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.readline()  # the first event: the request is live
        proc.send_signal(signal.SIGTERM)
        text = response.read().decode()
        assert text.rstrip().endswith("data: [DONE]")
        chunks = [json.loads(x[6:]) for x in text.split("\n") if x.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(kv_cache="int8"), dict(mesh="data=1")])
def test_the_engine_with_an_int8_cache_or_on_a_mesh_gives_generates_tokens(shipped, options):
    model, tokenizer = shipped
    engine = Engine(model, tokenizer, slots=3, max_seq_len=128, **options)
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS[:4]]
        requests = [engine.submit(Request(p, max_tokens=12, stop_ids=(tokenizer.eos_id,))) for p in prompts]
        got = [_collect(r) for r in requests]
        kv = options.get("kv_cache")
        want = [sj.generate(model, [p], tokenizer=tokenizer, max_new_tokens=12, kv_cache=kv)[0].ids for p in prompts]
        assert got == [[t for t in w if t != tokenizer.eos_id] for w in want]
    finally:
        engine.close()


@pytest.mark.slow
def test_speculative_engine_gives_generates_tokens_and_compiles_nothing_after_warmup(shipped):
    """A self-draft (prompt lookup: the next test): greedy requests queued beyond the slots (some
    alone in the step, some beside others) give `generate`'s tokens; the second wave compiles nothing."""
    from starcoder_jax.inference.speculative import first_layers

    model, tokenizer = shipped
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    want = [[t for t in g.ids if t != tokenizer.eos_id]
            for g in sj.generate(model, prompts, tokenizer=tokenizer, max_new_tokens=16)]
    for draft in (first_layers(model, 3),):
        engine = Engine(model, tokenizer, slots=4, max_seq_len=128, draft=draft, num_draft_tokens=3)
        try:
            engine.warmup()
            compiled = engine.compilations()
            for _ in range(2):
                requests = [engine.submit(Request(p, max_tokens=16, stop_ids=(tokenizer.eos_id,))) for p in prompts]
                assert [_collect(r) for r in requests] == want
            assert engine.compilations() == compiled
            assert 0 < engine.accepted_tokens <= engine.drafted_tokens
            sampled = engine.submit(Request(prompts[0], max_tokens=16, sampling=sj.inference.sampling.SamplingParams(
                temperature=0.8, top_k=20), seed=3))
            again = engine.submit(Request(prompts[0], max_tokens=16, sampling=sampled.sampling, seed=3))
            assert _collect(sampled) == _collect(again)  # seeded: the same text
        finally:
            engine.close()


@pytest.mark.slow
def test_speculative_server_over_http_and_a_ring_cache(shipped, tmp_path_factory):
    model, tokenizer = shipped
    engine = Engine(model, tokenizer, slots=2, max_seq_len=256, draft="prompt-lookup", num_draft_tokens=4)
    server = Server(engine, tokenizer, model_name="tiny", port=0)
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompt = PROMPTS[6] + " a + b\n\n" + PROMPTS[6]
        want = _greedy(model, tokenizer, prompt, 24, stop=["\n\n"]).text
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=["\n\n"])
        assert got.choices[0].text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=["\n\n"], stream=True))
        assert streamed == want
    finally:
        server.stop()
    sc2, tok2 = _starcoder2_with_file_sep(tmp_path_factory)
    engine = Engine(sc2, tok2, slots=2, max_seq_len=96, draft="prompt-lookup", num_draft_tokens=4)
    try:
        long = [20 + i % 7 for i in range(40)]  # repeats, so drafts are kept; past the window of 16
        out = _collect(engine.submit(Request(long, max_tokens=6)))
        assert out == sj.generate(sc2, [long], max_new_tokens=6, ignore_eos=True)[0].ids
        typed = long + out[:5] + [7, 8, 9]
        second = engine.submit(Request(typed, max_tokens=20))
        assert _collect(second) == sj.generate(sc2, [typed], max_new_tokens=20, ignore_eos=True)[0].ids
        assert second.cached_tokens == len(long) + 5
    finally:
        engine.close()
