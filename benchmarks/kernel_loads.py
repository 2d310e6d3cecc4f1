"""How wide the attention candidates' global loads are, compiled for an H100 / H200 (sm_90) on any machine.

    python benchmarks/kernel_loads.py --out benchmarks/results/kernel_loads_sm90.json

No GPU needed: Triton compiles each kernel of ``short_attention.py`` for ``sm_90`` from its source, and
this counts the global loads of the PTX by width (``ld.global`` into registers, ``cp.async`` into shared
memory, where Triton pipelines a loop), and reads registers and spills from Triton's bundled ``ptxas -v``
and shared memory from the compiled kernel: how many programs an SM can hold. Each candidate is compiled at DC-DiT-XL's
head dim (72) and at 64, with the head-start hint (``HEAD_ALIGN``, from ``head_alignment``: 8 at 72) and
without it (1), for the fused ``(B, L, 3, H, dh)`` projection the model hands to attention at 160 tokens.

Triton proves a pointer 16-byte aligned only from integer arguments divisible by 16. A head starts at
``h * dh`` elements, and at ``dh = 72`` no argument says that is a multiple of 8. Without the hint every
load is one bf16 wide (``ld.global.b16``); with it, loads are 16 bytes (``ld.global.v4.b32``). Session 13's
candidate ran without the hint, which may be why it lost to cuDNN (docs/performance-log.md, session 18).

Each row also counts the products, barriers, layout conversions and shared buffers of the kernel's code
(``instructions``). ``--tokens 208`` shows what the tails candidate's one tile of 16 keys costs on top of
the library's kernel: a step outside the pipelined loop, with its own products, barriers and conversions
(session 20).
"""

import argparse
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import short_attention as sa
from step_speed import save_result

POINTERS = ("Q", "K", "V", "O")


def strides(tokens: int, heads: int, head_dim: int) -> dict[str, int]:
    """The kernels' integer arguments for q, k, v as views of a fused ``(B, L, 3, H, dh)`` projection and
    a contiguous ``(B, L, H, dh)`` output."""
    row, out_row = 3 * heads * head_dim, heads * head_dim
    args = {"H": heads, "L_Q": tokens, "L_K": tokens}
    for t in "qkv":
        args |= {f"s_{t}b": tokens * row, f"s_{t}l": row, f"s_{t}h": head_dim}
    return args | {"s_ob": tokens * out_row, "s_ol": out_row, "s_oh": head_dim}


def compile_sm90(fn, constexprs: dict, ints: dict[str, int], num_warps: int, num_stages: int, scale_type="fp32"):
    """``fn`` compiled for sm_90 from its source, integer arguments specialised as Triton's launcher would
    (divisible by 16 or not). ``scale_type="fp64"`` types the logit scale as inductor does a Python float."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else "*bf16" if n in POINTERS else
                 scale_type if n == "scale_log2e" else "i32" for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in POINTERS or (n in ints and ints[n] % 16 == 0)}
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def global_loads(fn, constexprs: dict, ints: dict[str, int], num_warps: int, num_stages: int) -> dict[str, int]:
    """Global load instructions by width in ``fn``'s PTX for sm_90 (:func:`compile_sm90`)."""
    return _loads(compile_sm90(fn, constexprs, ints, num_warps, num_stages).asm["ptx"])


def _loads(ptx: str) -> dict[str, int]:
    loads = Counter(re.findall(r"ld\.global[\w.]*", ptx))  # into registers
    loads.update(f"cp.async {int(size, 16)} B" for size in  # into shared memory (pipelined loops)
                 re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+)", ptx))
    return dict(loads)


def resources(kernel) -> dict[str, int | None]:
    """Registers per thread and spilled bytes (from Triton's bundled ``ptxas -v`` on the kernel's PTX), and
    shared memory per program: what bounds how many programs an SM holds."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None,
            "shared_bytes": kernel.metadata.shared}


def instructions(kernel) -> dict[str, int]:
    """What a kernel's sm_90 code spends beyond its loads: Hopper products (``wgmma``), Ampere products
    (``mma.sync``), barriers (PTX), and layout conversions and shared-memory buffers (Triton's TTGIR)."""
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "mma.sync": len(re.findall(r"mma\.sync", ptx)),
            "barriers": len(re.findall(r"bar\.sync|barrier", ptx)), "layout conversions": ttgir.count("convert_layout"),
            "shared buffers": ttgir.count("local_alloc")}


def candidates(tokens: int, head_dim: int, align: int) -> dict[str, tuple]:
    """Each candidate kernel with its constexprs and launch shape, as ``short_attention.py`` runs it."""
    da, db = sa.split_head_dim(head_dim)
    ka, kb, kc, kd = sa.key_chunks(tokens)
    tiles = sa.AttentionTiles()
    key_blocks = dict(D=head_dim, DA=da, DB=db, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HEAD_ALIGN=align)
    return {
        "session 13 (key blocks, running max; 128x64 w4 s2)": (
            sa._attention_kernel, dict(D=head_dim, DA=da, DB=db, BLOCK_M=128, BLOCK_N=64, EVEN_N=tokens % 64 == 0,
                             HEAD_ALIGN=align), 4, 2),
        "the library's (key blocks; 64x64 w4 s3)": (
            sa._attention_kernel, key_blocks | dict(EVEN_N=tokens % tiles.block_n == 0), 4, 3),
        "tails (the library's tiles, then one tail tile of keys)": (
            sa._attn_tails, key_blocks | dict(TAIL_N=sa.tail_tile(tokens, tiles.block_n)), 4, 3),
        **{f"whole head{', values split' if split else ''} (64 rows, 1 program, w4 s{stages})": (
            sa._attn_whole_head, dict(D=head_dim, DA=da, DB=db, BLOCK_M=64, KA=ka, KB=kb, KC=kc, KD=kd, GRID_M=1,
                                      SPLIT_V=split, HEAD_ALIGN=align), 4, stages)
           for split in (False, True) for stages in (2, 1)},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[72, 64])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for head_dim in args.head_dims:
        hint = sa.head_alignment(head_dim)  # every head stride is dh in these layouts
        for align in dict.fromkeys((1, hint)):
            for name, (fn, constexprs, warps, stages) in candidates(args.tokens, head_dim, align).items():
                kernel = compile_sm90(fn, constexprs, strides(args.tokens, args.heads, head_dim), warps, stages)
                rows.append({"kernel": name, "head_dim": head_dim, "head_align": align,
                             "loads": _loads(kernel.asm["ptx"]), **resources(kernel),
                             "instructions": instructions(kernel)})
                print(f"dh={head_dim} HEAD_ALIGN={align:<2} {name}: {rows[-1]}", flush=True)
    print(f"\n{'kernel':<52}{'dh':>4}{'hint':>6}{'regs':>6}{'spill B':>9}{'smem KiB':>10}  global loads by width")
    for r in rows:
        print(f"{r['kernel']:<52}{r['head_dim']:>4}{r['head_align']:>6}{r['registers'] or '-':>6}"
              f"{r['spill_bytes'] if r['spill_bytes'] is not None else '-':>9}{r['shared_bytes'] / 1024:>10.1f}  "
              + ", ".join(f"{n} x {k}" for k, n in sorted(r["loads"].items())))
    return save_result(args.out, f"none (PTX for sm_90, Triton {triton.__version__})", tokens=args.tokens,
                       heads=args.heads, rows=rows)


if __name__ == "__main__":
    main()
