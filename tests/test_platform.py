"""hardware.py (train.py's device layer) on every GPU family, proven on the CPU: the attention backend and the
precision chosen for each compute capability, the FA3 load through the real `kernels` call path (hub mocked, or absent),
the FA3 smoke check, the peak-FLOPs table and the `platform:` line.

Nothing here needs a GPU or the network: the capability, ROCm, the hub and Triton are mocked, and the FA3
smoke check runs on CPU tensors.
"""

import functools
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import hardware
import train
from conftest import ROOT

HOPPER, COMMUNITY = "varunneal/flash-attention-3", "kernels-community/flash-attn3"


def windowed_attention(q, k, v, causal=True, window_size=(-1, -1)):
    """A correct FA3 stand-in, written out: (B, T, H, D) in, query i attends keys i - window .. i."""
    assert causal
    T, D = q.size(1), q.size(-1)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) / math.sqrt(D)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j <= window_size[0])), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.double()).to(q.dtype)


def fake_fa3(flash_attn_func):
    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


def no_kernel_image(*args, **kwargs):
    # what a build without code for the GPU raises at its first call (Blackwell with the Hopper/Ampere builds)
    raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


def full_causal(q, k, v, causal=True, window_size=(-1, -1)):
    return windowed_attention(q, k, v, causal, (q.size(1), 0))  # ignores the window


class Hub:
    """Stands in for the `kernels` package: get_kernel(repo) returns `module` (or raises `error`) and
    records the calls."""

    def __init__(self, module=None, error=None):
        self.module, self.error, self.calls = module, error, []

    def get_kernel(self, repo, **kwargs):
        self.calls.append((repo, kwargs))
        if self.error:
            raise self.error
        return types.SimpleNamespace(flash_attn_interface=self.module)


@pytest.fixture
def gpu(monkeypatch):
    """Set up one GPU row: the hub's answer, Triton's presence; the FA3 smoke check runs for real on CPU."""
    monkeypatch.delenv("AUTORESEARCH_ATTENTION", raising=False)
    monkeypatch.setattr(hardware, "fa3_check", functools.partial(hardware.fa3_check, device="cpu"))

    def setup(fa3=windowed_attention, hub_error=None, triton=True):
        hub = Hub(fake_fa3(fa3), hub_error)
        monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=hub.get_kernel))
        find_spec = importlib_find_spec
        monkeypatch.setattr(hardware.importlib.util, "find_spec",
                            lambda name, *a: (find_spec(name, *a) if triton else None) if name == "triton" else find_spec(name, *a))
        return hub
    return setup


importlib_find_spec = hardware.importlib.util.find_spec

# (capability, ROCm, FA3 stand-in, hub error, Triton) -> (backend, hub repo asked or None, words in the reason)
ROWS = {
    "H100/H200 (9.0)": ((9, 0), False, windowed_attention, None, True, "fa3", HOPPER, ["Flash Attention 3 from " + HOPPER]),
    "A100 (8.0)": ((8, 0), False, windowed_attention, None, True, "fa3", COMMUNITY, [COMMUNITY]),
    "RTX 3090/A10 (8.6)": ((8, 6), False, windowed_attention, None, True, "fa3", COMMUNITY, [COMMUNITY]),
    "RTX 4090/L4 (8.9)": ((8, 9), False, windowed_attention, None, True, "fa3", COMMUNITY, [COMMUNITY]),
    "Hopper, hub unreachable": ((9, 0), False, windowed_attention, OSError("connection refused"), True, "flex", HOPPER,
                                ["OSError: connection refused", "FlexAttention"]),
    "Hopper, loads but raises at first call": ((9, 0), False, no_kernel_image, None, True, "flex", HOPPER,
                                               ["loads but fails at the first call", "no kernel image", "FlexAttention"]),
    "Ampere, loads but computes something else": ((8, 6), False, full_causal, None, True, "flex", COMMUNITY,
                                                  ["loads but differs from SDPA", "FlexAttention"]),
    "Hopper, hub unreachable, no Triton": ((9, 0), False, windowed_attention, OSError("offline"), False, "sdpa", HOPPER,
                                           ["no FlexAttention (no Triton)", "SDPA"]),
    "B200 (10.0)": ((10, 0), False, windowed_attention, None, True, "flex", None, ["no Flash Attention 3 build for compute capability 10.0"]),
    "RTX 5090 (12.0)": ((12, 0), False, windowed_attention, None, True, "flex", None, ["compute capability 12.0"]),
    "T4/RTX 20xx (7.5)": ((7, 5), False, windowed_attention, None, True, "sdpa", None,
                          ["compute capability 7.5", "no FlexAttention (compute capability below 8.0)"]),
    "V100 (7.0)": ((7, 0), False, windowed_attention, None, True, "sdpa", None, ["compute capability 7.0"]),
    "MI300X under ROCm (9.4)": ((9, 4), True, windowed_attention, None, True, "flex", None, ["no Flash Attention 3 build for ROCm"]),
    "MI250X under ROCm (9.0)": ((9, 0), True, windowed_attention, None, True, "flex", None, ["ROCm"]),
}


