"""Shared fixtures: tiny checkpoints (made once per session) and vLLM engine settings for CPU."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest

from vllm_blockffn.tools.tiny import TinyOptions, make_tiny

# Engines in this process (uniproc executor): faster to start and lets tests reach the
# model through LLM.apply_model. Servers in subprocesses use vLLM's default multiprocess engine.
ENGINE_KWARGS = dict(enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.15, max_num_seqs=16,
                     seed=0)

PROMPTS = [
    "Return the list of items in the dictionary.",
    "Hello",
    "The logging module defines functions and classes which implement a flexible event logging system "
    "for applications and libraries, and the benefit of having",
    "import json",
    "A dataclass is",
]


@pytest.fixture(scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 for a module's tests (opt in with pytest.mark.usefixtures): kernels
    launched then run in Triton's CPU interpreter; the variable is restored afterwards."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """tiny_factory(**TinyOptions fields) → path of a checkpoint, cached per option set."""
    made: dict[tuple, str] = {}

    def make(**kwargs) -> str:
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            name = "tiny-" + "-".join(f"{k}={v}" for k, v in key) if key else "tiny-default"
            made[key] = make_tiny(tmp_path_factory.mktemp(name), TinyOptions(**kwargs))
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_factory) -> str:
    return tiny_factory()


def pytest_configure(config):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM (torch >= 2.10) saves compiled models under VLLM_CACHE_ROOT and loads them back when a
    # later run hashes the same; loading such artifacts has crashed CPU engines (vllm#32033,
    # pytorch#173090). A run of the suite compiles what it tests: its own, empty cache.
    os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="blockffn-vllm-cache-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _ray_token_auth()


def _ray_token_auth() -> None:
    """Every Ray instance the tests start or join uses one token of this session's own.

    Ray 2.5x turns token authentication on for a head whenever ~/.ray/auth_token exists (an
    earlier `ray.init()` may have written it), and a driver reads RAY_AUTH_MODE once, when
    Ray is first imported: set here, before anything imports Ray, it reaches in-process
    drivers, servers and Ray's own processes alike."""
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the caller chose
    path = os.path.join(tempfile.mkdtemp(prefix="blockffn-ray-auth-"), "auth_token")
    with open(path, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Engine:
    """A vLLM engine for one checkpoint, torn down with vLLM's own cleanup so the next can start."""

    def __init__(self, path: str, **kwargs):
        from vllm import LLM

        self.path = path
        self.llm = LLM(path, **{"dtype": "float32", **ENGINE_KWARGS, **kwargs})

    def set_backend(self, backend: str) -> None:
        """Switch every BlockFFN layer of the live model (dense | sparse | auto)."""

        def apply(model):
            from vllm_blockffn.serving.layers.blockffn import BlockFFN

            layers = [m for m in model.modules() if isinstance(m, BlockFFN)]
            for m in layers:
                m.backend = backend
            return len(layers)

        assert all(n > 0 for n in self.llm.apply_model(apply))

    def greedy(self, prompts, max_tokens: int = 16, prompt_logprobs: bool = False):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                prompt_logprobs=0 if prompt_logprobs else None)
        return self.llm.generate(prompts, params, use_tqdm=False)

    def close(self) -> None:
        from vllm.distributed import cleanup_dist_env_and_memory

        if self.llm is not None:
            self.llm = None
            cleanup_dist_env_and_memory()


@pytest.fixture
def engine_factory():
    engines: list[Engine] = []

    def start(path: str, **kwargs) -> Engine:
        engines.append(Engine(path, **kwargs))
        return engines[-1]

    yield start
    for e in engines:
        e.close()


_GREEDY_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
a = json.loads(sys.argv[1])
llm = LLM(a["path"], **a["kwargs"])
params = SamplingParams(max_tokens=a["max_tokens"], temperature=0, ignore_eos=True, prompt_logprobs=0)
outs = llm.generate(a["prompts"], params, use_tqdm=False)
rows = [dict(ids=o.prompt_token_ids, tokens=list(o.outputs[0].token_ids),
             lp=[{str(k): v.logprob for k, v in d.items()} for d in o.prompt_logprobs[1:]]) for o in outs]
