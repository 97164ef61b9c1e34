"""Bandwidth-oriented linear layer for CPU decode / draft-verify steps.

Why: a decode step multiplies every weight matrix by only M = 1..16 activation
rows, so its cost is the time to stream the weights from DRAM. torch's
`F.linear` (MKL / oneDNN) reaches well under half of the memory bandwidth for
these shapes on CPU, and gets *slower per byte* from M=1 to M=2..16. This
module provides `Linear`, a drop-in `torch.nn.Linear` whose `pack()` re-lays
the weight out in 16-feature panels for a small C++ kernel
(`skinny_gemm.cpp`, see "Build" below):

    fp32 : P[N/16][K][16]          P[p, k, j]    = W[16p + j, k]
    bf16 : P[N/16][K/2][16][2]     P[p, q, j, i] = W[16p + j, 2q + i]

(N = out_features padded to 16 with zero rows, bf16 K padded to even.) One
64-byte weight vector feeds M fused multiply-adds, each thread streams one
contiguous range, and for M > 16 each panel is re-used from cache for every
chunk of 16 rows. fp32 accumulates in fp32 (FMA); bf16 uses AVX512_BF16
`vdpbf16ps` (exact bf16 products, fp32 accumulation, result rounded to bf16
like torch). Up to M~8 the kernel runs near DRAM bandwidth; at M=16 it is
FMA-bound (16 FMAs per 64-byte weight vector), still ~2x F.linear.

Prefill (large M) also goes through the kernel: measured at M=16..512 on
SmolLM2 shapes it matches or beats MKL/oneDNN (fp32 up to 2x faster on the
LM head, bf16 within ~5%), whereas re-materialising the [out, in] weight
for torch costs a strided copy per call. So only one layout is ever kept.
The kernel has no backward: inputs that require grad go through F.linear.

Only the packed copy is kept in memory: after `pack()` the `weight`
parameter is an empty placeholder, `state_dict()` re-creates the standard
[out, in] weight via a hook, `load_state_dict()` unpacks/re-packs, and
assigning `layer.weight.data = W` re-packs on the next forward. Use
`unpacked_weight()` to get the [out, in] tensor and `weight_rows(ids)` to
read rows (e.g. a tied embedding) without unpacking.

Build: `pip install` / `pip wheel` compile skinny_gemm.cpp into the package as
`mtpspec.kernels._skinny_gemm` (setup.py, a torch `CppExtension`), which is
what runs. Without it (a source checkout never installed; or, in a checkout,
a skinny_gemm.cpp newer than its in-place build) the source is compiled at run
time with `torch.utils.cpp_extension` into $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions)/mtpspec/, once per source version, without a lock
a killed build could leave behind (`_jit_build`). `MTPSPEC_KERNELS=jit`
skips the prebuilt extension, `MTPSPEC_KERNELS=torch` skips the extension.
`kernel_info()` says which path runs.

Fallbacks: CUDA tensors, dtypes other than fp32/bf16, CPUs without AVX2, no
usable build (one warning via `logging`, with the reason) or
`MTPSPEC_KERNELS=torch` all use plain `F.linear` on the standard layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..processes import pid_alive

__all__ = ["Linear", "kernel_info"]

log = logging.getLogger(__name__)

PANEL = 16
_SUPPORTED = (torch.float32, torch.bfloat16)

# Compile flags, shared with setup.py (which adds -g0 against Python's own -g). No -march: the
# translation unit targets baseline x86-64 and only the kernels carry target("avx2,fma") /
# target("avx512f,...") attributes, chosen at run time (ext.isa(); ext.force_isa() lowers it for
# tests), so one build runs on every x86-64 CPU.
CXX_FLAGS = ["-O3", "-fopenmp"]  # -fopenmp only for at::parallel_for's pragma; libgomp.so.1
LD_FLAGS = ["-fopenmp"]          # resolves to the copy torch already loaded (one thread pool)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skinny_gemm.cpp")
EXTRA_SOURCES = ("quant_gemm.cpp", "attention.cpp", "quant_block.cpp")  # compiled into the same extension, next to SOURCE


def _sources(source: str) -> list[str]:
    """The C++ files of the extension whose main file is `source`: it and the EXTRA_SOURCES beside it."""
    extra = [os.path.join(os.path.dirname(source), f) for f in EXTRA_SOURCES]
    return [source] + [f for f in extra if os.path.exists(f)]
PREBUILT = "mtpspec.kernels._skinny_gemm"  # built by setup.py at install / wheel-build time
JIT_NAME = "mtpspec_skinny_gemm"
# the one warning of a missing / failed build: what it costs (python -m mtpspec.kernels.bench_linear,
# weight-streaming GB/s of F.linear vs the kernels on our 2-core CPU: 1.2-1.6x at M=1, 3x at M=5)
SLOWER = ("CPU decoding runs slower (F.linear streams the weights ~1.5x slower for one token per step "
          "and ~3x slower for speculative decoding's verify steps)")

_lock = threading.Lock()
_state: dict = {"ext": None, "tried": False, "error": None, "compile_s": None, "build": None, "file": None}


def _mode() -> str:
    """MTPSPEC_KERNELS: "torch" (never the extension), "jit" (skip the prebuilt one: compile the
    current source), anything else = auto (the prebuilt extension, else a JIT build)."""
    return os.environ.get("MTPSPEC_KERNELS", "").strip().lower()


def _forced_torch() -> bool:
    return _mode() == "torch"


def _prebuilt():
    """(module, None) or (None, why it cannot be used)."""
    import importlib.util

    spec = importlib.util.find_spec(PREBUILT)
    if spec is None or not spec.origin:
        return None, ("no prebuilt extension (this copy of mtpspec was not installed with pip, or its build "
                      "step was skipped)")
    # in a source checkout (the .cpp sits next to the .so: `pip install -e .`; wheels carry no .cpp),
    # an edited or pulled skinny_gemm.cpp makes the in-place build stale: compile the current source
    newest = max((os.path.getmtime(f) for f in _sources(SOURCE) if os.path.exists(f)), default=None)
    if newest is not None and os.path.exists(SOURCE) and newest > os.path.getmtime(spec.origin):
        return None, (f"the prebuilt {os.path.basename(spec.origin)} is older than skinny_gemm.cpp / quant_gemm.cpp "
                      "(re-run `bash setup.sh` or `pip install --no-build-isolation -e .` to rebuild it)")
    try:
        return importlib.import_module(PREBUILT), None
    except ImportError as e:  # e.g. built against another torch
        return None, f"the prebuilt extension does not load ({type(e).__name__}: {e})"


def _import_file(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _jit_build(source: str = SOURCE, name: str = JIT_NAME):
    """Compile `source` (skinny_gemm.cpp) into the module `name` with torch.utils.cpp_extension,
    for a source checkout that was never installed or a stale in-place build. Returns (module, file).

    Never waits on a lock, so a build killed half-way (Ctrl-C, kill -9, a closed terminal) cannot
    hang a later run (torch's own JIT lock file, left behind by a killed build, made every later run
    wait forever). Each build runs in a private directory `build-<host>-<pid>-*`; the finished
    library is published under a name keyed by the source, flags and versions with an atomic
    rename, and later runs load that file. Two processes building at once both compile and publish
    identical files. Private directories of dead processes are deleted by the next build."""
    import hashlib
    import platform
    import shutil
    import socket
    import sys
    import tempfile

    from torch.utils import cpp_extension

    root = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(), "mtpspec")
    h = hashlib.sha256()
    sources = _sources(source)
    for src in sources:
        with open(src, "rb") as f:
            h.update(f.read())
    h.update(repr((CXX_FLAGS, LD_FLAGS, torch.__version__, sys.version, platform.machine())).encode())
    final = os.path.join(root, f"{name}-{h.hexdigest()[:16]}.so")
    if os.path.exists(final):
        try:
            return _import_file(final, name), final
        except ImportError as e:  # unloadable (should not happen: published by rename): rebuild
            log.info("mtpspec.kernels: cached JIT build %s does not load (%s); rebuilding", final, e)
    os.makedirs(root, exist_ok=True)
    host = socket.gethostname()
    for d in os.listdir(root):  # private build dirs of dead processes on this host
        parts = d.split("-")
        if (d.startswith(f"build-{host}-") and len(parts) >= 4 and parts[-2].isdigit()
                and not pid_alive(int(parts[-2]))):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    log.info("mtpspec.kernels: compiling the C++ kernels (once, about a minute) into %s", root)
    tmp = tempfile.mkdtemp(prefix=f"build-{host}-{os.getpid()}-", dir=root)
    try:
        ext = cpp_extension.load(name=name, sources=sources, extra_cflags=CXX_FLAGS,
                                 extra_ldflags=LD_FLAGS, build_directory=tmp, verbose=False)
        if ext.__name__ != name:  # a second build in one process: torch renamed it name_v1
            return ext, ext.__file__
        os.replace(ext.__file__, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ext, final


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def _ext():
    """The compiled extension, or None (forced torch path, or no usable build: one warning)."""
    if _forced_torch():
        return None
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if not _state["tried"]:
            t0 = time.perf_counter()
            ext = why_prebuilt = None
            if _mode() != "jit":
                ext, why_prebuilt = _prebuilt()
                if ext is not None:
                    _state["build"], _state["file"] = "prebuilt", ext.__file__
            try:
                if ext is None:
                    if not os.path.exists(SOURCE):
                        raise FileNotFoundError(f"no C++ source to compile ({SOURCE})")
                    if why_prebuilt:
                        log.info("mtpspec.kernels: %s; compiling skinny_gemm.cpp instead", why_prebuilt)
                    ext, _state["file"] = _jit_build(SOURCE)
                    _state["build"] = "jit"
            except Exception as e:  # noqa: BLE001 - any failure => torch path
                ext = None
                _state["build"] = None
                _state["error"] = "; ".join(x for x in (why_prebuilt, f"JIT build: {_short(e)}") if x)
                log.warning("mtpspec.kernels: C++ kernels unavailable, using torch's F.linear: %s (%s). Install "
                            "mtpspec with its build step: `pip install torch==2.13.0` then "
                            "`pip install --no-build-isolation mtpspec` (or `bash setup.sh` in a clone)",
                            SLOWER, _state["error"])
            if ext is not None and ext.isa() == "none":
                _state["build"] = None
                _state["error"] = "this CPU has neither AVX-512 nor AVX2+FMA"
                log.warning("mtpspec.kernels: C++ kernels unavailable, using torch's F.linear: %s (%s)",
                            SLOWER, _state["error"])
                ext = None
            _state["ext"] = ext
            _state["compile_s"] = round(time.perf_counter() - t0, 2)
            _state["tried"] = True
    return _state["ext"]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512_BF16 or AMX-BF16). Without, torch's
    CPU bfloat16 matmuls fall back to slow paths: bfloat16 autocast trained ~18x slower than
    float32 on an AVX2-only EPYC. Assumed True where /proc/cpuinfo cannot tell."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------- bulk mode
BULK_MIN_ROWS = 32  # fewer rows per call: the weight-streaming kernels stay faster
_bulk: dict | None = None  # while bulk_matmuls() is active: module -> its dense bfloat16 weight


@contextlib.contextmanager
def bulk_matmuls(enabled: bool | None = None):
    """Within this context, linear layers (`Linear`, `quant.QuantLinear`) given at least
    BULK_MIN_ROWS rows multiply with torch's bfloat16 GEMM (oneDNN: AMX tiles or AVX512_BF16) on a
    dense bfloat16 copy of their weight, made once per layer per context, the decoder runs its
    blocks op by op (no fused C++ stack) and the caches it makes hold bfloat16 K/V (half the bytes
    attention reads over many rows' caches: answers 1.07-1.13x faster). For bulk work that feeds
    training, not decoding:
    drafter-training harvests and self-distillation (train/harvest.py). Measured on a 2-core AMX
    Xeon: 300-590 GMAC/s at 64-2048 rows against 100-150 for our int8-activation kernels, which
    stream each weight once for 1-16 rows and win there. Results differ from decoding's by bf16
    rounding (a near-tie argmax may flip), which is why decoding, verification and evaluation
    never run in this mode: their outputs must not depend on how many rows a step has.

    enabled: None (default) = when this CPU computes bfloat16 natively (`cpu_has_bf16`); without,
    bfloat16 GEMMs are far slower than the kernels and the context changes nothing."""
    global _bulk
    if enabled is None:
        enabled = cpu_has_bf16()
    if not enabled or _bulk is not None:
        yield
        return
    _bulk = {}
    try:
        yield
    finally:
        _bulk = None


def bulk_active() -> bool:
    """Whether a `bulk_matmuls()` context is active (the decoder then skips its fused stack)."""
    return _bulk is not None


def bulk_linear(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """module(x) through the bulk path (see `bulk_matmuls`), or None when it does not apply (no
    active context, too few rows, not a CPU tensor, autograd)."""
    if (_bulk is None or x.device.type != "cpu" or x.numel() < BULK_MIN_ROWS * x.shape[-1]
            or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    w = _bulk.get(module)
    if w is None:
        w = _bulk[module] = module.unpacked_weight().detach().to(torch.bfloat16).contiguous()
    y = F.linear(x.to(torch.bfloat16), w, None if bias is None else bias.to(torch.bfloat16))
    return y.to(x.dtype)


def kernel_info() -> dict:
    """Which path `Linear` uses (loads or builds the extension if not done yet): path "cpp" with
    build "prebuilt" (compiled at install time) or "jit" (compiled at run time), the ISA and the
    library file; or path "torch" with the reason."""
    ext = _ext()
    info = {
        "path": "cpp" if ext is not None else "torch",
        "threads": torch.get_num_threads(),
        "load_s": _state["compile_s"],
    }
    if ext is not None:
        info["isa"] = ext.isa()
        info["build"] = _state["build"]
        info["file"] = _state["file"]
    elif _forced_torch():
        info["reason"] = "MTPSPEC_KERNELS=torch"
    elif _state["error"]:
        info["reason"] = _state["error"]
    return info


# ----------------------------------------------------------------- layouts
def _no_grad_needed(*tensors: torch.Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0,
             fp32: bool = False) -> torch.Tensor | None:
    """The extension's RMS norm (fp32 maths) for a bf16 CPU tensor without autograd, else None
    (the caller then uses torch). fp32 tensors only with fp32=True: target models keep torch's own
    norm, which the reference matches bitwise; a drafter's norms (~10 us less each) need not."""
    ext = _state["ext"]
    if (ext is None or x.device.type != "cpu" or not _no_grad_needed(x, weight)
            or not (x.dtype == torch.bfloat16 or (fp32 and x.dtype == torch.float32))):
        return None
    w = None if weight is None else weight.detach().float().contiguous()
    return ext.rms_norm(x.contiguous(), w, float(eps), float(offset))


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor | None:
    """Attention whose output for a query does not depend on the step's other queries or rows
    (attention.cpp): q [B, H, T, D], k / v [B, KVH, L, D], additive mask [B, 1, T, L] or None; fp32
    CPU tensors (k / v: fp32 or both bfloat16) without autograd. None when it cannot run (the
    caller uses torch's SDPA)."""
    ext = _ext()
    if (ext is None or q.device.type != "cpu" or q.dtype != torch.float32 or q.shape[-1] % 8
            or k.dtype != v.dtype or k.dtype not in (torch.float32, torch.bfloat16)
            or not _no_grad_needed(q, k, v) or (mask is not None and mask.dtype != torch.float32)):
        return None
    return ext.attend_rows(q, k, v, mask, float(scale))


def cluster_scores(weight: torch.Tensor, s: torch.Tensor, top: torch.Tensor) -> torch.Tensor | None:
    """Clustered-head logits [B, k * P] of the chosen clusters `top` [B, k] for drafter states
    s [B, H], from the cluster-major LM weight viewed [C, P, H]: one C++ call (threads split the
    clusters) instead of B * k matrix-vector products. None when the extension cannot run it
    (no extension, not CPU, dtype other than fp32/bf16, autograd); the caller then uses torch."""
    ext = _ext()
    if (ext is None or s.device.type != "cpu" or weight.dtype not in _SUPPORTED or s.dtype != weight.dtype
            or not _no_grad_needed(weight, s)):
        return None
    return ext.cluster_scores(weight, s, top)


def drafter_layer(h: torch.Tensor, packed: list[torch.Tensor], norm_weights: list[torch.Tensor], eps: float,
                  k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                  layer_scalar: float, gelu: bool, qmeta: list[list[int]] | None = None) -> torch.Tensor | None:
    """One MTP-drafter layer in one C++ call (skinny_gemm.cpp, `drafter_layer`): h [N, H] (fp32 or
    bf16, weights packed in that dtype: q, o, gate, up, down), fp32 norm weights (input, q,
    post-attention, pre-feedforward, post-feedforward), the target's fp32 K/V [R, KVH, L, HD] that
    every row sees in full, and fp32 RoPE tables [R, rotary_dim] at the rows' positions. With
    `qmeta` ([out, in, bits, block, scale mode] per weight) the five weights are quantized
    (`QuantLinear.packed`, kernels/quant.py) instead. None when the extension cannot run it (the
    caller then runs the torch modules)."""
    ext = _state["ext"]
    if ext is None or h.device.type != "cpu" or not _no_grad_needed(h):
        return None
    return ext.drafter_layer(h.contiguous(), packed, norm_weights, float(eps), k, v, cos, sin, int(n_heads),
                             float(layer_scalar), bool(gelu), qmeta or [])


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> panel layout described in the module docstring."""
    n, k = w.shape
    n16 = -(-n // PANEL) * PANEL
    if w.dtype == torch.bfloat16:
        k2 = k + (k % 2)
        wp = w.new_zeros(n16, k2)
        wp[:n, :k] = w
        return wp.view(n16 // PANEL, PANEL, k2 // 2, 2).permute(0, 2, 1, 3).contiguous()
    wp = w.new_zeros(n16, k)
    wp[:n] = w
    return wp.view(n16 // PANEL, PANEL, k).transpose(1, 2).contiguous()


def unpack_weight(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `pack_weight` (format read from p.dim(), any dtype)."""
    if p.dim() == 4:  # bf16 format [P, K/2, 16, 2]
        w = p.permute(0, 2, 1, 3).reshape(p.shape[0] * PANEL, -1)
    else:  # fp32 format [P, K, 16]
        w = p.transpose(1, 2).reshape(p.shape[0] * PANEL, -1)
    return w[:n, :k].contiguous()


class Linear(nn.Module):
    """Drop-in `torch.nn.Linear` with a packed fast path for small-M on CPU.

    Call `pack()` once after loading weights and after any `.to()`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = ref.weight
        self.bias = ref.bias
        self._packed: Optional[torch.Tensor] = None
        self._reload_repack = False
        self.register_state_dict_post_hook(Linear._sd_hook)
        self.register_load_state_dict_pre_hook(Linear._load_pre_hook)
        self.register_load_state_dict_post_hook(Linear._load_post_hook)

    # ------------------------------------------------------------ packing
    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    def pack(self) -> "Linear":
        """Re-layout the weight for the C++ kernel (no-op if it can't be used)."""
        if self.is_packed:
            self.unpack()
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in _SUPPORTED or _ext() is None:
            return self
        packed = pack_weight(w.detach())
        self._packed = packed
        # Drop the [out, in] copy; keep an empty Parameter so `weight` exists.
        self.weight = nn.Parameter(w.new_empty(0), requires_grad=False)
        return self

    def unpack(self) -> "Linear":
        """Restore the standard [out, in] `weight` parameter."""
        if self.is_packed:
            if self.weight.numel() == 0:  # otherwise weight was re-assigned: keep it
                self.weight = nn.Parameter(self.unpacked_weight(), requires_grad=False)
            self._packed = None
        return self

    def unpacked_weight(self) -> torch.Tensor:
        """The [out, in] weight (a fresh tensor if packed)."""
        if self.is_packed and self.weight.numel() == 0:
            return unpack_weight(self._packed, self.out_features, self.in_features)
        return self.weight

    def weight_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`unpacked_weight()[ids]` without unpacking (for tied embeddings)."""
        if not (self.is_packed and self.weight.numel() == 0):
            return F.embedding(ids, self.weight)
        # the extension copies each row out of its panel (packing implies a CPU tensor and a built
        # extension): one strided copy per row instead of gathering whole panels or elements
        rows = _ext().panel_rows(self._packed, ids.reshape(-1), self.out_features)
        return rows[:, : self.in_features].reshape(*ids.shape, self.in_features)

    # ------------------------------------------------------ state dict hooks
    @staticmethod
    def _sd_hook(module, state_dict, prefix, local_metadata):
        if module.is_packed:
            state_dict[prefix + "weight"] = module.unpacked_weight().detach()

    @staticmethod
    def _load_pre_hook(module, state_dict, prefix, *args):
        if module.is_packed:
            module.unpack()
            module._reload_repack = True

    @staticmethod
    def _load_post_hook(module, incompatible_keys):
        if module._reload_repack:
            module._reload_repack = False
            module.pack()

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() would corrupt the packed layout's meaning
        # (and bias/dtype coupling), so go back to [out, in] first.
        was_packed = self.is_packed
        self.unpack()
        out = super()._apply(fn, recurse)
        if was_packed:
            self.pack()
        return out

    # ------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_packed and self.weight.numel() != 0:
            self.pack()  # `weight` was re-assigned after pack()
        if (not self.is_packed or x.dtype != self._packed.dtype or x.device.type != "cpu"
                or (x.requires_grad and torch.is_grad_enabled())):  # kernel has no backward
            return F.linear(x, self.unpacked_weight(), self.bias)
        if _bulk is not None and (y := bulk_linear(self, x, self.bias)) is not None:
            return y
        ext = _state["ext"]  # packed => built (MTPSPEC_KERNELS is read when packing, not per call)
        if ext is None:
            return F.linear(x, self.unpacked_weight(), self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self._packed.dim() == 4 and self.in_features % 2:
            x2 = F.pad(x2, (0, 1))  # bf16 kernel reads (x[2q], x[2q+1]) pairs
        if x2.stride(-1) != 1 or x2.stride(0) % 2 or x2.data_ptr() % 4:
            x2 = x2.contiguous()
        bias = self.bias.detach() if self.bias is not None else None
        y = ext.skinny_linear(x2.detach(), self._packed, bias, self.out_features)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self.is_packed}")