@pytest.mark.parametrize("row", ROWS)
def test_attention_backend_for_each_gpu(gpu, row):
    capability, rocm, fa3, hub_error, triton, backend, repo, words = ROWS[row]
    hub = gpu(fa3, hub_error, triton)
    chosen, reason, module = hardware.select_attention_backend(capability, rocm)
    assert chosen == backend, reason
    assert [call[0] for call in hub.calls] == ([repo] if repo else [])  # never asks the hub for a GPU it has no build for
    assert (module is not None) == (backend == "fa3")
    for word in words:
        assert word in reason
    assert "\n" not in reason


@pytest.mark.parametrize("capability", [(9, 0), (8, 0), (8, 6), (8, 9)])
def test_attention_line_says_fa3_when_the_hub_answers(monkeypatch, tmp_path, capability):
    """The real `kernels.get_kernel` runs with only the hub's download mocked: it must return the FA3 build
    and the `attention:` line must say fa3. With a `kernels` that refuses get_kernel(repo) (0.17 wants a
    version or revision) or wants trust settings, this fails."""
    import kernels

    hub_client = sys.modules[kernels.get_kernel.__module__]  # where get_kernel finds snapshot_download
    repo = hardware.fa3_repo(capability, False)
    package = repo.split("/")[-1].replace("-", "_")
    variant_dir = tmp_path / "build" / "torch-universal" / package
    variant_dir.mkdir(parents=True)
    (variant_dir / "__init__.py").write_text(textwrap.dedent(f"""
        import types
        from {__name__} import windowed_attention
        flash_attn_interface = types.SimpleNamespace(flash_attn_func=windowed_attention)
    """))
    downloads = []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs.get("revision")))
        return str(tmp_path)

    monkeypatch.setattr(hub_client, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hardware, "fa3_check", functools.partial(hardware.fa3_check, device="cpu"))
    monkeypatch.delenv("AUTORESEARCH_ATTENTION", raising=False)
    backend, reason, module = hardware.select_attention_backend(capability, False)
    assert f"attention: {backend} ({reason})" == f"attention: fa3 (Flash Attention 3 from {repo})"
    assert downloads == [(repo, "main")]
    assert module.flash_attn_func is windowed_attention


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_fa3_load_without_network_fails_for_a_network_reason(tmp_path):
    """load_fa3() through the real get_kernel with the hub unreachable (a closed loopback port): the error must
    come from the hub client failing to connect, not from how get_kernel was called (a TypeError, or the
    ValueError of `kernels` 0.17: "A kernel version or revision must be specified")."""
    code = textwrap.dedent("""
        import json, kernels, hardware
        raised = []
        real = kernels.get_kernel
        def spy(*args, **kwargs):
            try:
                return real(*args, **kwargs)
            except BaseException as e:
                raised.append(e)
                raise
        kernels.get_kernel = spy
        module, reason = hardware.load_fa3((9, 0), False)
        chain, e = [], raised[0] if raised else None
        while e is not None:
            chain.append([type(e).__module__, type(e).__name__, [c.__name__ for c in type(e).__mro__], str(e)[:300]])
            e = e.__cause__ or e.__context__
        print(json.dumps({"loaded": module is not None, "reason": reason, "chain": chain}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KERNELS_"))}
    env.update(AUTORESEARCH_DEVICE="cpu", HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="5",
               HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["loaded"]
    chain = result["chain"]
    assert chain, "get_kernel raised nothing"
    top_module, top_name, _, top_message = chain[0]
    assert top_module.startswith("huggingface_hub"), chain  # the hub client gave up, get_kernel accepted the call
    assert top_name not in ("TypeError", "ValueError"), chain
    assert "must be specified" not in top_message and "trust_remote_code" not in top_message
    connection_errors = {"ConnectionError", "ConnectError", "ConnectionRefusedError", "NewConnectionError"}
    assert any(connection_errors & set(mro) for _, _, mro, _ in chain), chain  # caused by the refused connection
    assert result["reason"].startswith(f"no Flash Attention 3 from {HOPPER} ({top_name}: ")


# ---------------------------------------------------------------------------
# FA3 smoke check and forced backends
# ---------------------------------------------------------------------------

def test_fa3_check_accepts_a_correct_kernel_and_rejects_the_rest():
    check = functools.partial(hardware.fa3_check, device="cpu")
    assert check(fake_fa3(windowed_attention)) is None
    assert check(fake_fa3(no_kernel_image)).startswith("fails at the first call (RuntimeError: CUDA error: no kernel image")
    assert check(fake_fa3(full_causal)).startswith("differs from SDPA")
    assert check(fake_fa3(lambda q, k, v, **kw: windowed_attention(q, k, v, **kw) * float("nan"))).startswith("differs")
    assert check(fake_fa3(lambda q, k, v, **kw: windowed_attention(q, k, v, **kw) * 1.05)).startswith("differs")
    # an older FA3 API that returns (out, softmax_lse)
    assert check(fake_fa3(lambda q, k, v, **kw: (windowed_attention(q, k, v, **kw), None))).startswith("fails")
    assert check(types.SimpleNamespace()).startswith("fails at the first call (AttributeError")


def test_forcing_fa3_exits_where_it_cannot_run(gpu, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "fa3")
    gpu(no_kernel_image)
    with pytest.raises(SystemExit, match="loads but fails at the first call"):
        hardware.select_attention_backend((9, 0), False)
    with pytest.raises(SystemExit, match="no Flash Attention 3 build for compute capability 12.0"):
        hardware.select_attention_backend((12, 0), False)
    gpu(windowed_attention)
    assert hardware.select_attention_backend((9, 0), False)[:2] == ("fa3", f"Flash Attention 3 from {HOPPER}; forced by AUTORESEARCH_ATTENTION")


def test_forcing_flex_below_ampere_exits_and_sdpa_skips_the_hub(gpu, monkeypatch):
    hub = gpu()
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "flex")
    with pytest.raises(SystemExit, match="compute capability 8.0"):
        hardware.select_attention_backend((7, 5), False)
    monkeypatch.setenv("AUTORESEARCH_ATTENTION", "sdpa")
    assert hardware.select_attention_backend((9, 0), False) == ("sdpa", "forced by AUTORESEARCH_ATTENTION", None)
    assert hub.calls == []


@pytest.mark.parametrize("capability,rocm,repo", [
    ((9, 0), False, HOPPER), ((8, 0), False, COMMUNITY), ((8, 6), False, COMMUNITY), ((8, 7), False, COMMUNITY),
    ((8, 9), False, COMMUNITY), ((10, 0), False, None), ((10, 3), False, None), ((12, 0), False, None),
    ((12, 1), False, None), ((9, 0), True, None), ((9, 4), True, None), ((7, 5), False, None), ((7, 0), False, None),
    ((6, 1), False, None), (None, False, None),
])
def test_fa3_repo_by_capability(capability, rocm, repo):
    assert hardware.fa3_repo(capability, rocm) == repo


# ---------------------------------------------------------------------------
# Precision by capability
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("capability,dtype", [
    ((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((8, 6), torch.bfloat16), ((8, 9), torch.bfloat16),
    ((10, 0), torch.bfloat16), ((12, 0), torch.bfloat16), ((9, 4), torch.bfloat16),
    ((7, 5), torch.float16), ((7, 0), torch.float16), ((6, 1), torch.float16), (None, torch.float32),
])
def test_amp_dtype_by_capability(capability, dtype):
    assert hardware.select_amp_dtype(capability) == dtype


def test_this_process_runs_the_cpu_profile():
    assert (hardware.CAPABILITY, hardware.IS_ROCM, train.AMP_DTYPE, train.COMPUTE_DTYPE) == (None, False, torch.float32, torch.float32)


def test_environment_set_before_torch_starts_cuda():
    """Importing train.py sets the reference's allocator and hub settings (unless the user set them)."""
    code = "import os, train; print(os.environ['PYTORCH_ALLOC_CONF'], os.environ['HF_HUB_DISABLE_PROGRESS_BARS'])"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, AUTORESEARCH_DEVICE="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["expandable_segments:True", "1"], out.stderr
    with open(os.path.join(ROOT, "train.py")) as f:
        source = f.read()
    assert source.index('os.environ.setdefault("PYTORCH_ALLOC_CONF"') < source.index("\nimport torch")


# ---------------------------------------------------------------------------
# Peak FLOPs (MFU) and the platform line
# ---------------------------------------------------------------------------

# torch.cuda.get_device_name() strings -> (bf16, fp16) dense peak TFLOP/s
DEVICE_NAMES = {
    "NVIDIA H100 80GB HBM3": (989.5, 989.5),
    "NVIDIA H100 PCIe": (756.5, 756.5),
    "NVIDIA H100 NVL": (835.5, 835.5),
    "NVIDIA H200": (989.5, 989.5),
    "NVIDIA H200 NVL": (835.5, 835.5),
    "NVIDIA GH200 480GB": (989.5, 989.5),
    "NVIDIA B200": (2250, 2250),
    "NVIDIA B100": (1750, 1750),
    "NVIDIA GB200": (2500, 2500),
    "NVIDIA A100-SXM4-80GB": (312, 312),
    "NVIDIA A100-SXM4-40GB": (312, 312),
    "NVIDIA A100-PCIE-40GB": (312, 312),
    "NVIDIA A100 80GB PCIe": (312, 312),
    "NVIDIA A10": (125, 125),
    "NVIDIA A10G": (70, 70),
    "NVIDIA L4": (121, 121),
    "NVIDIA L40": (181.05, 181.05),
    "NVIDIA L40S": (362.05, 362.05),
    "Tesla V100-SXM2-16GB": (0, 125),
    "Tesla V100-SXM2-32GB": (0, 125),
    "Tesla V100-PCIE-16GB": (0, 112),
    "Tesla V100S-PCIE-32GB": (0, 130),
    "Tesla T4": (0, 65),
    "NVIDIA GeForce RTX 5090": (209.5, 209.5),
    "NVIDIA GeForce RTX 5080": (112.6, 112.6),
    "NVIDIA GeForce RTX 4090": (165.2, 165.2),
    "NVIDIA GeForce RTX 4090 D": (147.1, 147.1),
    "NVIDIA GeForce RTX 4080": (97.5, 97.5),
    "NVIDIA GeForce RTX 3090": (71, 71),
    "NVIDIA GeForce RTX 3090 Ti": (80, 80),
    "NVIDIA GeForce RTX 3080": (59.5, 59.5),
    "NVIDIA RTX A6000": (154.8, 154.8),
    "NVIDIA RTX 6000 Ada Generation": (364.25, 364.25),
    "AMD Instinct MI300X": (1307.4, 1307.4),
    "AMD Instinct MI325X": (1307.4, 1307.4),
    "AMD Instinct MI250X/MI250": (191.5, 191.5),
    "AMD Instinct MI250": (181.05, 181.05),
    "AMD Instinct MI210": (181, 181),
    # not in the table: MFU 0
    "Quadro RTX 6000": (0, 0),
    "NVIDIA GeForce GTX 1080 Ti": (0, 0),
    "AMD Radeon RX 7900 XTX": (0, 0),
    "": (0, 0),
}


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_peak_flops_by_device_name_and_dtype(name):
    bf16, fp16 = DEVICE_NAMES[name]
    assert hardware.peak_flops_for(name, torch.bfloat16) == pytest.approx(bf16 * 1e12)
    assert hardware.peak_flops_for(name, torch.float16) == pytest.approx(fp16 * 1e12)
    assert hardware.peak_flops_for(name, torch.float32) == 0.0


def test_peak_flops_table_is_ordered_specific_first():
    """No row is shadowed by an earlier, less specific one: each name, looked up alone, finds its own figures."""
    for key, bf16, fp16 in hardware.PEAK_FLOPS:
        assert hardware.peak_flops_for(key, torch.bfloat16) == (bf16 or 0.0), key
        assert hardware.peak_flops_for(key, torch.float16) == fp16, key


@pytest.mark.parametrize("device_type, name, cores, slug", [
    ("cuda", "NVIDIA H100 80GB HBM3", None, "h100-80gb-hbm3"),
    ("cuda", "NVIDIA H100 PCIe", None, "h100-pcie"),
    ("cuda", "NVIDIA A100-SXM4-80GB", None, "a100-sxm4-80gb"),
    ("cuda", "Tesla T4", None, "t4"),
    ("cuda", "Tesla V100-SXM2-16GB", None, "v100-sxm2-16gb"),
    ("cuda", "NVIDIA GeForce RTX 4090", None, "rtx-4090"),
    ("cuda", "NVIDIA RTX 6000 Ada Generation", None, "rtx-6000-ada-generation"),
    ("cuda", "AMD Instinct MI300X", None, "amd-instinct-mi300x"),
    ("mps", "Apple M2 Max", None, "apple-m2-max"),
    ("cpu", "AMD EPYC", 2, "cpu-amd-epyc-2c"),
    ("cpu", "AMD EPYC 7B13 64-Core Processor", 64, "cpu-amd-epyc-7b13-64c"),
    ("cpu", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", 8, "cpu-intel-xeon-platinum-8375c-8c"),
    ("cpu", "13th Gen Intel(R) Core(TM) i7-13700K", 24, "cpu-13th-gen-intel-core-i7-13700k-24c"),
    ("cpu", "Apple M3 Pro", 12, "cpu-apple-m3-pro-12c"),
    ("cpu", "  Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz\n", 4, "cpu-intel-core-i5-8250u-4c"),
    ("cpu", "", 4, "cpu-unknown-4c"),
    # too long: whole words go from the end; one word too long is cut
    ("cpu", "Neoverse-V1 with a very long model name that goes on and on", 64, "cpu-neoverse-v1-with-a-very-long-64c"),
    ("cuda", "X" * 50, None, "x" * 40),
])
def test_platform_slug(device_type, name, cores, slug):
    assert hardware.platform_slug(device_type, name, cores) == slug
    assert re.fullmatch(r"[a-z0-9.-]{1,40}", slug)


def test_platform_line_on_this_cpu():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = hardware.platform_name()
    assert name.startswith("cpu-") and name.endswith(f"-{cores}c") and re.fullmatch(r"[a-z0-9.-]{1,40}", name)


# ---------------------------------------------------------------------------
# The budget's clock and the load line
# ---------------------------------------------------------------------------

def test_cpu_budget_clock_is_the_main_threads_cpu_time(monkeypatch):
    """On a CPU the budget runs on the main thread's CPU time: time this thread spends not running (here asleep;
    in a run, descheduled by other processes' load) is not spent from the budget. On CUDA and MPS: wall time."""
    import time
    monkeypatch.setattr(hardware, "_START", (time.time() - 10.0, time.thread_time() - 10.0))  # ran all along
    before = hardware.budget_clock()
    time.sleep(0.3)
    assert hardware.budget_clock() - before < 0.05
    x, give_up = torch.randn(256, 256), time.time() + 30
    while hardware.budget_clock() - before < 0.2 and time.time() < give_up:  # computing spends it
        x @ x
    assert hardware.budget_clock() - before >= 0.2
    for device_type in ("cuda", "mps"):
        monkeypatch.setattr(hardware, "DEVICE_TYPE", device_type)
        assert abs(hardware.budget_clock() - time.time()) < 1.0


def test_cpu_budget_clock_runs_at_least_a_third_of_wall_time_on_a_very_busy_machine(monkeypatch):
    """A main thread that got under a third of the wall time (here: 100 s of wall since import, 10 s of CPU)
    spends the budget at a third of the wall time, so the run ends within 3x the budget instead of hours later."""
    import time
    monkeypatch.setattr(hardware, "_START", (time.time() - 100.0, time.thread_time() - 10.0))
    assert abs(hardware.budget_clock() - 100.0 / 3) < 0.5
    before = hardware.budget_clock()
    time.sleep(0.6)  # asleep, as when other processes hold the cores
    assert 0.15 <= hardware.budget_clock() - before <= 0.4  # a third of 0.6 s, give or take the scheduler
    monkeypatch.setattr(hardware, "_START", (time.time() - 100.0, time.thread_time() - 50.0))  # share 0.5
    assert abs(hardware.budget_clock() - 50.0) < 0.5  # CPU time leads: the floor does not apply


def test_load_report_gives_the_share_of_wall_time_and_the_load_average(monkeypatch):
    import time
    monkeypatch.setattr(hardware, "_START", (time.time() - 100.0, time.thread_time() - 25.0))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (3.04, 2.0, 1.0))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert hardware.load_report() == f"0.25 (share of the wall time the main thread ran; load average 3.0 on {cores} cores)"