print("BLOCKFFN-RESULT " + json.dumps(rows))
"""


def greedy_in_fresh_process(path: str, prompts, max_tokens: int = 16, env: dict | None = None, **kwargs):
    """Greedy outputs with prompt logprobs, from an engine in a new Python process.

    For engines that compile native code (torch.compile → inductor C++): a crash there fails this
    one test with its stderr instead of ending the whole run, and nothing the engines before it left
    in this process (vLLM's frozen env cache, loaded libraries, frozen GC heap) is shared. Returns
    objects shaped like vLLM's RequestOutput as far as compare_to_reference reads them."""
    args = dict(path=path, prompts=list(prompts), max_tokens=max_tokens,
                kwargs={"dtype": "float32", **ENGINE_KWARGS, **kwargs})
    proc = subprocess.run([sys.executable, "-c", _GREEDY_SCRIPT, json.dumps(args)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BLOCKFFN-RESULT ")), None)
    assert proc.returncode == 0 and line, (
        f"engine process exited with {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}")
    return [SimpleNamespace(prompt_token_ids=r["ids"], outputs=[SimpleNamespace(token_ids=r["tokens"])],
                            prompt_logprobs=[None] + [{int(k): SimpleNamespace(logprob=v) for k, v in d.items()}
                                                      for d in r["lp"]])
            for r in json.loads(line.split(" ", 1)[1])]


def compare_to_reference(outputs, reference, max_tokens: int = 16) -> tuple[float, list[bool]]:
    """Max |Δ prompt logprob| over all prompts, and per prompt whether greedy tokens are identical."""
    worst, same = 0.0, []
    for out in outputs:
        ids = out.prompt_token_ids
        ref_lp = reference.prompt_logprobs(ids)
        got_lp = [d[ids[i + 1]].logprob for i, d in enumerate(out.prompt_logprobs[1:])]
        assert len(ref_lp) == len(got_lp) == len(ids) - 1
        worst = max([worst, *(abs(a - b) for a, b in zip(ref_lp, got_lp))])
        same.append(list(out.outputs[0].token_ids) == reference.greedy(ids, max_tokens))
    return worst, same


def expert_scores(T: int, E: int, seed: int = 1):
    """Router scores [T, E] for kernel tests: ~16% of the pairs active (relu of a shifted normal), one NaN (inactive,
    whatever the weights) and the last token's last expert on."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = torch.relu(torch.randn(T, E, generator=g) - 1.0)
    s[0, 0] = float("nan")
    s[-1, -1] = 0.7
    return s


def greedy_up_to_ties(reference, prompt_ids: list[int], got: list[int], margin: float = 1e-3) -> int:
    """Walk a served greedy continuation through the reference, fed the served tokens: every token must be the
    reference's argmax or within ``margin`` (in logits) of it — a near-tie that a path rounding differently from the
    fp32 reference (int8's int16 activations) may break the other way. Returns how many tokens were such ties."""
    import torch

    ids, ties = list(prompt_ids), 0
    for tok in got:
        logits = reference(torch.tensor(ids))[-1]
        best = int(logits.argmax())
        if tok != best:
            gap = float(logits[best] - logits[tok])
            step = len(ids) - len(prompt_ids)
            assert gap <= margin, f"token {step}: served {tok}, the reference's greedy {best} ({gap:.2e} apart)"
            ties += 1
        ids.append(tok)
    return ties


@pytest.fixture
def record_figure(request):
    """record_figure(name, value): printed in the terminal summary (figures for the issue notes)."""
    figures = request.config.stash.setdefault(_FIGURES, {})

    def record(name: str, value) -> None:
        figures[name] = value

    return record


_FIGURES = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = config.stash.get(_FIGURES, {})
    if figures:
        terminalreporter.section("measured figures")
        for name, value in sorted(figures.items()):
            terminalreporter.write_line(f"{name}: {value}")
